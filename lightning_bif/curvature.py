"""The stiff directions of the sampled posterior, and the low-rank preconditioner built from them.

SGLD's step size is capped by the stiffest direction of the posterior (ε·nβ·λ_max must stay below
about 4), so a short chain from w* barely moves along the flat directions, which are the ones
an influence function weighs most. ``preconditioner="lowrank"`` finds the top-K eigenpairs of the
Hessian of the training objective at w* from Hessian-vector products (a randomized range finder:
no Hessian is ever formed) and gives the flat complement a larger step. A constant
preconditioner keeps the stationary distribution, so the BIF is the same quantity, reached faster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad, jvp, vmap

from .data import Batch
from .functional import FunctionalModel, LossFn

# Hessian-vector products run this many at a time under vmap (bounds activation memory).
_HVP_CHUNK = 16


@dataclass
class Curvature:
    """Top of the spectrum of the objective's Hessian H + λ at w*.

    Attributes:
        values: The K + 1 largest eigenvalues, descending, ``[K + 1]``.
        vectors: Orthonormal eigenvectors of the first K, ``[D, K]``.
        mean: The mean eigenvalue tr(H + λ)/D (Hutchinson estimate from the same products).
    """

    values: torch.Tensor
    vectors: torch.Tensor
    mean: float


def objective_gradient(
    fmodel: FunctionalModel, batch: Batch, size: int, loss_fn: LossFn, buffers: dict[str, torch.Tensor],
    weight_decay: float,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``flat [D] -> ∇(mean loss of batch + λ/2·||w||²)`` at ``flat``: the gradient whose Jacobian is H + λ."""

    def objective(flat: torch.Tensor) -> torch.Tensor:
        loss = fmodel.losses(flat, batch, size, loss_fn, buffers, "loss_fn").mean()
        return loss + weight_decay / 2 * flat.square().sum()

    return grad(objective)


def _hessian_vector_products(
    fmodel: FunctionalModel, batch: Batch, size: int, loss_fn: LossFn, buffers: dict[str, torch.Tensor],
    weight_decay: float,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``vectors [D, b] -> (H + λ) vectors [D, b]`` for the mean loss of ``batch`` at w*."""
    gradient = objective_gradient(fmodel, batch, size, loss_fn, buffers, weight_decay)
    center = fmodel.center

    def one(vector: torch.Tensor) -> torch.Tensor:
        return jvp(gradient, (center,), (vector,))[1]

    vectorized = [True]  # until vmap fails once; later blocks then go one product at a time straight away

    def products(vectors: torch.Tensor) -> torch.Tensor:
        columns = vectors.T.contiguous()
        if vectorized[0]:
            try:
                return torch.cat([vmap(one)(chunk) for chunk in columns.split(_HVP_CHUNK)]).T
            except RuntimeError:  # an op without a batching rule
                vectorized[0] = False
        try:
            return torch.stack([one(column) for column in columns]).T
        except RuntimeError as error:
            raise RuntimeError(
                "preconditioner='lowrank' needs Hessian-vector products of loss_fn (torch.func.jvp over "
                f"torch.func.grad), and they failed: {error}. Use SGLDConfig(preconditioner='none')."
            ) from error

    return products


def top_curvature(
    fmodel: FunctionalModel, batch: Batch, size: int, loss_fn: LossFn, buffers: dict[str, torch.Tensor],
    weight_decay: float, rank: int, seed: int, oversample: int = 20, power_iterations: int = 1,
) -> Curvature:
    """Top ``rank`` eigenpairs of the Hessian of ``mean loss + λ/2·‖w‖²`` at w*, by randomized subspace iteration.

    Costs ``(2 + power_iterations)·(rank + oversample)`` Hessian-vector products on ``batch``
    (Halko, Martinsson & Tropp 2011, algorithm 4.4). The sampler's own seed drives the random
    start, so the global RNG is untouched and a snapshot is reproducible.

    Args:
        fmodel: The functional model; its ``center`` is w*.
        batch: The examples whose mean loss defines the Hessian.
        size: Number of examples in ``batch``.
        loss_fn: ``(model, batch) -> Tensor[B]``.
        buffers: The model's buffers.
        weight_decay: λ of the L2 prior.
        rank: K, the number of eigenpairs; fewer than the number of sampled parameters.
        seed: Seed of the random start.
        oversample: Extra columns of the random block (accuracy of the K-th pair).
        power_iterations: Rounds of subspace iteration (sharper for slowly decaying spectra).

    Returns:
        :class:`Curvature`.
    """
    dim = fmodel.dim
    if rank >= dim:
        raise ValueError(
            f"SGLDConfig.preconditioner_rank={rank} must be below the number of sampled parameters ({dim})."
        )
    products = _hessian_vector_products(fmodel, batch, size, loss_fn, buffers, weight_decay)
    width = min(rank + oversample, dim)
    generator = torch.Generator(device=fmodel.device).manual_seed(seed)
    probes = torch.randn(dim, width, generator=generator, device=fmodel.device, dtype=fmodel.center.dtype)
    block = products(probes)
    mean = float((probes * block).sum(0).mean()) / dim  # E[zᵀAz] = tr(A) for z ~ N(0, I)
    for _ in range(power_iterations):
        block = products(torch.linalg.qr(block).Q)
    basis = torch.linalg.qr(block).Q
    projected = basis.T @ products(basis)
    values, rotation = torch.linalg.eigh((projected + projected.T) / 2)
    values, rotation = values.flip(0), rotation.flip(1)
    return Curvature(values=values[:rank + 1], vectors=basis @ rotation[:, :rank], mean=mean)


class LowRankPreconditioner:
    """``G = g_rest·I + U diag(g - g_rest) Uᵀ`` with ``g_k = (λ_1 + δ)/(λ_k + δ)``.

    The stiffest direction keeps G = 1 and the other top-K directions and the flat complement (all
    given λ_{K+1}) move up to (λ_1 + δ)/(λ_{K+1} + δ) times faster. Along eigenvector k the
    posterior's curvature is A_k = nβ·λ_k + γ, and g_k·A_k ≤ A_1 exactly when δ ≥ γ/nβ: δ is
    raised to γ/nβ when it is below, so no direction becomes stiffer than the stiffest one and a
    step size that is stable without the preconditioner stays stable with it (in the quadratic
    approximation). δ = γ/nβ equalises every direction; a larger δ equalises less and keeps chains
    closer to the region where the posterior is quadratic (docs/benchmarks.md compares settings).

    Args:
        curvature: The top eigenpairs.
        damping: δ; ``None`` means 10 × the mean eigenvalue.
        floor: The least δ, γ/nβ.
    """

    def __init__(self, curvature: Curvature, damping: float | None, floor: float = 0.0) -> None:
        delta = max(10 * max(curvature.mean, 0.0) if damping is None else damping, floor)
        values = curvature.values.clamp_min(0) + max(delta, torch.finfo(curvature.values.dtype).tiny)
        gains = values[0] / values
        self.damping = float(delta)
        self.rest = float(gains[-1])
        self.basis = curvature.vectors.contiguous()
        self._top = (gains[:-1] - self.rest).to(self.basis.dtype)
        self._top_sqrt = (gains[:-1].sqrt() - self.rest**0.5).to(self.basis.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``G x`` for rows ``x [G, D]``."""
        return self.rest * x + ((x @ self.basis) * self._top) @ self.basis.T

    def apply_sqrt(self, x: torch.Tensor) -> torch.Tensor:
        """``G^{1/2} x`` for rows ``x [G, D]`` (scales the injected noise)."""
        return self.rest**0.5 * x + ((x @ self.basis) * self._top_sqrt) @ self.basis.T
