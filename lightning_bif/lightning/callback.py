"""``BIFCallback``: BIF snapshots during Lightning training, appended to an HDF5 log and TensorBoard."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from ..config import SGLDConfig
from ..curvature.cache import CurvatureCache
from ..example_sets import Batch, ExampleSet, ExampleSource
from ..functional import LossFn
from ..log import LogWriteError, LogWriter, RunIdentity
from ..schedule import Event, LogSpaced, SnapshotSchedule
from ..snapshot.collectives import StrategyCollectives
from ..snapshot.record import SnapshotRecord
from ..snapshot.snapshotter import SnapshotSink, Snapshotter, shown_setting, training_config, with_horizon
from ..snapshot.threads import oversubscription, snapshot_threads
from ..tuning.run_damping import RunLength
from ..viewers.tensorboard import TensorBoardSink
from .argument_checks import Groups, calibration_options, check_options, display_texts, group_labels
from .datamodule_examples import DataModuleExamples
from .log_path import default_log_path
from .training_length import manual_optimization_steps

#: Name of the LightningModule method used when no ``loss_fn`` is given.
LOSS_HOOK = "per_example_loss"

_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
_PROGRESS_EVERY_S = 10.0


def module_per_example_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The default ``loss_fn``: the LightningModule's own ``per_example_loss(batch) -> Tensor[B]``."""
    return getattr(model, LOSS_HOOK)(batch)


class BIFCallback(Callback):
    """Take Bayesian-influence-function snapshots of the model while it trains.

    On a schedule the callback runs a snapshot (:class:`~lightning_bif.snapshot.snapshotter.Snapshotter`: localized
    SGLD chains from the current weights, as :func:`~lightning_bif.estimate_bif`) and hands the record,
    ``influence = -Cov(loss_train, probe)`` as ``[probe, train]`` with standard errors and diagnostics, to
    the HDF5 log (global rank 0) and the trainer's ``TensorBoardLogger``. Training is left bitwise as it
    would have been without it. Bad input stops the fit at fit start (``MisconfigurationException``); a
    snapshot that diverges or fails is logged with its status, and training goes on. docs/user-guide.md
    ("The callback") and docs/lightning.md describe every option in full.

    Args:
        train: Tracked training examples (``Dataset``, ``Subset``, ``DataLoader``, tuple of tensors or
            :class:`~lightning_bif.DataModuleExamples`); N examples, logged by dataset index.
        probes: Probe examples whose behaviour is explained (same kinds); P examples.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``; default: the module's ``per_example_loss(batch)``.
        probe_fn: ``probe_fn(model, batch) -> Tensor[B]`` (``[B, T]`` with ``per_token``); default ``loss_fn``.
        train_groups: A label per tracked example, ``[N]``.
        probe_groups: A label per probe, ``[P]``.
        train_group_names: Display names of train groups, ``{label: name}``.
        probe_group_names: Display names of probe groups.
        probe_tokens: Display strings of every probe token, ``[P][T]`` (needs ``SGLDConfig(per_token=True)``).
        train_text: Display text of every tracked example, ``[N]`` (cut to 1024 UTF-8 bytes).
        every_n_steps: A snapshot after every n-th optimizer step (``trainer.global_step``).
        every_n_epochs: A snapshot at the end of every n-th training epoch.
        at_steps: Snapshots after exactly these optimizer steps.
        log_spaced: ``LogSpaced(num, first=1, last=None)`` or ``num``: log-spaced steps.
        at_fit_start: A snapshot before the first training step.
        at_fit_end: A snapshot when training ends.
        config: The :class:`SGLDConfig` of the snapshots.
        data: Where SGLD minibatches come from; default: the dataset of the trainer's training ``DataLoader``.
        weight_decay_from_optimizer: Use the optimizer's weight decay as the L2 prior when ``config.weight_decay``
            is 0.
        precision_from_trainer: bf16 autocast for snapshots of a bf16 trainer when ``config.autocast`` is None.
        log_path: The HDF5 log; default ``<trainer.log_dir>/influence.h5`` (docs/lightning.md, "Default log paths").
        if_exists: ``"error"``, ``"overwrite"`` or ``"resume"`` (same run) when ``log_path`` exists at fit start.
        tensorboard: ``True``, ``False``, ``"all"`` or a list of chart names (docs/tensorboard.md).
        progress: Show progress during a snapshot.
        calibrate: ``True`` or a dict of :func:`~lightning_bif.estimation.calibration.calibrate`'s settings: choose
            the step size from pilot chains before snapshots until one is accepted.
        horizon: H of the snapshots' question (docs/horizon.md): ``"interval"`` (to the next snapshot), ``"rest"``
            (to the end), a number of steps, or ``None`` (the config's γ and ε).
        min_split_half: Warn once per fit below this split-half reliability; ``None``: never.
        num_threads: ``torch.set_num_threads`` during snapshots; ``None`` keeps torch's setting.

    Example::

        bif = BIFCallback(train=train_subset, probes=probe_set, log_spaced=12, at_fit_start=True,
                          config=SGLDConfig(chains=4, draws=100))
        trainer = L.Trainer(max_epochs=10, callbacks=[bif], logger=TensorBoardLogger("runs", name="exp"))
        trainer.fit(model, datamodule)  # model defines per_example_loss(self, batch) -> Tensor[B]
    """

    def __init__(
        self,
        train: ExampleSource | DataModuleExamples,
        probes: ExampleSource | DataModuleExamples,
        *,
        loss_fn: LossFn | None = None,
        probe_fn: LossFn | None = None,
        train_groups: Groups | None = None,
        probe_groups: Groups | None = None,
        train_group_names: Mapping[Any, str] | None = None,
        probe_group_names: Mapping[Any, str] | None = None,
        probe_tokens: Sequence[Sequence[str]] | None = None,
        train_text: Sequence[str] | None = None,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        at_steps: Iterable[int] | None = None,
        log_spaced: LogSpaced | int | None = None,
        at_fit_start: bool = False,
        at_fit_end: bool = False,
        config: SGLDConfig | None = None,
        data: ExampleSource | None = None,
        weight_decay_from_optimizer: bool = True,
        precision_from_trainer: bool = True,
        log_path: str | Path | None = None,
        if_exists: Literal["error", "overwrite", "resume"] = "error",
        tensorboard: bool | str | Sequence[str] = True,
        progress: bool = True,
        calibrate: bool | Mapping[str, Any] = False,
        min_split_half: float | None = 0.3,
        num_threads: int | None = None,
        horizon: int | Literal["interval", "rest"] | None = "interval",
    ) -> None:
        try:
            self.schedule = SnapshotSchedule.from_args(every_n_steps, every_n_epochs, at_steps, log_spaced,
                                                       at_fit_start, at_fit_end)
            for name, source in (("train", train), ("probes", probes)):
                if not isinstance(source, DataModuleExamples):
                    ExampleSet(source, name)
            if data is not None:
                ExampleSet(data, "data")
        except (TypeError, ValueError) as error:
            raise MisconfigurationException(f"BIFCallback: {error}") from error
        try:
            check_options(if_exists=if_exists, tensorboard=tensorboard, min_split_half=min_split_half,
                          num_threads=num_threads, horizon=horizon, loss_fn=loss_fn, probe_fn=probe_fn)
            self.calibrate = calibration_options(calibrate)
        except ValueError as error:
            raise MisconfigurationException(str(error)) from error
        self.min_split_half, self.num_threads, self.horizon = min_split_half, num_threads, horizon
        self.train, self.probes, self.data = train, probes, data
        self.loss_fn = loss_fn
        self.probe_fn = probe_fn
        self._groups_given = (train_groups, probe_groups)
        self._texts_given = (probe_tokens, train_text)
        self.train_ids = self.probe_ids = self.train_groups = self.probe_groups = None
        self.probe_tokens = self.train_text = None
        self._curvature = CurvatureCache()  # curvature at w*, reused by later snapshots and pilots while fresh
        # What snapshots are taken of: made from train/probes (at setup for DataModuleExamples); its SGLD data
        # is the trainer's from train start on (unless `data` is given), its collectives the trainer's strategy.
        self._snapshotter: Snapshotter | None = None
        if not isinstance(train, DataModuleExamples) and not isinstance(probes, DataModuleExamples):
            self._use_examples(train, probes)
        self.train_group_names = dict(train_group_names) if train_group_names else None
        self.probe_group_names = dict(probe_group_names) if probe_group_names else None
        self.config = config or SGLDConfig()
        self.weight_decay_from_optimizer = weight_decay_from_optimizer
        self.precision_from_trainer = precision_from_trainer
        self.log_path = None if log_path is None else Path(log_path)
        self.if_exists = if_exists
        self.tensorboard = tensorboard
        self.progress = progress

        self._config = self.config  # the configured config, resolved at fit start; it identifies the run in the log
        self._calibrated_step_size: float | None = None  # checkpointed: a resumed fit keeps it
        self._tokens: int | None = None  # tokens per probe of a per-token config, found at fit start (log layout)
        self._vectorized: bool | None = None  # chains under vmap: decided at the first train start (checkpointed)
        self._sequential_reason: str | None = None  # why not, under vectorize="auto"; in each snapshot's message
        self._active_schedule = self.schedule
        self._last_step = -1  # global step of the last snapshot (checkpointed)
        self._last_seen_step = -1  # global step at the last on_train_batch_end (gradient accumulation)
        self._start = (0, 0)  # global step at train start, training batches since (sizes log_spaced under manual opt.)
        self._snapshots = 0
        self._resumed = False
        self._resolved_log_path: Path | None = None  # this fit's log; from the checkpoint or the last fit until then
        self._writer: LogWriter | None = None  # the log among the sinks (resume, truncation)
        self._sinks: list[SnapshotSink] = []  # rank 0: the log and, with a TensorBoardLogger, TensorBoard
        self._lost: list[int] = []  # steps of snapshots this fit could not write to the log (rank 0)
        self._write_error = ""  # the first such error
        self._warned: set[str] = set()
        self._run = RunLength()  # Σ η/(1 - μ) of the steps taken: the horizon of a snapshot with none ahead

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(log_path=None if self.log_path is None else str(self.log_path),
                                        train=_key(self.train), probes=_key(self.probes))

    def _use_examples(self, train: ExampleSource, probes: ExampleSource) -> None:
        """Adopt concrete example sets: their ids, and the group labels checked against their sizes."""
        train_set, probe_set = ExampleSet(train, "train"), ExampleSet(probes, "probes")
        self._snapshotter = Snapshotter(self.loss_fn or module_per_example_loss, train, probes,
                                        probe_fn=self.probe_fn, data=self.data, cache=self._curvature)
        self.train_ids = train_set.ids().numpy()
        self.probe_ids = probe_set.ids().numpy()
        try:
            self.train_groups = group_labels(self._groups_given[0], len(train_set), "train_groups", "train")
            self.probe_groups = group_labels(self._groups_given[1], len(probe_set), "probe_groups", "probes")
            self.probe_tokens = display_texts(self._texts_given[0], len(probe_set), "probe_tokens", "probes", True)
            self.train_text = display_texts(self._texts_given[1], len(train_set), "train_text", "train", False)
        except ValueError as error:
            raise MisconfigurationException(str(error)) from error

    def _resolve_examples(self, trainer: pl.Trainer) -> None:
        """Take ``DataModuleExamples`` from the trainer's dataloaders (after the DataModule's setup)."""
        try:
            train, probes = (source.resolve(trainer, name) if isinstance(source, DataModuleExamples) else source
                             for name, source in (("train", self.train), ("probes", self.probes)))
            self._use_examples(train, probes)
        except (TypeError, ValueError) as error:
            raise MisconfigurationException(f"BIFCallback: {error}") from error

    # ------------------------------------------------------------------ customisation point

    def should_snapshot(self, event: Event, step: int, epoch: int) -> bool:
        """Whether to take a snapshot now. Override to customise the schedule.

        Called on every rank with the same arguments (the answer must not depend on the rank).
        A step that already has a snapshot never gets a second one. When one batch takes several
        optimizer steps (manual optimization), it is asked about each of them, and a yes for any
        takes one snapshot at the end of that batch.

        Args:
            event: ``"fit_start"``, ``"step"`` (after an optimizer step), ``"epoch_end"`` or ``"fit_end"``.
            step: Optimizer steps taken so far (``trainer.global_step``).
            epoch: The current epoch (0-based).

        Returns:
            ``True`` to take a snapshot.
        """
        return self._active_schedule.due(event, step, epoch)

    @property
    def resolved_config(self) -> SGLDConfig:
        """The config used for snapshots.

        ``config`` with the optimizer's weight decay filled in at fit start and, once
        calibration accepted one, the calibrated step size.
        """
        if self._calibrated_step_size is None:
            return self._config
        return self._config.replace(step_size=self._calibrated_step_size)

    @property
    def resolved_log_path(self) -> Path | None:
        """Where the log is written (known from fit start on)."""
        return self._resolved_log_path

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_strategy(trainer)
            self._check_loss_hook(pl_module)
            if isinstance(self.train, DataModuleExamples) or isinstance(self.probes, DataModuleExamples):
                self._resolve_examples(trainer)
            self._snapshotter.collectives = StrategyCollectives(trainer.strategy)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._warned -= {"split_half", "calibration", "write"}  # these warnings are once per fit
        self._lost, self._write_error = [], ""
        self._config = self._resolve_config(trainer)
        with snapshot_threads(self.num_threads):
            self._check_losses_at_start(pl_module)
        # Bound before the log exists, so that a schedule that cannot be bound leaves no file behind.
        self._active_schedule = self.schedule
        # Under manual optimization the optimizer steps per batch are known only once a batch stepped.
        if self.schedule.needs_total_steps and pl_module.automatic_optimization:
            self._active_schedule = self._bind_schedule(trainer.estimated_stepping_batches)
        self._open_log(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.data is None:
            self._snapshotter.data = self._trainer_data(trainer)
        self._start = (trainer.global_step, 0)
        self._check_threads(trainer, pl_module)
        if self._vectorized is None:
            self._decide_vectorized(pl_module)
        self._check_log_continues(trainer)
        self._last_seen_step = trainer.global_step
        self._maybe_snapshot(trainer, pl_module, "fit_start")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        start_step, batches = self._start[0], self._start[1] + 1
        self._start = (start_step, batches)
        # With gradient accumulation most batches end without an optimizer step: global_step is unchanged.
        if trainer.global_step == self._last_seen_step:
            return
        previous, self._last_seen_step = self._last_seen_step, trainer.global_step
        self._run.observe(trainer.optimizers, trainer.global_step - previous)
        if self._active_schedule is self.schedule and self.schedule.needs_total_steps:
            steps_per_batch = (trainer.global_step - start_step) / batches
            self._active_schedule = self._bind_schedule(manual_optimization_steps(trainer, steps_per_batch))
        if trainer.global_step - previous > 1:
            self._warn_steps_per_batch(trainer.global_step - previous)
        self._maybe_snapshot(trainer, pl_module, "step", previous)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_snapshot(trainer, pl_module, "epoch_end")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_end rather than on_fit_end: the strategy (and its process group) is still up here.
        self._maybe_snapshot(trainer, pl_module, "fit_end")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_log()
        self._report_lost()
        if stage == "fit" and self._resolved_log_path is not None:
            self._resumed = True  # a later fit with this callback (more epochs on the same trainer) continues the log

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_log()

    @override
    def state_dict(self) -> dict[str, Any]:
        path = self._resolved_log_path
        return {"last_step": self._last_step, "snapshots": self._snapshots,
                "log_path": None if path is None else str(path), "calibrated_step_size": self._calibrated_step_size,
                "vectorized": self._vectorized, "sequential_reason": self._sequential_reason}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict["last_step"])
        self._snapshots = int(state_dict["snapshots"])
        self._resolved_log_path = None if state_dict["log_path"] is None else Path(state_dict["log_path"])
        self._calibrated_step_size = state_dict.get("calibrated_step_size")  # absent in older checkpoints
        self._vectorized = state_dict.get("vectorized")
        self._sequential_reason = state_dict.get("sequential_reason")
        self._resumed = True

    # ------------------------------------------------------------------ fit-start checks

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        if isinstance(trainer.strategy, _SHARDED):
            raise MisconfigurationException(
                f"BIFCallback does not support the sharded strategy {type(trainer.strategy).__name__}: every rank "
                "needs the full weights to sample from. Use strategy='ddp' (or a single device)."
            )

    def _check_loss_hook(self, pl_module: pl.LightningModule) -> None:
        if self.loss_fn is None and not callable(getattr(pl_module, LOSS_HOOK, None)):
            raise MisconfigurationException(
                f"BIFCallback needs per-example losses: add a method `def {LOSS_HOOK}(self, batch) -> Tensor` "
                f"to {type(pl_module).__name__} returning one loss per example (shape [B], e.g. "
                "F.cross_entropy(self(x), y, reduction='none')), or pass BIFCallback(loss_fn=(model, batch) -> Tensor)."
            )

    def _resolve_config(self, trainer: pl.Trainer) -> SGLDConfig:
        """The configured config with the settings it leaves to the trainer filled in."""
        resolved = training_config(self.config, trainer.optimizers, trainer.precision,
                                   weight_decay_from_optimizer=self.weight_decay_from_optimizer,
                                   precision_from_trainer=self.precision_from_trainer)
        for message in resolved.warnings:
            rank_zero_warn(f"BIFCallback: {message}")
        for message in resolved.notes:
            rank_zero_info(f"BIFCallback: {message}")
        return resolved.config

    def _check_losses_at_start(self, pl_module: pl.LightningModule) -> None:
        """Evaluate the loss functions on every tracked example at w*: shapes and finiteness."""
        try:
            self._tokens = self._snapshotter.check_losses(pl_module, self._config, pl_module.device)
        except (TypeError, ValueError) as error:
            raise MisconfigurationException(f"BIFCallback check at fit start failed: {error}") from error
        if self.probe_tokens is not None:
            lengths = sorted({len(row) for row in self.probe_tokens})
            if self._tokens is None:
                raise MisconfigurationException(
                    "BIFCallback(probe_tokens=...) needs per-token probe losses: set SGLDConfig(per_token=True) "
                    "with a probe_fn that returns [B, T], or leave probe_tokens out."
                )
            if lengths != [self._tokens]:
                raise MisconfigurationException(
                    f"BIFCallback(probe_tokens=...) has rows of length {', '.join(map(str, lengths))}, but probe_fn "
                    f"returns T = {self._tokens} token losses per probe: pass one string per token loss."
                )

    def _decide_vectorized(self, pl_module: pl.LightningModule) -> None:
        """Decide once, before the first snapshot, whether chains run under vmap; rank 0's answer holds everywhere.

        At train start, when the SGLD data (by default the trainer's training DataLoader) is known:
        every function a snapshot calls is tried under vmap on it.
        """
        try:
            with snapshot_threads(self.num_threads):
                self._vectorized, self._sequential_reason = self._snapshotter.decide_vectorized(
                    pl_module, self._config, pl_module.device)
        except (TypeError, ValueError) as error:
            raise MisconfigurationException(f"BIFCallback check at fit start failed: {error}") from error

    def _check_threads(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn when CPU snapshots would run more threads than there are cores (``num_threads`` unset).

        Called at train start, once the training DataLoader (and its workers) is known.
        """
        if self.num_threads is not None or pl_module.device.type != "cpu":
            return
        loader = trainer.train_dataloader
        reason = oversubscription(loader.num_workers if isinstance(loader, DataLoader) else 0)
        if reason is not None:
            rank_zero_warn(
                f"BIFCallback: {reason}. Snapshots of small models are many tiny kernels, which slow down many "
                "times over when threads outnumber free cores; pass BIFCallback(num_threads=1) (set only during "
                "snapshots) or call torch.set_num_threads(1). See docs/lightning.md, 'Threads'."
            )

    def _trainer_data(self, trainer: pl.Trainer) -> DataLoader:
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise MisconfigurationException(
                f"BIFCallback takes SGLD minibatches from the trainer's training DataLoader, but it is a "
                f"{type(loader).__name__}; pass BIFCallback(data=...) with the examples to sample from."
            )
        try:
            ExampleSet(loader, "data")
        except (TypeError, ValueError) as error:
            raise MisconfigurationException(
                f"BIFCallback cannot index the trainer's training data ({error}); pass BIFCallback(data=...)."
            ) from error
        return loader

    def _bind_schedule(self, total_steps: int | float) -> SnapshotSchedule:
        try:
            return self.schedule.bind(total_steps)
        except ValueError as error:
            raise MisconfigurationException(f"BIFCallback: {error}") from error

    def _warn_steps_per_batch(self, steps: int) -> None:
        """Say once what the schedule counts when one batch takes several optimizer steps."""
        schedule = self.schedule
        if "steps_per_batch" in self._warned or not (schedule.every_n_steps or schedule.at_steps
                                                     or schedule.log_spaced):
            return
        self._warned.add("steps_per_batch")
        rank_zero_warn(
            f"BIFCallback: one training batch advanced trainer.global_step by {steps} (manual optimization stepping "
            "several optimizers, or several optimizer.step() calls a batch). The schedule counts global_step, as "
            "max_steps, checkpoints and the log's step column do: a step it names inside a batch is taken at the "
            f"end of that batch. To count batches instead, multiply: every_n_steps=n*{steps}, at_steps=[s*{steps}, "
            "...]. (Shown once.)"
        )

    # ------------------------------------------------------------------ the log

    def _identity(self) -> RunIdentity:
        callback = {
            "loss_fn": _qualname(self.loss_fn) if self.loss_fn else f"LightningModule.{LOSS_HOOK}",
            "probe_fn": _qualname(self.probe_fn) if self.probe_fn else "loss_fn",
            "data": "trainer training data" if self.data is None else "data argument",
            "horizon": self.horizon,
        }
        return RunIdentity.for_snapshots(
            self._snapshotter, self._config, tokens=self._tokens, settings={"callback": callback},
            train_groups=self.train_groups, probe_groups=self.probe_groups, train_group_names=self.train_group_names,
            probe_group_names=self.probe_group_names, probe_tokens=self.probe_tokens, train_text=self.train_text)

    def _open_log(self, trainer: pl.Trainer) -> None:
        """Resolve the log path, open the writer on rank 0 and agree on any error across ranks."""
        path = self.log_path or self._resolved_log_path
        if path is None:
            path = default_log_path(trainer)
        self._resolved_log_path = path
        error = None
        if trainer.is_global_zero:
            error = self._open_writer(trainer, path)
        error = trainer.strategy.broadcast(error)
        if error is not None:
            self._close_log()
            raise MisconfigurationException(error)
        rank_zero_info(f"BIFCallback: writing influence snapshots to {path}")

    def _open_writer(self, trainer: pl.Trainer, path: Path) -> str | None:
        """Open the log (rank 0); return an error message instead of raising so all ranks can stop together."""
        if_exists = "resume" if self._resumed and self.if_exists != "overwrite" else self.if_exists
        if self._resumed and if_exists == "resume" and self._last_step >= 0 and not path.exists():
            return (f"BIFCallback: resuming a run whose influence log {path} is missing (the checkpoint has "
                    f"snapshots up to step {self._last_step}). Put the log back (or a repaired copy: lightning-bif "
                    "repair), or pass BIFCallback(if_exists='overwrite') to start a new log from this step.")
        try:
            self._writer = LogWriter(path, self._identity(), if_exists=if_exists)
        except (OSError, ValueError) as error:
            return f"BIFCallback cannot use log_path={str(path)!r}: {error}"
        if self._writer.recovered is not None:
            rank_zero_info(f"BIFCallback: the previous run writing {path} was killed; recovered its log: "
                           f"{self._writer.recovered}")
        if self._resumed and if_exists == "resume":
            dropped = self._writer.truncate_after(self._last_step)
            if dropped:
                rank_zero_info(f"BIFCallback: resumed; removed {dropped} snapshot(s) after step {self._last_step} "
                               "written after the checkpoint.")
        self._sinks = [self._writer]
        if self.tensorboard:
            logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
            if logger is not None:
                self._sinks.append(TensorBoardSink(logger.experiment, self._identity(), self.train_group_names,
                                                   self.probe_group_names, self.tensorboard, log_path=path))
        return None

    def _check_log_continues(self, trainer: pl.Trainer) -> None:
        """Refuse to append to a log (``if_exists="resume"``) that already has snapshots at or after the start step."""
        last = int(self._writer.steps[-1]) if self._writer is not None and len(self._writer.steps) else -1
        last = trainer.strategy.broadcast(last)
        if last > self._last_step and last >= trainer.global_step:
            self._close_log()
            raise MisconfigurationException(
                f"BIFCallback: the log {self._resolved_log_path} already has snapshots up to step {last}, but "
                f"training starts at step {trainer.global_step}. To continue that run, resume from its checkpoint "
                "(trainer.fit(..., ckpt_path=...)); to start over, pass if_exists='overwrite' or another log_path."
            )
        self._last_step = max(self._last_step, last)

    def _close_log(self) -> None:
        sinks, self._sinks, self._writer = self._sinks, [], None
        for sink in sinks:
            try:
                sink.close()
            except LogWriteError as error:
                rank_zero_warn(f"BIFCallback: {error}. Check the log with `lightning-bif summary "
                               f"{self._resolved_log_path}`.")

    def _report_lost(self) -> None:
        """Say at the end of a fit how many snapshots could not be written to the log, and why."""
        if self._lost:
            steps = ", ".join(map(str, self._lost[:10])) + (", ..." if len(self._lost) > 10 else "")
            rank_zero_warn(
                f"BIFCallback: {len(self._lost)} snapshot(s) of this fit could not be written to the influence log "
                f"{self._resolved_log_path} (steps {steps}); first error: {self._write_error}. They are not in "
                "the log; every other snapshot is."
            )
            self._lost = []

    # ------------------------------------------------------------------ snapshots

    def _maybe_snapshot(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: Event, previous: int | None = None
    ) -> None:
        """Snapshot when ``event`` is due at the current step or, for steps, at any step passed since ``previous``.

        A batch can take several optimizer steps (manual optimization with several optimizers):
        a step the schedule names inside it is taken at the end of that batch.
        """
        step = trainer.global_step
        first = step if previous is None else max(previous + 1, self._last_step + 1)
        if step > self._last_step and any(self.should_snapshot(event, s, trainer.current_epoch)
                                          for s in range(first, step + 1)):
            self._snapshot(trainer, pl_module)

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        calibration = None
        with snapshot_threads(self.num_threads):
            if self.calibrate is not None and self._calibrated_step_size is None:
                calibration = self._calibrate(pl_module, step)
            config = self._with_horizon(trainer, self.resolved_config, step)
            taken = self._snapshotter.take(pl_module, config, device=pl_module.device,
                                           progress=self._progress_fn(trainer, step), vectorized=self._vectorized,
                                           sequential_reason=self._sequential_reason)
        self._vectorized, self._sequential_reason = taken.vectorized, taken.sequential_reason
        record = taken.record(step, trainer.current_epoch, calibration)
        self._last_step = step
        self._snapshots += 1
        written = self._write(record) if trainer.is_global_zero else True
        self._report(record, written)

    def _with_horizon(self, trainer: pl.Trainer, config: SGLDConfig, step: int) -> SGLDConfig:
        """``config`` with this snapshot's horizon H and the optimizer's current (η, μ), unless it has its own."""
        if self.horizon is None or config.horizon_steps is not None:
            return config
        resolved = with_horizon(config, trainer.optimizers, self._horizon_steps(trainer, step), step, self._run)
        for message in resolved.warnings:
            if step == 0:  # before the first step an adaptive optimizer cannot know its step: expected, not a problem
                rank_zero_info(f"BIFCallback: {message}")
            elif "horizon" not in self._warned:
                self._warned.add("horizon")
                rank_zero_warn(f"BIFCallback: {message} (Shown once.)")
        return resolved.config

    def _horizon_steps(self, trainer: pl.Trainer, step: int) -> int | None:
        """H for a snapshot at ``step``: fixed, to the next scheduled snapshot (``"interval"``) or to the end.

        Where nothing follows (the last snapshot), H is the length of the interval that led to it (from the
        previous snapshot, or from step 0).
        """
        if not isinstance(self.horizon, str):
            return self.horizon
        total = trainer.estimated_stepping_batches
        end = int(total) if math.isfinite(total) else None
        per_epoch = int(trainer.num_training_batches) // max(trainer.accumulate_grad_batches, 1) \
            if math.isfinite(trainer.num_training_batches) else 0
        following = end if self.horizon == "rest" else self._active_schedule.next_step(step, per_epoch, end)
        if following is not None and following > step:
            return following - step
        previous = max(self._last_step, 0)
        return step - previous if step > previous else None

    def _calibrate(self, pl_module: pl.LightningModule, step: int) -> dict[str, Any]:
        """Calibrate the step size (rank 0, broadcast); adopt an accepted one. Returns the evidence for the log."""
        evidence = self._snapshotter.calibrate(pl_module, self._config, pl_module.device, **self.calibrate)
        if evidence["ok"]:
            self._calibrated_step_size = float(evidence["step_size"])
            rank_zero_info(f"BIFCallback: calibrated step_size={self._calibrated_step_size:.3g} at step {step} "
                           f"(configured {shown_setting(self._config.step_size)}); used from this snapshot on.")
        elif "calibration" not in self._warned:
            self._warned.add("calibration")
            reasons = evidence.get("error") or "; ".join(
                f"{c['step_size']:.3g}: {c['reason']}" for c in evidence["candidates"][-3:]
            )
            rank_zero_warn(
                f"BIFCallback: step-size calibration at step {step} accepted no step size ({reasons}). This is "
                "typical early in training, where the weights are not yet a stationary point of the sampled "
                f"posterior. Keeping the configured step_size={shown_setting(self._config.step_size)} and "
                "calibrating again at the next snapshot until one is accepted; every attempt is in the log's "
                "calibration column. (Shown once.)"
            )
        return evidence

    def _write(self, record: SnapshotRecord) -> bool:
        """Hand the record to every sink; a write that fails is counted and reported once, and training goes on."""
        written = True
        for sink in self._sinks:
            try:
                sink.write(record)
            except LogWriteError as error:
                if written:
                    self._lost.append(record.step)
                written = False
                if "write" not in self._warned:
                    self._warned.add("write")
                    self._write_error = str(error)
                    rank_zero_warn(f"BIFCallback: {error}. Training goes on; later snapshots are tried again and "
                                   "the end of the fit says how many were lost. (Shown once.)")
        return written

    def _report(self, record: SnapshotRecord, written: bool = True) -> None:
        if record.status == "ok":
            where = "" if written else f", but NOT written to the log ({len(self._lost)} lost so far)"
            rank_zero_info(f"BIFCallback: snapshot at step {record.step} done in {record.duration_s:.1f} s{where}.")
            self._check_reliability(record)
            return
        if record.status not in self._warned:
            self._warned.add(record.status)
            advice = (f"{record.message}. Lower SGLDConfig.step_size (calibrate=True picks one from pilot chains) "
                      "or raise localization; more chains or draws do not help." if record.status == "diverged"
                      else record.message)
            rank_zero_warn(
                f"BIFCallback: the snapshot at step {record.step} {record.status} and is recorded with status "
                f"{record.status!r}; training goes on. {advice} (Shown once; see the log's status and message "
                "columns.)"
            )

    def _check_reliability(self, record: SnapshotRecord) -> None:
        """Warn once per fit about a snapshot whose two halves of the chains disagree."""
        if self.min_split_half is None or record.result is None or "split_half" in self._warned:
            return
        split_half = record.result.diagnostics.split_half
        low = split_half < self.min_split_half if math.isfinite(split_half) else record.result.config.chains >= 2
        if not low:
            return
        self._warned.add("split_half")
        constant, probes = record.result.diagnostics.constant_probes, record.result.influence.shape[0]
        if constant:
            rank_zero_warn(
                f"BIFCallback: at step {record.step}, {constant} of {probes} probe(s) took the same value in every "
                "SGLD draw (a probe_fn that does not depend on the sampled weights, or one saturated at a constant): "
                f"their BIF is exactly 0 and they carry no signal, so the split-half reliability ({split_half:.2f}) "
                f"{'is undefined' if constant == probes else 'rests on the other probes only'}. Check probe_fn; more "
                "chains or draws do not change this. (Shown once per fit.)"
            )
            return
        rank_zero_warn(
            f"BIFCallback: the snapshot at step {record.step} has split-half reliability {split_half:.2f}, below "
            f"min_split_half={self.min_split_half:g}: the BIF of two halves of the chains disagree, so single "
            "entries are mostly Monte-Carlo noise (group means may still be usable). Raise SGLDConfig.chains "
            "(most effective) or draws; see 'How much to trust a curve' in docs/user-guide.md. (Shown once per fit; "
            "the log's split_half column has every snapshot's value.)"
        )

    def _progress_fn(self, trainer: pl.Trainer, step: int) -> Callable[[int, int], None] | None:
        if not self.progress or not trainer.is_global_zero:
            return None
        bar = _tqdm_train_bar(trainer)
        last_line = [time.perf_counter()]

        def report(done: int, total: int) -> None:
            if bar is not None:
                if done == total or done % max(total // 50, 1) == 0:
                    bar.set_postfix_str(f"BIF snapshot {100 * done // total}%", refresh=True)
            elif time.perf_counter() - last_line[0] > _PROGRESS_EVERY_S:
                last_line[0] = time.perf_counter()
                rank_zero_info(f"BIFCallback: snapshot at step {step}: {done}/{total} SGLD steps")

        return report


def _key(source: ExampleSource | DataModuleExamples) -> int | str:
    """What identifies an example set in the state key: its size (known before setup for ``DataModuleExamples``)."""
    if isinstance(source, DataModuleExamples):
        return f"{source.dataloader}:{source.size}"
    return len(ExampleSet(source, "examples"))


def _qualname(fn: Callable) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


def _tqdm_train_bar(trainer: pl.Trainer) -> Any:
    bar = trainer.progress_bar_callback
    if not isinstance(bar, TQDMProgressBar) or not bar.is_enabled:
        return None
    try:
        return bar.train_progress_bar
    except TypeError:
        return None
