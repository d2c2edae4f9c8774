"""An end-of-training snapshot of a run whose cosine schedule ends at learning rate 0 gets the run's own damping."""

import math

import lightning.pytorch as pl
import pytest
import torch
from scripts.toy import FAST, ToyClassifier, loader, toy_dataset, tracked_sets

from lightning_bif import BIFCallback, open_log

DATA = toy_dataset()
TRAIN, PROBES = tracked_sets(DATA)
STEPS, LR, MOMENTUM = 12, 0.1, 0.9


class CosineToZero(ToyClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_end_of_training_snapshot_at_lr_zero_uses_the_run_damping(tmp_path) -> None:
    pl.seed_everything(0)
    callback = BIFCallback(TRAIN, PROBES, log_path=tmp_path / "bif.h5", at_steps=[STEPS], min_split_half=None,
                           config=FAST.replace(localization=None, step_size=None))
    trainer = pl.Trainer(max_steps=STEPS, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(CosineToZero(), loader(DATA))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # The callback reads each step's lr after Lightning's scheduler step: lr_t for t = 1..T.
    length = sum(0.5 * LR * (1 + math.cos(math.pi * t / STEPS)) for t in range(1, STEPS + 1)) / (1 - MOMENTUM)
    log = open_log(tmp_path / "bif.h5")
    assert log.steps.tolist() == [STEPS]
    snapshot = log.snapshot(0)
    assert snapshot.horizon_steps == STEPS and snapshot.momentum == 0.0
    assert snapshot.learning_rate * snapshot.horizon_steps == pytest.approx(length, rel=1e-6)
    reason = snapshot.tuning["reasons"]["localization"]
    assert "run damping 1/S" in reason and f"T = {STEPS}" in reason
    assert snapshot.localization >= snapshot.tuning["localization_floor"] * (1 - 1e-9)


def test_the_run_length_is_checkpointed_so_a_resumed_fit_keeps_counting(tmp_path) -> None:
    pl.seed_everything(0)
    callback = BIFCallback(TRAIN, PROBES, log_path=tmp_path / "bif.h5", at_steps=[STEPS], min_split_half=None,
                           config=FAST)
    trainer = pl.Trainer(max_steps=STEPS - 2, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(CosineToZero(), loader(DATA))
    state = callback.state_dict()
    assert state["run_length"]["steps"] == STEPS - 2 and state["run_length"]["length"] > 0
    restored = BIFCallback(TRAIN, PROBES, log_path=tmp_path / "other.h5", at_steps=[STEPS], config=FAST)
    restored.load_state_dict(state)
    assert restored.state_dict()["run_length"] == state["run_length"]
    del state["run_length"]  # a checkpoint written before the run length was kept
    older = BIFCallback(TRAIN, PROBES, log_path=tmp_path / "older.h5", at_steps=[STEPS], config=FAST)
    older.load_state_dict(state)
    assert older.state_dict()["run_length"]["steps"] == 0
