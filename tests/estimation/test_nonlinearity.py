"""The locality check: Gaussian draws shaped like the posterior, the even/odd split of the tracked losses,
and nβ raised by the estimator with the result reported at the data's nβ."""

from __future__ import annotations

import pytest
import torch
from helpers import classification_data, cross_entropy, half_squared_error, linear_problem, mlp, train_briefly

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.curvature.hessian import Curvature
from lightning_bif.estimation.estimator import BIFEstimator
from lightning_bif.estimation.nonlinearity import complement_eigenvalue, nonlinearity, posterior_deltas
from lightning_bif.tuning import locality, minibatch


def _curvature(dim: int, rank: int, seed: int = 0) -> tuple[Curvature, torch.Tensor]:
    """A Hessian with K known top eigenpairs and one eigenvalue 0.5 on the complement; its matrix."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    values = torch.cat([torch.linspace(20.0, 3.0, rank, dtype=torch.float64), torch.full((dim - rank,), 0.5,
                                                                                          dtype=torch.float64)])
    matrix = basis @ torch.diag(values) @ basis.T
    return Curvature(values=values[:rank + 1], vectors=basis[:, :rank], mean=float(values.mean())), matrix


def test_the_complement_eigenvalue_is_the_rest_of_the_trace() -> None:
    curvature, _ = _curvature(dim=8, rank=3)
    assert complement_eigenvalue(curvature, 8, floor=0.0) == pytest.approx(0.5)
    assert complement_eigenvalue(curvature, 8, floor=2.0) == 2.0


def test_deltas_have_the_posterior_covariance() -> None:
    dim, rank, nbeta, gamma = 6, 3, 50.0, 10.0
    curvature, matrix = _curvature(dim, rank)
    deltas = posterior_deltas(curvature, dim, nbeta, gamma, 0.0, 200_000, seed=1, device=torch.device("cpu"),
                              dtype=torch.float64)
    expected = torch.linalg.inv(nbeta * matrix + gamma * torch.eye(dim, dtype=torch.float64))
    sample = deltas.T @ deltas / len(deltas)
    assert torch.allclose(sample, expected, atol=0.01 * float(expected.diagonal().max()))


def _estimator(problem, config: SGLDConfig) -> BIFEstimator:
    estimator = BIFEstimator(problem.model, half_squared_error, (problem.x, problem.y), (problem.xp, problem.yp),
                             config=config)
    estimator.check_losses()
    return estimator


def test_q_of_quadratic_losses_falls_exactly_as_one_over_nbeta() -> None:
    problem = linear_problem(n=40, d=3)
    estimator = _estimator(problem, SGLDConfig(draws=2, thin=1))
    curvature, _ = _curvature(dim=4, rank=2)
    found = []
    for nbeta in (40.0, 400.0):  # γ/nβ fixed: the draws shrink by √10, the odd part by √10, the even by 10
        deltas = posterior_deltas(curvature, 4, nbeta, nbeta * 0.1, 0.0, 8, seed=3, device=torch.device("cpu"),
                                  dtype=torch.float64)
        found.append(nonlinearity(estimator.losses, estimator.fmodel, deltas))
    assert found[0] > 0 and found[1] == pytest.approx(found[0] / 10, rel=1e-9)


def test_losses_linear_in_the_weights_have_no_even_part() -> None:
    problem = linear_problem(n=30, d=3)

    def output(model: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        return model(batch[0]).squeeze(-1)

    estimator = BIFEstimator(problem.model, output, (problem.x, problem.y), (problem.xp, problem.yp),
                             config=SGLDConfig(draws=2, thin=1))
    estimator.check_losses()
    curvature, _ = _curvature(dim=4, rank=2)
    deltas = posterior_deltas(curvature, 4, 30.0, 3.0, 0.0, 8, seed=0, device=torch.device("cpu"),
                              dtype=torch.float64)
    assert nonlinearity(estimator.losses, estimator.fmodel, deltas) < 1e-20


def _fitted_mlp() -> tuple[torch.nn.Module, tuple, tuple]:
    x, y = classification_data(96, seed=0)
    model = train_briefly(mlp(hidden=8), cross_entropy, x, y, steps=150)
    return model, (x, y), (x[:6], y[:6])


def test_the_estimator_raises_nbeta_and_reports_at_the_data_nbeta(monkeypatch) -> None:
    monkeypatch.setattr(locality, "NONLINEARITY_LIMIT", 1e-3)  # make sure the rule raises nβ on this toy
    model, train, probes = _fitted_mlp()
    config = SGLDConfig(chains=4, draws=20, burn_in=0, target_split_half=None)
    auto = estimate_bif(model, cross_entropy, train, probes, config=config)
    tuning, nbeta = auto.diagnostics.tuning, auto.diagnostics.nbeta
    assert nbeta == pytest.approx(96 * tuning.nonlinearity / 1e-3) and nbeta > 96
    assert "nβ = n·Q/0.001" in tuning.reasons["nbeta"]
    # The same chains at the chosen settings given by hand report -Cov itself: the automatic result is nβ/n times it.
    resolved = auto.config
    given = estimate_bif(model, cross_entropy, train, probes, config=config.replace(
        nbeta=nbeta, localization=resolved.localization, step_size=resolved.step_size,
        batch_size=resolved.batch_size, thin=resolved.thin, preconditioner=resolved.preconditioner,
        control_variates=resolved.control_variates))
    assert given.diagnostics.nbeta == nbeta and "nbeta" not in given.diagnostics.tuning.chosen
    torch.testing.assert_close(auto.influence, given.influence * (nbeta / 96), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(auto.stderr, given.stderr * (nbeta / 96), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(auto.correlation, given.correlation, rtol=1e-4, atol=1e-6)


def test_set_localization_or_step_size_keeps_the_data_nbeta(monkeypatch) -> None:
    monkeypatch.setattr(locality, "NONLINEARITY_LIMIT", 1e-3)
    model, train, probes = _fitted_mlp()
    result = estimate_bif(model, cross_entropy, train, probes,
                          config=SGLDConfig(chains=2, draws=4, burn_in=0, localization=50.0, target_split_half=None))
    assert result.diagnostics.nbeta == 96 and result.diagnostics.tuning.nonlinearity is None
    plain = estimate_bif(model, cross_entropy, train, probes,
                         config=SGLDConfig(chains=2, draws=4, burn_in=0, preconditioner="none",
                                           target_split_half=None))
    assert plain.diagnostics.nbeta == 96 and "needs the top eigenpairs" in plain.diagnostics.tuning.reasons["nbeta"]


def test_with_more_sgld_data_than_tracked_examples_nbeta_stops_where_the_minibatch_noise_allows(monkeypatch) -> None:
    """The callback's case: SGLD minibatches from a large training set, at most N + P examples per step."""
    monkeypatch.setattr(locality, "NONLINEARITY_LIMIT", 1e-4)
    x, y = classification_data(2000, seed=0)
    model = train_briefly(mlp(hidden=8), cross_entropy, x, y, steps=150)
    result = estimate_bif(model, cross_entropy, (x[:40], y[:40]), (x[-8:], y[-8:]), data=(x, y),
                          config=SGLDConfig(chains=2, draws=4, burn_in=0, target_split_half=None))
    tuning = result.diagnostics.tuning
    assert result.config.batch_size == 64  # N + P = 48, raised to the smallest minibatch
    # Q asks for nβ far above n, but 64 examples per step already carry more than the target's gradient noise.
    assert tuning.nonlinearity / 1e-4 > 10 and tuning.gradient_noise_ratio > minibatch.GRADIENT_NOISE_RATIO
    assert result.diagnostics.nbeta == 2000 and "already" in tuning.reasons["nbeta"]
    assert "capped at m = 64" in tuning.reasons["batch_size"]
