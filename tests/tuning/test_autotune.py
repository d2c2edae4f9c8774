"""Self-tuning (``None`` settings, lightning_bif/tuning/autotune.py), the curvature cache, and what they record."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from helpers import (
    TanhOnceDifferentiable,
    classification_data,
    cross_entropy,
    exact_influence,
    gaussian_posterior,
    half_squared_error,
    linear_problem,
    mlp,
    pearson,
    relative_error,
    train_briefly,
    with_bias,
)

import lightning_bif.estimation.tuning_run as tuning_run_module
from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.curvature.cache import CurvatureCache
from lightning_bif.estimation.calibration import calibrate
from lightning_bif.estimation.estimator import BIFEstimator
from lightning_bif.log import LogWriter, RunIdentity, SnapshotRecord, open_log
from lightning_bif.tuning import autotune, locality, localization
from lightning_bif.viewers.cli import main

LOCALIZATION = 20.0


def _discretized_covariance(precision: torch.Tensor, preconditioner: torch.Tensor, step: float) -> torch.Tensor:
    """Stationary covariance of δ ← (I - ε/2·G·A)δ + √ε·G^{1/2}ξ: the discrete Lyapunov equation Σ = MΣMᵀ + εG."""
    d = precision.shape[0]
    m = torch.eye(d, dtype=torch.float64) - step / 2 * preconditioner @ precision
    lhs = torch.eye(d * d, dtype=torch.float64) - torch.kron(m, m)
    return torch.linalg.solve(lhs, step * preconditioner.reshape(-1)).reshape(d, d)


@pytest.mark.parametrize(("weight_decay", "smallest_scale", "rank"), [(0.0, 0.8, 3), (0.1, 0.3, 3), (0.0, 0.3, 2)],
                         ids=["isotropic", "weight_decay", "rank_2"])
def test_automatic_choices_sample_the_exact_gaussian_bif(weight_decay: float, smallest_scale: float,
                                                         rank: int) -> None:
    """Every automatic choice at once (ε, low-rank preconditioner, control variates, thinning) on an exact Gaussian."""
    problem = linear_problem(n=40, d=3, probes=8, seed=0, smallest_scale=smallest_scale)
    config = SGLDConfig(chains=16, draws=250, burn_in=100, localization=LOCALIZATION, weight_decay=weight_decay,
                        batch_size=None, seed=0, preconditioner_rank=rank)
    estimator = BIFEstimator(problem.model, half_squared_error, (problem.x, problem.y), (problem.xp, problem.yp),
                             config=config)
    estimator.prepare()
    result = estimator.summarize(estimator.sample_checked(range(config.chains)), 0.0)
    chosen = result.diagnostics.tuning.chosen
    assert set(chosen) == {"thin", "step_size", "preconditioner", "control_variates"}
    assert chosen["preconditioner"] == "lowrank" and chosen["control_variates"] is True
    x, xp = with_bias(problem.x), with_bias(problem.xp)
    mean, cov = gaussian_posterior(x, problem.y, problem.w_star, nbeta=len(problem.x), localization=LOCALIZATION,
                                   weight_decay=weight_decay)
    # ε·(nβ·λ_max + γ) = 1 inflates the stiffest directions' variance by up to 1/(1 - 1/4): the chains sample
    # the discretized chain's stationary law, whose BIF is checked tightly, and the posterior's ranking.
    g = estimator.sampler.lowrank_preconditioner({}).apply(torch.eye(4, dtype=torch.float64))
    sampled = _discretized_covariance(torch.linalg.inv(cov), g, result.config.step_size)
    assert relative_error(result.influence, exact_influence(x, problem.y, xp, problem.yp, mean, sampled)) <= 0.1
    exact = exact_influence(x, problem.y, xp, problem.yp, mean, cov)
    assert pearson(result.influence, exact) >= 0.99
    assert relative_error(result.influence, exact) <= 0.35


def _trained_mlp() -> tuple[torch.nn.Module, tuple, tuple]:
    x, y = classification_data(n=96, seed=0)
    model = mlp(seed=0)
    train_briefly(model, cross_entropy, x, y, steps=100)
    return model, (x, y), (x[:6], y[:6])


def test_unset_settings_are_chosen_and_recorded_and_set_ones_win() -> None:
    model, train, probes = _trained_mlp()
    auto = estimate_bif(model, cross_entropy, train, probes, config=SGLDConfig(chains=2, burn_in=2, draws=4))
    tuning = auto.diagnostics.tuning
    assert set(tuning.chosen) == {"thin", "step_size", "preconditioner", "control_variates", "localization", "nbeta",
                                  "batch_size"}
    assert tuning.given == ["draws"] and auto.config.draws == 4
    nbeta = auto.diagnostics.nbeta  # n = 96, raised by the locality rule where the losses are not linear enough
    assert tuning.chosen["nbeta"] == nbeta
    assert nbeta == pytest.approx(96 * max(1.0, tuning.nonlinearity / locality.NONLINEARITY_LIMIT))
    # γ = nβ·(c·λ̄ + max(0, -λ_min)) without a horizon.
    floor = nbeta * (localization.LOCALIZATION_FACTOR * tuning.mean_eigenvalue + max(0.0, -tuning.lambda_min))
    assert tuning.localization_floor == pytest.approx(floor)
    assert auto.config.localization == pytest.approx(floor)  # no horizon, no run: the floor itself
    # (N + P)/(3·m) = 102/(3·m) rounds to 1 for m ≥ 64; ε = 1/(nβ·λ_max + γ), times λ_max(A)/λ_max(G·A) on the
    # drift's minibatches where the preconditioner makes them stiffer.
    assert auto.config.thin == 1
    assert auto.config.step_size == pytest.approx(
        min(1.0, tuning.drift_stiffness / tuning.preconditioned_stiffness)
        / (nbeta * tuning.lambda_max + auto.config.localization))
    assert tuning.lambda_min <= tuning.lambda_max and tuning.mean_eigenvalue > 0
    assert "MiB" in tuning.reasons["preconditioner"] and tuning.lowrank_memory_mib > 0
    given = estimate_bif(model, cross_entropy, train, probes,
                         config=SGLDConfig(chains=2, burn_in=2, draws=4, thin=2, step_size=1e-4, batch_size=64,
                                           preconditioner="none", control_variates=False, localization=7.0))
    assert given.config.step_size == 1e-4 and given.config.thin == 2 and given.config.preconditioner == "none"
    assert given.config.localization == 7.0 and given.diagnostics.tuning.localization_floor is None
    assert given.diagnostics.tuning.chosen == {}
    assert set(given.diagnostics.tuning.given) == {*autotune.AUTOMATIC, "batch_size"}
    assert given.diagnostics.nbeta == 96 and given.diagnostics.tuning.nonlinearity is None


def test_lowrank_falls_back_to_plain_sgld_over_the_memory_budget(monkeypatch) -> None:
    model, train, probes = _trained_mlp()
    monkeypatch.setattr(autotune, "LOWRANK_MEMORY_BUDGET", 1024)
    result = estimate_bif(model, cross_entropy, train, probes, config=SGLDConfig(chains=2, burn_in=2, draws=4))
    tuning = result.diagnostics.tuning
    assert result.config.preconditioner == "none" and result.config.control_variates is False
    assert "over the budget of 0 MiB" in tuning.reasons["preconditioner"]



def test_lowrank_falls_back_to_plain_sgld_when_hessian_vector_products_fail() -> None:
    x, y = classification_data(n=64, seed=1)
    model = torch.nn.Linear(4, 3)

    def loss(m, batch):
        logits = TanhOnceDifferentiable.apply(m(batch[0])) * 3
        return torch.nn.functional.cross_entropy(logits, batch[1], reduction="none")

    result = estimate_bif(model, loss, (x, y), (x[:4], y[:4]),
                          config=SGLDConfig(chains=2, burn_in=2, draws=4, vectorize=False, preconditioner_rank=4))
    assert result.ok and result.config.preconditioner == "none"
    assert "Hessian-vector products failed" in result.diagnostics.tuning.reasons["preconditioner"]
    assert result.diagnostics.tuning.lambda_max > 0  # Lanczos fell back to finite differences


def test_the_curvature_cache_is_reused_while_fresh_and_refreshed_when_stale(monkeypatch) -> None:
    model, train, probes = _trained_mlp()
    measured = []
    original = tuning_run_module.top_curvature
    monkeypatch.setattr(tuning_run_module, "top_curvature", lambda *a, **k: measured.append(1) or original(*a, **k))
    cache = CurvatureCache()
    config = SGLDConfig(chains=2, burn_in=2, draws=4)
    first = estimate_bif(model, cross_entropy, train, probes, config=config, cache=cache)
    second = estimate_bif(model, cross_entropy, train, probes, config=config, cache=cache)
    assert not first.diagnostics.tuning.curvature_reused and second.diagnostics.tuning.curvature_reused
    assert second.diagnostics.tuning.curvature_drift < 1e-4 and len(measured) == 1
    assert second.config.step_size == pytest.approx(first.config.step_size, rel=1e-3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # a much sharper minimum: the cached eigenvalues are far off
    third = estimate_bif(model, cross_entropy, train, probes, config=config, cache=cache)
    assert not third.diagnostics.tuning.curvature_reused and len(measured) == 2
    assert "drifted" in third.diagnostics.tuning.curvature_reason
    other = estimate_bif(model, cross_entropy, train, probes, config=config.replace(weight_decay=1e-3), cache=cache)
    assert other.diagnostics.tuning.curvature_reason == "settings changed"


def test_calibration_pilots_measure_the_curvature_once(monkeypatch) -> None:
    model, train, _ = _trained_mlp()
    measured = []
    original = tuning_run_module.top_curvature
    monkeypatch.setattr(tuning_run_module, "top_curvature", lambda *a, **k: measured.append(1) or original(*a, **k))
    found = calibrate(model, cross_entropy, train, SGLDConfig(batch_size=32), pilot_steps=20, pilot_chains=1,
                      tracked=16)
    # The eigenpairs are measured for the automatic centre; every pilot reuses them.
    assert len(found.candidates) >= 2 and len(measured) == 1


def test_tuning_is_logged_and_summarized_and_a_version_1_log_reads_none(tmp_path, capsys) -> None:
    model, train, probes = _trained_mlp()
    result = estimate_bif(model, cross_entropy, train, probes, config=SGLDConfig(chains=2, burn_in=2, draws=4,
                                                                                    target_split_half=None))
    path = tmp_path / "bif.h5"
    identity = RunIdentity({"sgld": result.config.to_dict()}, np.arange(96), np.arange(6), chains=2, draws=4)
    with LogWriter(path, identity) as writer:
        writer.append(SnapshotRecord(step=0, epoch=0, wall_time=0.0, duration_s=1.0, status="ok", result=result))
    with open_log(path) as log:
        assert log.tuning[0]["chosen"]["preconditioner"] == "lowrank"
        assert log.snapshot(0).tuning["lambda_max"] == pytest.approx(result.diagnostics.tuning.lambda_max)
    assert main(["summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "automatic settings at step 0" in out and "preconditioner = lowrank" in out and "λ_max" in out
    assert f"nonlinearity Q {result.diagnostics.tuning.nonlinearity:.3g}" in out and "minibatch noise r 0" in out
    assert "nbeta = " in out and "batch_size = None" in out  # 96 examples: the full batch, r = 0
    with h5py.File(path, "a") as file:  # what a version-1 writer left: no tuning column
        del file["tuning"]
    with open_log(path) as log:
        assert log.tuning == [None] and log.snapshot(0).tuning is None


def test_runaway_low_rank_chains_are_sampled_again_with_plain_sgld(monkeypatch) -> None:
    """A runaway (mean loss rise beyond max(D/nβ, loss)) under the automatic preconditioner: plain SGLD instead."""
    model, train, probes = _trained_mlp()
    monkeypatch.setattr(BIFEstimator, "runaway",
                        lambda self, acc: "forced" if self.config.preconditioner == "lowrank" else None)
    cache = CurvatureCache()
    config = SGLDConfig(chains=2, burn_in=2, draws=4)
    result = estimate_bif(model, cross_entropy, train, probes, config=config, cache=cache)
    assert result.ok and result.config.preconditioner == "none" and result.config.control_variates is False
    assert "ran away (forced)" in result.diagnostics.tuning.reasons["preconditioner"]
    again = estimate_bif(model, cross_entropy, train, probes, config=config, cache=cache)
    assert "ran away at an earlier estimate" in again.diagnostics.tuning.reasons["preconditioner"]


def test_the_runaway_bound_is_the_laplace_bound() -> None:
    model, train, probes = _trained_mlp()
    estimator = BIFEstimator(model, cross_entropy, train, probes, config=SGLDConfig(chains=2, burn_in=2, draws=4))
    estimator.prepare()
    accumulator = estimator.sample(range(2))
    assert estimator.runaway(accumulator) is None  # a sane snapshot: rise far below D/nβ
    accumulator.sum_train += 10 * estimator.fmodel.dim / estimator.nbeta * accumulator.count[:, None]
    assert "> max(D/nβ, loss at w*)" in estimator.runaway(accumulator)
