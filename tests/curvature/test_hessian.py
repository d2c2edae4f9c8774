"""The objective's curvature (lightning_bif/curvature/hessian.py) against the eigenvalues of its explicit Hessian."""

from __future__ import annotations

import pytest
import torch
from helpers import classification_data, cross_entropy, mlp
from torch.func import functional_call

from lightning_bif.curvature.hessian import Curvature, LowRankPreconditioner, top_curvature
from lightning_bif.curvature.objective import Objective
from lightning_bif.functional import FunctionalModel

WEIGHT_DECAY = 0.05
CPU = torch.device("cpu")


def problem() -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    """A small tanh MLP in float64, its data, and the explicit Hessian of mean loss + λ/2·‖w‖² at its weights."""
    model = mlp(hidden=4, seed=3).double()
    x, y = classification_data(24, seed=2)
    batch = [x.double(), y]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def objective(w: torch.Tensor) -> torch.Tensor:
        tensors = {n: t.view(s) for n, t, s in zip(names, w.split(sizes), shapes, strict=True)}
        loss = cross_entropy(lambda inputs: functional_call(model, tensors, (inputs,)), batch).mean()
        return loss + WEIGHT_DECAY / 2 * w.square().sum()

    return model, batch, torch.autograd.functional.hessian(objective, flat)


def test_the_top_eigenvalues_and_vectors_and_the_mean_are_the_hessians() -> None:
    model, batch, hessian = problem()
    exact_values, exact_vectors = torch.linalg.eigh(hessian)
    exact_values, exact_vectors = exact_values.flip(0), exact_vectors.flip(1)
    fmodel = FunctionalModel(model, None, CPU)
    rank = 3
    objective = Objective(fmodel, cross_entropy, fmodel.fresh_buffers(), WEIGHT_DECAY)
    curvature = top_curvature(objective, batch, len(batch[1]), rank=rank, seed=0)
    assert curvature.values.shape == (rank + 1,) and curvature.vectors.shape == (fmodel.dim, rank)
    torch.testing.assert_close(curvature.values, exact_values[:rank + 1], rtol=1e-3, atol=1e-8)
    overlap = (curvature.vectors.T @ exact_vectors[:, :rank]).abs().diagonal()
    assert overlap.min() > 0.99  # the same directions, up to sign
    torch.testing.assert_close(curvature.vectors.T @ curvature.vectors, torch.eye(rank, dtype=torch.float64))
    trace_mean = float(hessian.trace()) / fmodel.dim
    assert abs(curvature.mean - trace_mean) < 0.5 * trace_mean  # an estimate (Hutchinson: a few dozen probes)


def test_the_same_seed_gives_the_same_curvature_and_the_rank_must_be_below_the_dimension() -> None:
    model, batch, _ = problem()
    fmodel = FunctionalModel(model, None, CPU)
    args = (Objective(fmodel, cross_entropy, fmodel.fresh_buffers(), WEIGHT_DECAY), batch, len(batch[1]))
    first, again = top_curvature(*args, rank=2, seed=4), top_curvature(*args, rank=2, seed=4)
    assert torch.equal(first.values, again.values) and torch.equal(first.vectors, again.vectors)
    with pytest.raises(ValueError, match="preconditioner_rank=35 must be below the number of sampled parameters"):
        top_curvature(*args, rank=fmodel.dim, seed=0)


def test_the_preconditioner_is_the_matrix_it_describes() -> None:
    vectors = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(0),
                                          dtype=torch.float64)).Q
    curvature = Curvature(values=torch.tensor([8.0, 3.0, 1.0], dtype=torch.float64), vectors=vectors, mean=2.0)
    preconditioner = LowRankPreconditioner(curvature, damping=1.0)
    gains = torch.tensor([9.0 / 9.0, 9.0 / 4.0, 9.0 / 2.0], dtype=torch.float64)  # (λ_1 + δ)/(λ_k + δ)
    matrix = gains[2] * torch.eye(6, dtype=torch.float64) + vectors @ torch.diag(gains[:2] - gains[2]) @ vectors.T
    rows = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(preconditioner.apply(rows), rows @ matrix)
    torch.testing.assert_close(preconditioner.apply_sqrt(preconditioner.apply_sqrt(rows)), rows @ matrix)
    assert preconditioner.rest == pytest.approx(4.5) and preconditioner.damping == 1.0
    assert LowRankPreconditioner(curvature, damping=None).damping == pytest.approx(20.0)  # 10 × the mean
    assert LowRankPreconditioner(curvature, damping=0.1, floor=0.5).damping == pytest.approx(0.5)
