"""``BIFCallback``: BIF snapshots during Lightning training, appended to an HDF5 log and the trainer's loggers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from typing_extensions import override

from ..config import MIN_SPLIT_HALF, SGLDConfig
from ..curvature.cache import CurvatureCache
from ..estimation.rounds import chain_capacity
from ..example_sets import ExampleSet, ExampleSource
from ..functional import LossFn
from ..log import RunIdentity
from ..schedule import Event, LogSpaced, SnapshotSchedule
from ..snapshot.collectives import StrategyCollectives
from ..snapshot.record import SnapshotRecord
from ..snapshot.snapshotter import SnapshotSink, Snapshotter, shown_setting, training_config, with_horizon
from ..snapshot.threads import snapshot_threads
from ..tuning.run_damping import RunLength
from .argument_checks import calibration_options, check_options
from .datamodule_examples import DataModuleExamples
from .example_labels import ExampleLabels, Groups
from .log_path import default_log_path
from .loggers import LoggerChoice, check_loggers, chosen_loggers, logger_sinks
from .overhead_budget import OverheadBudget, SnapshotBudget, check_overhead, planned_after
from .snapshot_progress import progress_display
from .snapshot_sinks import SnapshotSinks
from .snapshot_warnings import (
    below_target,
    calibration_rejected,
    low_split_half,
    minibatch_noise,
    several_steps_per_batch,
    skipped_snapshot,
    unusable_snapshot,
)
from .trainer_checks import (
    LOSS_HOOK,
    check_loss_hook,
    check_probe_tokens,
    check_strategy,
    check_threads,
    module_per_example_loss,
    trainer_data,
)
from .training_length import horizon_steps, manual_optimization_steps, schedule_span


class BIFCallback(Callback):
    """Take Bayesian-influence-function snapshots of the model while it trains.

    On a schedule the callback runs a snapshot (:class:`~lightning_bif.snapshot.snapshotter.Snapshotter`: localized
    SGLD chains from the current weights, as :func:`~lightning_bif.estimate_bif`) and hands the record,
    ``influence = -Cov(loss_train, probe)`` as ``[probe, train]`` with standard errors and diagnostics, to
    the HDF5 log (global rank 0) and the trainer's loggers. Training is left bitwise as it
    would have been without it. Bad input stops the fit at fit start (``MisconfigurationException``); a
    snapshot that diverges or fails is logged with its status, and training goes on. docs/user-guide.md
    ("The callback") and docs/lightning.md describe every option in full.

    Args:
        train: Tracked training examples (``Dataset``, ``Subset``, ``DataLoader``, tuple of tensors or
            :class:`~lightning_bif.DataModuleExamples`); N examples, logged by dataset index.
        probes: Probe examples whose behaviour is explained (same kinds); P examples.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``; default: the module's ``per_example_loss(batch)``.
        probe_fn: ``probe_fn(model, batch) -> Tensor[B]`` (``[B, T]`` with ``per_token``); default ``loss_fn``.
        train_groups, probe_groups: A label per tracked example ``[N]`` / per probe ``[P]``.
        train_group_names, probe_group_names: Display names of the group labels, ``{label: name}``.
        probe_tokens: Display strings of every probe token, ``[P][T]`` (needs ``SGLDConfig(per_token=True)``).
        train_text: Display text of every tracked example, ``[N]`` (cut to 1024 UTF-8 bytes).
        schedule: When to take snapshots: a :class:`~lightning_bif.SnapshotSchedule`.
        every_n_steps, every_n_epochs, at_steps, log_spaced, at_fit_start, at_fit_end: Shorthand for
            ``schedule=SnapshotSchedule(...)`` with these fields (not together with ``schedule``).
        config: The :class:`SGLDConfig` of the snapshots.
        data: Where SGLD minibatches come from; default: the dataset of the trainer's training ``DataLoader``.
        weight_decay_from_optimizer: Use the optimizer's weight decay as the L2 prior when ``config.weight_decay``
            is 0.
        precision_from_trainer: bf16 autocast for snapshots of a bf16 trainer when ``config.autocast`` is None.
        log_path: The HDF5 log; default ``<trainer.log_dir>/influence.h5`` (docs/lightning.md, "Default log paths").
        if_exists: ``"error"``, ``"overwrite"`` or ``"resume"`` (same run) when ``log_path`` exists at fit start.
        tensorboard: ``True``, ``False``, ``"all"`` or a list of chart names (docs/tensorboard.md), for every
            chosen logger.
        loggers: Which of the trainer's loggers get the charts: ``None`` (all), or a list of names (``"tensorboard"``,
            ``"wandb"``, ``"mlflow"``, ``"csv"``) and ``Logger`` classes (docs/loggers.md).
        progress: Show progress during a snapshot.
        calibrate: ``True`` or a dict of :func:`~lightning_bif.estimation.calibration.calibrate`'s settings: choose
            the step size from pilot chains before snapshots until one is accepted.
        horizon: H of the snapshots' question (docs/horizon.md): ``"interval"`` (to the next snapshot), ``"rest"``
            (to the end), a number of steps, or ``None`` (the config's γ and ε).
        min_split_half: Warn once per fit below this split-half reliability; ``None``: never.
        num_threads: ``torch.set_num_threads`` during snapshots; ``None`` keeps torch's setting.
        overhead: The fraction of the fit's wall time snapshots may take (e.g. 0.1), shared by the snapshots the
            schedule plans: it sets each snapshot's ``SGLDConfig.max_seconds`` (:mod:`.overhead_budget`), and the
            fit's end says what they spent. ``None`` (default): no time budget, so snapshots do not depend on the
            machine's speed (their rounds stop at the config's ``target_split_half`` or ``max_chains``).

    Example::

        bif = BIFCallback(train=train_subset, probes=probe_set, config=SGLDConfig(chains=4, draws=100),
                          schedule=SnapshotSchedule(log_spaced=12, at_fit_start=True))
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
        schedule: SnapshotSchedule | None = None,
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
        loggers: Sequence[LoggerChoice] | LoggerChoice | None = None,
        progress: bool = True,
        calibrate: bool | Mapping[str, Any] = False,
        min_split_half: float | None = MIN_SPLIT_HALF,
        num_threads: int | None = None,
        horizon: int | Literal["interval", "rest"] | None = "interval",
        overhead: float | None = None,
    ) -> None:
        try:
            self.schedule = SnapshotSchedule.from_keywords(
                schedule, every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, at_steps=at_steps,
                log_spaced=log_spaced, at_fit_start=at_fit_start, at_fit_end=at_fit_end)
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
            self.loggers = check_loggers(loggers)
            check_overhead(overhead)
        except ValueError as error:
            raise MisconfigurationException(str(error)) from error
        self.min_split_half, self.num_threads, self.horizon = min_split_half, num_threads, horizon
        self.overhead = overhead
        self._budget: OverheadBudget | None = None  # this fit's, from train start on
        self.train, self.probes, self.data = train, probes, data
        self.loss_fn = loss_fn
        self.probe_fn = probe_fn
        # Checked against the example sets once they are concrete (at setup for DataModuleExamples).
        self._labels = ExampleLabels(train_groups, probe_groups, train_group_names, probe_group_names, probe_tokens,
                                     train_text)
        self._curvature = CurvatureCache()  # curvature at w*, reused by later snapshots and pilots while fresh
        # What snapshots are taken of: made from train/probes (at setup for DataModuleExamples); its SGLD data
        # is the trainer's from train start on (unless `data` is given), its collectives the trainer's strategy.
        self._snapshotter: Snapshotter | None = None
        if not isinstance(train, DataModuleExamples) and not isinstance(probes, DataModuleExamples):
            self._use_examples(train, probes)
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
        self._sinks = SnapshotSinks()  # this fit's; on rank 0 the log and a sink per chosen logger
        self._warned: set[str] = set()
        self._run = RunLength()  # Σ η/(1 - μ) of the steps taken: the horizon of a snapshot with none ahead

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(log_path=None if self.log_path is None else str(self.log_path),
                                        train=_key(self.train), probes=_key(self.probes))

    def _use_examples(self, train: ExampleSource, probes: ExampleSource) -> None:
        """Adopt concrete example sets, with their labels checked against their sizes."""
        try:
            self._labels = self._labels.checked(ExampleSet(train, "train"), ExampleSet(probes, "probes"))
        except ValueError as error:
            raise MisconfigurationException(str(error)) from error
        self._snapshotter = Snapshotter(self.loss_fn or module_per_example_loss, train, probes,
                                        probe_fn=self.probe_fn, data=self.data, cache=self._curvature)

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
            check_strategy(trainer)
            check_loss_hook(pl_module, self.loss_fn)
            if isinstance(self.train, DataModuleExamples) or isinstance(self.probes, DataModuleExamples):
                self._resolve_examples(trainer)
            self._snapshotter.collectives = StrategyCollectives(trainer.strategy)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._warned -= {"split_half", "calibration", "below_target", "minibatch_noise"}  # once per fit
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
            self._snapshotter.data = trainer_data(trainer)
        self._start = (trainer.global_step, 0)
        check_threads(trainer, pl_module, self.num_threads)
        if self._vectorized is None:
            self._decide_vectorized(pl_module)
        self._last_step = self._sinks.check_continues(trainer, self._last_step)
        self._last_seen_step = trainer.global_step
        if self.overhead is not None:
            self._budget = OverheadBudget(self.overhead)
            self._budget.start(trainer.global_step)
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
        if self._budget is not None:
            rank_zero_info(self._budget.report())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._sinks.close()
        self._sinks.report_lost()
        if stage == "fit" and self._resolved_log_path is not None:
            self._resumed = True  # a later fit with this callback (more epochs on the same trainer) continues the log

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._sinks.close()

    @override
    def state_dict(self) -> dict[str, Any]:
        path = self._resolved_log_path
        return {"last_step": self._last_step, "snapshots": self._snapshots,
                "log_path": None if path is None else str(path), "calibrated_step_size": self._calibrated_step_size,
                "vectorized": self._vectorized, "sequential_reason": self._sequential_reason,
                "run_length": self._run.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict["last_step"])
        self._snapshots = int(state_dict["snapshots"])
        self._resolved_log_path = None if state_dict["log_path"] is None else Path(state_dict["log_path"])
        self._calibrated_step_size = state_dict.get("calibrated_step_size")  # absent in older checkpoints
        self._vectorized = state_dict.get("vectorized")
        self._sequential_reason = state_dict.get("sequential_reason")
        if "run_length" in state_dict:  # absent in older checkpoints: S then counts from the resume
            self._run.load_state_dict(state_dict["run_length"])
        self._resumed = True

    # ------------------------------------------------------------------ fit start

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
        check_probe_tokens(self._labels.probe_tokens, self._tokens)

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

    def _bind_schedule(self, total_steps: int | float) -> SnapshotSchedule:
        try:
            return self.schedule.bind(total_steps)
        except ValueError as error:
            raise MisconfigurationException(f"BIFCallback: {error}") from error

    def _warn_steps_per_batch(self, steps: int) -> None:
        """Say once what the schedule counts when one batch takes several optimizer steps."""
        if self.schedule.every_n_steps or self.schedule.at_steps or self.schedule.log_spaced:
            self._warn_once("steps_per_batch", several_steps_per_batch(steps))

    # ------------------------------------------------------------------ the log

    def _identity(self) -> RunIdentity:
        callback = {
            "loss_fn": _qualname(self.loss_fn) if self.loss_fn else f"LightningModule.{LOSS_HOOK}",
            "probe_fn": _qualname(self.probe_fn) if self.probe_fn else "loss_fn",
            "data": "trainer training data" if self.data is None else "data argument",
            "horizon": self.horizon,
        }
        return RunIdentity.for_snapshots(self._snapshotter, self._config, tokens=self._tokens,
                                         settings={"callback": callback}, **self._labels.as_keywords())

    def _open_log(self, trainer: pl.Trainer) -> None:
        """Resolve the log path; open the log and a sink per chosen logger (rank 0); stop every rank on an error."""
        path = self.log_path or self._resolved_log_path or default_log_path(trainer)
        self._resolved_log_path = path
        if_exists = "resume" if self._resumed and self.if_exists != "overwrite" else self.if_exists
        identity = self._identity()
        self._sinks = SnapshotSinks.for_fit(trainer, path, identity, if_exists,
                                            resumed_after=self._last_step if self._resumed else None,
                                            viewers=lambda log: self._viewers(trainer, identity, log.path))

    def _viewers(self, trainer: pl.Trainer, identity: RunIdentity, log_path: Path) -> list[SnapshotSink]:
        """A sink per chosen logger of the trainer (rank 0), beside the log."""
        if not self.tensorboard:
            return []
        loggers, missing = chosen_loggers(trainer.loggers, self.loggers)
        if missing:
            rank_zero_warn(f"BIFCallback(loggers=...): the trainer has no {', '.join(k.__name__ for k in missing)}; "
                           "those charts go nowhere.")
        labels = self._labels
        return logger_sinks(loggers, identity, labels.train_group_names, labels.probe_group_names, self.tensorboard,
                            log_path=log_path)

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
        """Take a snapshot at the current step (every rank), write its record (rank 0) and report it."""
        step = trainer.global_step
        budget = self._plan_budget(trainer, step)
        if budget is None:
            return
        calibration = None
        progress = progress_display(trainer, step) if self.progress and trainer.is_global_zero else None
        with snapshot_threads(self.num_threads):
            if self.calibrate is not None and self._calibrated_step_size is None:
                calibration = self._calibrate(pl_module, step)
            config = self._with_horizon(trainer, self.resolved_config, step)
            if budget.max_seconds is not None:  # the log's chain axis stays what the configured rounds may run
                config = config.replace(chains=budget.chains, max_chains=chain_capacity(config),
                                        max_seconds=budget.max_seconds)
            taken = self._snapshotter.take(pl_module, config, device=pl_module.device, progress=progress,
                                           vectorized=self._vectorized, sequential_reason=self._sequential_reason)
        self._vectorized, self._sequential_reason = taken.vectorized, taken.sequential_reason
        record = taken.record(step, trainer.current_epoch, calibration)
        self._last_step = step
        self._snapshots += 1
        if self._budget is not None:
            precision = None if taken.result is None else taken.result.diagnostics.precision
            tuning = None if taken.result is None else taken.result.diagnostics.tuning
            self._budget.record(taken.duration_s, getattr(tuning, "seconds", 0.0) or 0.0,
                                0 if precision is None else precision.chains,
                                precision is not None and precision.below_target)
        written = self._sinks.write(record)
        self._report(record, written)

    def _with_horizon(self, trainer: pl.Trainer, config: SGLDConfig, step: int) -> SGLDConfig:
        """``config`` with this snapshot's horizon H and the optimizer's current (η, μ), unless it has its own."""
        if self.horizon is None or config.horizon_steps is not None:
            return config
        steps = horizon_steps(trainer, self.horizon, self._active_schedule, step, self._last_step)
        resolved = with_horizon(config, trainer.optimizers, steps, step, self._run)
        for message in resolved.warnings:
            if step == 0:  # before the first step an adaptive optimizer cannot know its step: expected, not a problem
                rank_zero_info(f"BIFCallback: {message}")
            else:
                self._warn_once("horizon", f"BIFCallback: {message} (Shown once.)")
        return resolved.config

    def _plan_budget(self, trainer: pl.Trainer, step: int) -> SnapshotBudget | None:
        """This snapshot's share of ``overhead`` (:mod:`.overhead_budget`), decided on rank 0; ``None``: skip it."""
        if self._budget is None:
            return SnapshotBudget(None, self.config.chains)
        per_epoch, end = schedule_span(trainer)
        after = planned_after(self._active_schedule, step, per_epoch, end)
        budget = self._budget.plan(step, trainer.estimated_stepping_batches, after, self.resolved_config.chains) \
            if trainer.is_global_zero else None
        budget = trainer.strategy.broadcast(("plan", budget))[1]
        if budget is None:
            self._warn_once("skipped", skipped_snapshot(step, self.overhead))
        return budget

    def _calibrate(self, pl_module: pl.LightningModule, step: int) -> dict[str, Any]:
        """Calibrate the step size (rank 0, broadcast); adopt an accepted one. Returns the evidence for the log."""
        evidence = self._snapshotter.calibrate(pl_module, self._config, pl_module.device, **self.calibrate)
        if evidence["ok"]:
            self._calibrated_step_size = float(evidence["step_size"])
            rank_zero_info(f"BIFCallback: calibrated step_size={self._calibrated_step_size:.3g} at step {step} "
                           f"(configured {shown_setting(self._config.step_size)}); used from this snapshot on.")
        else:
            self._warn_once("calibration", calibration_rejected(evidence, step, self._config.step_size))
        return evidence

    def _report(self, record: SnapshotRecord, written: bool) -> None:
        """Say that a snapshot is done, or warn (once per status) that it diverged or failed."""
        if record.status != "ok":
            self._warn_once(record.status, unusable_snapshot(record))
            return
        where = "" if written else f", but NOT written to the log ({len(self._sinks.lost)} lost so far)"
        rank_zero_info(f"BIFCallback: snapshot at step {record.step} done in {record.duration_s:.1f} s{where}.")
        message = low_split_half(record, self.min_split_half)
        if message is not None:
            self._warn_once("split_half", message)
        message = below_target(record, self.overhead)
        if message is not None:
            self._warn_once("below_target", message)
        message = minibatch_noise(record)
        if message is not None:
            self._warn_once("minibatch_noise", message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _key(source: ExampleSource | DataModuleExamples) -> int | str:
    """What identifies an example set in the state key: its size (known before setup for ``DataModuleExamples``)."""
    if isinstance(source, DataModuleExamples):
        return f"{source.dataloader}:{source.size}"
    return len(ExampleSet(source, "examples"))


def _qualname(fn: Callable) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)
