"""How far from linear the tracked losses are across the posterior: the even part of antithetic pairs.

The BIF is a covariance over the localized posterior. Where the posterior is small enough that every
tracked loss is linear in w - w* across it, Cov(ℓ_i, φ_j) = ∇ℓ_iᵀ·Σ·∇φ_j: the linear response that
retraining and continued training follow to first order (docs/how-it-works.md). Where it is not,
the quadratic terms add Cov(½δᵀH_iδ, ½δᵀH_jδ), which is not what retraining asks. The split of a
loss change into its odd and even parts under δ → -δ separates the two exactly for a quadratic:

    odd_i = ℓ_i(w* + δ) - ℓ_i(w* - δ) = 2∇ℓ_i·δ,    even_i = ℓ_i(w* + δ) + ℓ_i(w* - δ) - 2ℓ_i(w*) = δᵀH_iδ,

so Q = Σ_i Var_δ(even_i) / Σ_i E_δ[odd_i²] is the tracked losses' nonlinear fluctuation relative to
their linear one. For δ drawn from N(0, Σ) with Σ = (nβ·(H + λ) + γ)⁻¹, the odd part scales as
1/√nβ and the even part as 1/nβ at a fixed damping γ/nβ, so Q ∝ 1/nβ:
:mod:`lightning_bif.tuning.locality` picks the nβ that brings Q to its limit.

:func:`posterior_deltas` draws δ from the Gaussian with the measured top eigenpairs of H + λ and,
on their complement, its mean remaining eigenvalue (from the Hutchinson trace); :func:`nonlinearity`
evaluates the tracked losses at w* ± δ.
"""

from __future__ import annotations

import torch

from ..curvature.hessian import Curvature
from ..functional import FunctionalModel
from .tracked_losses import TrackedLosses

# Antithetic pairs δ, -δ of the nonlinearity check (2·LOCALITY_PROBES + 1 evaluations of the tracked losses).
LOCALITY_PROBES = 8


def complement_eigenvalue(curvature: Curvature, dim: int, floor: float) -> float:
    """The mean eigenvalue of H + λ outside the measured top K: (D·λ̄ - Σ_k λ_k)/(D - K), at least ``floor``."""
    rank = curvature.vectors.shape[1]
    if dim <= rank:
        return max(float(curvature.values[-1]), floor)
    rest = (dim * curvature.mean - float(curvature.values[:rank].sum())) / (dim - rank)
    return max(rest, floor)


def posterior_deltas(
    curvature: Curvature, dim: int, nbeta: float, localization: float, weight_decay: float, count: int, seed: int,
    device: torch.device, dtype: torch.dtype,
) -> torch.Tensor:
    """``[count, D]`` draws δ ~ N(0, Σ), Σ = (nβ·(H + λ) + γ)⁻¹ with H + λ from ``curvature``.

    The top K directions get their own precision nβ·λ_k + γ; the complement one precision, nβ·λ_c + γ with
    λ_c its mean eigenvalue (:func:`complement_eigenvalue`, at least λ).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(count, dim, generator=generator, device=device, dtype=dtype)
    basis = curvature.vectors.to(device=device, dtype=dtype)
    rank = basis.shape[1]
    top = curvature.values[:rank].to(device=device, dtype=dtype).clamp_min(weight_decay)
    rest = complement_eigenvalue(curvature, dim, weight_decay)
    coefficients = noise @ basis  # [count, K]
    complement = (noise - coefficients @ basis.T) / (nbeta * rest + localization) ** 0.5
    return complement + (coefficients / (nbeta * top + localization).sqrt()) @ basis.T


def nonlinearity(losses: TrackedLosses, fmodel: FunctionalModel, deltas: torch.Tensor) -> float:
    """Q = Σ_i Var_δ(even_i) / Σ_i E_δ[odd_i²] over the tracked examples and probes, δ the rows of ``deltas``.

    Evaluates the tracked losses at w*, w* + δ and w* - δ (one at a time: this runs before vmap is decided).
    """
    center = fmodel.center
    points = torch.cat([center[None], center + deltas, center - deltas])
    with torch.no_grad():
        train, probes = losses.evaluate(fmodel, points, vectorized=False)
    values = torch.cat([train, probes], dim=1).double()
    count = deltas.shape[0]
    at, plus, minus = values[0], values[1:count + 1], values[count + 1:]
    even, odd = plus + minus - 2 * at, plus - minus
    linear = float(odd.square().mean(0).sum())
    quadratic = float(even.var(0).sum()) if count > 1 else float(even.square().mean(0).sum())
    return quadratic / linear if linear > 0 else float("inf")
