"""The SGLD minibatch size when ``SGLDConfig.batch_size="auto"``: large enough that minibatch noise stays small.

An SGLD step is w ← w - ε·(nβ·ĝ_B + γ·(w - w*) + nβλ·w) + √(2ε)·ξ. The Gaussian ξ is the noise the
posterior needs; the minibatch gradient ĝ_B of m examples drawn (with replacement, as the sampler
draws them) from the n SGLD examples adds more, with covariance ε²·nβ²·C/m per step, C the covariance
of the per-example gradients (:mod:`lightning_bif.curvature.gradient_noise`). Against the injected
2ε·I, along a unit direction v,

    r(m) = ε·nβ²·vᵀCv / (2m),   and 0 for the full batch.

Where r is not small the chains sample a wider distribution than the posterior along v (the
stationary covariance grows by about a factor 1 + r there), and the BIF is that of the wrong
distribution. The rule takes v as the stiffest direction of the Hessian (the Lanczos Ritz vector
of λ_max, measured anyway for ε), where the per-example gradients of a fitted model spread most,
and chooses the smallest m (at least ``SMALLEST_MINIBATCH``) with r(m) ≤ ``GRADIENT_NOISE_RATIO``:

    m = ε·nβ²·vᵀCv / (2·GRADIENT_NOISE_RATIO);

m ≥ n is the full batch. With ε = 1/(nβ·λ_max + γ) and nβ = n, r(m) is about n·vᵀCv/(2m·λ_max): on
a few hundred examples and m = 64, noise several times the posterior's own. The cost is capped
(:func:`largest_minibatch`): m is at most the tracked examples' count N + P (a step's gradient then costs
about three draws' evaluations), except that all n SGLD examples may be used where n ≤
``FULL_BATCH_FACTOR``·(N + P); where the cap binds the record says which r was reached. Why 0.1 and
where it was chosen: docs/self-tuning.md, "The inverse temperature and the minibatch".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The largest minibatch-to-injected noise ratio r along the stiffest direction (chosen on `midtrain`).
GRADIENT_NOISE_RATIO = 0.1
# The least minibatch the rule chooses (the fixed default before it).
SMALLEST_MINIBATCH = 64
# The full batch is affordable where the SGLD data are at most this many times the tracked examples (the four
# minibatches' worth of examples the curvature is measured on).
FULL_BATCH_FACTOR = 4


@dataclass(frozen=True)
class MinibatchChoice:
    """The minibatch size chosen for a snapshot and why.

    Attributes:
        batch_size: m, or ``None`` for the full batch.
        noise_ratio: r at that m (0 for the full batch).
        reason: A sentence for the tuning record.
    """

    batch_size: int | None
    noise_ratio: float
    reason: str


def largest_minibatch(tracked: int, examples: int) -> int:
    """The cost cap on m: all ``examples`` where they are at most ``FULL_BATCH_FACTOR`` times the tracked count
    N + P (at least ``SMALLEST_MINIBATCH``), else that count."""
    cap = max(tracked, SMALLEST_MINIBATCH)
    return examples if examples <= FULL_BATCH_FACTOR * cap else cap


def gradient_noise_ratio(step_size: float, nbeta: float, variance: float, minibatch: int, examples: int) -> float:
    """r(m) = ε·nβ²·vᵀCv/(2m) for m examples drawn with replacement (0 for the full batch, m ≥ n)."""
    if minibatch >= examples:
        return 0.0
    return step_size * nbeta**2 * variance / (2.0 * minibatch)


def choose_minibatch(step_size: float, nbeta: float, variance: float, examples: int, largest: int,
                     ratio: float | None = None) -> MinibatchChoice:
    """The smallest m ≥ ``SMALLEST_MINIBATCH`` with r(m) ≤ ``ratio``, at most ``max(largest, SMALLEST_MINIBATCH)``.

    Args:
        step_size: ε (before any preconditioner: the stiffest direction keeps it).
        nbeta: nβ.
        variance: vᵀCv along the stiffest direction.
        examples: n, the SGLD examples.
        largest: The cost cap on m (:func:`largest_minibatch`).
        ratio: The target r; ``None``: ``GRADIENT_NOISE_RATIO`` (read at call time, so a sweep can set it).

    Returns:
        :class:`MinibatchChoice`; ``batch_size=None`` when the choice covers all n examples.
    """
    target = GRADIENT_NOISE_RATIO if ratio is None else ratio
    scale = step_size * nbeta**2 * max(variance, 0.0) / 2.0
    need = 1 if scale <= 0 else math.ceil(scale / target - 1e-9)
    cap = max(largest, SMALLEST_MINIBATCH)
    size = min(max(need, SMALLEST_MINIBATCH), cap)
    size_text = "the full batch" if size >= examples else f"m = {size}"
    reached = gradient_noise_ratio(step_size, nbeta, variance, size, examples)
    evidence = (f"minibatch noise r(m) = ε·nβ²·vᵀCv/(2m) along the stiffest direction (vᵀCv = {variance:.4g}, "
                f"n = {examples}): r ≤ {target:g} needs m ≥ {need}")
    if need > cap and cap < examples:
        reason = (f"{evidence}; capped at {size_text} (the tracked examples' count N + P: a step costs about three "
                  f"draws' evaluations): r = {reached:.3g} there")
    else:
        reason = f"{evidence}: {size_text} (r = {reached:.3g})"
    return MinibatchChoice(None if size >= examples else size, reached, reason)
