"""Self-tuning: the sampler settings a user leaves unset (``None``), chosen from what is measured at w*.

docs/self-tuning.md derives each rule; in short:

* ``step_size``: ε = ``STIFFNESS_STEP``/(nβ·λ_max + γ), λ_max from Lanczos: the stiffest direction of
  the posterior then takes a step a quarter of the SGLD stability bound (the horizon's rule, which
  now also serves snapshots without a horizon). With the low-rank preconditioner G, times
  min(1, λ_max(A)/λ_max(G·A)) on the drift's minibatches, so that G makes no step stiffer.
* ``preconditioner``: ``"lowrank"`` when its working memory (two ``[D, K + 70]`` blocks of the
  parameters' dtype) fits ``LOWRANK_MEMORY_BUDGET`` and K < D, else ``"none"``; also ``"none"``, with
  the error as the reason, when Hessian-vector products of ``loss_fn`` fail.
* ``control_variates``: on whenever the top eigenpairs are measured anyway (the low-rank
  preconditioner) and the estimate is not per-token.
* ``localization``: the horizon's γ (the run's own where no steps follow), raised to the floor
  nβ·(λ̄ + max(0, -λ_min)) where it is below; without any horizon, the floor
  (:mod:`lightning_bif.tuning.localization`).
* ``nbeta``: n, raised until the tracked losses are close to linear across the posterior
  (:mod:`lightning_bif.tuning.locality`).
* ``batch_size`` (``"auto"``): the smallest minibatch whose gradient noise along the stiffest direction is
  at most ``GRADIENT_NOISE_RATIO`` of the injected noise, capped at the tracked examples' count unless the
  full batch is affordable (:mod:`lightning_bif.tuning.minibatch`); ``thin`` and ``draws`` are then chosen
  again for it.
* ``thin`` and ``draws``: a draw evaluates the N + P tracked losses (forward only), a step the
  gradient of m minibatch losses (forward and backward, about 3 forwards): ``thin`` =
  round((N + P)/(3·m)) in [1, 8] balances evaluation and sampling cost, and ``draws`` =
  ``STEPS_AFTER_BURN_IN``/``thin`` keeps every chain's length.

A value the user sets is used as given and recorded as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import SGLDConfig
from ..curvature.hessian import KRYLOV_EXTRA
from .minibatch import SMALLEST_MINIBATCH

# Working memory the low-rank preconditioner may take for its eigen-decomposition (two [D, K + 70] blocks).
LOWRANK_MEMORY_BUDGET = 512 * 2**20
# SGLD steps each chain takes after burn-in when draws and thin are chosen automatically (the old 50 × 4).
STEPS_AFTER_BURN_IN = 200
_MAX_THIN = 8


@dataclass
class Tuning:
    """Every automatically chosen setting of an estimate, and the evidence behind it.

    Attributes:
        chosen: Field name → value for the ``SGLDConfig`` fields that were ``None`` and got chosen here.
        given: Names of the automatic fields the user set (used as given).
        reasons: Field name → why that value (a sentence).
        lambda_min: Lanczos estimate of the least Hessian eigenvalue at w* (``None`` when not measured).
        lambda_max: Lanczos estimate of the largest.
        mean_eigenvalue: Hutchinson estimate of tr(H + λ)/D (with the eigenpairs or an automatic
            ``localization``; else ``None``).
        localization_floor: The least γ the localization rule allowed, nβ·(c·λ̄ + max(0, -λ_min))
            (:mod:`lightning_bif.tuning.localization`; ``None`` when the user set ``localization``).
        top_eigenvalues: The K + 1 largest eigenvalues (with the eigenpairs; else ``None``).
        preconditioned_stiffness: λ_max(G·A) of the drift's curvature with the low-rank preconditioner, the
            largest over the SGLD minibatches measured, when the step size is automatic (``None`` otherwise).
        drift_stiffness: λ_max(A) of the same minibatches without it: ε is the plain rule's times
            min(1, drift_stiffness/preconditioned_stiffness).
        lowrank_memory_mib: Working memory the low-rank preconditioner needs (or would need).
        gradient_noise_variance: vᵀCv, the per-example gradients' variance along λ_max's Ritz vector, with
            ``batch_size="auto"`` (:mod:`lightning_bif.tuning.minibatch`; else ``None``).
        gradient_noise_ratio: r, the minibatch-to-injected noise ratio along it at the chosen minibatch.
        nonlinearity: Q, the tracked losses' nonlinear-to-linear fluctuation across the posterior at nβ = n
            (:mod:`lightning_bif.tuning.locality`; ``None`` when not measured).
        curvature_reused: Whether the curvature came from an earlier estimate (:mod:`lightning_bif.curvature.cache`).
        curvature_drift: The staleness check's Rayleigh-quotient drift (NaN when nothing was checked).
        curvature_reason: Why the curvature was measured again, or ``"reused"``.
        seconds: Wall time of the tuning (curvature, projections) within the estimate.
    """

    chosen: dict[str, Any] = field(default_factory=dict)
    given: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    lambda_min: float | None = None
    lambda_max: float | None = None
    mean_eigenvalue: float | None = None
    localization_floor: float | None = None
    top_eigenvalues: list[float] | None = None
    lowrank_memory_mib: float | None = None
    preconditioned_stiffness: float | None = None
    drift_stiffness: float | None = None
    gradient_noise_variance: float | None = None
    nonlinearity: float | None = None
    gradient_noise_ratio: float | None = None
    curvature_reused: bool = False
    curvature_drift: float = float("nan")
    curvature_reason: str = ""
    seconds: float = 0.0

    def choose(self, name: str, value: Any, reason: str) -> None:
        """Record an automatic choice."""
        self.chosen[name] = value
        self.reasons[name] = reason

    def summary(self) -> dict[str, Any]:
        """Plain JSON-compatible values (stored in the log)."""
        return {key: value for key, value in self.__dict__.items()}


AUTOMATIC = ("draws", "thin", "step_size", "preconditioner", "control_variates", "localization")


def budget_minibatch(config: SGLDConfig, tracked_train: int) -> int:
    """The m of the budget rule: ``batch_size``, the tracked training examples' count with full-batch SGLD, or
    ``SMALLEST_MINIBATCH`` until ``"auto"`` is resolved (:func:`resolve_budget` runs again then)."""
    if config.batch_size == "auto":
        return SMALLEST_MINIBATCH
    return config.batch_size if config.batch_size is not None else tracked_train


def resolve_budget(config: SGLDConfig, tracked: int, minibatch: int, tuning: Tuning) -> SGLDConfig:
    """Choose ``thin`` and ``draws`` when unset (see the module docstring); a set one is kept."""
    tuning.given.extend(name for name in AUTOMATIC if getattr(config, name) is not None)
    if config.batch_size != "auto":
        tuning.given.append("batch_size")
    return _choose_budget(config, tracked, minibatch, tuning)


def rechoose_budget(config: SGLDConfig, tracked: int, minibatch: int, tuning: Tuning) -> SGLDConfig:
    """``thin`` and ``draws`` again for the minibatch ``batch_size="auto"`` chose, where they were automatic."""
    unset = {name: None for name in ("thin", "draws") if name in tuning.chosen}
    return _choose_budget(config.replace(**unset), tracked, minibatch, tuning)


def _choose_budget(config: SGLDConfig, tracked: int, minibatch: int, tuning: Tuning) -> SGLDConfig:
    thin = config.thin
    if thin is None:
        ratio = tracked / (3 * minibatch)
        thin = min(_MAX_THIN, max(1, round(ratio)))
        tuning.choose("thin", thin, f"a draw evaluates {tracked} tracked losses, a step the gradient of {minibatch}: "
                                    f"(N + P)/(3·m) = {ratio:.2f}, in [1, {_MAX_THIN}]")
    draws = config.draws
    if draws is None:
        draws = max(2, STEPS_AFTER_BURN_IN // thin)
        tuning.choose("draws", draws, f"{STEPS_AFTER_BURN_IN} steps after burn-in every {thin} steps")
    return config.replace(thin=thin, draws=draws)


def lowrank_fits(config: SGLDConfig, dim: int, itemsize: int, tuning: Tuning) -> tuple[bool, str]:
    """Whether ``preconditioner="lowrank"`` fits its memory budget (and K < D), with the reason."""
    need = 2 * dim * (config.preconditioner_rank + KRYLOV_EXTRA) * itemsize
    tuning.lowrank_memory_mib = need / 2**20
    if config.preconditioner_rank >= dim:
        return False, f"rank K = {config.preconditioner_rank} is not below the {dim} sampled parameters"
    if need > LOWRANK_MEMORY_BUDGET:
        return False, (f"its eigen-decomposition needs {need / 2**20:.0f} MiB, over the budget of "
                       f"{LOWRANK_MEMORY_BUDGET / 2**20:.0f} MiB (lower preconditioner_rank or sample fewer "
                       "parameters)")
    return True, (f"{dim} parameters × (K + {KRYLOV_EXTRA}) = {config.preconditioner_rank + KRYLOV_EXTRA} columns: "
                  f"{need / 2**20:.1f} MiB, within {LOWRANK_MEMORY_BUDGET / 2**20:.0f} MiB")
