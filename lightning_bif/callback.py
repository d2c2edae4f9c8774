"""``BIFCallback``: BIF snapshots during Lightning training, appended to an HDF5 log and TensorBoard."""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
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

from .accumulator import CovarianceAccumulator
from .autotune import Tuning, budget_minibatch, resolve_budget
from .calibration import calibrate as calibrate_step_size
from .config import SGLDConfig
from .curvature_cache import CurvatureCache
from .data import Batch, ExampleSet, ExampleSource
from .datamodule_source import DataModuleExamples
from .estimator import BIFEstimator, BIFResult
from .functional import LossFn, preserved_state
from .horizon import optimizer_step
from .log import LogWriteError, LogWriter, RunIdentity, SnapshotRecord
from .log_path import default_log_path
from .schedule import Event, LogSpaced, SnapshotSchedule, manual_optimization_steps
from .tensorboard import TensorBoardSink, check_charts
from .threads import oversubscription, snapshot_threads

Groups = Sequence[int] | Sequence[str] | torch.Tensor | np.ndarray

#: Name of the LightningModule method used when no ``loss_fn`` is given.
LOSS_HOOK = "per_example_loss"

_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
# calibrate()'s settings a user may pass through BIFCallback(calibrate={...}); the rest comes from the callback.
_CALIBRATION_OPTIONS = tuple(
    name for name, parameter in inspect.signature(calibrate_step_size).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("device", "cache")
)
_MAX_ERROR_CHARS = 500
_PROGRESS_EVERY_S = 10.0


def module_per_example_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The default ``loss_fn``: the LightningModule's own ``per_example_loss(batch) -> Tensor[B]``."""
    return getattr(model, LOSS_HOOK)(batch)


class BIFCallback(Callback):
    r"""Take Bayesian-influence-function snapshots of the model while it trains.

    On a schedule the callback pauses training, runs ``config.chains`` localized SGLD chains from
    the current weights w* (as :func:`~lightning_bif.estimate_bif` does), and appends the snapshot
    — ``influence = -Cov(loss_train, probe)`` as ``[probe, train]`` with standard errors,
    correlations, losses at w* and sampler diagnostics — to an HDF5 log written by global rank 0,
    and to the trainer's ``TensorBoardLogger`` when there is one. Negative = the training example
    helps the probe, positive = it hurts. Training is left bitwise as it would have been without
    the callback (parameters, gradients, optimizer state, buffers, modes, global RNG).

    Without ``loss_fn`` the LightningModule must define ``per_example_loss(self, batch) -> Tensor[B]``.
    Bad input stops the fit at fit start with a :class:`MisconfigurationException`; a snapshot that
    diverges or fails is logged with its status and training goes on; one that cannot be written (a
    full disk) is left out, reported and counted (docs/reliability.md). docs/user-guide.md covers
    schedules, the prior read from the optimizer, precision, DDP, resume, calibration and failures.

    Args:
        train: Training examples whose influence is tracked (``Dataset``, ``Subset``, ``DataLoader``
            or tuple of tensors); N examples. Their ids in the log are dataset indices. A
            :class:`~lightning_bif.DataModuleExamples` takes them from the trainer's DataModule at setup.
        probes: Probe examples whose behaviour is explained; P examples (same kinds).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` per-example losses; drives SGLD and gives the
            training losses ℓ_i. Default: the module's ``per_example_loss`` method.
        probe_fn: ``probe_fn(model, batch) -> Tensor[B]``, the probe observable φ_j; default ``loss_fn``.
            With ``SGLDConfig(per_token=True)`` it returns ``[B, T]`` and the log gains per-token influence.
        train_groups: A label per tracked training example (e.g. its class), ``[N]``.
        probe_groups: A label per probe, ``[P]``.
        train_group_names: Display names of train groups, ``{label: name}`` (TensorBoard tags, stored in the log).
        probe_group_names: Display names of probe groups.
        probe_tokens: The display string of every token of every probe, ``[P][T]`` (a list of lists of
            str), stored in the log for the token view (``lightning-bif tokens``). Needs
            ``SGLDConfig(per_token=True)``; T is checked against ``probe_fn``'s ``[B, T]`` at fit start.
        train_text: The display text of every tracked training example, ``[N]``, stored in the log
            (each cut to 1024 UTF-8 bytes) so the token view can show the most helpful and harmful ones.
        every_n_steps: A snapshot after every n-th optimizer step (``trainer.global_step``: under manual
            optimization every ``optimizer.step()`` counts; see docs/lightning.md).
        every_n_epochs: A snapshot at the end of every n-th training epoch.
        at_steps: Snapshots after exactly these optimizer steps.
        log_spaced: ``LogSpaced(num, first=1, last=None)`` or just ``num``: log-spaced steps up to
            ``last`` (default: the trainer's ``estimated_stepping_batches``).
        at_fit_start: A snapshot before the first training step.
        at_fit_end: A snapshot when training ends.
        config: The estimator's :class:`SGLDConfig` (chains, draws, step size, nβ, γ, ...).
        data: Where SGLD minibatches come from; default: the dataset of the trainer's training
            ``DataLoader`` (indexed directly, so no sampler or shuffling RNG is involved).
        weight_decay_from_optimizer: Read the L2 prior from the optimizer when
            ``config.weight_decay`` is 0 (the largest param group's; exact for SGD and Adam).
        precision_from_trainer: Run the snapshot's forward passes in bf16 when the trainer trains in
            bf16 and ``config.autocast`` is None (fp16 trainers keep float32 snapshots).
        log_path: The HDF5 log; default ``<trainer.log_dir>/influence.h5`` with a ``TensorBoardLogger`` or
            ``CSVLogger``, else ``<default_root_dir>/bif_logs/version_<N>/influence.h5`` (next free N).
        if_exists: What to do when ``log_path`` already exists at fit start: ``"error"``,
            ``"overwrite"``, or ``"resume"`` (append; the file must come from the same run: same
            config and ids). A fit resumed from a checkpoint always resumes its log.
        tensorboard: Write group curves, a matrix figure and diagnostics to the trainer's
            ``TensorBoardLogger`` (``True``); ``False`` for none, ``"all"``, or a list of chart names
            to add the opt-in ones (see :mod:`lightning_bif.tensorboard` and docs/tensorboard.md).
        progress: Show progress during a snapshot (in the progress bar, or as log lines).
        calibrate: Choose the SGLD step size from pilot chains at the first snapshot, and again at
            later ones until one is accepted: ``True`` for :func:`~lightning_bif.calibration.calibrate`'s
            defaults, or a dict of its settings, e.g. ``{"pilot_steps": 200, "pilot_chains": 2,
            "step_sizes": [...]}`` (keys: ``step_sizes``, ``pilot_steps``, ``pilot_chains``,
            ``tracked``, ``tolerance``, ``drift_tolerance``, ``safety``). The default ladder is
            ``config.step_size`` (or the automatic one) times 16, 8, ..., 1/16, tried from the largest down; a
            candidate costs ``pilot_chains × pilot_steps`` SGLD steps, three times that when its
            half-step reference runs too. The time is not part of the snapshot's ``duration_s``
            (it is in the calibration evidence).
        horizon: The question a snapshot answers (docs/horizon.md): how up-weighting z_i from the snapshot's
            step on changes φ_j over the next H optimizer steps, with the optimizer's current learning rate
            and momentum (read at every snapshot, :func:`~lightning_bif.horizon.optimizer_step`). H is the
            number of steps to the next scheduled snapshot (``"interval"``, so consecutive snapshots tile
            the run), to the end of training (``"rest"``), or a fixed number. It sets γ (raised at saddles)
            per snapshot in place of ``localization``, and ε when ``step_size`` is ``None`` (a step size you
            set, or a calibrated one, is kept); the log records H, η, μ, γ and λ_min. ``None``, or a config with its own
            ``horizon_steps``, keeps the config's γ and ε.
        min_split_half: Warn (once per fit) when a snapshot's split-half reliability falls below
            this value: its single entries are then mostly Monte-Carlo noise. ``None`` turns the
            warning off.
        num_threads: ``torch.set_num_threads`` during snapshots (restored after each), e.g. 1 on a CPU
            shared with dataloader workers or other processes; ``None`` keeps torch's setting. On a CPU,
            a warning at fit start says when torch's threads plus the workers exceed the cores.

    Example::

        import lightning as L
        from lightning.pytorch.loggers import TensorBoardLogger
        from lightning_bif import BIFCallback, SGLDConfig

        bif = BIFCallback(train=train_subset, probes=probe_set, log_spaced=12, at_fit_start=True,
                          config=SGLDConfig(chains=4, draws=100, step_size=1e-4))
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
        if if_exists not in ("error", "overwrite", "resume"):
            raise MisconfigurationException(
                f"BIFCallback(if_exists={if_exists!r}): use 'error', 'overwrite' or 'resume'."
            )
        self.calibrate = _calibration_options(calibrate)
        try:
            check_charts(tensorboard)
        except ValueError as error:
            raise MisconfigurationException(f"BIFCallback(tensorboard=...): {error}") from error
        if min_split_half is not None and not (
            isinstance(min_split_half, (int, float)) and not isinstance(min_split_half, bool)
            and -1 <= min_split_half <= 1
        ):
            raise MisconfigurationException(
                f"BIFCallback(min_split_half={min_split_half!r}) must be a correlation in [-1, 1] or None."
            )
        self.min_split_half = min_split_half
        if num_threads is not None and (not isinstance(num_threads, int) or isinstance(num_threads, bool)
                                        or num_threads < 1):
            raise MisconfigurationException(f"BIFCallback(num_threads={num_threads!r}) must be a positive integer "
                                            "or None.")
        self.num_threads = num_threads
        if horizon not in ("interval", "rest", None) and not (
            isinstance(horizon, int) and not isinstance(horizon, bool) and horizon >= 1
        ):
            raise MisconfigurationException(
                f"BIFCallback(horizon={horizon!r}) must be 'interval', 'rest', a number of steps >= 1, or None."
            )
        self.horizon = horizon
        for name, fn in (("loss_fn", loss_fn), ("probe_fn", probe_fn)):
            if fn is not None and not callable(fn):
                raise MisconfigurationException(f"BIFCallback({name}=...) must be callable as {name}(model, batch).")
        self.train, self.probes, self.data = train, probes, data
        self._groups_given = (train_groups, probe_groups)
        self._texts_given = (probe_tokens, train_text)
        self.train_ids = self.probe_ids = self.train_groups = self.probe_groups = None
        self.probe_tokens = self.train_text = None
        self._train_source: ExampleSource | None = None  # the examples themselves, from train/probes at setup
        self._probe_source: ExampleSource | None = None
        if not isinstance(train, DataModuleExamples) and not isinstance(probes, DataModuleExamples):
            self._use_examples(train, probes)
        self.train_group_names = dict(train_group_names) if train_group_names else None
        self.probe_group_names = dict(probe_group_names) if probe_group_names else None
        self.loss_fn = loss_fn
        self.probe_fn = probe_fn
        self.config = config or SGLDConfig()
        self.weight_decay_from_optimizer = weight_decay_from_optimizer
        self.precision_from_trainer = precision_from_trainer
        self.log_path = None if log_path is None else Path(log_path)
        self.if_exists = if_exists
        self.tensorboard = tensorboard
        self.progress = progress

        self._config = self.config  # the configured config, resolved at fit start; it identifies the run in the log
        self._calibrated_step_size: float | None = None  # checkpointed: a resumed fit keeps it
        self._data_source = data
        self._tokens: int | None = None  # tokens per probe of a per-token config, found at fit start (log layout)
        self._vectorized: bool | None = None  # chains under vmap: decided at the first train start (checkpointed)
        self._sequential_reason: str | None = None  # why not, under vectorize="auto"; in each snapshot's message
        self._curvature = CurvatureCache()  # curvature at w*, reused by later snapshots and pilots while fresh
        self._active_schedule = self.schedule
        self._last_step = -1  # global step of the last snapshot (checkpointed)
        self._last_seen_step = -1  # global step at the last on_train_batch_end (gradient accumulation)
        self._start = (0, 0)  # global step at train start, training batches since (sizes log_spaced under manual opt.)
        self._snapshots = 0
        self._resumed_log_path: Path | None = None
        self._resumed = False
        self._resolved_log_path: Path | None = None
        self._writer: LogWriter | None = None
        self._lost: list[int] = []  # steps of snapshots this fit could not write to the log (rank 0)
        self._write_error = ""  # the first such error
        self._sink: Any = None  # a TensorBoardSink when the trainer has a TensorBoardLogger
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(log_path=None if self.log_path is None else str(self.log_path),
                                        train=_key(self.train), probes=_key(self.probes))

    def _use_examples(self, train: ExampleSource, probes: ExampleSource) -> None:
        """Adopt concrete example sets: their ids, and the group labels checked against their sizes."""
        train_set, probe_set = ExampleSet(train, "train"), ExampleSet(probes, "probes")
        self._train_source, self._probe_source = train, probes
        self.train_ids = train_set.ids().numpy()
        self.probe_ids = probe_set.ids().numpy()
        self.train_groups = _groups(self._groups_given[0], len(train_set), "train_groups", "train")
        self.probe_groups = _groups(self._groups_given[1], len(probe_set), "probe_groups", "probes")
        self.probe_tokens = _texts(self._texts_given[0], len(probe_set), "probe_tokens", "probes", nested=True)
        self.train_text = _texts(self._texts_given[1], len(train_set), "train_text", "train", nested=False)

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
            self._data_source = self._trainer_data(trainer)
        self._start = (trainer.global_step, 0)
        self._check_threads(trainer, pl_module)
        if self._vectorized is None:
            self._decide_vectorized(trainer, pl_module)
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
            # A later fit with this callback (more epochs on the same trainer) continues the same log.
            self._resumed, self._resumed_log_path = True, self._resolved_log_path

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_log()

    @override
    def state_dict(self) -> dict[str, Any]:
        path = self._resolved_log_path or self._resumed_log_path
        return {"last_step": self._last_step, "snapshots": self._snapshots,
                "log_path": None if path is None else str(path), "calibrated_step_size": self._calibrated_step_size,
                "vectorized": self._vectorized, "sequential_reason": self._sequential_reason}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict["last_step"])
        self._snapshots = int(state_dict["snapshots"])
        self._resumed_log_path = None if state_dict["log_path"] is None else Path(state_dict["log_path"])
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
        config = self.config
        if not config.weight_decay and self.weight_decay_from_optimizer:
            decay = _optimizer_weight_decay(trainer)
            if decay:
                rank_zero_info(f"BIFCallback: SGLD prior weight_decay={decay:g}, read from the optimizer "
                               "(set SGLDConfig(weight_decay=...) to choose another value).")
                config = config.replace(weight_decay=decay)
        if config.autocast is None and self.precision_from_trainer and str(trainer.precision).startswith("bf16"):
            rank_zero_info(f"BIFCallback: snapshots run their forward passes under bf16 autocast, as the trainer "
                           f"(precision={trainer.precision!r}); pass precision_from_trainer=False for float32.")
            config = config.replace(autocast="bf16")
        return config

    def _check_losses_at_start(self, pl_module: pl.LightningModule) -> None:
        """Evaluate the loss functions on every tracked example at w*: shapes and finiteness."""
        model = _float32_model(pl_module)
        estimator = self._estimator(model, pl_module.device, data=self._data_source, vectorized=False)
        try:
            with preserved_state(model, [pl_module.device]):
                estimator.check_losses()  # shapes and finiteness only: tuning waits for the first snapshot
        except (TypeError, ValueError) as error:
            raise MisconfigurationException(f"BIFCallback check at fit start failed: {error}") from error
        self._tokens = estimator.tokens
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

    def _decide_vectorized(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Decide once, before the first snapshot, whether chains run under vmap; rank 0's answer holds everywhere.

        At train start, when the SGLD data (by default the trainer's training DataLoader) is known:
        every function a snapshot calls is tried under vmap on it.
        """
        model = _float32_model(pl_module)
        estimator = self._estimator(model, pl_module.device, data=self._data_source)
        try:
            with snapshot_threads(self.num_threads), preserved_state(model, [pl_module.device]):
                estimator.decide_vectorized()
        except (TypeError, ValueError) as error:
            raise MisconfigurationException(f"BIFCallback check at fit start failed: {error}") from error
        self._vectorized, self._sequential_reason = trainer.strategy.broadcast(
            (estimator.vectorized, estimator.sequential_reason))

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
        cfg = self._config
        callback = {
            "loss_fn": _qualname(self.loss_fn) if self.loss_fn else f"LightningModule.{LOSS_HOOK}",
            "probe_fn": _qualname(self.probe_fn) if self.probe_fn else "loss_fn",
            "data": "trainer training data" if self.data is None else "data argument",
            "horizon": self.horizon,
        }
        return RunIdentity(
            config={"sgld": cfg.to_dict(), "callback": callback},
            train_ids=self.train_ids,
            probe_ids=self.probe_ids,
            train_groups=self.train_groups,
            probe_groups=self.probe_groups,
            chains=cfg.chains,
            draws=resolve_budget(cfg, len(self.train_ids) + len(self.probe_ids),
                                 budget_minibatch(cfg, len(self.train_ids)), Tuning()).draws,
            tokens=self._tokens,
            train_group_names=self.train_group_names,
            probe_group_names=self.probe_group_names,
            probe_tokens=self.probe_tokens,
            train_text=self.train_text,
        )

    def _open_log(self, trainer: pl.Trainer) -> None:
        """Resolve the log path, open the writer on rank 0 and agree on any error across ranks."""
        path = self.log_path or self._resumed_log_path
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
        if self.tensorboard:
            logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
            if logger is not None:
                self._sink = TensorBoardSink(logger.experiment, self._identity(),
                                             self.train_group_names, self.probe_group_names, self.tensorboard,
                                             log_path=path)
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
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except LogWriteError as error:
                rank_zero_warn(f"BIFCallback: {error}. Check the log with `lightning-bif summary {writer.path}`.")
        if self._sink is not None:
            self._sink.close()
        self._sink = None

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
        step, epoch = trainer.global_step, trainer.current_epoch
        calibration = None
        with snapshot_threads(self.num_threads):
            if self.calibrate is not None and self._calibrated_step_size is None:
                calibration = self._calibrate(trainer, pl_module, step)
            config = self._with_horizon(trainer, self.resolved_config, step)
            start = time.perf_counter()
            result, message, result_reason = self._estimate(trainer, pl_module, step, config)
            duration = time.perf_counter() - start
        wall_time = time.time()
        status = "failed" if result is None else ("ok" if result.ok else "diverged")
        if status == "diverged":
            message = result.divergence
        if result is not None and not result.diagnostics.vectorized and self._vectorized:
            # vmap failed during this snapshot and it ran one chain at a time: so will later ones.
            self._vectorized = False
            self._sequential_reason = result_reason or "torch.func.vmap failed during sampling on another rank"
        if result is not None and self._sequential_reason is not None and not message:
            message = f"chains ran one after another: {self._sequential_reason}"
        record = SnapshotRecord(step=step, epoch=epoch, wall_time=wall_time, duration_s=duration,
                                status=status, result=result, message=message,
                                step_size=config.step_size if result is None else result.config.step_size,
                                calibration=calibration)
        self._last_step = step
        self._snapshots += 1
        written = self._write(record) if trainer.is_global_zero else True
        self._report(record, written)

    def _with_horizon(self, trainer: pl.Trainer, config: SGLDConfig, step: int) -> SGLDConfig:
        """``config`` with this snapshot's horizon H and the optimizer's current (η, μ), unless it has its own."""
        if self.horizon is None or config.horizon_steps is not None:
            return config
        found = optimizer_step(trainer.optimizers)
        steps = self._horizon_steps(trainer, step)
        if found is None or steps is None:
            why = ("the optimizer's step is unknown: its learning rate is 0, it is not SGD, Adam, AdamW or RMSprop, "
                   "or it has taken no step yet (Adam, RMSprop)" if found is None
                   else "the number of steps to come is unknown")
            message = (f"BIFCallback: the snapshot at step {step} has no horizon ({why}); it uses "
                       f"SGLDConfig.localization={config.localization:g} and step_size={_shown(config.step_size)}. Set "
                       "SGLDConfig(horizon_steps=..., learning_rate=..., momentum=...) to choose the horizon yourself.")
            if step == 0:  # before the first step an adaptive optimizer cannot know its step: expected, not a problem
                rank_zero_info(message)
            elif "horizon" not in self._warned:
                self._warned.add("horizon")
                rank_zero_warn(message + " (Shown once.)")
            return config
        return config.replace(horizon_steps=steps, learning_rate=found.learning_rate, momentum=found.momentum)

    def _horizon_steps(self, trainer: pl.Trainer, step: int) -> int | None:
        """H for a snapshot at ``step``: fixed, to the next scheduled snapshot (``"interval"``) or to the end.

        Where nothing follows (the last snapshot), H is the length of the interval that led to it (from the
        previous snapshot, or from step 0).
        """
        if not isinstance(self.horizon, str):
            return self.horizon
        total = trainer.estimated_stepping_batches
        end = int(total) if math.isfinite(total) else None
        following = end if self.horizon == "rest" else self._next_snapshot_step(trainer, step, end)
        if following is not None and following > step:
            return following - step
        previous = max(self._last_step, 0)
        return step - previous if step > previous else None

    def _next_snapshot_step(self, trainer: pl.Trainer, step: int, end: int | None) -> int | None:
        """The step of the next scheduled snapshot after ``step``, at most ``end``; ``None`` when none is known."""
        schedule = self._active_schedule
        candidates = [s for s in schedule.steps if s > step]
        if schedule.every_n_steps:
            candidates.append((step // schedule.every_n_steps + 1) * schedule.every_n_steps)
        per_epoch = int(trainer.num_training_batches) // max(trainer.accumulate_grad_batches, 1) \
            if math.isfinite(trainer.num_training_batches) else 0
        if schedule.every_n_epochs and per_epoch > 0:
            epochs = schedule.every_n_epochs
            candidates.append(((step // per_epoch) // epochs + 1) * epochs * per_epoch)
        if end is not None:  # training stops there, scheduled or not
            candidates.append(end)
        return min(candidates) if candidates else None

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Any]:
        """Calibrate the step size on global rank 0 and broadcast the evidence; adopt an accepted step size.

        Rank 0 alone runs the pilots, so every rank gets the same answer even where GPU kernels
        are not bitwise reproducible across devices. Returns the evidence for the log.
        """
        evidence: dict[str, Any] | None = None
        if trainer.is_global_zero:
            device = pl_module.device
            model = _float32_model(pl_module)
            try:
                with preserved_state(model, [device]):
                    found = calibrate_step_size(model, self.loss_fn or module_per_example_loss, self._data_source,
                                                self._config, device=device, cache=self._curvature, **self.calibrate)
                evidence = {**found.summary(), "duration_s": found.duration_s}
            except Exception as caught:  # a failed calibration keeps the configured step size; training goes on
                error = f"{type(caught).__name__}: {caught}"[:_MAX_ERROR_CHARS]
                evidence = {"step_size": self._config.step_size, "ok": False, "error": error, "candidates": []}
        evidence = trainer.strategy.broadcast(evidence)
        if evidence["ok"]:
            self._calibrated_step_size = float(evidence["step_size"])
            rank_zero_info(f"BIFCallback: calibrated step_size={self._calibrated_step_size:.3g} at step {step} "
                           f"(configured {_shown(self._config.step_size)}); used from this snapshot on.")
        elif "calibration" not in self._warned:
            self._warned.add("calibration")
            reasons = evidence.get("error") or "; ".join(
                f"{c['step_size']:.3g}: {c['reason']}" for c in evidence["candidates"][-3:]
            )
            rank_zero_warn(
                f"BIFCallback: step-size calibration at step {step} accepted no step size ({reasons}). This is "
                "typical early in training, where the weights are not yet a stationary point of the sampled "
                f"posterior. Keeping the configured step_size={_shown(self._config.step_size)} and calibrating "
                "again at the next snapshot until one is accepted; every attempt is in the log's calibration column. "
                "(Shown once.)"
            )
        return evidence

    def _estimate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, config: SGLDConfig
    ) -> tuple[BIFResult | None, str, str | None]:
        """Run this rank's chains, merge across ranks; a failure anywhere fails the snapshot everywhere.

        Returns the result (``None`` when failed), the error message, and why this rank's chains
        fell back from vmap during sampling (``None`` when they did not).
        """
        device = pl_module.device
        world = trainer.world_size
        chains = [c for c in range(config.chains) if c % world == trainer.global_rank]
        model = _float32_model(pl_module)
        start = time.perf_counter()
        error: Exception | None = None
        try:
            estimator = self._estimator(model, device, data=self._data_source, config=config)
            with preserved_state(model, [device]):
                estimator.prepare()
                # The runaway rerun is decided per process; under DDP every rank must sample alike.
                sample = estimator.sample_checked if world == 1 else estimator.sample
                accumulator = sample(chains, self._progress_fn(trainer, step))
        except Exception as caught:  # a failed snapshot is recorded; training goes on
            error = caught
        if world > 1:
            # A rank whose chains fell back from vmap makes every rank's result count as sequential.
            fell_back = trainer.strategy.reduce_boolean_decision(
                error is None and bool(self._vectorized) and not estimator.vectorized, all=False)
            if fell_back and error is None:
                estimator.vectorized = False
        failed = error is not None
        if world > 1:
            failed = trainer.strategy.reduce_boolean_decision(failed, all=False)
        if failed:
            message = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
            return None, message, None
        if world > 1:
            _merge(trainer, accumulator)
        return estimator.summarize(accumulator, time.perf_counter() - start), "", estimator.sequential_reason

    def _estimator(
        self, model: nn.Module, device: torch.device, data: ExampleSource | None, config: SGLDConfig | None = None,
        vectorized: bool | None = None,
    ) -> BIFEstimator:
        loss_fn = self.loss_fn or module_per_example_loss
        vectorized = self._vectorized if vectorized is None else vectorized
        return BIFEstimator(model, loss_fn, self._train_source, self._probe_source, probe_fn=self.probe_fn, data=data,
                            config=config or self._config, device=device, vectorized=vectorized,
                            cache=self._curvature)

    def _write(self, record: SnapshotRecord) -> bool:
        """Append to the sinks; a log write that fails is counted and reported once, and training goes on."""
        written = True
        if self._writer is not None:
            try:
                self._writer.append(record)
            except LogWriteError as error:
                written = False
                self._lost.append(record.step)
                if "write" not in self._warned:
                    self._warned.add("write")
                    self._write_error = str(error)
                    rank_zero_warn(f"BIFCallback: {error}. Training goes on; later snapshots are tried again and "
                                   "the end of the fit says how many were lost. (Shown once.)")
        if self._sink is not None:
            self._sink.write(record.step, record)
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


def _calibration_options(calibrate: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    """``calibrate(...)``'s keyword arguments from ``BIFCallback(calibrate=...)``; ``None`` when off."""
    if isinstance(calibrate, bool):
        return {} if calibrate else None
    if not isinstance(calibrate, Mapping):
        raise MisconfigurationException(
            "BIFCallback(calibrate=...) takes True/False or a dict of calibrate() settings, got "
            f"{type(calibrate).__name__}."
        )
    unknown = sorted(set(calibrate) - set(_CALIBRATION_OPTIONS))
    if unknown:
        raise MisconfigurationException(
            f"BIFCallback(calibrate=...): unknown setting(s) {unknown}; use {list(_CALIBRATION_OPTIONS)}."
        )
    return dict(calibrate)


def _groups(groups: Groups | None, size: int, name: str, what: str) -> np.ndarray | None:
    if groups is None:
        return None
    array = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    if array.ndim != 1 or array.shape[0] != size:
        raise MisconfigurationException(
            f"BIFCallback({name}=...) needs one label per example of {what} ({size}), got shape {array.shape}."
        )
    return array if array.dtype.kind in "US" else array.astype(np.int64)


def _key(source: ExampleSource | DataModuleExamples) -> int | str:
    """What identifies an example set in the state key: its size (known before setup for ``DataModuleExamples``)."""
    if isinstance(source, DataModuleExamples):
        return f"{source.dataloader}:{source.size}"
    return len(ExampleSet(source, "examples"))


def _texts(texts: Sequence | None, size: int, name: str, what: str, nested: bool) -> list | None:
    """Display strings as lists, one entry per example (``nested``: a list of token strings per example)."""
    if texts is None:
        return None
    if isinstance(texts, str) or len(texts) != size or not all(
        not isinstance(entry, str) and all(isinstance(v, str) for v in entry) if nested else isinstance(entry, str)
        for entry in texts
    ):
        kind = "a list of token strings" if nested else "a str"
        raise MisconfigurationException(
            f"BIFCallback({name}=...) needs {kind} for each of the {size} examples of {what}, in order."
        )
    return [list(entry) for entry in texts] if nested else list(texts)


def _qualname(fn: Callable) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


def _optimizer_weight_decay(trainer: pl.Trainer) -> float:
    groups = [(float(g.get("weight_decay", 0.0)), sum(p.numel() for p in g["params"]))
              for optimizer in trainer.optimizers for g in optimizer.param_groups]
    if not groups:
        return 0.0
    values = {decay for decay, _ in groups}
    decay = max(groups, key=lambda g: g[1])[0]
    if len(values) > 1:
        rank_zero_warn(
            f"BIFCallback: the optimizer's param groups use different weight decays {sorted(values)}; the SGLD "
            f"prior uses {decay:g} (the largest group's). Set SGLDConfig(weight_decay=...) to choose."
        )
    return decay


def _float32_model(module: nn.Module) -> nn.Module:
    """The module itself, or a float32 copy when its parameters are half precision (bf16-true, 16-true).

    SGLD steps of size ε·∇ vanish in bf16/fp16 rounding, so the estimate runs on float32 weights.
    Mixed-precision trainers keep float32 parameters and need no copy.
    """
    if all(p.dtype not in (torch.float16, torch.bfloat16) for p in module.parameters()):
        return module
    return copy.deepcopy(module).float()


def _merge(trainer: pl.Trainer, accumulator: CovarianceAccumulator) -> None:
    """Sum the per-chain sums across ranks (chains are disjoint, so the sum is the union). Every rank calls this."""
    for tensor in accumulator.tensors():
        tensor.copy_(trainer.strategy.reduce(tensor, reduce_op="sum"))


def _tqdm_train_bar(trainer: pl.Trainer) -> Any:
    bar = trainer.progress_bar_callback
    if not isinstance(bar, TQDMProgressBar) or not bar.is_enabled:
        return None
    try:
        return bar.train_progress_bar
    except TypeError:
        return None


def _shown(step_size: float | None) -> str:
    """A configured step size for a message: ``None`` is chosen per snapshot."""
    return "auto" if step_size is None else f"{step_size:.3g}"
