"""The low-rank curvature preconditioner: its eigenpairs, its operator, and the BIF it samples."""

from __future__ import annotations

import pytest
import torch
from helpers import (
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
from torch.func import functional_call

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.curvature.hessian import Curvature, LowRankPreconditioner, top_curvature
from lightning_bif.curvature.objective import Objective
from lightning_bif.estimation.estimator import BIFEstimator
from lightning_bif.functional import FunctionalModel

WEIGHT_DECAY = 1e-2


def trained_mlp() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    x, y = classification_data(64, seed=0, label_noise=2.0)
    model = train_briefly(mlp(hidden=8), cross_entropy, x, y, steps=100, weight_decay=WEIGHT_DECAY)
    return model.double(), x.double(), y


def exact_hessian(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Hessian of mean cross-entropy + λ/2·‖w‖² in the sampler's flat parameter order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def objective(w: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, (t.view(s) for t, s in zip(w.split([s.numel() for s in shapes]), shapes,
                                                                   strict=True)), strict=True))
        loss = torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
        return loss + WEIGHT_DECAY / 2 * w.square().sum()

    return torch.autograd.functional.hessian(objective, flat)


def test_randomized_eigenpairs_match_the_exact_hessian() -> None:
    model, x, y = trained_mlp()
    hessian = exact_hessian(model, x, y)
    exact_values, exact_vectors = torch.linalg.eigh(hessian)
    exact_values, exact_vectors = exact_values.flip(0), exact_vectors.flip(1)
    fmodel = FunctionalModel(model, None, torch.device("cpu"))
    objective = Objective(fmodel, cross_entropy, fmodel.fresh_buffers(), WEIGHT_DECAY)
    curvature = top_curvature(objective, [x, y], len(x), rank=5, seed=0)

    assert curvature.values.shape == (6,) and curvature.vectors.shape == (fmodel.dim, 5)
    torch.testing.assert_close(curvature.values, exact_values[:6], rtol=1e-3, atol=1e-8)
    # The same subspace: the principal angles between the two bases are all ~0.
    overlap = torch.linalg.svdvals(exact_vectors[:, :5].T @ curvature.vectors)
    assert overlap.min() > 0.999
    torch.testing.assert_close(curvature.vectors.T @ curvature.vectors, torch.eye(5, dtype=torch.float64))
    assert curvature.mean == pytest.approx(float(exact_values.mean()), rel=0.3)  # Hutchinson, 25 probes


def test_the_operator_keeps_the_stiffest_direction_and_speeds_up_the_rest() -> None:
    basis = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).Q
    curvature = Curvature(values=torch.tensor([4.0, 2.0, 0.5], dtype=torch.float64), vectors=basis, mean=0.1)
    operator = LowRankPreconditioner(curvature, damping=1.0)
    dense = operator.apply(torch.eye(6, dtype=torch.float64))
    expected_gains = torch.tensor([5 / 5, 5 / 3], dtype=torch.float64)
    rest = 5 / 1.5
    reference = rest * torch.eye(6, dtype=torch.float64) + basis @ torch.diag(expected_gains - rest) @ basis.T
    torch.testing.assert_close(dense, reference)
    root = operator.apply_sqrt(torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(root @ root, dense)
    assert LowRankPreconditioner(curvature, damping=None).damping == pytest.approx(1.0)  # 10 × mean eigenvalue


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgld_with_the_lowrank_preconditioner_matches_the_exact_gaussian_bif(weight_decay: float) -> None:
    problem = linear_problem(n=40, d=3, probes=8, seed=0, smallest_scale=0.3)
    config = SGLDConfig(chains=16, draws=250, thin=4, burn_in=100, step_size=1.6e-3, localization=20.0,
                        weight_decay=weight_decay, preconditioner="lowrank", preconditioner_rank=1,
                        preconditioner_damping=0.05, batch_size=None, seed=0)
    result = estimate_bif(problem.model, half_squared_error, (problem.x, problem.y), (problem.xp, problem.yp),
                          config=config)
    x, xp = with_bias(problem.x), with_bias(problem.xp)
    mean, cov = gaussian_posterior(x, problem.y, problem.w_star, nbeta=len(problem.x), localization=20.0,
                                   weight_decay=weight_decay)
    exact = exact_influence(x, problem.y, xp, problem.yp, mean, cov)
    assert result.ok
    assert pearson(result.influence, exact) >= 0.95
    assert relative_error(result.influence, exact) <= 0.25


def test_chains_give_the_same_draws_vectorized_or_one_by_one_and_rank_is_checked() -> None:
    model, x, y = trained_mlp()
    config = SGLDConfig(chains=3, draws=10, burn_in=0, step_size=1e-3, batch_size=16, preconditioner="lowrank",
                        preconditioner_rank=4, weight_decay=WEIGHT_DECAY, seed=1)
    together = estimate_bif(model, cross_entropy, (x, y), (x[:4], y[:4]), config=config.replace(vectorize=True))
    one_by_one = estimate_bif(model, cross_entropy, (x, y), (x[:4], y[:4]), config=config.replace(vectorize=False))
    torch.testing.assert_close(together.influence, one_by_one.influence, rtol=1e-6, atol=1e-12)
    plain = estimate_bif(model, cross_entropy, (x, y), (x[:4], y[:4]), config=config.replace(preconditioner="none"))
    assert not torch.allclose(plain.influence, together.influence)  # the preconditioner does act

    with pytest.raises(ValueError, match=r"preconditioner_rank=500 must be below the number of sampled parameters"):
        estimate_bif(model, cross_entropy, (x, y), (x[:4], y[:4]), config=config.replace(preconditioner_rank=500))


def test_config_validates_and_round_trips_the_preconditioner_fields() -> None:
    config = SGLDConfig(preconditioner="lowrank", preconditioner_rank=20, preconditioner_damping=0.02)
    assert SGLDConfig.from_json(config.to_json()) == config
    for bad in (dict(preconditioner="kfac"), dict(preconditioner_rank=0), dict(preconditioner_rank=2.5),
                dict(preconditioner_damping=0.0), dict(preconditioner_damping=float("nan"))):
        with pytest.raises(ValueError, match=r"SGLDConfig\.preconditioner"):
            SGLDConfig(**bad)


def test_the_callback_snapshots_with_the_lowrank_preconditioner(tmp_path) -> None:
    import lightning.pytorch as pl
    from scripts.toy import FAST, ToyClassifier, loader, toy_dataset, tracked_sets

    from lightning_bif import BIFCallback, open_log

    data = toy_dataset()
    train, probes = tracked_sets(data)
    config = FAST.replace(preconditioner="lowrank", preconditioner_rank=8)
    callback = BIFCallback(train, probes, every_n_steps=3, config=config, log_path=tmp_path / "bif.h5",
                           min_split_half=None)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(ToyClassifier(), loader(data))
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [3, 6] and (log.status == "ok").all()
        assert log.config["sgld"]["preconditioner"] == "lowrank" and log.config["sgld"]["preconditioner_rank"] == 8


@pytest.mark.parametrize("damping", [1e-4, 0.05, 3.0])
def test_no_direction_becomes_stiffer_than_the_stiffest_one(damping: float) -> None:
    """With δ raised to at least γ/nβ, g_k·(nβλ_k + γ) ≤ nβλ_1 + γ for every direction, the rest included."""
    nbeta, localization = 1000.0, 500.0  # γ/nβ = 0.5: a strong pull, as early in training
    values = torch.tensor([3.0, 1.0, 0.2, 0.01, -0.5], dtype=torch.float64)  # a negative one, as off a minimum
    basis = torch.linalg.qr(torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))).Q
    operator = LowRankPreconditioner(Curvature(values, basis, mean=0.1), damping, floor=localization / nbeta)
    assert operator.damping == max(damping, 0.5)
    top = nbeta * values[0] + localization
    gains = torch.diagonal(basis.T @ operator.apply(basis.T.contiguous()).T)
    assert (gains * (nbeta * values[:4] + localization) <= top * (1 + 1e-12)).all()
    assert operator.rest * (nbeta * values[4].clamp_min(0) + localization) <= top
    assert gains[0] == pytest.approx(1.0) and operator.rest > 1  # the stiffest keeps its step; the rest speed up


@pytest.mark.parametrize("batch_size", [4, 8])
def test_the_automatic_step_size_keeps_the_preconditioned_minibatch_drift_as_stiff_as_the_plain_one(
    batch_size: int,
) -> None:
    """ε·λ_max(G^{1/2}·A_B·G^{1/2}) against ε_plain·λ_max(A_B), exact Hessians of the minibatches B the drift follows.

    G flattens the curvature sample's top eigenvectors; a fresh minibatch's curvature outside them is
    amplified by G's rest gain, so with λ_max(G·A) measured on the curvature sample alone the
    preconditioned drift was 1.2–1.3 × stiffer than the plain one (typical and worst minibatch), and
    on digits every chain diverged.
    """
    model, x, y = trained_mlp()
    config = SGLDConfig(weight_decay=WEIGHT_DECAY, preconditioner="lowrank", preconditioner_rank=5,
                        batch_size=batch_size, seed=0)
    estimator = BIFEstimator(model, cross_entropy, (x, y), (x[:4], y[:4]), config=config)
    estimator.prepare()
    assert "step_size" in estimator.tuning.chosen
    eps, nbeta, gamma = estimator.config.step_size, estimator.nbeta, estimator.config.localization
    plain_eps = 1 / (nbeta * estimator.tuning.lambda_max + gamma)  # the rule without the preconditioner
    identity = torch.eye(estimator.fmodel.dim, dtype=torch.float64)
    root = estimator.sampler.lowrank_preconditioner(estimator.buffers).apply_sqrt(identity)
    generator = torch.Generator().manual_seed(123)
    plain, preconditioned = [], []
    for _ in range(100):  # minibatches drawn as the chains draw theirs, not those the rule measured
        index = torch.randint(len(x), (batch_size,), generator=generator)
        curvature = nbeta * exact_hessian(model, x[index], y[index]) + gamma * identity
        plain.append(plain_eps * float(torch.linalg.eigvalsh(curvature)[-1]))
        preconditioned.append(eps * float(torch.linalg.eigvalsh(root @ curvature @ root)[-1]))
    plain, preconditioned = torch.tensor(plain), torch.tensor(preconditioned)
    assert preconditioned.max() <= 1.1 * plain.max()
    assert preconditioned.median() <= 1.1 * plain.median()
    assert preconditioned.max() < 4  # the stability bound
