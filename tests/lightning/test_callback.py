"""BIFCallback in real Lightning training on CPU: training untouched, schedule, checks at fit start, failures."""

import csv
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import every_warning
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from scripts.toy import FAST, ToyClassifier, loader, toy_dataset, tracked_sets
from torch.utils.data import Subset

from lightning_bif import BIFCallback, open_log
from lightning_bif.schedule import LogSpaced, SnapshotSchedule

DATA = toy_dataset()
TRAIN, PROBES = tracked_sets(DATA)


def make_trainer(tmp_path: Path, callbacks=(), **kwargs) -> pl.Trainer:
    options = dict(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, deterministic=True, default_root_dir=tmp_path)
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def fit(tmp_path: Path, callbacks=(), model: ToyClassifier | None = None, seed: int = 0, **kwargs):
    pl.seed_everything(seed)
    model = model or ToyClassifier()
    trainer = make_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model, loader(DATA))
    return trainer, model


def fit_warned(tmp_path: Path, callback: BIFCallback, word: str, **kwargs) -> tuple[pl.Trainer, ToyClassifier, list]:
    """``fit`` with ``callback``, and the messages of the warnings that mention ``word`` (repeats included)."""
    with every_warning() as caught:
        trainer, model = fit(tmp_path, [callback], **kwargs)
    return trainer, model, [str(w.message) for w in caught if word in str(w.message)]


def bif(tmp_path: Path, name: str = "bif.h5", **kwargs) -> BIFCallback:
    kwargs.setdefault("config", FAST)
    # FAST's few chains and draws are unreliable by design; the tests about that warning ask for it.
    kwargs.setdefault("min_split_half", None)
    return BIFCallback(TRAIN, PROBES, log_path=tmp_path / name, **kwargs)


def csv_metrics(trainer: pl.Trainer) -> list[dict]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as file:
        return list(csv.DictReader(file))


# Cheap pilots: the point here is that calibrating (at every snapshot, as none is accepted) leaves training alone.
TINY_CALIBRATION = {"pilot_steps": 20, "pilot_chains": 1, "tracked": 16, "step_sizes": [1e-2, 1e-4]}


@pytest.mark.parametrize(("dropout", "calibrate"), [(0.0, False), (0.5, False), (0.5, TINY_CALIBRATION)])
def test_training_is_bitwise_identical_with_and_without_the_callback(tmp_path, dropout, calibrate):
    def run(callbacks, where):
        pl.seed_everything(0)
        model = ToyClassifier(dropout=dropout)
        trainer = make_trainer(tmp_path, callbacks, max_steps=14, val_check_interval=4, limit_val_batches=2,
                               logger=CSVLogger(tmp_path / where), log_every_n_steps=1)
        trainer.fit(model, loader(DATA), loader(DATA, shuffle=False))
        return trainer, model

    plain_trainer, plain = run([], "plain")
    callback = bif(tmp_path, every_n_steps=3, at_steps=[1, 4], at_fit_start=True, at_fit_end=True, calibrate=calibrate)
    if calibrate:  # the toy's weights are never a stationary point: no step size is accepted, and it says so
        with pytest.warns(UserWarning, match="calibration at step 0 accepted no step size"):
            bif_trainer, with_bif = run([callback], "bif")
    else:
        bif_trainer, with_bif = run([callback], "bif")

    for (name, a), b in zip(plain.state_dict().items(), with_bif.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    plain_opt = plain_trainer.optimizers[0].state_dict()
    bif_opt = bif_trainer.optimizers[0].state_dict()
    for key, state in plain_opt["state"].items():
        assert torch.equal(state["momentum_buffer"], bif_opt["state"][key]["momentum_buffer"])
    assert torch.equal(torch.stack(plain.losses), torch.stack(with_bif.losses))
    plain_rows, bif_rows = csv_metrics(plain_trainer), csv_metrics(bif_trainer)
    assert len(plain_rows) > 14 and plain_rows == bif_rows  # train_loss every step and val_loss, equal strings
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [0, 1, 3, 4, 6, 9, 12, 14]
        assert (log.status == "ok").all()
        assert np.isfinite(log.influence[:]).all()
        assert all(c is not None for c in log.calibration) if calibrate else log.calibration == [None] * 8


def test_snapshots_only_at_real_optimizer_steps_under_gradient_accumulation(tmp_path):
    trainer, _ = fit(tmp_path, [bif(tmp_path, every_n_steps=2)], max_steps=6, accumulate_grad_batches=3)
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [2, 4, 6]
        assert log.epochs.tolist() == [0, 1, 2]  # 6 batches per epoch = 2 optimizer steps per epoch
    assert trainer.global_step == 6


def test_epoch_schedule_and_fit_end_never_repeat_a_step(tmp_path):
    fit(tmp_path, [bif(tmp_path, every_n_epochs=1, at_fit_end=True)], max_steps=-1, max_epochs=3)
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [6, 12, 18] and log.epochs.tolist() == [0, 1, 2]


def test_log_spaced_schedule_ends_at_the_trainers_length(tmp_path):
    callback = bif(tmp_path, log_spaced=4)
    fit(tmp_path, [callback], max_steps=27)
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [1, 3, 9, 27]
    fit(tmp_path, [bif(tmp_path, "b.h5", log_spaced=LogSpaced(3, first=2, last=8))], max_steps=27)
    with open_log(tmp_path / "b.h5") as log:
        assert log.steps.tolist() == [2, 4, 8]


def test_a_schedule_value_and_its_keywords_give_the_same_log(tmp_path):
    keywords = dict(every_n_steps=4, at_steps=[1], at_fit_start=True)
    fit(tmp_path, [bif(tmp_path, "keywords.h5", **keywords)], max_steps=8)
    fit(tmp_path, [bif(tmp_path, "value.h5", schedule=SnapshotSchedule(**keywords))], max_steps=8)
    with open_log(tmp_path / "keywords.h5") as by_keywords, open_log(tmp_path / "value.h5") as by_value:
        assert by_keywords.steps.tolist() == by_value.steps.tolist() == [0, 1, 4, 8]
        np.testing.assert_array_equal(by_keywords.influence[:], by_value.influence[:])
    with pytest.raises(MisconfigurationException, match="every_n_steps were both given"):
        bif(tmp_path, schedule=SnapshotSchedule(at_fit_start=True), every_n_steps=2)


def test_a_second_fit_on_the_same_trainer_continues_the_log(tmp_path):
    callback = bif(tmp_path, every_n_steps=2)
    trainer, model = fit(tmp_path, [callback], max_steps=4)
    trainer.fit_loop.epoch_loop.max_steps = 8
    trainer.fit(model, loader(DATA))
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [2, 4, 6, 8]


def test_should_snapshot_is_the_customisation_point(tmp_path):
    class OddSteps(BIFCallback):
        def should_snapshot(self, event, step, epoch):
            return event == "step" and step % 2 == 1

    odd = OddSteps(TRAIN, PROBES, at_fit_end=True, config=FAST, log_path=tmp_path / "odd.h5", min_split_half=None)
    fit(tmp_path, [odd], max_steps=6)
    with open_log(tmp_path / "odd.h5") as log:
        assert log.steps.tolist() == [1, 3, 5]


def test_weight_decay_prior_comes_from_the_optimizer_unless_set(tmp_path):
    callback = bif(tmp_path, at_fit_start=True)
    fit(tmp_path, [callback], model=ToyClassifier(weight_decay=0.01), max_steps=1)
    assert callback.resolved_config.weight_decay == 0.01
    with open_log(tmp_path / "bif.h5") as log:
        assert log.config["sgld"]["weight_decay"] == 0.01
    explicit = bif(tmp_path, "explicit.h5", at_fit_start=True, config=FAST.replace(weight_decay=0.5))
    fit(tmp_path, [explicit], model=ToyClassifier(weight_decay=0.01), max_steps=1)
    assert explicit.resolved_config.weight_decay == 0.5
    off = bif(tmp_path, "off.h5", at_fit_start=True, weight_decay_from_optimizer=False)
    fit(tmp_path, [off], model=ToyClassifier(weight_decay=0.01), max_steps=1)
    assert off.resolved_config.weight_decay == 0.0


def test_default_log_path_is_in_the_trainers_log_dir_and_groups_are_stored(tmp_path):
    callback = BIFCallback(TRAIN, PROBES, at_fit_start=True, config=FAST, min_split_half=None,
                           train_groups=DATA.tensors[1][TRAIN.indices], probe_groups=["a", "b", "a", "b"])
    trainer, _ = fit(tmp_path, [callback], max_steps=1, logger=CSVLogger(tmp_path))
    expected = Path(trainer.logger.log_dir) / "influence.h5"
    assert callback.resolved_log_path == expected
    with open_log(expected) as log:
        assert log.train_ids.tolist() == TRAIN.indices and log.probe_ids.tolist() == PROBES.indices
        assert log.train_groups.tolist() == DATA.tensors[1][TRAIN.indices].tolist()
        assert log.probe_groups.tolist() == ["a", "b", "a", "b"]


class NoHook(ToyClassifier):
    per_example_loss = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)


def mean_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def short_loss(model, batch):
    return ToyClassifier.per_example_loss(model, batch)[:-1]


def infinite_loss(model, batch):
    losses = ToyClassifier.per_example_loss(model, batch)
    return torch.where(batch[1] == 0, torch.inf, losses)


@pytest.mark.parametrize(("model", "kwargs", "match"), [
    (NoHook(), {}, "def per_example_loss"),
    (ToyClassifier(), {"loss_fn": mean_loss}, "scalar.*reduction='none'"),
    (ToyClassifier(), {"loss_fn": short_loss}, r"expected \[12\]"),
    (ToyClassifier(), {"loss_fn": infinite_loss}, "non-finite"),
    (ToyClassifier(), {"log_path": "FILE/bif.h5"}, "log_path"),
])
def test_bad_input_is_rejected_at_fit_start_before_any_training_step(tmp_path, model, kwargs, match):
    (tmp_path / "FILE").write_text("a file where a directory should be")
    if kwargs.get("log_path"):
        kwargs["log_path"] = tmp_path / kwargs["log_path"]
    options = {"every_n_steps": 1, "config": FAST, "log_path": tmp_path / "bif.h5", **kwargs}
    callback = BIFCallback(TRAIN, PROBES, **options)
    trainer = make_trainer(tmp_path, [callback])
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(model, loader(DATA))
    assert trainer.global_step == 0 and model.losses == []


def test_bad_arguments_are_rejected_when_the_callback_is_made():
    with pytest.raises(MisconfigurationException, match="train is empty"):
        BIFCallback(Subset(DATA, []), PROBES, every_n_steps=1)
    with pytest.raises(MisconfigurationException, match="probes is empty"):
        BIFCallback(TRAIN, (torch.zeros(0, 8), torch.zeros(0)), every_n_steps=1)
    with pytest.raises(MisconfigurationException, match="schedule is empty"):
        BIFCallback(TRAIN, PROBES)
    with pytest.raises(MisconfigurationException, match="train_groups"):
        BIFCallback(TRAIN, PROBES, every_n_steps=1, train_groups=[0, 1])
    with pytest.raises(MisconfigurationException, match="if_exists"):
        BIFCallback(TRAIN, PROBES, every_n_steps=1, if_exists="append")


def test_an_existing_log_of_another_run_is_refused_unless_overwritten(tmp_path):
    fit(tmp_path, [bif(tmp_path, at_fit_start=True)], max_steps=1)
    model = ToyClassifier()
    with pytest.raises(MisconfigurationException, match="if_exists"):
        make_trainer(tmp_path, [bif(tmp_path, at_fit_start=True)]).fit(model, loader(DATA))
    other = bif(tmp_path, at_fit_start=True, if_exists="resume", config=FAST.replace(draws=12))
    with pytest.raises(MisconfigurationException, match="draws"):
        make_trainer(tmp_path, [other]).fit(model, loader(DATA))
    assert model.losses == []
    fit(tmp_path, [bif(tmp_path, every_n_steps=2, if_exists="overwrite", config=FAST.replace(draws=12))], max_steps=4)
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [2, 4] and log.draws == 12
    same_run = bif(tmp_path, every_n_steps=2, if_exists="resume", config=FAST.replace(draws=12))
    with pytest.raises(MisconfigurationException, match=r"up to step 4, but training starts at step 0.*ckpt_path"):
        make_trainer(tmp_path, [same_run]).fit(model, loader(DATA))
    assert model.losses == []
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [2, 4]


def test_sharded_strategies_are_refused(tmp_path):
    callback = bif(tmp_path, every_n_steps=1)
    trainer = make_trainer(tmp_path, [callback])
    trainer._accelerator_connector.strategy = FSDPStrategy()  # FSDP itself needs a GPU; the check must not
    with pytest.raises(MisconfigurationException, match=r"FSDPStrategy.*ddp"):
        callback.setup(trainer, ToyClassifier(), "fit")


def test_diverging_chains_are_recorded_warned_once_and_training_goes_on(tmp_path):
    callback = bif(tmp_path, every_n_steps=2, config=FAST.replace(step_size=1e3), horizon=None)
    trainer, model, (warning,) = fit_warned(tmp_path, callback, "diverged", max_steps=6)  # warned once
    assert "step_size" in warning and trainer.global_step == 6 and len(model.losses) == 6
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [2, 4, 6] and (log.status == "diverged").all()
        assert np.asarray(log.diverged).all()


def test_a_snapshot_that_raises_is_recorded_as_failed_and_training_goes_on(tmp_path):
    def fails_after_step_2(model, batch):
        if model.trainer.global_step >= 2:
            raise RuntimeError("out of memory (simulated)")
        return ToyClassifier.per_example_loss(model, batch)

    callback = bif(tmp_path, every_n_steps=1, loss_fn=fails_after_step_2)
    trainer, model, (warning,) = fit_warned(tmp_path, callback, "failed", max_steps=4)
    assert "out of memory (simulated)" in warning and trainer.global_step == 4 and len(model.losses) == 4
    with open_log(tmp_path / "bif.h5") as log:
        assert log.status.tolist() == ["ok", "failed", "failed", "failed"]
        assert "RuntimeError: out of memory (simulated)" in log.message[1]
        assert np.isnan(log.influence[1]).all() and np.isfinite(log.influence[0]).all()


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_half_precision_trainers_get_float32_estimates_and_keep_their_weights(tmp_path, precision):
    callback = bif(tmp_path, at_fit_start=True, at_fit_end=True)
    _, model = fit(tmp_path, [callback], max_steps=3, precision=precision)
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert all(p.dtype == expected for p in model.parameters())
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [0, 3] and (log.status == "ok").all()
        influence = log.influence[-1]
        assert np.isfinite(influence).all() and np.abs(influence).max() > 0
        assert log.config["sgld"]["autocast"] == "bf16"  # forward passes in the trainer's precision


@pytest.mark.parametrize(("precision", "follow", "expected"),
                         [("32-true", True, None), ("bf16-mixed", False, None), ("bf16-mixed", True, "bf16")])
def test_snapshots_follow_a_bf16_trainer_unless_told_not_to(tmp_path, precision, follow, expected):
    callback = bif(tmp_path, at_fit_end=True, precision_from_trainer=follow)
    fit(tmp_path, [callback], max_steps=2, precision=precision)
    with open_log(tmp_path / "bif.h5") as log:
        assert log.config["sgld"]["autocast"] == expected and (log.status == "ok").all()
    assert callback.resolved_config.autocast == expected


def test_fit_from_a_checkpoint_continues_the_log_and_drops_the_abandoned_timeline(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(tmp_path, [bif(tmp_path, every_n_steps=3), bif(tmp_path, "second.h5", every_n_steps=5), checkpoints],
        max_steps=12, enable_checkpointing=True)
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [3, 6, 9, 12]
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)
    states = [v for k, v in checkpoint["callbacks"].items() if k.startswith("BIFCallback")]
    assert sorted(s["last_step"] for s in states) == [-1, 3]  # state_key keeps the two instances apart

    resumed = bif(tmp_path, every_n_steps=3)
    second = bif(tmp_path, "second.h5", every_n_steps=5)
    trainer = make_trainer(tmp_path, [resumed, second], max_steps=10)
    resumed_at = time.time()
    trainer.fit(ToyClassifier(), loader(DATA), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [3, 6, 9]
        assert log.wall_time[0] < resumed_at < log.wall_time[1]  # 6 and 9 are the new timeline's
    with open_log(tmp_path / "second.h5") as log:
        assert log.steps.tolist() == [5, 10]


def test_snapshots_reach_the_trainers_tensorboard_logger_with_the_logged_values(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing import event_accumulator

    labels = DATA.tensors[1]
    callback = BIFCallback(TRAIN, PROBES, every_n_steps=2, config=FAST, min_split_half=None,
                           train_groups=labels[TRAIN.indices],
                           probe_groups=labels[PROBES.indices], probe_group_names={0: "zero", 1: "one", 2: "two"},
                           tensorboard=["groups", "duration_s"])
    trainer, _ = fit(tmp_path, [callback], max_steps=4, logger=TensorBoardLogger(tmp_path, name="tb"))

    def events(directory: Path) -> event_accumulator.EventAccumulator:
        loaded = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
        loaded.Reload()
        return loaded

    main, group_zero = events(Path(trainer.logger.log_dir)), events(Path(trainer.logger.log_dir) / "train_0")
    with open_log(callback.resolved_log_path) as log:
        assert callback.resolved_log_path.parent == Path(trainer.logger.log_dir)
        assert "bif_diag/split_half" not in main.Tags()["scalars"]  # only the charts asked for
        durations = main.Scalars("bif_diag/duration_s")
        assert [e.step for e in durations] == log.steps.tolist() == [2, 4]
        np.testing.assert_allclose([e.value for e in durations], log.duration_s, rtol=1e-6)
        pairs = np.ix_(log.probe_groups == 1, log.train_groups == 0)
        expected = [log.nbeta[s] * log.influence[s][pairs].mean() for s in range(len(log))]
        np.testing.assert_allclose([e.value for e in group_zero.Scalars("bif_x_nbeta/probes_one")], expected, rtol=1e-5)
    with pytest.raises(MisconfigurationException, match=r"tensorboard.*'heatmap'"):
        BIFCallback(TRAIN, PROBES, every_n_steps=2, tensorboard=["heatmap"])


def split_half_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "split-half" in str(w.message)]


def test_low_split_half_reliability_is_warned_about_once_per_fit(tmp_path):
    # Plain SGLD: the automatic preconditioner and control variates make even 3 draws fairly reliable here.
    few_draws = bif(tmp_path, every_n_steps=2, config=FAST.replace(draws=3, burn_in=0, preconditioner="none",
                                                                   control_variates=False),
                    min_split_half=0.3, horizon=None)
    with every_warning() as caught:
        trainer, model = fit(tmp_path, [few_draws], max_steps=6)
    (message,) = split_half_warnings(caught)
    assert "min_split_half=0.3" in message and "chains" in message and "How much to trust a curve" in message
    with open_log(tmp_path / "bif.h5") as log:
        assert (log.split_half < 0.3).all()  # every snapshot is unreliable; the warning came once
    trainer.fit_loop.epoch_loop.max_steps = 8
    with every_warning() as caught:
        trainer.fit(model, loader(DATA))
    assert len(split_half_warnings(caught)) == 1  # once per fit

    many_chains = bif(tmp_path, "good.h5", every_n_steps=2, config=FAST.replace(chains=16, draws=50),
                      min_split_half=0.3)
    off = bif(tmp_path, "off.h5", every_n_steps=2, config=FAST.replace(draws=3, burn_in=0), min_split_half=None)
    with every_warning() as caught:
        fit(tmp_path, [many_chains, off], max_steps=6)
    assert split_half_warnings(caught) == []
    with open_log(tmp_path / "good.h5") as log:
        assert (log.split_half > 0.5).all()
    with pytest.raises(MisconfigurationException, match="min_split_half"):
        bif(tmp_path, every_n_steps=1, min_split_half=2.0)


def test_calibration_picks_the_step_size_once_weights_are_stationary_and_keeps_it(tmp_path):
    """Too large a configured step (0.1); calibration fails at step 0 (not stationary), succeeds at step 60."""
    ladder = [0.1 * 2.0**-k for k in range(9)]
    options = {"pilot_steps": 100, "pilot_chains": 2, "tracked": 32, "step_sizes": ladder}
    callback = bif(tmp_path, at_fit_start=True, at_steps=[60, 100, 110], calibrate=options,
                   config=FAST.replace(step_size=0.1, batch_size=None), horizon=None)
    trainer, model, (warning,) = fit_warned(tmp_path, callback, "calibration", max_steps=100)
    assert "step 0" in warning and "step_size=0.1" in warning and "not a stationary point" in warning
    with open_log(tmp_path / "bif.h5") as log:
        at_start, chosen, later = log.calibration
        assert at_start["ok"] is False and later is None  # no calibration once one step size was accepted
        assert chosen["ok"] is True and chosen["candidates"][-1]["accepted"] is True
        calibrated = chosen["step_size"]
        assert calibrated < 0.1 / 4 and chosen["candidates"][0]["accepted"] is False
        assert log.step_size.tolist() == [0.1, calibrated, calibrated]
        # step size 0.1 blows the chains up (loss rise ~1e8): diverged; the calibrated ones are fine.
        assert log.status.tolist() == ["diverged", "ok", "ok"] and "left the neighbourhood" in log.message[0]
        assert log.config["sgld"]["step_size"] == 0.1  # the stored config is the configured one
    assert callback.resolved_config.step_size == calibrated
    state = callback.state_dict()
    assert state["calibrated_step_size"] == calibrated
    restored = bif(tmp_path, "restored.h5", every_n_steps=1, calibrate=True, config=FAST.replace(step_size=0.1))
    restored.load_state_dict(state)
    assert restored.resolved_config.step_size == calibrated

    # A second fit continues the log: same run (identity unchanged), calibrated step size kept, no new calibration.
    trainer.fit_loop.epoch_loop.max_steps = 110
    trainer.fit(model, loader(DATA))
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [0, 60, 100, 110]
        assert log.step_size[-1] == calibrated and log.calibration[-1] is None


def test_calibration_settings_are_checked_when_the_callback_is_made(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"unknown setting\(s\) \['pilot_draws'\]"):
        bif(tmp_path, every_n_steps=1, calibrate={"pilot_draws": 10})
    with pytest.raises(MisconfigurationException, match="True/False or a dict"):
        bif(tmp_path, every_n_steps=1, calibrate="yes")
