"""The snapshot unit without Lightning: the same result as estimate_bif and the callback, failures as a status,
the model and the RNG untouched, the config derived from an optimizer, and the collectives."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scripts.toy import FAST, ToyClassifier, loader, toy_dataset, tracked_sets
from torch import nn

from lightning_bif import BIFCallback, SGLDConfig, estimate_bif, open_log
from lightning_bif.curvature.cache import CurvatureCache
from lightning_bif.functional import float32_model
from lightning_bif.log import LogWriter, RunIdentity
from lightning_bif.snapshot.snapshotter import Snapshotter, training_config, with_horizon

DATA = toy_dataset()
TRAIN, PROBES = tracked_sets(DATA)
# Chains one after another: vectorize="auto" decides by timing on a CPU, which a bitwise comparison cannot allow.
CONFIG = FAST.replace(vectorize=False)


def test_the_unit_gives_the_callbacks_snapshot_and_estimate_bifs_result_bitwise(tmp_path) -> None:
    pl.seed_everything(0)
    model = ToyClassifier()
    callback = BIFCallback(TRAIN, PROBES, at_fit_end=True, config=CONFIG, log_path=tmp_path / "bif.h5",
                           min_split_half=None, horizon=3)
    trainer = pl.Trainer(max_steps=5, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, loader(DATA))
    optimizers = trainer.optimizers

    # The config the callback ran with, derived without Lightning from the same optimizer.
    resolved = training_config(CONFIG, optimizers)
    assert resolved.config.weight_decay == model.hparams.weight_decay and resolved.notes and not resolved.warnings
    config = with_horizon(resolved.config, optimizers, 3, trainer.global_step).config
    assert config.horizon_steps == 3 and (config.learning_rate, config.momentum) == pytest.approx((0.1, 0.9))

    snapshotter = Snapshotter(ToyClassifier.per_example_loss, TRAIN, PROBES, data=loader(DATA))
    taken = snapshotter.take(model, config)
    assert (taken.status, taken.message, taken.error) == ("ok", "", None)
    assert (taken.vectorized, taken.sequential_reason) == (False, None)  # decided by the snapshot: vectorize=False
    alone = estimate_bif(model, ToyClassifier.per_example_loss, TRAIN, PROBES, data=loader(DATA), config=config)
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [5] and log.status.tolist() == ["ok"]
        assert SGLDConfig.from_dict(log.config["sgld"]) == resolved.config  # the run's identity: before the horizon
        logged = {"influence": log.influence[-1], "stderr": log.stderr[-1], "correlation": log.correlation[-1]}
        assert float(log.step_size[-1]) == taken.step_size == alone.config.step_size
    for name, value in logged.items():
        np.testing.assert_array_equal(getattr(taken.result, name).numpy(), value, err_msg=name)
        assert torch.equal(getattr(taken.result, name), getattr(alone, name)), name


def test_a_record_from_the_unit_goes_to_the_log_like_the_callbacks(tmp_path) -> None:
    model = ToyClassifier()
    snapshotter = Snapshotter(ToyClassifier.per_example_loss, TRAIN, PROBES, data=DATA)
    config = CONFIG.replace(draws=None)  # the identity sizes the diagnostics with the resolved draws
    taken = snapshotter.take(model, config)
    identity = RunIdentity.for_snapshots(snapshotter, config, train_groups=[0, 1] * 6)
    with LogWriter(tmp_path / "bif.h5", identity) as writer:
        writer.write(taken.record(step=7, epoch=1))
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [7] and log.epochs.tolist() == [1] and log.status.tolist() == ["ok"]
        assert log.train_groups.tolist() == [0, 1] * 6 and log.train_ids.tolist() == list(range(0, 24, 2))
        np.testing.assert_array_equal(log.influence[-1], taken.result.influence.numpy())


def _state(model: nn.Module) -> dict[str, object]:
    return {"tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "modes": [m.training for m in model.modules()], "dtypes": [p.dtype for p in model.parameters()],
            "rng": torch.get_rng_state()}


def _assert_same_state(before: dict[str, object], model: nn.Module) -> None:
    after = _state(model)
    assert before["modes"] == after["modes"] and before["dtypes"] == after["dtypes"]
    assert torch.equal(before["rng"], after["rng"])
    for kind in ("tensors", "grads"):
        assert before[kind].keys() == after[kind].keys()
        for name, value in before[kind].items():
            assert torch.equal(value, after[kind][name]), (kind, name)


class _Net(nn.Module):
    """Dropout, BatchNorm (running statistics move in train mode) and a submodule left in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.5))
        self.head = nn.Linear(16, 3)
        self.head.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _net_loss(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_snapshot_leaves_the_model_and_the_global_rng_bitwise_alone(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = _Net().to(dtype)
    model(DATA.tensors[0][:32].to(dtype)).sum().backward()  # gradients a snapshot must not touch
    before = _state(model)
    taken = Snapshotter(_net_loss, TRAIN, PROBES, data=DATA).take(model, CONFIG.replace(autocast="bf16")
                                                                  if dtype == torch.bfloat16 else CONFIG)
    assert taken.status == "ok" and torch.isfinite(taken.result.influence).all()
    _assert_same_state(before, model)
    if dtype == torch.bfloat16:  # sampled as a float32 copy: SGLD steps vanish in bf16 rounding
        copy = float32_model(model)
        assert copy is not model and all(p.dtype == torch.float32 for p in copy.parameters())
    else:
        assert float32_model(model) is model


def test_a_failure_is_a_status_and_estimate_bif_raises_it() -> None:
    def fails_while_sampling(model: nn.Module, batch) -> torch.Tensor:
        if torch.is_grad_enabled() and len(batch[0]) == CONFIG.batch_size:  # an SGLD minibatch, not the w* check
            raise RuntimeError("out of memory (simulated)")
        return ToyClassifier.per_example_loss(model, batch)

    model = ToyClassifier()
    before = _state(model)
    taken = Snapshotter(fails_while_sampling, TRAIN, PROBES, data=DATA).take(model, CONFIG)
    assert (taken.status, taken.result) == ("failed", None)
    assert taken.message == "RuntimeError: out of memory (simulated)" and isinstance(taken.error, RuntimeError)
    assert taken.step_size == CONFIG.step_size and taken.record(step=3).used_step_size() == CONFIG.step_size
    _assert_same_state(before, model)
    with pytest.raises(RuntimeError, match="out of memory"):
        estimate_bif(model, fails_while_sampling, TRAIN, PROBES, data=DATA, config=CONFIG)

    diverged = Snapshotter(ToyClassifier.per_example_loss, TRAIN, PROBES, data=DATA).take(
        model, CONFIG.replace(step_size=50.0))
    assert diverged.status == "diverged" and diverged.message == diverged.result.divergence
    assert diverged.result is not None and not diverged.result.ok


def test_the_loss_check_measures_no_curvature_and_a_snapshot_does() -> None:
    cache = CurvatureCache()
    snapshotter = Snapshotter(ToyClassifier.per_example_loss, TRAIN, PROBES, data=DATA, cache=cache)
    config = CONFIG.replace(step_size=None)  # an automatic step size needs the curvature
    assert snapshotter.check_losses(ToyClassifier(), config) is None  # shapes and finiteness; no token axis
    assert cache.entry is None
    assert snapshotter.take(ToyClassifier(), config).status == "ok"
    assert cache.entry is not None


def test_the_config_from_an_optimizer() -> None:
    weights, biases = nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [weights], "weight_decay": 0.01}, {"params": [biases]}], lr=0.1)
    resolved = training_config(SGLDConfig(), [optimizer], "bf16-mixed")
    assert resolved.config.weight_decay == 0.01 and resolved.config.autocast == "bf16"
    assert len(resolved.notes) == 2 and "different weight decays [0.0, 0.01]" in resolved.warnings[0]
    kept = training_config(SGLDConfig(weight_decay=0.5), [optimizer], "bf16-mixed", precision_from_trainer=False)
    assert (kept.config.weight_decay, kept.config.autocast, kept.notes) == (0.5, None, ())

    horizon = with_horizon(SGLDConfig(), [optimizer], 20, step=5).config
    assert (horizon.horizon_steps, horizon.momentum) == (20, 0.0) and horizon.learning_rate == pytest.approx(0.1)
    own = SGLDConfig(horizon_steps=4, learning_rate=1.0, momentum=0.5)
    assert with_horizon(own, [optimizer], 20, step=5).config == own
    unknown = with_horizon(SGLDConfig(), [optimizer], None, step=5)
    assert unknown.config == SGLDConfig() and "step 5 has no horizon (the number of steps" in unknown.warnings[0]
    optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = 0.0
    assert "optimizer's step is unknown" in with_horizon(SGLDConfig(), [optimizer], 20, step=5).warnings[0]
