"""Step-size calibration against the Gaussian case, where the stable step size is known exactly."""

import json
import math

import pytest
import torch
from torch import nn

from lightning_bif import SGLDConfig
from lightning_bif.estimation.calibration import calibrate

N, NBETA, GAMMA = 200, 200.0, 1.0


def half_squared_error(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y).square()


def regression(at_optimum: bool = True) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Linear regression with unequal feature scales; the model at the least-squares solution.

    Returns the model, the data and the eigenvalues of the drift Hessian A = nβ·XᵀX/n + γ·I.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=gen) * torch.tensor([2.0, 1.0, 1.0, 0.5])
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.3 * torch.randn(N, generator=gen)
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        solution = torch.linalg.lstsq(x, y[:, None]).solution.T
        model.weight.copy_(solution if at_optimum else solution + 2.0)
    curvature = torch.linalg.eigvalsh(NBETA * x.T @ x / N + GAMMA * torch.eye(4))
    return model, (x, y), curvature


def rise_inflation(step_size: float, curvature: torch.Tensor) -> float:
    """Exact stationary loss rise of the discretized chain over that of the true posterior.

    XᵀX/n = (A - γ·I)/nβ shares A's eigenbasis, where the chain is an AR(1) process with
    variance 1 / (a·(1 - ε·a/4)) instead of 1/a; the mean loss rise is ½·tr(Σ·XᵀX/n).
    """
    a = curvature.double()
    data_curvature = (a - GAMMA) / NBETA
    exact = (data_curvature / a).sum()
    return float((data_curvature / (a * (1 - step_size * a / 4))).sum() / exact)


def test_chosen_step_is_stable_and_nearly_unbiased() -> None:
    model, data, curvature = regression()
    limit = 4 / float(curvature.max())  # ε·a_max < 4 is the exact stability bound of the update
    config = SGLDConfig(chains=2, draws=10, step_size=limit / 8, nbeta=NBETA, localization=GAMMA, batch_size=None,
                          vectorize=False)
    before = model.weight.detach().clone()
    ladder = [limit * 2.0**k for k in range(1, -5, -1)]
    result = calibrate(model, half_squared_error, data, config, step_sizes=ladder, pilot_steps=100)

    assert result.ok
    assert torch.equal(model.weight, before)
    assert limit / 16 <= result.step_size < limit
    assert result.config == config.replace(step_size=result.step_size)
    # Every larger candidate was rejected for a stated reason; the chosen one is barely biased.
    assert [c.accepted for c in result.candidates] == [False] * (len(result.candidates) - 1) + [True]
    assert result.step_size == result.candidates[-1].step_size / 2  # the default safety margin
    assert all(c.step_size > result.step_size for c in result.candidates[:-1])
    assert any(c.pilot.diverged or "bias" in c.reason for c in result.candidates[:-1])
    assert rise_inflation(result.step_size, curvature) < 1.25
    # Candidates at or beyond the stability bound can never be chosen.
    assert all(not c.accepted for c in result.candidates if c.step_size >= limit)
    json.dumps(result.summary())


def test_rejects_weights_that_are_not_a_stationary_point() -> None:
    model, data, curvature = regression(at_optimum=False)
    limit = 4 / float(curvature.max())
    config = SGLDConfig(step_size=limit / 8, nbeta=NBETA, localization=GAMMA, batch_size=None,
                          vectorize=False)
    result = calibrate(model, half_squared_error, data, config, step_sizes=[limit / 4, limit / 8], pilot_steps=60)

    assert not result.ok
    assert result.step_size == limit / 8
    assert all("stationary" in c.reason or "drift" in c.reason for c in result.candidates)


def test_pilot_evidence_and_argument_checks() -> None:
    model, data, curvature = regression()
    limit = 4 / float(curvature.max())
    config = SGLDConfig(step_size=limit / 8, nbeta=NBETA, localization=GAMMA, batch_size=None,
                          vectorize=False)
    result = calibrate(model, half_squared_error, data, config, step_sizes=[limit / 8], pilot_steps=60)
    (candidate,) = result.candidates
    assert candidate.pilot.steps == 60 and candidate.reference is not None and candidate.reference.steps == 120
    assert candidate.pilot.loss_trace.shape == (30,)
    assert math.isfinite(candidate.bias)
    with pytest.raises(ValueError, match="step_sizes"):
        calibrate(model, half_squared_error, data, config, step_sizes=[-1.0])
    with pytest.raises(ValueError, match="safety"):
        calibrate(model, half_squared_error, data, config, safety=0.5)
    with pytest.raises(ValueError, match="pilot_steps"):
        calibrate(model, half_squared_error, data, config, pilot_steps=3)


class _Rows(torch.utils.data.Dataset):
    """A generic (not tensor-backed) dataset, so batches come from the DataLoader's collate_fn."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def test_a_dataloaders_collate_fn_is_kept_for_the_pilots() -> None:
    model, (x, y), curvature = regression()
    limit = 4 / float(curvature.max())
    as_dict = lambda rows: {"x": torch.stack([r[0] for r in rows]), "y": torch.stack([r[1] for r in rows])}  # noqa: E731
    loader = torch.utils.data.DataLoader(_Rows(x, y), collate_fn=as_dict)
    config = SGLDConfig(step_size=limit / 8, nbeta=NBETA, localization=GAMMA, batch_size=None, vectorize=False)
    dict_loss = lambda m, b: half_squared_error(m, [b["x"], b["y"]])  # noqa: E731
    from_loader = calibrate(model, dict_loss, loader, config, step_sizes=[limit / 8], pilot_steps=40)
    from_tensors = calibrate(model, half_squared_error, (x, y), config, step_sizes=[limit / 8], pilot_steps=40)
    assert from_loader.summary() == from_tensors.summary()
