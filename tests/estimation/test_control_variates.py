"""Subspace control variates (estimation/control_variates.py): projected gradients and the covariance correction."""

from __future__ import annotations

import torch
from helpers import NoForwardMode, cross_entropy, mlp
from torch import nn

from lightning_bif.estimation.control_variates import Subspace, projected_gradients
from lightning_bif.functional import FunctionalModel

CPU = torch.device("cpu")


def orthonormal(dim: int, rank: int, seed: int = 0) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(dim, rank, generator=torch.Generator().manual_seed(seed))).Q


def explicit_projection(model: nn.Module, batch: list[torch.Tensor], basis: torch.Tensor) -> torch.Tensor:
    """Uᵀ∇ℓ_i of each example by plain autograd, one example at a time."""
    rows = []
    for i in range(len(batch[1])):
        model.zero_grad()
        cross_entropy(model, [batch[0][i:i + 1], batch[1][i:i + 1]]).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return (torch.stack(rows) @ basis).double()


def test_projected_gradients_are_the_per_example_gradients_along_the_basis() -> None:
    model = mlp(hidden=5).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g)
    fmodel = FunctionalModel(model, None, CPU)
    basis = orthonormal(fmodel.dim, 3).double()
    batches = [(4, [x[:4], y[:4]]), (3, [x[4:], y[4:]])]
    projected = projected_gradients(fmodel, batches, cross_entropy, fmodel.fresh_buffers(), basis, "loss_fn")
    assert projected.shape == (7, 3) and projected.dtype == torch.float64
    torch.testing.assert_close(projected, explicit_projection(model, [x, y], basis))


def test_without_forward_mode_the_derivatives_are_central_differences() -> None:
    model = mlp(hidden=5).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)

    def custom(m: nn.Module, b: list[torch.Tensor]) -> torch.Tensor:
        logits = m[2](NoForwardMode.apply(m[0](b[0])))
        return nn.functional.cross_entropy(logits, b[1], reduction="none")

    fmodel = FunctionalModel(model, None, CPU)
    basis = orthonormal(fmodel.dim, 2).double()
    projected = projected_gradients(fmodel, [(5, [x, y])], custom, fmodel.fresh_buffers(), basis, "loss_fn")
    torch.testing.assert_close(projected, explicit_projection(model, [x, y], basis), atol=1e-6, rtol=1e-5)


def test_for_linear_losses_the_correction_leaves_only_the_diagonal_of_the_coordinate_covariance() -> None:
    g = torch.Generator().manual_seed(2)
    dim, rank, draws = 6, 3, 40
    basis, center = orthonormal(dim, rank, seed=3), torch.randn(dim, generator=g)
    a, b = torch.randn(5, rank, generator=g, dtype=torch.float64), torch.randn(2, rank, generator=g,
                                                                                dtype=torch.float64)
    subspace = Subspace(basis=basis, train=a, probe=b)
    params = center + torch.randn(draws, dim, generator=g)
    z = subspace.coordinates(params, center)
    torch.testing.assert_close(z, ((params - center) @ basis).double())
    assert subspace.rank == rank
    train, probe = z @ a.T, z @ b.T  # losses exactly linear in the subspace coordinates
    centered = lambda t: t - t.mean(0)  # noqa: E731
    sigma = centered(z).T @ centered(z) / (draws - 1)
    covariance = centered(probe).T @ centered(train) / (draws - 1)  # [P, N]
    torch.testing.assert_close(covariance - subspace.correction(sigma), b @ torch.diag(sigma.diagonal()) @ a.T)
    variance = centered(train).square().sum(0) / (draws - 1)
    torch.testing.assert_close(variance - Subspace.variance_correction(sigma, a),
                               (a.square() * sigma.diagonal()).sum(1))
