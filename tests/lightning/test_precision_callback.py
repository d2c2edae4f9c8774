"""BIFCallback with precision on demand: overhead=, the log's format-3 precision columns, the below-target warning.

Whatever the budget lets the snapshots run, training stays bitwise what it is without the callback; no test
depends on how long anything takes (the budget's arithmetic is tested on a fake clock in test_overhead_budget.py).
"""

from __future__ import annotations

import io
import logging

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import every_warning
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from scripts.toy import FAST, ToyClassifier, loader, toy_dataset, tracked_sets

from lightning_bif import BIFCallback, open_log
from lightning_bif.viewers.cli import summary
from lightning_bif.viewers.plot import plot_pairs

DATA = toy_dataset()
TRAIN, PROBES = tracked_sets(DATA)


def fit(tmp_path, callbacks=()):
    pl.seed_everything(0)
    model = ToyClassifier()
    trainer = pl.Trainer(callbacks=list(callbacks), max_steps=8, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                         default_root_dir=tmp_path)
    trainer.fit(model, loader(DATA))
    return trainer, model


def test_overhead_leaves_training_bitwise_alone_and_the_log_records_the_rounds(tmp_path, caplog):
    _, plain = fit(tmp_path)
    callback = BIFCallback(TRAIN, PROBES, log_path=tmp_path / "bif.h5", every_n_steps=4, at_fit_start=True,
                           config=FAST.replace(target_split_half=0.9, max_chains=8), overhead=0.5,
                           min_split_half=None)
    with caplog.at_level(logging.INFO), every_warning() as caught:
        _, with_bif = fit(tmp_path, [callback])
    # Which of these warnings come depends on the budget's timing; no other warning of ours may.
    ours = [str(w.message) for w in caught if str(w.message).startswith("BIFCallback")]
    assert all("below its split-half target" in m or "skipped the snapshot" in m for m in ours), ours
    for (name, a), b in zip(plain.state_dict().items(), with_bif.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(torch.stack(plain.losses), torch.stack(with_bif.losses))
    assert any("snapshot(s) took" in r.getMessage() and "overhead=0.5" in r.getMessage() for r in caplog.records)
    assert callback._budget.snapshots + callback._budget.skipped == 3
    with open_log(tmp_path / "bif.h5") as log:
        # The first snapshot is taken as configured; later ones as the budget allows (skipped when not earned).
        assert log.format_version == 3 and log.steps[0] == 0 and set(log.steps.tolist()) <= {0, 4, 8}
        assert log.chains == 8  # the chain axis holds the most the rounds may run
        assert np.all(log.target_split_half == 0.9)
        used = np.asarray(log.chains_used)
        assert np.all((used >= 2) & (used <= 8)) and np.all(np.asarray(log.draws_used) == 10)
        # The budget decides how many chains ran; whatever it decided, the log is consistent with it.
        for row, chains in enumerate(used.astype(int)):
            assert np.isnan(log.sampling_loss[row][chains:]).all()
            assert np.isfinite(log.sampling_loss[row][:chains]).all()
            assert log.below_target[row] == (log.split_half[row] < 0.9)
            assert not log.below_target[row] or log.budget_ran_out[row]


def test_a_snapshot_below_target_is_warned_once_with_the_fix_and_its_cost(tmp_path):
    config = FAST.replace(target_split_half=0.999, max_chains=2)  # the cap stops every snapshot at once
    callback = BIFCallback(TRAIN, PROBES, log_path=tmp_path / "bif.h5", every_n_steps=4, config=config,
                           min_split_half=None)
    with every_warning() as caught:
        fit(tmp_path, [callback])
    messages = [str(w.message) for w in caught if "below its split-half target" in str(w.message)]
    assert len(messages) == 1
    assert "SGLDConfig.max_chains" in messages[0] and "target_split_half" in messages[0]
    with open_log(tmp_path / "bif.h5") as log:
        assert log.below_target.all() and log.budget_ran_out.all() and np.all(np.asarray(log.rounds) == 1)
        assert all("below the target" in m and "max_chains" in m for m in log.message)
        out = io.StringIO()
        summary(log, out)
        assert "!" in out.getvalue() and "stopped below their split-half target" in out.getvalue()
        figure = plot_pairs(log)  # the split-half strip marks them
        strip = figure.subfigs[0].axes[1] if getattr(figure, "subfigs", None) else figure.axes[1]
        assert any(line.get_label().startswith("below target") for line in strip.get_lines())
    # A format-3 log written before these columns (main's) reads them as None.
    with h5py.File(tmp_path / "bif.h5", "a") as file:
        for name in ("target_split_half", "chains_used", "draws_used", "rounds", "budget_ran_out", "below_target"):
            del file[name]
    with open_log(tmp_path / "bif.h5") as log:
        assert log.below_target is None and log.chains_used is None and log.snapshot(0).target_split_half is None
        summary(log, io.StringIO())


@pytest.mark.parametrize("overhead", [0, 1, 1.2, -0.5])
def test_an_overhead_outside_zero_one_is_refused_before_training(overhead):
    with pytest.raises(MisconfigurationException, match="overhead"):
        BIFCallback(TRAIN, PROBES, every_n_steps=1, overhead=overhead)


def test_the_below_target_warning_comes_once_in_each_fit(tmp_path):
    config = FAST.replace(target_split_half=0.999, max_chains=2)
    callback = BIFCallback(TRAIN, PROBES, log_path=tmp_path / "bif.h5", every_n_steps=4, config=config,
                           min_split_half=None)
    pl.seed_everything(0)
    model = ToyClassifier()
    trainer = pl.Trainer(callbacks=[callback], max_steps=8, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    for max_steps in (8, 16):  # a second fit continues training and the log, and warns again, once
        trainer.fit_loop.epoch_loop.max_steps = max_steps
        with every_warning() as caught:
            trainer.fit(model, loader(DATA))
        assert sum("below its split-half target" in str(w.message) for w in caught) == 1
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [4, 8, 12, 16]


def test_a_capped_automatic_minibatch_is_warned_once_with_the_fix(tmp_path):
    """1024 SGLD examples, 16 tracked: the automatic minibatch stops at 64, and its gradient noise exceeds SGLD's."""
    data = toy_dataset(n=1024)
    train, probes = tracked_sets(data)
    config = FAST.replace(batch_size="auto", step_size=None, localization=None)
    callback = BIFCallback(train, probes, log_path=tmp_path / "bif.h5", every_n_steps=4, config=config,
                           min_split_half=None)
    pl.seed_everything(0)
    trainer = pl.Trainer(callbacks=[callback], max_steps=8, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with every_warning() as caught:
        trainer.fit(ToyClassifier(), loader(data))
    messages = [str(w.message) for w in caught if "minibatch was capped" in str(w.message)]
    assert len(messages) == 1
    assert "SGLDConfig(batch_size=None)" in messages[0] and "at most 256 training examples" in messages[0]
    assert "wider than the posterior" in messages[0]  # r > 1 here
    with open_log(tmp_path / "bif.h5") as log:
        ratios = [t["gradient_noise_ratio"] for t in log.tuning]
        assert all(r > 1 for r in ratios) and all(t["chosen"]["batch_size"] == 64 for t in log.tuning)
    quiet = BIFCallback(TRAIN, PROBES, log_path=tmp_path / "quiet.h5", every_n_steps=4, config=config,
                        min_split_half=None)  # 192 examples: within 4 x 64, the full batch
    with every_warning() as caught:
        fit(tmp_path, [quiet])
    assert not [w for w in caught if "minibatch was capped" in str(w.message)]
