"""The length of a fit in optimizer steps, the unit of every schedule (``trainer.global_step``)."""

from __future__ import annotations

import math

import lightning.pytorch as pl


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
