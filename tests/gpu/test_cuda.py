"""What only a CUDA device can show: no host synchronisation, and the same answers as on the CPU."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    cross_entropy,
    exact_influence,
    gaussian_posterior,
    half_squared_error,
    linear_problem,
    mlp,
    pearson,
    relative_error,
    with_bias,
)
from scripts.toy import FAST, ToyClassifier, loader, toy_dataset, tracked_sets

from lightning_bif import BIFCallback, SGLDConfig, estimate_bif, open_log
from lightning_bif.estimation.estimator import BIFEstimator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def _classification(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x @ torch.randn(4, 3, generator=g)).argmax(dim=1)


@pytest.mark.parametrize("overrides", [dict(vectorize=True), dict(vectorize=False),
                                       dict(vectorize=True, autocast="bf16"),
                                       dict(vectorize=True, preconditioner="rmsprop"),
                                       dict(vectorize=True, preconditioner="lowrank", preconditioner_rank=8)],
                         ids=["vmap", "sequential", "bf16", "rmsprop", "lowrank"])
def test_the_sgld_loop_never_synchronises_with_the_host(overrides: dict) -> None:
    x, y = _classification()
    model = mlp().to(CUDA)
    config = SGLDConfig(chains=8, draws=10, burn_in=5, thin=2, batch_size=32, **overrides)
    bif = BIFEstimator(model, cross_entropy, (x[:200], y[:200]), (x[200:], y[200:]), config=config)
    bif.prepare()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        accumulator = bif.sample(range(8))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(accumulator.count.sum()) == 8 * 10


def test_chains_on_the_gpu_match_the_exact_gaussian_bif() -> None:
    problem = linear_problem(n=40, d=3, probes=8, seed=0, smallest_scale=0.8)
    config = SGLDConfig(chains=16, draws=250, thin=4, burn_in=100, step_size=1.6e-3, localization=20.0,
                        batch_size=None, seed=0)
    result = estimate_bif(problem.model.to(CUDA), half_squared_error, (problem.x, problem.y),
                          (problem.xp, problem.yp), config=config)
    x, xp = with_bias(problem.x), with_bias(problem.xp)
    mean, cov = gaussian_posterior(x, problem.y, problem.w_star, nbeta=len(problem.x), localization=20.0)
    exact = exact_influence(x, problem.y, xp, problem.yp, mean, cov)
    assert result.ok and result.influence.device.type == "cpu"
    assert pearson(result.influence, exact) >= 0.95
    assert relative_error(result.influence, exact) <= 0.25


def test_bf16_autocast_on_the_gpu_tracks_the_float32_estimate() -> None:
    x, y = _classification()
    model = mlp().to(CUDA)
    config = SGLDConfig(chains=8, draws=60, burn_in=20, step_size=1e-3, batch_size=None, seed=0)
    full = estimate_bif(model, cross_entropy, (x[:200], y[:200]), (x[200:], y[200:]), config=config)
    half = estimate_bif(model, cross_entropy, (x[:200], y[:200]), (x[200:], y[200:]),
                        config=config.replace(autocast="bf16"))
    assert full.ok and half.ok
    assert pearson(full.influence, half.influence) >= 0.8


def test_a_bf16_gpu_trainer_snapshots_in_bf16_and_trains_as_without_the_callback(tmp_path) -> None:
    data = toy_dataset()
    train, probes = tracked_sets(data)

    def run(callbacks: list) -> torch.Tensor:
        pl.seed_everything(0)
        model = ToyClassifier()
        trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=6, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             deterministic=True, callbacks=callbacks, default_root_dir=tmp_path)
        trainer.fit(model, loader(data))
        return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])

    callback = BIFCallback(train, probes, every_n_steps=3, config=FAST, log_path=tmp_path / "bif.h5")
    with_bif, without = run([callback]), run([])
    assert torch.equal(with_bif, without)
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [3, 6] and (log.status == "ok").all()
        assert log.config["sgld"]["autocast"] == "bf16"
