"""The localization floor: γ ≥ nβ·(c·λ̄ + max(0, -λ_min)), against exact spectra and the exact Gaussian posterior."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    exact_influence,
    gaussian_posterior,
    half_squared_error,
    linear_problem,
    pearson,
    relative_error,
    sgld_gaussian_influence,
)
from helpers import with_bias as design

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.tuning.localization import (
    LOCALIZATION_FACTOR,
    choose_localization,
    hutchinson_mean_eigenvalue,
    localization_floor,
)


def test_floor_is_the_bulk_plus_the_negative_curvature() -> None:
    c = LOCALIZATION_FACTOR
    assert localization_floor(10.0, 2.0, 0.5) == pytest.approx(10 * c * 2.0)
    assert localization_floor(10.0, 2.0, -4.0) == pytest.approx(10 * (c * 2.0 + 4.0))  # a saddle
    assert localization_floor(10.0, 2.0, 0.5, factor=3.0) == pytest.approx(60.0)
    assert localization_floor(10.0, -1.0, -1.0, factor=5.0) == pytest.approx(10.0)  # λ̄ < 0 adds nothing


def test_choice_is_the_larger_of_the_horizon_and_the_floor_and_without_a_horizon_the_floor() -> None:
    none = choose_localization(nbeta=10.0, mean_eigenvalue=1.0, lambda_min=0.1, horizon_localization=None)
    assert none.localization == none.floor == pytest.approx(10 * LOCALIZATION_FACTOR)  # retraining: the floor
    assert "no horizon and no run" in none.reason
    high = choose_localization(nbeta=100.0, mean_eigenvalue=1.0, lambda_min=-2.0, horizon_localization=50.0)
    assert high.localization == pytest.approx(100 * (LOCALIZATION_FACTOR + 2)) and high.floor == high.localization
    assert "the floor" in high.reason and "horizon's γ 50" in high.reason
    horizon = choose_localization(nbeta=1.0, mean_eigenvalue=1.0, lambda_min=0.5, horizon_localization=7.0,
                                  horizon_source="run damping 1/S")
    assert horizon.localization == 7.0 and "(run damping 1/S)" in horizon.reason


def test_hutchinson_mean_is_exact_for_a_diagonal_and_close_for_a_dense_matrix() -> None:
    generator = torch.Generator().manual_seed(0)
    diagonal = torch.rand(200, generator=generator, dtype=torch.float64) * 5
    mean = hutchinson_mean_eigenvalue(lambda v: diagonal[:, None] * v, 200, torch.device("cpu"), torch.float64, seed=1)
    assert mean == pytest.approx(float(diagonal.mean()), rel=1e-12)  # Rademacher z: zᵀDz = tr(D) exactly
    factor = torch.randn(200, 200, generator=generator, dtype=torch.float64) / 200**0.5
    dense = factor @ factor.T + torch.eye(200, dtype=torch.float64)
    exact = float(torch.trace(dense)) / 200
    estimates = [hutchinson_mean_eigenvalue(lambda v: dense @ v, 200, torch.device("cpu"), torch.float64, seed=s)
                 for s in range(5)]
    assert all(abs(e - exact) / exact < 0.1 for e in estimates)
    assert len(set(estimates)) == 5  # the seed matters: the check above is not of a constant


def _problem(n: int):
    problem = linear_problem(n=n, d=3, probes=8, seed=0, smallest_scale=0.5)
    x = design(problem.x)
    return problem, x, torch.linalg.eigvalsh(x.T @ x / n)


def test_estimate_without_a_horizon_raises_gamma_to_the_floor_and_records_why() -> None:
    problem, _, eigenvalues = _problem(n=80)
    config = SGLDConfig(chains=2, draws=4, thin=1, burn_in=0, batch_size=None, preconditioner="none")
    result = estimate_bif(problem.model, half_squared_error, (problem.x, problem.y), (problem.xp, problem.yp),
                          config=config)
    tuning = result.diagnostics.tuning
    # Hutchinson (30 Rademacher probes) on the 4 × 4 Hessian XᵀX/n, and Lanczos exact in 4 dimensions.
    assert tuning.mean_eigenvalue == pytest.approx(float(eigenvalues.mean()), rel=0.25)
    assert tuning.lambda_min == pytest.approx(float(eigenvalues[0]), rel=1e-6)
    floor = 80 * LOCALIZATION_FACTOR * tuning.mean_eigenvalue
    assert tuning.localization_floor == pytest.approx(floor)
    assert result.config.localization == pytest.approx(floor) == tuning.chosen["localization"]
    assert "the floor" in tuning.reasons["localization"]
    # ε follows the chosen γ.
    assert result.config.step_size == pytest.approx(1 / (80 * tuning.lambda_max + floor))
    given = estimate_bif(problem.model, half_squared_error, (problem.x, problem.y), (problem.xp, problem.yp),
                         config=config.replace(localization=5.0))
    assert given.config.localization == 5.0 and "localization" in given.diagnostics.tuning.given


def test_a_long_horizon_is_raised_to_the_floor_and_the_sampler_matches_the_exact_posterior() -> None:
    """The exact-Gaussian check under the automatic γ: SGLD's discretised stationary covariance, closed form."""
    problem, x, eigenvalues = _problem(n=40)
    n = len(x)
    # δ = (1 - μ)/(η·H) = 0.5/(0.05·2000) = 0.005: far below c·λ̄ ≈ 0.8 (c = 1), so the floor sets γ.
    config = SGLDConfig(chains=16, draws=250, thin=4, burn_in=100, batch_size=None, seed=0,
                        horizon_steps=2000, learning_rate=0.05, momentum=0.5)
    result = estimate_bif(problem.model, half_squared_error, (problem.x, problem.y), (problem.xp, problem.yp),
                          config=config)
    tuning, check = result.diagnostics.tuning, result.diagnostics.horizon
    gamma = result.config.localization
    assert gamma == pytest.approx(tuning.localization_floor) == pytest.approx(check.localization)
    assert gamma > n * check.damping * 100
    assert gamma == pytest.approx(n * LOCALIZATION_FACTOR * float(eigenvalues.mean()), rel=0.25)
    eps = result.config.step_size
    assert eps == pytest.approx(1 / (n * float(eigenvalues[-1]) + gamma))
    mean, exact = sgld_gaussian_influence(problem, x, gamma, eps)
    assert result.ok
    assert pearson(result.influence, exact) >= 0.98 and relative_error(result.influence, exact) <= 0.15
    # The check can tell: the horizon's own (unfloored) γ gives a different posterior.
    _, weak = gaussian_posterior(x, problem.y, problem.w_star, nbeta=n, localization=n * check.damping)
    assert relative_error(result.influence, exact_influence(x, problem.y, design(problem.xp), problem.yp, mean,
                                                            weak)) > 0.5
