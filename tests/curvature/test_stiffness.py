"""The drift's stiffness with and without the low-rank preconditioner (lightning_bif/curvature/stiffness.py), checked
against explicit Hessians of each minibatch (torch.autograd.functional.hessian)."""

from __future__ import annotations

import pytest
import torch
from test_lanczos import WEIGHT_DECAY, explicit_hessian, small_problem

from lightning_bif.curvature.hessian import LowRankPreconditioner, top_curvature
from lightning_bif.curvature.objective import Objective
from lightning_bif.curvature.stiffness import drift_stiffness
from lightning_bif.functional import FunctionalModel

NBETA, GAMMA = 40.0, 3.0


def setting():
    model, (x, y) = small_problem()
    fmodel = FunctionalModel(model, None, torch.device("cpu"))
    buffers = fmodel.fresh_buffers()
    curvature = top_curvature(Objective(fmodel, _loss, buffers, WEIGHT_DECAY), [x, y], len(x), rank=4, seed=0)
    lowrank = LowRankPreconditioner(curvature, damping=None, floor=GAMMA / NBETA)
    samples = [(10, [x[i:i + 10], y[i:i + 10]]) for i in (0, 10, 25)]
    exact_plain, exact_preconditioned = [], []
    root = lowrank.apply_sqrt(torch.eye(fmodel.dim, dtype=torch.float64))  # symmetric: G^{1/2}
    for _, batch in samples:
        a = NBETA * explicit_hessian(model, batch, _loss) + GAMMA * torch.eye(fmodel.dim, dtype=torch.float64)
        exact_plain.append(float(torch.linalg.eigvalsh(a)[-1]))
        exact_preconditioned.append(float(torch.linalg.eigvalsh(root @ a @ root)[-1]))
    return fmodel, buffers, lowrank, samples, max(exact_plain), max(exact_preconditioned)


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_stiffness_to_full_dimension_matches_explicit_hessians() -> None:
    fmodel, buffers, lowrank, samples, plain, preconditioned = setting()
    found = drift_stiffness(Objective(fmodel, _loss, buffers, WEIGHT_DECAY), samples, NBETA, GAMMA, lowrank, seed=0,
                            steps=fmodel.dim, tolerance=None)
    assert found.minibatches == 3
    assert found.plain == pytest.approx(plain, rel=1e-6)
    assert found.preconditioned == pytest.approx(preconditioned, rel=1e-6)


def test_early_stopped_stiffness_is_close_below_and_cheaper() -> None:
    fmodel, buffers, lowrank, samples, plain, preconditioned = setting()
    found = drift_stiffness(Objective(fmodel, _loss, buffers, WEIGHT_DECAY), samples, NBETA, GAMMA, lowrank, seed=0)
    assert found.steps < 24
    assert 0.9 * plain <= found.plain <= plain * (1 + 1e-9)  # Ritz values lie inside the spectrum
    assert 0.9 * preconditioned <= found.preconditioned <= preconditioned * (1 + 1e-9)
