"""Subspace control variates: the BIF's linear part along the stiff eigendirections, without its cross-noise.

Near w* every tracked loss is ℓ_i(w) ≈ ℓ_i(w*) + g_iᵀδ with δ = w - w*. Write z = Uᵀδ for the
coordinates of δ along K orthonormal eigenvectors U of the objective's Hessian (the ones
``preconditioner="lowrank"`` uses), a_i = g_iᵀU and b_j = h_jᵀU for the probes. The pooled
sample covariance is bilinear, so

    Ĉov(ℓ_i, φ_j) = a_iᵀ Σ̂_z b_j + [Ĉov(ℓ_i, φ_j) - a_iᵀ Σ̂_z b_j],

where Σ̂_z is the K × K sample covariance of z over the same draws. In the eigenbasis the
posterior's covariance Σ_z is diagonal (exactly for a Gaussian posterior; SGLD with no
preconditioner or the low-rank one, which shares the basis, keeps every eigendirection
independent at every step, so this holds along the whole chain, burn-in transient included).
The off-diagonal entries of Σ̂_z therefore have mean zero and carry only Monte-Carlo noise, and
replacing Σ̂_z by its diagonal in the first term removes that noise without changing the
expectation:

    Ĉov_cv(ℓ_i, φ_j) = Ĉov(ℓ_i, φ_j) - a_iᵀ offdiag(Σ̂_z) b_j.

The noise removed is that of K(K - 1)/2 off-diagonal covariances, each weighted by a_{ik}·b_{jl}:
large where the gradients concentrate in the stiff subspace, as they do in trained networks. The
diagonal (K variances, each estimated from every draw) stays estimated by the chains themselves,
so step-size bias, minibatch noise and the burn-in transient enter it as they enter the plain
estimate. Where the posterior is not Gaussian, or U is not exactly an eigenbasis of what the
chains sample (minibatch noise, a curvature sample smaller than the data), the dropped
off-diagonal terms have a small nonzero mean: this is the estimator's only bias (docs/self-tuning.md
measures it against the exact Gaussian BIF and the LDS benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import jvp, vmap

from ..example_sets import Batch
from ..functional import FunctionalModel, LossFn

# Directional derivatives run this many directions at a time under vmap (bounds activation memory).
_JVP_CHUNK = 16
# Length of the parameter step of a finite-difference directional derivative (when forward-mode AD fails).
_FINITE_DIFFERENCE_STEP = 1e-3


@dataclass
class Subspace:
    """The eigenbasis the control variates work in, and the gradients of the tracked losses projected on it.

    Attributes:
        basis: Orthonormal directions U, ``[D, K]``.
        train: a_i = Uᵀ∇ℓ_i(w*) of the tracked training examples, ``[N, K]`` (float64).
        probe: b_j = Uᵀ∇φ_j(w*) of the probe observables, ``[P, K]`` (float64).
    """

    basis: torch.Tensor
    train: torch.Tensor
    probe: torch.Tensor

    @property
    def rank(self) -> int:
        """K."""
        return self.basis.shape[1]

    def coordinates(self, params: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """z = Uᵀ(w - w*) of parameter rows ``params [G, D]``, ``[G, K]`` (float64)."""
        return ((params - center) @ self.basis).to(torch.float64)

    def correction(self, coordinate_covariance: torch.Tensor) -> torch.Tensor:
        """``b offdiag(Σ̂_z) aᵀ``, ``[P, N]``: what to subtract from the sample covariance ``[P, N]``."""
        return self.probe @ _off_diagonal(coordinate_covariance) @ self.train.T

    @staticmethod
    def variance_correction(coordinate_covariance: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """``a_iᵀ offdiag(Σ̂_z) a_i`` per row of ``projected [n, K]``: the correction of each variance."""
        return ((projected @ _off_diagonal(coordinate_covariance)) * projected).sum(1)


def _off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    return matrix - torch.diag_embed(torch.diagonal(matrix))


def projected_gradients(
    fmodel: FunctionalModel, batches: list[tuple[int, Batch]], fn: LossFn, buffers: dict[str, torch.Tensor],
    basis: torch.Tensor, what: str,
) -> torch.Tensor:
    """Uᵀ∇ℓ(w*) for every example of ``batches``, ``[n, K]``: K forward-mode derivatives per batch.

    Directional derivatives along the K columns of ``basis`` need no per-example gradients (which
    some models cannot give under vmap); where forward-mode AD fails they are central differences.
    """
    center = fmodel.center
    columns = basis.T.contiguous()
    parts = []
    for size, batch in batches:
        def losses(flat: torch.Tensor, b: Batch = batch, s: int = size) -> torch.Tensor:
            return fmodel.losses(flat, b, s, fn, buffers, what)

        def along(direction: torch.Tensor, f=losses) -> torch.Tensor:
            return jvp(f, (center,), (direction,))[1]

        try:
            rows = torch.cat([vmap(along)(chunk) for chunk in columns.split(_JVP_CHUNK)])
        except RuntimeError:  # no forward-mode rule or no batching rule for an op of the model
            h = _FINITE_DIFFERENCE_STEP
            with torch.no_grad():
                rows = torch.stack([(losses(center + h * d) - losses(center - h * d)) / (2 * h) for d in columns])
        parts.append(rows.T.detach().to(torch.float64))
    return torch.cat(parts)
