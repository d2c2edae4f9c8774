"""nβ when ``SGLDConfig.nbeta`` is ``None``: the data's own nβ = n, raised until the posterior is local.

The BIF estimates the linear response that retraining and continued training follow to first order
only where the tracked losses are close to linear across the posterior. The posterior's width
scales as 1/√nβ at a fixed damping γ/nβ, and with it the losses' nonlinearity Q (the even part of
antithetic loss changes relative to the odd part, :mod:`lightning_bif.estimation.nonlinearity`)
falls as 1/nβ. The rule measures Q at nβ = n and, where it exceeds ``NONLINEARITY_LIMIT``, raises nβ
by Q/``NONLINEARITY_LIMIT``:

    nβ = n·max(1, Q(n)/NONLINEARITY_LIMIT).

γ and ε follow nβ as their own rules say (γ/nβ and ε·nβ stay as they were); a minibatch chosen by
``batch_size="auto"`` grows with it (its noise grows as ε·nβ²). The BIF then estimates the same
linear response with less bias, and its values scale as 1/nβ (the log records nβ per snapshot).
The rule runs where the top eigenpairs are measured (the low-rank preconditioner or the control
variates), and only when nβ, γ and ε are all automatic; otherwise nβ = n. Why 0.03 and where it was
chosen: docs/self-tuning.md, "The inverse temperature".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Q, the tracked losses' nonlinear-to-linear fluctuation across the posterior, that nβ is raised to meet.
NONLINEARITY_LIMIT = 0.03


@dataclass(frozen=True)
class LocalityChoice:
    """nβ chosen for a snapshot and why.

    Attributes:
        nbeta: nβ.
        nonlinearity: Q measured at the data's nβ.
        reason: A sentence for the tuning record.
    """

    nbeta: float
    nonlinearity: float
    reason: str


def choose_nbeta(data_nbeta: float, nonlinearity: float, limit: float | None = None,
                 noise_room: float = math.inf) -> LocalityChoice:
    """nβ = n·max(1, min(Q/limit, noise_room)) (``limit``: ``NONLINEARITY_LIMIT``, read at call time).

    Args:
        data_nbeta: n, the SGLD examples (β = 1).
        nonlinearity: Q measured at nβ = n.
        limit: The largest Q allowed.
        noise_room: How many times nβ may grow before the largest affordable minibatch's gradient noise reaches
            its target (:mod:`lightning_bif.tuning.minibatch`; r ∝ nβ): infinite with the full batch.

    Example:
        >>> choose_nbeta(500.0, 2.0, limit=0.1).nbeta
        10000.0
        >>> choose_nbeta(500.0, 0.05, limit=0.1).nbeta
        500.0
    """
    limit = NONLINEARITY_LIMIT if limit is None else limit
    wanted = nonlinearity / limit if math.isfinite(nonlinearity) else 1.0  # no linear part: keep n
    factor = max(1.0, min(wanted, noise_room))
    nbeta = data_nbeta * factor
    evidence = (f"the tracked losses' nonlinearity across the posterior at nβ = n = {data_nbeta:.6g} is Q = "
                f"{nonlinearity:.3g} (even/odd parts of antithetic loss changes; Q ∝ 1/nβ)")
    if wanted <= 1.0:
        return LocalityChoice(nbeta, nonlinearity, f"{evidence}, within {limit:g}: nβ = n")
    if noise_room <= 1.0:
        return LocalityChoice(nbeta, nonlinearity, (
            f"{evidence}, above {limit:g}, but with the largest affordable minibatch the gradient noise is already "
            f"{1 / noise_room:.3g}× its target at nβ = n, and it grows with nβ: nβ = n"))
    if noise_room < wanted:
        return LocalityChoice(nbeta, nonlinearity, (
            f"{evidence}, above {limit:g}, but the largest affordable minibatch's gradient noise allows nβ to grow "
            f"only {noise_room:.3g}×: nβ = {nbeta:.4g} (Q ≈ {nonlinearity / factor:.3g} there)"))
    return LocalityChoice(nbeta, nonlinearity, f"{evidence}, above {limit:g}: nβ = n·Q/{limit:g} = {nbeta:.4g}")
