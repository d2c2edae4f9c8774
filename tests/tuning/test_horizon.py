"""The horizon: γ from (H, η, μ) against the exact unrolled SGD response, the saddle check, optimizers, the log.

On linear regression (quadratic loss) heavy-ball SGD is a linear recursion, so the response of
the iterate after H steps to up-weighting z_i has a closed form per Hessian eigenvalue a:
d_H = -f_H(a)·∇ℓ_i/n with the filter f_H from the recursion below. The horizon BIF replaces f_H(a)
by 1/(a + δ), δ = (1 - μ)/(η·H); both are ≈ η·H/(1 - μ) for a ≪ δ and 1/a for a ≫ δ, and
ρ = max_a |f_H(a)·(a + δ) - 1| bounds the difference in between.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import h5py
import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    TanhOnceDifferentiable,
    exact_influence,
    gaussian_posterior,
    half_squared_error,
    linear_problem,
    pearson,
    relative_error,
    sgld_gaussian_influence,
)
from helpers import with_bias as design
from scripts.toy import FAST, ToyClassifier, loader, toy_dataset, tracked_sets
from torch import nn

from lightning_bif import BIFCallback, SGLDConfig, estimate_bif, open_log
from lightning_bif.curvature.extremes import extreme_curvature
from lightning_bif.curvature.objective import Objective
from lightning_bif.functional import FunctionalModel
from lightning_bif.tuning.horizon import horizon_config, horizon_damping, optimizer_step

H, LR, MOMENTUM = 20, 0.05, 0.5  # δ = (1 - μ)/(η·H) = 0.5: the Hessian's eigenvalues (0.3 .. 1.3) straddle it


def stationary_problem():
    """Linear regression at its least-squares fit w* (a stationary point: training from w* stays there)."""
    problem = linear_problem(n=40, d=3, probes=8, seed=0, smallest_scale=0.5)
    x = design(problem.x)
    fit = torch.linalg.lstsq(x, problem.y[:, None]).solution.squeeze(1)
    with torch.no_grad():
        problem.model.weight.copy_(fit[:3][None])
        problem.model.bias.copy_(fit[3:])
    return problem, x, design(problem.xp)


def unrolled_response(problem, horizon: int, lr: float, momentum: float, eps: float = 1e-4) -> torch.Tensor:
    """d φ_j(w_{t+H}) / d(weight of z_i) ``[P, N]`` by central differences of real ``torch.optim.SGD`` runs.

    The training objective is mean_k ℓ_k + (weight of z_i)/n·ℓ_i, started at w* with an empty momentum buffer.
    """
    n = len(problem.x)
    response = torch.empty(len(problem.xp), n, dtype=torch.float64)
    for i in range(n):
        ends = []
        for sign in (1, -1):
            model = nn.Linear(3, 1).double()
            model.load_state_dict(problem.model.state_dict())
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
            weights = torch.ones(n, dtype=torch.float64)
            weights[i] += sign * eps
            for _ in range(horizon):
                optimizer.zero_grad()
                (half_squared_error(model, [problem.x, problem.y]) * weights).mean().backward()
                optimizer.step()
            with torch.no_grad():
                ends.append(half_squared_error(model, [problem.xp, problem.yp]))
        response[:, i] = (ends[0] - ends[1]) / (2 * eps)
    return response


def filter_ratio_error(eigenvalues: torch.Tensor, horizon: int, lr: float, momentum: float) -> float:
    """ρ = max over eigenvalues a of |f_H(a)·(a + δ) - 1|, f_H from the heavy-ball recursion with unit forcing."""
    d, u = torch.zeros_like(eigenvalues), torch.zeros_like(eigenvalues)
    for _ in range(horizon):
        u = momentum * u + eigenvalues * d + 1
        d = d - lr * u
    f = -d
    return float((f * (eigenvalues + horizon_damping(horizon, lr, momentum)) - 1).abs().max())


def test_horizon_bif_matches_the_exact_unrolled_sgd_response_on_a_quadratic() -> None:
    problem, x, xp = stationary_problem()
    n = len(x)
    hessian = x.T @ x / n
    eigenvalues = torch.linalg.eigvalsh(hessian)
    config = SGLDConfig(horizon_steps=H, learning_rate=LR, momentum=MOMENTUM)
    resolved, check = horizon_config(config, nbeta=n, lambda_min=float(eigenvalues[0]),
                                     lambda_max=float(eigenvalues[-1]))
    assert check.damping == pytest.approx(0.5) and resolved.localization == pytest.approx(n * 0.5)
    unrolled = unrolled_response(problem, H, LR, MOMENTUM)
    # The closed form of the localized posterior with the horizon's γ (posterior mean = w*: a stationary point).
    mean, cov = gaussian_posterior(x, problem.y, problem.w_star, nbeta=n, localization=resolved.localization)
    assert torch.allclose(mean, problem.w_star)
    bif = exact_influence(x, problem.y, xp, problem.yp, mean, cov)

    # The bound: with residual-weighted inputs p = r_p·x_p, q = r_i·x_i in the eigenbasis V, the first-order
    # parts differ by Σ_k p_k q_k (f_H(a_k) - 1/(a_k + δ))/n, at most ρ·Σ_k |p_k q_k|/(n·(a_k + δ)) per entry;
    # the BIF's second-order term ½(x_pᵀΣx_i)² comes on top.
    rho = filter_ratio_error(eigenvalues, H, LR, MOMENTUM)
    assert rho <= 0.35  # H·(1 - μ) = 10 steps of memory: the regime where damping ≈ unrolling
    values, vectors = torch.linalg.eigh(hessian)
    p = (problem.yp - xp @ mean)[:, None] * (xp @ vectors)
    q = (problem.y - x @ mean)[:, None] * (x @ vectors)
    bound = rho * (p.abs() / (values + check.damping)) @ q.abs().T / n
    second_order = 0.5 * (xp @ cov @ x.T).square()
    assert ((unrolled - bif).abs() <= bound + second_order + 1e-9).all()
    assert pearson(unrolled, bif) >= 0.97 and relative_error(bif, unrolled) <= rho
    # The check can tell: dropping the momentum factor (damping 1/(η·H), 2x smaller) is clearly further off.
    _, cov_without = gaussian_posterior(x, problem.y, problem.w_star, nbeta=n, localization=n / (LR * H))
    without = exact_influence(x, problem.y, xp, problem.yp, mean, cov_without)
    assert relative_error(without, unrolled) > relative_error(bif, unrolled) + 0.15


def test_sampler_with_a_horizon_matches_the_closed_form() -> None:
    problem = linear_problem(n=40, d=3, probes=8, seed=0, smallest_scale=0.8)
    x = design(problem.x)
    n = len(x)
    # A set localization keeps the horizon's γ as it is (no floor): the closed form below is the horizon's.
    config = SGLDConfig(chains=16, draws=250, thin=4, burn_in=100, batch_size=None, seed=0, localization=0.0,
                        horizon_steps=H, learning_rate=LR, momentum=MOMENTUM)
    result = estimate_bif(problem.model, half_squared_error, (problem.x, problem.y), (problem.xp, problem.yp),
                          config=config)
    check = result.diagnostics.horizon
    eigenvalues = torch.linalg.eigvalsh(x.T @ x / n)
    assert check.lambda_min == pytest.approx(float(eigenvalues[0]), rel=1e-6)  # Lanczos is exact in 4 dimensions
    assert check.lambda_max == pytest.approx(float(eigenvalues[-1]), rel=1e-6)
    assert not check.saddle and result.config.localization == pytest.approx(n * 0.5)
    gamma = result.config.localization
    eps = result.config.step_size
    assert eps == pytest.approx(1 / (n * float(eigenvalues[-1]) + gamma))  # ε·(largest posterior curvature) = 1
    # Full-batch SGLD's stationary variance is 1/(a·(1 - ε·a/4)) per precision eigenvalue a (up to 33 % above 1/a).
    mean, exact = sgld_gaussian_influence(problem, x, gamma, eps)
    assert result.ok
    assert pearson(result.influence, exact) >= 0.98 and relative_error(result.influence, exact) <= 0.15
    # The check can tell: the continuous-time covariance 1/a misses the step's inflation of the stiff directions.
    continuous = exact_influence(x, problem.y, design(problem.xp), problem.yp, mean, torch.linalg.inv(
        x.T @ x + gamma * torch.eye(4, dtype=torch.float64)))
    assert relative_error(result.influence, continuous) > 0.2


class Saddle(nn.Module):
    """ℓ_k(w) = a/2·(w1 - x_k)² - b/2·w2² + c/4·w2⁴: at w* = (mean x, 0) a saddle with λ_min = -b."""

    def __init__(self, center: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([center, 0.0], dtype=torch.float64))


def saddle_loss(model: Saddle, batch: list[torch.Tensor]) -> torch.Tensor:
    (x,) = batch
    w1, w2 = model.w
    return 0.5 * 2.0 * (w1 - x).square() - 0.5 * 3.0 * w2.square() + 0.25 * 10.0 * w2**4


def test_a_saddle_is_diagnosed_recorded_and_handled() -> None:
    x = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = Saddle(float(x.mean()))
    n = len(x)
    # δ = 1/(0.1·10) = 1 < |λ_min| = 3: with γ = nβ·δ the Gaussian limit is improper along w2.
    config = SGLDConfig(chains=4, draws=100, thin=2, burn_in=0, batch_size=None,
                        horizon_steps=10, learning_rate=0.1, momentum=0.0)
    result = estimate_bif(model, saddle_loss, (x,), (x[:3],), config=config)
    check = result.diagnostics.horizon
    assert check.saddle and check.lambda_min == pytest.approx(-3.0, rel=1e-6)
    assert result.config.localization == pytest.approx(n * (1.0 + 3.0))  # the most negative direction gets δ
    # Handled, the chains stay at the saddle: the Gaussian loss rise is 1/(6n) - 1.5/n + 7.5/n² ≈ -0.024.
    assert result.ok and -0.05 < result.diagnostics.loss_rise < 0.01
    # Unhandled, the chains slide into the wells at w2² = b/c, where the loss is 0.225 below w*.
    plain = estimate_bif(model, saddle_loss, (x,), (x[:3],),
                         config=SGLDConfig(chains=4, draws=100, thin=2, burn_in=0, step_size=1e-3, batch_size=None,
                                           localization=n * 1.0))
    assert plain.diagnostics.loss_rise < -0.1


def constant_gradient_displacement(optimizer_cls, horizon: int = 50, **options) -> tuple[torch.Tensor, ...]:
    """Warm an optimizer up on a constant gradient, read its heavy-ball (η, μ), then move H more steps."""
    param = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    gradient = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64) * 0.3
    optimizer = optimizer_cls([param], **options)

    def run(steps: int) -> None:
        for _ in range(steps):
            param.grad = gradient.clone()
            optimizer.step()

    run(1000)  # RMSprop's average has no bias correction: let it settle
    found = optimizer_step(optimizer)
    before = param.detach().clone()
    run(horizon)
    predicted = -found.learning_rate * horizon / (1 - found.momentum) * gradient
    return param.detach() - before, predicted, found


@pytest.mark.parametrize(("optimizer_cls", "options", "momentum"), [
    (torch.optim.SGD, {"lr": 0.01}, 0.0),
    (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}, 0.9),
    (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "dampening": 0.5}, 0.9),
    (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "nesterov": True}, 0.9),
    (torch.optim.Adam, {"lr": 0.01}, 0.9),
    (torch.optim.Adam, {"lr": 0.01, "amsgrad": True}, 0.9),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.0}, 0.9),
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5}, 0.5),
], ids=["sgd", "momentum", "dampening", "nesterov", "adam", "amsgrad", "adamw", "rmsprop"])
def test_heavy_ball_equivalent_predicts_the_optimizers_own_steps(optimizer_cls, options, momentum) -> None:
    moved, predicted, found = constant_gradient_displacement(optimizer_cls, **options)
    assert found.momentum == pytest.approx(momentum)
    torch.testing.assert_close(moved, predicted, rtol=1e-3, atol=0.0)


def test_optimizer_step_reads_schedulers_groups_and_refuses_what_it_does_not_know() -> None:
    small, large = nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(30))
    sgd = torch.optim.SGD([{"params": [small], "lr": 0.1}, {"params": [large], "lr": 0.2, "momentum": 0.5}])
    found = optimizer_step(sgd)
    assert found.learning_rate == pytest.approx((10 * 0.1 + 30 * 0.2) / 40)  # weighted by parameter count
    assert found.momentum == pytest.approx(30 * 0.5 / 40)
    scheduler = torch.optim.lr_scheduler.StepLR(sgd, step_size=1, gamma=0.1)
    sgd.step()
    scheduler.step()
    assert optimizer_step(sgd).learning_rate == pytest.approx((10 * 0.01 + 30 * 0.02) / 40)  # the current lr
    assert optimizer_step(torch.optim.Adam([small])) is None  # no second moments before the first step
    assert optimizer_step(torch.optim.Adagrad([small])) is None
    assert optimizer_step(torch.optim.SGD([small], lr=0.0)) is None


@pytest.mark.parametrize(("changes", "match"), [
    ({"horizon_steps": 10}, "together"),
    ({"horizon_steps": 0.5, "learning_rate": 0.1, "momentum": 0.0}, "horizon_steps"),
    ({"horizon_steps": 10, "learning_rate": 0.0, "momentum": 0.0}, "learning_rate"),
    ({"horizon_steps": 10, "learning_rate": 0.1, "momentum": 1.0}, "momentum"),
])
def test_config_validates_the_horizon(changes, match) -> None:
    with pytest.raises(ValueError, match=match):
        SGLDConfig(**changes)
    assert SGLDConfig.from_json(SGLDConfig(horizon_steps=10, learning_rate=0.1, momentum=0.9).to_json()).momentum == 0.9


@pytest.mark.parametrize(("horizon", "expected"), [("interval", [4, 2]), ("rest", [6, 2]), (7, [7, 7])])
def test_callback_records_the_horizon_of_every_snapshot(tmp_path: Path, horizon, expected) -> None:
    data = toy_dataset()
    train, probes = tracked_sets(data)
    callback = BIFCallback(train, probes, every_n_steps=4, config=FAST, log_path=tmp_path / "bif.h5",
                           horizon=horizon, progress=False)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback], default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ToyClassifier(lr=0.1), loader(data))
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [4, 8] and (log.status == "ok").all()
        assert log.horizon_steps.tolist() == expected
        assert log.learning_rate.tolist() == pytest.approx([0.1, 0.1]) and log.momentum.tolist() == [0.9, 0.9]
        damping = [(1 - 0.9) / (0.1 * h) for h in expected]
        assert all(g >= 192 * d for g, d in zip(log.localization, damping, strict=True))  # + |λ_min| at a saddle
        raised = [g / 192 - d for g, d in zip(log.localization, damping, strict=True)]
        assert raised == pytest.approx([max(0.0, -v) for v in log.lambda_min], abs=1e-9)
        assert math.isfinite(log.snapshot(-1).lambda_min)


def test_a_version_1_log_without_horizon_columns_still_opens(tmp_path: Path) -> None:
    data = toy_dataset()
    train, probes = tracked_sets(data)
    path = tmp_path / "bif.h5"
    callback = BIFCallback(train, probes, every_n_steps=2, config=FAST, log_path=path, horizon=None, progress=False)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback], default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ToyClassifier(), loader(data))
    with open_log(path) as log:
        assert math.isnan(log.horizon_steps[0]) and log.localization.tolist() == [FAST.localization]
    with h5py.File(path, "r+") as file:  # what a version-1 writer left: no horizon columns
        for name in ("horizon_steps", "learning_rate", "momentum", "localization", "lambda_min"):
            del file[name]
        file.attrs["format_version"] = 1
    with open_log(path) as log:
        assert log.format_version == 1 and log.horizon_steps is None and log.lambda_min is None
        snapshot = log.snapshot(0)
        assert snapshot.localization is None and snapshot.influence.shape == (4, 12)



def test_curvature_falls_back_to_finite_differences_where_forward_mode_ad_fails() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 1)).double()
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, dtype=torch.float64)

    def loss(m, batch, act=torch.tanh):
        return (m[1](act(m[0](batch[0]))).squeeze(-1) - batch[1]).square()

    fmodel = FunctionalModel(model, None, torch.device("cpu"))
    buffers = fmodel.fresh_buffers()
    exact = extreme_curvature(Objective(fmodel, loss, buffers, 1e-3), [x, y], 30, seed=0)
    once = Objective(fmodel, lambda m, b: loss(m, b, TanhOnceDifferentiable.apply), buffers, 1e-3)
    fallback = extreme_curvature(once, [x, y], 30, seed=0)
    with pytest.raises(RuntimeError):  # the op really has no forward-mode derivative
        torch.func.jvp(TanhOnceDifferentiable.apply, (x,), (x,))
    assert exact[0] < 0 < exact[1]  # an indefinite Hessian: a saddle-like point of a small network
    assert fallback == pytest.approx(exact, rel=1e-4)
