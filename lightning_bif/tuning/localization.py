"""The localization γ a snapshot uses when ``SGLDConfig.localization`` is ``None``: a floor under the damping.

The localized posterior's BIF is an influence function damped by d = γ/nβ (docs/how-it-works.md).
A short chain estimates it well only where the posterior is close to its quadratic approximation
at w* and where the chains mix within their budget: along directions with curvature λ ≪ d the
damping dominates, the chain's spread there is set by γ alone and the estimate is pure
Monte-Carlo noise from directions the data does not pin down. The floor keeps d at least
``LOCALIZATION_FACTOR`` times the mean Hessian eigenvalue λ̄ = tr(H + λ)/D (the bulk of the
spectrum, measured by Hutchinson's estimator), plus max(0, -λ_min) so that the posterior stays
proper at a saddle:

    γ ≥ nβ·(c·λ̄ + max(0, -λ_min)),   c = ``LOCALIZATION_FACTOR``.

With a horizon, γ is the larger of the horizon's γ and the floor (a long horizon asks for a
weakly damped influence function, which a short chain cannot estimate; the floor says so in the
tuning record). Without a horizon, γ is the larger of ``NO_HORIZON_LOCALIZATION`` (the fixed
default of earlier versions) and the floor. A number the user sets is used as given. Why c = 3,
and where it was chosen and checked, is in docs/self-tuning.md, "The localization floor".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# c of the floor d ≥ c·λ̄ + max(0, -λ_min) on the damping d = γ/nβ.
LOCALIZATION_FACTOR = 3.0
# γ without a horizon when the floor is lower (the fixed default before the floor existed).
NO_HORIZON_LOCALIZATION = 100.0
# Rademacher probes of the Hutchinson estimate of tr(H + λ)/D when no eigen-decomposition measured it.
MEAN_EIGENVALUE_PROBES = 30


@dataclass(frozen=True)
class LocalizationChoice:
    """The γ chosen for a snapshot and why.

    Attributes:
        localization: γ.
        floor: nβ·(c·λ̄ + max(0, -λ_min)), the least γ the rule allows.
        reason: A sentence for the tuning record.
    """

    localization: float
    floor: float
    reason: str


def localization_floor(nbeta: float, mean_eigenvalue: float, lambda_min: float, factor: float | None = None) -> float:
    """γ_floor = nβ·(c·max(λ̄, 0) + max(0, -λ_min)), c = ``factor`` or ``LOCALIZATION_FACTOR``."""
    factor = LOCALIZATION_FACTOR if factor is None else factor
    return nbeta * (factor * max(mean_eigenvalue, 0.0) + max(0.0, -lambda_min))


def choose_localization(nbeta: float, mean_eigenvalue: float, lambda_min: float, horizon_localization: float | None,
                        factor: float | None = None) -> LocalizationChoice:
    """γ = max(the horizon's γ, or ``NO_HORIZON_LOCALIZATION`` without one; the floor).

    Args:
        nbeta: nβ.
        mean_eigenvalue: λ̄ = tr(H + λ)/D at w*.
        lambda_min: The least eigenvalue of H + λ at w* (negative at a saddle).
        horizon_localization: The horizon's γ (:func:`lightning_bif.tuning.horizon.horizon_config`), or ``None``.
        factor: c; ``None``: ``LOCALIZATION_FACTOR`` (read at call time, so a sweep can set the module's).

    Returns:
        :class:`LocalizationChoice`.
    """
    factor = LOCALIZATION_FACTOR if factor is None else factor
    floor = localization_floor(nbeta, mean_eigenvalue, lambda_min, factor)
    base, source = ((horizon_localization, "the horizon's γ") if horizon_localization is not None
                    else (NO_HORIZON_LOCALIZATION, "the no-horizon default"))
    if not (floor > base):
        return LocalizationChoice(base, floor, f"{source} {base:.4g}, above the floor nβ·({factor:g}·λ̄ + "
                                               f"max(0, -λ_min)) = {floor:.4g} (λ̄ = {mean_eigenvalue:.4g})")
    return LocalizationChoice(floor, floor, f"the floor nβ·({factor:g}·λ̄ + max(0, -λ_min)) = {floor:.4g} "
                                            f"(λ̄ = {mean_eigenvalue:.4g}, λ_min = {lambda_min:.4g}), above "
                                            f"{source} {base:.4g}")


def hutchinson_mean_eigenvalue(products: Callable[[torch.Tensor], torch.Tensor], dim: int, device: torch.device,
                               dtype: torch.dtype, seed: int, probes: int = MEAN_EIGENVALUE_PROBES) -> float:
    """tr(A)/D from ``probes`` Rademacher vectors z: E[zᵀAz] = tr(A) (``products``: ``[D, b] -> A·[D, b]``)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    signs = torch.randint(0, 2, (dim, probes), generator=generator, device=device).to(dtype) * 2 - 1
    return float((signs * products(signs)).sum(0).mean()) / dim
