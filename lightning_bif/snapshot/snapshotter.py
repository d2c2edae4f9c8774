"""One BIF snapshot of a model at its current weights, without Lightning: what ``estimate_bif`` and ``BIFCallback`` run.

:class:`Snapshotter` takes a snapshot: a float32 view of the model, its state preserved (the model and
the global RNG are left exactly as they were), :class:`~lightning_bif.estimation.estimator.BIFEstimator`'s prepare,
this rank's share of the chains, the merge across ranks through :mod:`lightning_bif.snapshot.collectives`, the
summary, and the status (``"ok"``, ``"suspect"``, ``"diverged"``, ``"failed"``: a failure is recorded, not raised).
It also calibrates the step size (rank 0, broadcast). :func:`training_config` and :func:`with_horizon`
derive the config a snapshot runs with from the training run's optimizer; the result goes to the sinks
(:class:`SnapshotSink`: the HDF5 log, TensorBoard) as a :class:`~lightning_bif.snapshot.record.SnapshotRecord`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn

from ..config import SGLDConfig
from ..curvature.cache import CurvatureCache
from ..estimation.accumulator import CovarianceAccumulator
from ..estimation.calibration import calibrate as calibrate_step_size
from ..estimation.estimator import BIFEstimator
from ..estimation.result import BIFResult
from ..estimation.rounds import RoundPlan
from ..estimation.sampler import ProgressFn
from ..example_sets import ExampleSet, ExampleSource
from ..functional import LossFn, float32_model, preserved_state
from ..tuning.autotune import Tuning, budget_minibatch, resolve_budget
from ..tuning.horizon import optimizer_step
from ..tuning.run_damping import RunLength
from .collectives import Collectives, SingleProcess
from .record import SnapshotRecord
from .threads import default_snapshot_threads, snapshot_threads

_MAX_ERROR_CHARS = 500


class SnapshotSink(Protocol):
    """Where snapshots go: the HDF5 log (:class:`~lightning_bif.log.LogWriter`), TensorBoard (``TensorBoardSink``)."""

    def write(self, record: SnapshotRecord) -> None:
        """Take one snapshot; a sink that cannot store it raises ``LogWriteError``."""

    def close(self) -> None:
        """Flush and release what the sink holds."""


@dataclass
class SnapshotOutcome:
    """What :meth:`Snapshotter.take` returns.

    Attributes:
        result: The estimate, or ``None`` when the snapshot failed.
        status: ``"ok"``, ``"suspect"`` (:attr:`BIFResult.suspicion`), ``"diverged"``
            (:attr:`BIFResult.divergence`) or ``"failed"``.
        message: Why it failed, diverged or is suspect, or that chains ran one after another (and why); else ``""``.
        step_size: The step size the snapshot used (the config's when it failed).
        duration_s: Wall time of the snapshot.
        error: The exception of a failed snapshot on this rank (``None`` when another rank failed).
        vectorized: Whether later snapshots run chains under vmap (``False`` once this one fell back).
        sequential_reason: Why chains run one after another, or ``None``.
    """

    result: BIFResult | None
    status: str
    message: str
    step_size: float | None
    duration_s: float
    error: Exception | None = None
    vectorized: bool | None = None
    sequential_reason: str | None = None

    def record(self, step: int, epoch: int = 0, calibration: dict[str, Any] | None = None) -> SnapshotRecord:
        """The snapshot as the sinks take it, at training step ``step``, finished now."""
        return SnapshotRecord(step=step, epoch=epoch, wall_time=time.time(), duration_s=self.duration_s,
                              status=self.status, result=self.result, message=self.message,
                              step_size=self.step_size, calibration=calibration)


@dataclass
class Snapshotter:
    """Takes BIF snapshots of a model: the examples, loss functions and SGLD data stay; the weights change.

    Args:
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` per-example losses (drives SGLD, gives ℓ_i).
        train: The tracked training examples (N).
        probes: The probes (P).
        probe_fn: The probe observable φ_j; default ``loss_fn``.
        data: Where SGLD minibatches come from; default ``train``.
        collectives: The ranks sharing the chains (chain c runs on rank c mod world size); default one process.
        cache: Curvature shared by the snapshots (:mod:`lightning_bif.curvature.cache`); ``None`` measures anew.
        clock: Seconds, monotonic: the snapshot's duration and ``SGLDConfig.max_seconds``
            (:class:`~lightning_bif.estimation.rounds.RoundPlan`); tests pass a fake one.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_bif import SGLDConfig
        >>> from lightning_bif.snapshot.snapshotter import Snapshotter
        >>> x, y = torch.randn(64, 3), torch.randn(64)
        >>> mse = lambda m, b: (m(b[0]).squeeze(-1) - b[1]).square()
        >>> snapshotter = Snapshotter(mse, (x, y), (x[:4], y[:4]))
        >>> taken = snapshotter.take(nn.Linear(3, 1), SGLDConfig(chains=2, draws=20, burn_in=10))
        >>> taken.status, taken.result.influence.shape
        ('ok', torch.Size([4, 64]))
    """

    loss_fn: LossFn
    train: ExampleSource
    probes: ExampleSource
    probe_fn: LossFn | None = None
    data: ExampleSource | None = None
    collectives: Collectives = field(default_factory=SingleProcess)
    cache: CurvatureCache | None = None
    clock: Callable[[], float] = time.perf_counter

    def _estimator(
        self, model: nn.Module, config: SGLDConfig, device: torch.device | str | None = None,
        vectorized: bool | None = None,
    ) -> BIFEstimator:
        """The estimator of one snapshot of ``model`` (already a float32 view)."""
        return BIFEstimator(model, self.loss_fn, self.train, self.probes, probe_fn=self.probe_fn, data=self.data,
                            config=config, device=device, vectorized=vectorized, cache=self.cache)

    def planned_draws(self, config: SGLDConfig) -> int:
        """Draws per chain that snapshots with ``config`` keep (with ``draws=None``, from the budget rule)."""
        train = ExampleSet(self.train, "train")
        size = len(train) + len(ExampleSet(self.probes, "probes"))
        return resolve_budget(config, size, budget_minibatch(config, len(train)), Tuning()).draws

    def example_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """Dataset indices (or keys) of the tracked training examples ``[N]`` and of the probes ``[P]``."""
        return ExampleSet(self.train, "train").ids().numpy(), ExampleSet(self.probes, "probes").ids().numpy()

    def check_losses(
        self, model: nn.Module, config: SGLDConfig, device: torch.device | str | None = None
    ) -> int | None:
        """Evaluate the loss functions on every tracked example at the current weights: shapes and finiteness only.

        Returns:
            Tokens per probe of a per-token config, else ``None``.

        Raises:
            TypeError, ValueError: A loss function returns the wrong kind, shape or non-finite values.
        """
        model = float32_model(model)
        estimator = self._estimator(model, config, device, vectorized=False)
        with preserved_state(model, [estimator.device]), torch.inference_mode(False):
            estimator.check_losses()  # tuning (curvature, vmap timing) waits for the first snapshot
        return estimator.tokens

    def decide_vectorized(
        self, model: nn.Module, config: SGLDConfig, device: torch.device | str | None = None
    ) -> tuple[bool, str | None]:
        """Whether chains run under vmap (every function a snapshot calls is tried); rank 0's answer holds everywhere.

        Returns:
            The decision and, under ``vectorize="auto"``, why chains run one after another (else ``None``).

        Raises:
            ValueError: With ``vectorize=True`` when vmap cannot run one of the functions.
        """
        model = float32_model(model)
        estimator = self._estimator(model, config, device)
        with preserved_state(model, [estimator.device]), torch.inference_mode(False):
            estimator.decide_vectorized()
        return self.collectives.broadcast((estimator.vectorized, estimator.sequential_reason))

    def calibrate(
        self, model: nn.Module, config: SGLDConfig, device: torch.device | str | None = None, **options: Any
    ) -> dict[str, Any]:
        """Calibrate the step size (:func:`~lightning_bif.estimation.calibration.calibrate`) on rank 0; broadcast
        the evidence.

        Rank 0 alone runs the pilots, so every rank gets the same answer even where GPU kernels are
        not bitwise reproducible across devices. A calibration that raises keeps ``config.step_size``.

        Args:
            model: The model at the weights to calibrate at.
            config: The sampler settings to calibrate.
            device: Where to compute; default the device of the model's parameters.
            **options: ``calibrate``'s keyword settings (``step_sizes``, ``pilot_steps``, ...).

        Returns:
            The evidence (``CalibrationResult.summary()`` and ``duration_s``; ``error`` when it raised):
            ``evidence["ok"]`` says whether ``evidence["step_size"]`` was accepted.
        """
        evidence: dict[str, Any] | None = None
        if self.collectives.rank == 0:
            model = float32_model(model)
            try:
                with preserved_state(model, [_device(model, device)]), torch.inference_mode(False):
                    found = calibrate_step_size(model, self.loss_fn, self.train if self.data is None else self.data,
                                                config, device=device, cache=self.cache, **options)
                evidence = {**found.summary(), "duration_s": found.duration_s}
            except Exception as caught:  # a failed calibration keeps the configured step size
                error = f"{type(caught).__name__}: {caught}"[:_MAX_ERROR_CHARS]
                evidence = {"step_size": config.step_size, "ok": False, "error": error, "candidates": []}
        return self.collectives.broadcast(evidence)

    def take(
        self, model: nn.Module, config: SGLDConfig, *, device: torch.device | str | None = None,
        progress: ProgressFn | None = None, vectorized: bool | None = None, sequential_reason: str | None = None,
    ) -> SnapshotOutcome:
        """Take one snapshot of ``model`` at its current weights; every rank calls this with the same arguments.

        The model (parameters, gradients, buffers, modes) and the global RNG are left exactly as they
        were. On a CPU, a small model is sampled with one intra-op thread unless a count was chosen
        (:func:`~lightning_bif.snapshot.threads.default_snapshot_threads`). A failure on any rank fails
        the snapshot on every rank (all of them call the same collectives), and is returned with status
        ``"failed"``; nothing is raised.

        Args:
            model: Any ``nn.Module`` at the weights to explain (half precision is sampled as a float32 copy).
            config: Sampler settings.
            device: Where to compute; default the device of the model's parameters.
            progress: Called as ``progress(done_steps, total_steps)`` during sampling.
            vectorized: Whether chains run under vmap, decided earlier (:meth:`decide_vectorized`); ``None``
                decides now, on each rank alone (with several ranks, decide first).
            sequential_reason: Why chains were decided to run one after another (for the message).

        Returns:
            The :class:`SnapshotOutcome`.
        """
        start = self.clock()
        collectives, world = self.collectives, self.collectives.world_size
        model = float32_model(model)
        estimator: BIFEstimator | None = None
        error: Exception | None = None
        with torch.inference_mode(False):  # SGLD needs gradients, also inside a validation hook
            try:
                estimator = self._estimator(model, config, device, vectorized)
                threads = default_snapshot_threads(model, estimator.device)
                with preserved_state(model, [estimator.device]), snapshot_threads(threads):
                    estimator.prepare()
                    plan = RoundPlan(config, self.clock, start, estimator.max_chains())
                    plan.begin_round(config.chains)
                    # The runaway rerun is decided per process; under DDP every rank must sample alike.
                    sample = estimator.sample_checked if world == 1 else estimator.sample
                    accumulator = sample(self._rank_chains(0, config.chains), progress)
            except Exception as caught:  # a failed snapshot is recorded; training goes on
                error = caught
            failed = collectives.any(error is not None) if world > 1 else error is not None
            while not failed:
                merged = self._merged(accumulator)
                add = 0
                if plan.active:  # rank 0 decides (on its clock), so every rank runs the same rounds
                    add = collectives.broadcast(plan.next_chains(merged.split_half(len(estimator.probes)))
                                                if collectives.rank == 0 else None)
                if not add:
                    accumulator = merged
                    break
                plan.begin_round(add)
                try:
                    with preserved_state(model, [estimator.device]), snapshot_threads(threads):
                        estimator.sample_more(accumulator, self._rank_chains(plan.chains - add, plan.chains),
                                              plan.chains, progress)
                except Exception as caught:
                    error = caught
                failed = collectives.any(error is not None) if world > 1 else error is not None
            if world > 1:
                # A rank whose chains fell back from vmap makes every rank's result count as sequential.
                if collectives.any(not failed and bool(vectorized) and not estimator.vectorized) and not failed:
                    estimator.vectorized = False
            if failed:
                message = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
                return SnapshotOutcome(None, "failed", message, config.step_size, self.clock() - start, error,
                                       vectorized, sequential_reason)
            if plan.chains != estimator.config.chains:
                estimator.config = estimator.config.replace(chains=plan.chains)
            result = estimator.summarize(accumulator, self.clock() - start)
            result.diagnostics.precision = plan.outcome(result.diagnostics.split_half, estimator.config.draws)
        if vectorized is None:  # decided by this snapshot
            vectorized, sequential_reason = result.diagnostics.vectorized, estimator.sequential_reason
        elif vectorized and not result.diagnostics.vectorized:
            # vmap failed during this snapshot and it ran one chain at a time: so will later ones.
            vectorized = False
            sequential_reason = estimator.sequential_reason or "torch.func.vmap failed during sampling on another rank"
        status, message = result.status, result.divergence or result.suspicion or ""
        if sequential_reason is not None and not message:
            message = f"chains ran one after another: {sequential_reason}"
        if not message and result.diagnostics.precision is not None:
            message = result.diagnostics.precision.shortfall()
        return SnapshotOutcome(result, status, message, result.config.step_size, self.clock() - start,
                               None, vectorized, sequential_reason)

    def _rank_chains(self, first: int, end: int) -> list[int]:
        """This rank's share of the chains ``first .. end - 1`` (chain c runs on rank c mod world size)."""
        return [c for c in range(first, end) if c % self.collectives.world_size == self.collectives.rank]

    def _merged(self, accumulator: CovarianceAccumulator) -> CovarianceAccumulator:
        """The union of every rank's chains (disjoint across ranks: their sum); this rank's is left as it is."""
        if self.collectives.world_size == 1:
            return accumulator
        return accumulator.mapped(lambda tensor: self.collectives.sum(tensor.clone()))


class ConfigFromTraining(NamedTuple):
    """A config with settings filled in from the training run, and what to tell the user about it.

    Attributes:
        config: The config.
        notes: One line per setting filled in (informational).
        warnings: One line per choice the user may want to make explicitly.
    """

    config: SGLDConfig
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def training_config(
    config: SGLDConfig, optimizers: Iterable[torch.optim.Optimizer], precision: str = "32-true", *,
    weight_decay_from_optimizer: bool = True, precision_from_trainer: bool = True,
) -> ConfigFromTraining:
    """``config`` with the settings it leaves to the training run filled in (as ``BIFCallback`` does at fit start).

    Args:
        config: The configured settings.
        optimizers: The training run's optimizers.
        precision: The trainer's precision (e.g. ``"bf16-mixed"``).
        weight_decay_from_optimizer: When ``config.weight_decay`` is 0, use the optimizers' weight decay as
            the L2 prior (the largest param group's).
        precision_from_trainer: When ``config.autocast`` is None and ``precision`` is bf16, run the
            snapshot's forward passes under bf16 autocast.

    Returns:
        The config, with notes and warnings for the user.
    """
    notes, warnings = [], []
    if not config.weight_decay and weight_decay_from_optimizer:
        groups = [(float(g.get("weight_decay", 0.0)), sum(p.numel() for p in g["params"]))
                  for optimizer in optimizers for g in optimizer.param_groups]
        decay = max(groups, key=lambda g: g[1])[0] if groups else 0.0
        values = sorted({value for value, _ in groups})
        if len(values) > 1:
            warnings.append(f"the optimizer's param groups use different weight decays {values}; the SGLD prior "
                            f"uses {decay:g} (the largest group's). Set SGLDConfig(weight_decay=...) to choose.")
        if decay:
            notes.append(f"SGLD prior weight_decay={decay:g}, read from the optimizer (set "
                         "SGLDConfig(weight_decay=...) to choose another value).")
            config = config.replace(weight_decay=decay)
    if config.autocast is None and precision_from_trainer and str(precision).startswith("bf16"):
        notes.append(f"snapshots run their forward passes under bf16 autocast, as the trainer "
                     f"(precision={precision!r}); pass precision_from_trainer=False for float32.")
        config = config.replace(autocast="bf16")
    return ConfigFromTraining(config, tuple(notes), tuple(warnings))


def with_horizon(
    config: SGLDConfig, optimizers: Iterable[torch.optim.Optimizer], horizon_steps: int | None, step: int,
    run: RunLength | None = None,
) -> ConfigFromTraining:
    """``config`` with the horizon H and the optimizers' current (η, μ) (docs/horizon.md), unless it has its own.

    Where the optimizer has no step (learning rate 0, as at the end of a cosine schedule) or H is
    unknown, the run so far is the horizon: damping 1/S with S = Σ_t η_t/(1 - μ_t) over the steps
    ``run`` observed (:mod:`lightning_bif.tuning.run_damping`), recorded in ``horizon_source``.

    Args:
        config: The settings of the snapshot.
        optimizers: The training run's optimizers (their current learning rate and momentum are read).
        horizon_steps: H, the optimizer steps the snapshot's question looks ahead; ``None`` when unknown.
        step: The training step of the snapshot (for the warning).
        run: The steps taken so far, or ``None``.

    Returns:
        The config; a warning (and the config unchanged) when neither a horizon nor a run is known.
    """
    if config.horizon_steps is not None:
        return ConfigFromTraining(config)
    found = optimizer_step(optimizers)
    if found is not None and horizon_steps is not None:
        return ConfigFromTraining(config.replace(horizon_steps=horizon_steps, learning_rate=found.learning_rate,
                                                 momentum=found.momentum))
    why = ("the optimizer's step is unknown: its learning rate is 0, it is not SGD, Adam, AdamW or RMSprop, "
           "or it has taken no step yet (Adam, RMSprop)" if found is None
           else "the number of steps to come is unknown")
    whole = run.horizon() if run is not None else None
    if whole is not None:
        return ConfigFromTraining(config.replace(horizon_steps=whole.horizon_steps, learning_rate=whole.learning_rate,
                                                 momentum=0.0, horizon_source=whole.source),
                                  notes=(f"the snapshot at step {step} has no steps ahead ({why}); its horizon is "
                                         f"the run so far, {whole.source}.",))
    return ConfigFromTraining(config, warnings=(
        f"the snapshot at step {step} has no horizon ({why}); it uses SGLDConfig.localization="
        f"{shown_setting(config.localization)} and step_size={shown_setting(config.step_size)}. Set "
        "SGLDConfig(horizon_steps=..., learning_rate=..., momentum=...) to choose the horizon yourself.",))


def shown_setting(value: float | None) -> str:
    """A configured step size or localization for a message: ``None`` is chosen per snapshot ("auto")."""
    return "auto" if value is None else f"{value:.3g}"


def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
