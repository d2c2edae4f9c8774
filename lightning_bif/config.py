"""Configuration of one BIF estimate: the SGLD sampler and the evaluation of tracked losses."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

Preconditioner = Literal["none", "rmsprop", "lowrank"]
Autocast = Literal["bf16", "fp16"]


def _is_int(value: Any) -> bool:
    """An integer, and not a bool (``chains=True`` is a mistake, not one chain)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A real, finite number (rejects NaN and inf, which compare False with everything)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# Split-half reliability below which a snapshot's single entries are mostly noise: it has lost more than a fifth
# of its LDS (LDS ∝ √(2r/(1 + r)), measured on the LDS suite's development set-up; docs/self-tuning.md).
MIN_SPLIT_HALF = 0.5


@dataclass(frozen=True)
class SGLDConfig:
    """Hyperparameters of the localized SGLD chains behind a BIF estimate.

    The chains sample the localized, tempered posterior

        p(w) ∝ exp(-nβ·L(w) - nβ·λ/2·||w||² - γ/2·||w - w*||²)

    from the current weights w*, with the update

        w ← w - ε/2 · G ⊙ [nβ·∇L_batch(w) + nβ·λ·w + γ·(w - w*)] + √(ε·G) ⊙ N(0, I)

    where G is 1 without a preconditioner, a frozen diagonal with ``"rmsprop"`` and a low-rank-plus-identity
    matrix with ``"lowrank"`` (G ⊙ then reads G ·). docs/how-it-works.md explains the choices and
    docs/benchmarks.md measures them.

    Args:
        chains: Number of independent chains C. Two or more give per-entry standard errors; at
            equal cost many short chains from w* estimate better than a few long ones.
        draws: Draws D kept per chain after burn-in. ``None`` (default): 200 steps after burn-in divided by
            ``thin`` (:mod:`lightning_bif.tuning.autotune`).
        burn_in: SGLD steps discarded at the start of every chain. A chain started at w* needs
            none; ``preconditioner="rmsprop"`` is estimated during burn-in.
        thin: SGLD steps between two kept draws: a draw evaluates all tracked examples, a
            minibatch step only m of them, so thinning saves evaluations at little loss. ``None``
            (default): round((N + P)/(3·m)) in [1, 8], which balances the two costs (m is N with full-batch
            SGLD; :mod:`lightning_bif.tuning.autotune`).
        step_size: The SGLD step size ε. ``None`` (default): ε = 1/(nβ·λ_max + γ) with λ_max, the
            largest Hessian eigenvalue at w*, from a Lanczos run (ε·nβ·λ_max must stay well below the
            stability bound 4; :mod:`lightning_bif.tuning.autotune`). A number is used as given.
        nbeta: The inverse temperature times the data size, nβ. ``None`` (default): n, the number of
            examples SGLD minibatches are drawn from (β = 1, the Bayesian posterior), raised where the tracked
            losses are not linear enough across the posterior (:mod:`lightning_bif.tuning.locality`); the
            result is then reported at nβ = n, -(nβ/n)·Cov. A number is used as given (the result is -Cov).
        localization: Strength γ of the pull towards w*; γ/nβ acts as a damping of the curvature. ``None``
            (default): chosen per estimate (:mod:`lightning_bif.tuning.localization`): the horizon's γ (in a fit with
            no steps ahead, the run's own, :mod:`lightning_bif.tuning.run_damping`), raised where needed to the floor
            nβ·(λ̄ + max(0, -λ_min)), λ̄ the mean Hessian eigenvalue at w*; without any horizon, the floor itself.
            A number is used as given, without the floor (with a horizon, the horizon's γ is then used as it is).
        weight_decay: Strength λ of the L2 prior; set it to the weight decay the model was
            trained with so that w* is a stationary point of the posterior and chains do not drift.
        preconditioner: ``None`` (default) for ``"lowrank"`` when its eigen-decomposition fits
            ``autotune.LOWRANK_MEMORY_BUDGET`` and ``"none"`` otherwise (the reason is in the result's
            ``diagnostics.tuning``); ``"none"`` for plain SGLD, ``"rmsprop"`` for a diagonal preconditioner
            estimated from the mean squared drift over burn-in and then frozen, ``"lowrank"`` for
            one built from the top ``preconditioner_rank`` eigenpairs of the training objective's
            Hessian at w* (from Hessian-vector products, once per estimate): the stiffest direction
            keeps the step size, the flat ones move up to (λ_1 + δ)/(λ_{K+1} + δ) times faster;
            choose ε for the stiffest direction.
        preconditioner_rank: K for ``"lowrank"``: how many stiff directions keep their own step.
            It costs K + 80 Hessian-vector
            products per estimate, each about 1.5 gradients, on the full batch (full-batch SGLD) or on
            four minibatches' worth of SGLD examples.
        preconditioner_damping: δ for ``"lowrank"``, added to every eigenvalue before taking ratios;
            ``None`` uses 10 × the mean eigenvalue of the Hessian (estimated from the same
            products). It is raised to γ/nβ when below, which keeps every direction no stiffer
            than the stiffest (δ = γ/nβ equalises all of them; a larger δ equalises less).
        batch_size: SGLD minibatch size m; ``None`` uses the whole data each step (full batch). ``"auto"``
            (default): the smallest m ≥ 64 whose gradient noise along the stiffest direction stays below a tenth
            of the noise SGLD injects, at most the tracked examples' count (the full batch where the SGLD data are at
            most four times that; :mod:`lightning_bif.tuning.minibatch`). Minibatch gradient noise grows with ε·nβ²/m.
        eval_batch_size: Batch size of the per-draw evaluation of tracked losses.
        seed: Seed of the sampler's own random generators; chain c always gets the same stream.
        sample_params: Glob patterns (``fnmatch``) of parameter names to sample; the others stay
            frozen at w*. ``None`` samples every parameter that requires grad.
        vectorize: Run chains together with ``torch.func.vmap`` (``True``), one after another
            (``False``), or choose (``"auto"``): vectorized, falling back to sequential when vmap
            fails, except on a CPU when one chain's SGLD step takes 5 ms or more, where vmap is
            slower than a loop over chains. Either way the draws agree up to float rounding.
        chains_per_batch: Largest number of chains vectorized at once (bounds memory); ``None``
            vectorizes all chains together and, on CUDA, splits a batch in halves and reruns it
            when it runs out of memory (a chain's draws do not depend on its batch).
        autocast: Precision of the forward passes: ``"bf16"`` or ``"fp16"`` runs the per-draw
            evaluation and the SGLD loss gradients under ``torch.autocast`` with that dtype (pass
            the precision the model trains in); ``None`` runs them in the parameters' dtype. The
            sampled parameters, the SGLD update and the accumulated statistics keep their own
            precision either way. fp16 gradients are not loss-scaled: prefer ``"bf16"``.
        per_token: Also estimate the influence on every token of every probe: ``probe_fn`` must then
            return per-token losses ``[B, T]`` (same T for all probes; masked or padded tokens should
            return 0 loss, which has zero covariance with everything) and the result gains
            ``token_influence [P, T, N]`` and ``token_stderr [P, T, N]``. ``influence [P, N]`` stays
            the influence on the token mean, as without it.
        horizon_steps: H, the horizon of the question a snapshot answers: the influence of up-weighting
            z_i from now on over the next H optimizer steps of training run with ``learning_rate`` η
            and ``momentum`` μ. Sets γ = nβ·((1 - μ)/(η·H) + max(0, -λ_min)) (``localization`` is
            then unused; λ_min is the least Hessian eigenvalue, estimated per estimate by Lanczos), raised
            to the localization floor when ``localization`` is ``None``, and, unless ``step_size`` is set,
            ε = 1/(nβ·λ_max + γ) (see :mod:`lightning_bif.tuning.horizon`). ``None`` (with the other two):
            ``localization`` is used as given (or chosen when ``None``).
        learning_rate: η of the training run's optimizer, as heavy-ball SGD (see
            :func:`lightning_bif.tuning.horizon.optimizer_step`); set together with ``horizon_steps``.
        momentum: μ of the training run's optimizer (0 ≤ μ < 1); set together with ``horizon_steps``.
        control_variates: Subspace control variates (:mod:`lightning_bif.estimation.control_variates`): the linear
            part of the BIF along the top ``preconditioner_rank`` Hessian eigenvectors keeps only its
            diagonal in that basis, which removes Monte-Carlo noise at the cost of one eigen-decomposition
            (shared with ``preconditioner="lowrank"``) and K directional derivatives of the tracked losses.
            ``True``/``False`` force it; ``None`` lets the estimate decide (docs/self-tuning.md). Not with
            ``per_token`` or ``preconditioner="rmsprop"`` (whose per-coordinate scaling mixes eigendirections).
        max_token_entries: Largest C·P·T·N allowed with ``per_token``: the accumulator keeps that many
            float64 cross sums (default 2**26 = 512 MiB), and an estimate that needs more is refused
            before sampling.
        horizon_source: Where the horizon came from, kept in the tuning record's reason for γ (e.g.
            ``BIFCallback`` sets "run damping 1/S: S = Σ η/(1 - μ) = ... over T = ... optimizer steps" for a
            snapshot whose horizon is the run itself, :mod:`lightning_bif.tuning.run_damping`). Informational.
        shared_minibatch_order: Every chain draws the same minibatch at the same step (one index stream from
            ``seed``; the chains differ only in their noise), as devinterp's ``bif()`` does by default
            (``match_sampling_input_ids_across_chains=True``). ``False`` (default): each chain draws its own.
            The chains then share the minibatch-noise part of their paths: the BIF, a covariance over draws,
            gets no less noisy (that shared path is one realization more chains do not average away) and the
            split-half reliability reads too high, as both halves contain it. For reproducing devinterp runs
            (docs/how-it-works.md#coming-from-devinterp).
        target_split_half: Precision on demand (:mod:`lightning_bif.estimation.rounds`): after the first
            ``chains`` chains, more chains are run in rounds until the split-half reliability reaches this
            target (in (0, 1)), ``max_seconds`` is spent or ``max_chains`` are run, whichever comes first.
            Each round adds the chains the Spearman–Brown formula predicts the target needs (at least half,
            at most 3 × the chains so far). ``None`` switches the target off. The default is
            where entries stop being usable on the LDS suite's development set-up (docs/self-tuning.md,
            "Precision on demand").
        max_seconds: Wall-clock budget of the estimate in seconds (> 0), tuning included: no round starts
            that the chains' measured speed says would end past it (the first round always runs). ``None``
            (default): no time budget, so the same seed gives the same numbers. A budget that stops the
            rounds makes the result depend on the machine's speed; the result says whether it did.
        max_chains: Most chains the rounds may run (at least ``chains``); ``None``: 4 × ``chains``.
    """

    chains: int = 16
    draws: int | None = None
    burn_in: int = 25
    thin: int | None = None
    step_size: float | None = None
    nbeta: float | None = None
    localization: float | None = None
    weight_decay: float = 0.0
    preconditioner: Preconditioner | None = None
    preconditioner_rank: int = 50
    preconditioner_damping: float | None = None
    batch_size: int | Literal["auto"] | None = "auto"
    eval_batch_size: int = 1024
    seed: int = 0
    sample_params: tuple[str, ...] | None = None
    vectorize: bool | Literal["auto"] = "auto"
    chains_per_batch: int | None = None
    autocast: Autocast | None = None
    per_token: bool = False
    max_token_entries: int = 2**26
    horizon_steps: float | None = None
    learning_rate: float | None = None
    momentum: float | None = None
    control_variates: bool | None = None
    horizon_source: str | None = None
    shared_minibatch_order: bool = False
    target_split_half: float | None = 0.8
    max_seconds: float | None = None
    max_chains: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.sample_params, (list, str)):
            patterns = (self.sample_params,) if isinstance(self.sample_params, str) else self.sample_params
            object.__setattr__(self, "sample_params", tuple(patterns))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        positive_ints = {"chains": self.chains, "draws": self.draws, "thin": self.thin,
                         "eval_batch_size": self.eval_batch_size}
        for name, value in positive_ints.items():
            if value is None and name in ("draws", "thin"):
                continue
            if not _is_int(value) or value < 1:
                raise ValueError(f"SGLDConfig.{name} must be a positive integer, got {value!r}.")
        if self.draws is not None and self.draws < 2:
            raise ValueError(
                f"SGLDConfig.draws must be >= 2, got {self.draws}: each chain's covariance (behind the standard "
                "errors and the split-half reliability) needs two draws, so with one every snapshot would be NaN. "
                "Use draws >= 2 (or None: chosen with thin); to spend fewer SGLD steps per draw lower thin instead."
            )
        if not _is_int(self.burn_in) or self.burn_in < 0:
            raise ValueError(f"SGLDConfig.burn_in must be an integer >= 0, got {self.burn_in!r}.")
        if self.step_size is not None and (not _is_finite(self.step_size) or not self.step_size > 0):
            raise ValueError(f"SGLDConfig.step_size must be a finite number > 0 or None, got {self.step_size!r}.")
        if self.nbeta is not None and (not _is_finite(self.nbeta) or not self.nbeta > 0):
            raise ValueError(f"SGLDConfig.nbeta must be a finite number > 0 or None, got {self.nbeta!r}.")
        for name, value in {"localization": self.localization, "weight_decay": self.weight_decay}.items():
            if value is None and name == "localization":
                continue
            if not _is_finite(value) or value < 0:
                raise ValueError(f"SGLDConfig.{name} must be a finite number >= 0, got {value!r}.")
        if self.preconditioner not in (None, "none", "rmsprop", "lowrank"):
            raise ValueError(
                f"SGLDConfig.preconditioner must be None, 'none', 'rmsprop' or 'lowrank', got {self.preconditioner!r}."
            )
        if not _is_int(self.preconditioner_rank) or self.preconditioner_rank < 1:
            raise ValueError(
                f"SGLDConfig.preconditioner_rank must be a positive integer, got {self.preconditioner_rank!r}."
            )
        if self.preconditioner_damping is not None and (
            not _is_finite(self.preconditioner_damping) or not self.preconditioner_damping > 0
        ):
            raise ValueError(
                f"SGLDConfig.preconditioner_damping must be a finite number > 0 or None, "
                f"got {self.preconditioner_damping!r}."
            )
        if self.preconditioner == "rmsprop" and self.burn_in < 1:
            raise ValueError("SGLDConfig.preconditioner='rmsprop' is estimated during burn-in: set burn_in >= 1.")
        if self.batch_size not in (None, "auto") and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise ValueError(f"SGLDConfig.batch_size must be a positive integer, None (full batch) or 'auto', "
                             f"got {self.batch_size!r}.")
        if self.vectorize not in (True, False, "auto"):
            raise ValueError(f"SGLDConfig.vectorize must be True, False or 'auto', got {self.vectorize!r}.")
        if self.chains_per_batch is not None and (not _is_int(self.chains_per_batch) or self.chains_per_batch < 1):
            raise ValueError(
                f"SGLDConfig.chains_per_batch must be a positive integer or None, got {self.chains_per_batch!r}."
            )
        if self.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"SGLDConfig.autocast must be 'bf16', 'fp16' or None, got {self.autocast!r}.")
        if not isinstance(self.per_token, bool):
            raise ValueError(f"SGLDConfig.per_token must be True or False, got {self.per_token!r}.")
        if not _is_int(self.max_token_entries) or self.max_token_entries < 1:
            raise ValueError(
                f"SGLDConfig.max_token_entries must be a positive integer, got {self.max_token_entries!r}."
            )
        if self.control_variates not in (None, True, False):
            raise ValueError(f"SGLDConfig.control_variates must be True, False or None, got {self.control_variates!r}.")
        if self.control_variates and (self.per_token or self.preconditioner == "rmsprop"):
            raise ValueError("SGLDConfig.control_variates=True works in the Hessian eigenbasis, which per_token and "
                             "preconditioner='rmsprop' do not support; set control_variates=None or False.")
        if not isinstance(self.shared_minibatch_order, bool):
            raise ValueError(f"SGLDConfig.shared_minibatch_order must be True or False, "
                             f"got {self.shared_minibatch_order!r}.")
        self._validate_horizon()
        self._validate_rounds()

    def _validate_rounds(self) -> None:
        target = self.target_split_half
        if target is not None and (not _is_finite(target) or not 0 < target < 1):
            raise ValueError(f"SGLDConfig.target_split_half must be a number in (0, 1) (a correlation to reach) or "
                             f"None (no target), got {target!r}.")
        if self.max_seconds is not None and (not _is_finite(self.max_seconds) or not self.max_seconds > 0):
            raise ValueError(f"SGLDConfig.max_seconds must be a finite number of seconds > 0 or None (no budget), "
                             f"got {self.max_seconds!r}.")
        if self.max_chains is not None and (not _is_int(self.max_chains) or self.max_chains < self.chains):
            raise ValueError(f"SGLDConfig.max_chains must be an integer >= chains ({self.chains}) or None "
                             f"(4 x chains), got {self.max_chains!r}.")

    def _validate_horizon(self) -> None:
        horizon = {"horizon_steps": self.horizon_steps, "learning_rate": self.learning_rate, "momentum": self.momentum}
        given = [name for name, value in horizon.items() if value is not None]
        if given and len(given) < 3:
            missing = sorted(set(horizon) - set(given))
            raise ValueError(f"SGLDConfig: horizon_steps, learning_rate and momentum are set together or not at all; "
                             f"{given} given, {missing} missing.")
        if not given:
            return
        if not _is_finite(self.horizon_steps) or not self.horizon_steps >= 1:
            raise ValueError(f"SGLDConfig.horizon_steps must be a finite number >= 1, got {self.horizon_steps!r}.")
        if not _is_finite(self.learning_rate) or not self.learning_rate > 0:
            raise ValueError(f"SGLDConfig.learning_rate must be a finite number > 0, got {self.learning_rate!r}.")
        if not _is_finite(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"SGLDConfig.momentum must be a number in [0, 1), got {self.momentum!r}.")

    def replace(self, **changes: Any) -> SGLDConfig:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-compatible values."""
        values = dataclasses.asdict(self)
        if values["sample_params"] is not None:
            values["sample_params"] = list(values["sample_params"])
        return values

    def to_json(self) -> str:
        """The config serialized as JSON (stored next to the results it produced)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SGLDConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"Unknown SGLDConfig fields {sorted(unknown)}; known fields are {sorted(known)}.")
        values = dict(values)
        if values.get("sample_params") is not None:
            values["sample_params"] = tuple(values["sample_params"])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> SGLDConfig:
        """Rebuild a config from :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))
