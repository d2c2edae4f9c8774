"""Lengths in optimizer steps (``trainer.global_step``), the unit of every schedule: the fit's, a snapshot's horizon."""

from __future__ import annotations

import math

import lightning.pytorch as pl

from ..schedule import SnapshotSchedule


def manual_optimization_steps(trainer: pl.Trainer, steps_per_batch: float) -> int | float:
    """The training length in ``global_step`` units of a manually optimized fit.

    Lightning's ``estimated_stepping_batches`` counts batches there, while ``global_step`` counts
    every ``optimizer.step()``: the batches of the fit times the optimizer steps per batch seen so
    far, capped by ``max_steps`` (which counts ``global_step`` too).

    Args:
        trainer: The trainer, during training.
        steps_per_batch: Optimizer steps per training batch, measured at the first batch that stepped.

    Returns:
        The estimated number of optimizer steps of the whole fit (``inf`` when unbounded).
    """
    batches = trainer.num_training_batches
    total = math.inf if trainer.max_epochs == -1 or not math.isfinite(batches) else batches * max(trainer.max_epochs, 1)
    total = total * steps_per_batch
    if trainer.max_steps != -1:
        total = min(total, trainer.max_steps)
    return total if math.isinf(total) else math.ceil(total)


def schedule_span(trainer: pl.Trainer) -> tuple[int, int | None]:
    """Optimizer steps per epoch (0 when unknown) and the fit's last step (``None`` when unbounded)."""
    total = trainer.estimated_stepping_batches
    end = int(total) if math.isfinite(total) else None
    per_epoch = int(trainer.num_training_batches) // max(trainer.accumulate_grad_batches, 1) \
        if math.isfinite(trainer.num_training_batches) else 0
    return per_epoch, end


def horizon_steps(trainer: pl.Trainer, horizon: int | str | None, schedule: SnapshotSchedule, step: int,
                  last_snapshot: int) -> int | None:
    """H for a snapshot at ``step``: fixed, to the next scheduled snapshot (``"interval"``) or to the end (``"rest"``).

    Where nothing follows (the last snapshot), H is the length of the interval that led to it (from the
    previous snapshot ``last_snapshot``, or from step 0).

    Args:
        trainer: The trainer, during training.
        horizon: ``BIFCallback(horizon=...)``: a number of steps, ``"interval"`` or ``"rest"``.
        schedule: The bound schedule.
        step: The step of the snapshot.
        last_snapshot: The step of the previous snapshot (-1 when none).
    """
    if not isinstance(horizon, str):
        return horizon
    per_epoch, end = schedule_span(trainer)
    following = end if horizon == "rest" else schedule.next_step(step, per_epoch, end)
    if following is not None and following > step:
        return following - step
    previous = max(last_snapshot, 0)
    return step - previous if step > previous else None
