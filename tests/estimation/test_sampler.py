"""The SGLD update rule (sampler.sgld_drift / sgld_step) against the formula it implements."""

from __future__ import annotations

import pytest
import torch

from lightning_bif.curvature.hessian import Curvature, LowRankPreconditioner
from lightning_bif.estimation.sampler import _DiagonalPreconditioner, sgld_drift, sgld_step

NBETA, GAMMA, DECAY, STEP = 300.0, 40.0, 0.01, 1e-3


def test_drift_is_the_gradient_of_the_localized_posterior_potential() -> None:
    """nβ·∇L + nβλ·w + γ·(w − w*) is ∇U for U(w) = nβ·L(w) + nβλ/2·‖w‖² + γ/2·‖w − w*‖²."""
    gen = torch.Generator().manual_seed(0)
    center = torch.randn(7, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(7, generator=gen, dtype=torch.float64)
    loss = ((w - target) ** 4).sum(dim=1)  # any per-chain loss L(w)
    potential = NBETA * loss + NBETA * DECAY / 2 * w.square().sum(dim=1) + GAMMA / 2 * (w - center).square().sum(dim=1)
    (grad_loss,) = torch.autograd.grad(loss.sum(), w, retain_graph=True)
    (expected,) = torch.autograd.grad(potential.sum(), w)
    drift = sgld_drift(w.detach(), grad_loss.clone(), center, NBETA, GAMMA, DECAY)
    torch.testing.assert_close(drift, expected)


@pytest.mark.parametrize("kind", ["identity", "diagonal", "lowrank"])
def test_step_applies_the_preconditioned_update(kind: str) -> None:
    """w ← w − ε/2·G·drift + √ε·G^½·ξ, checked against dense matrices in float64."""
    gen = torch.Generator().manual_seed(1)
    chains, dim = 2, 6
    w = torch.randn(chains, dim, generator=gen, dtype=torch.float64)
    drift = torch.randn(chains, dim, generator=gen, dtype=torch.float64)
    noise = torch.randn(chains, dim, generator=gen, dtype=torch.float64)
    if kind == "identity":
        precondition, dense = None, [torch.eye(dim, dtype=torch.float64)] * chains
    elif kind == "diagonal":
        diagonal = torch.rand(chains, dim, generator=gen, dtype=torch.float64) + 0.5
        precondition, dense = _DiagonalPreconditioner(diagonal), [torch.diag(d) for d in diagonal]
    else:
        basis, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen, dtype=torch.float64))
        curvature = Curvature(values=torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64), vectors=basis, mean=2.0)
        precondition = LowRankPreconditioner(curvature, damping=0.5)
        gains = torch.tensor([1.0, 9.5 / 4.5], dtype=torch.float64)  # (λ_1 + δ)/(λ_k + δ), δ = 0.5
        rest = 9.5 / 1.5
        matrix = rest * torch.eye(dim, dtype=torch.float64) + basis @ torch.diag(gains - rest) @ basis.T
        dense = [matrix] * chains
    expected = torch.stack([
        w[c] - STEP / 2 * dense[c] @ drift[c] + STEP**0.5 * _sqrtm(dense[c]) @ noise[c] for c in range(chains)
    ])
    sgld_step(w, drift.clone(), noise.clone(), STEP, precondition)
    torch.testing.assert_close(w, expected)


def _sqrtm(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.sqrt()) @ vectors.T
