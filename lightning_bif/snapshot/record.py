"""What one snapshot hands to its sinks (the HDF5 log, TensorBoard): :class:`SnapshotRecord`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..estimation.estimator import BIFResult


@dataclass
class SnapshotRecord:
    """One snapshot as handed to the sinks (HDF5 log, TensorBoard).

    Attributes:
        step: Training step (``trainer.global_step``) at which the snapshot was taken.
        epoch: Training epoch.
        wall_time: Unix time when the snapshot finished.
        duration_s: Seconds the snapshot took.
        status: ``"ok"``, ``"diverged"`` (some chains diverged) or ``"failed"``.
        result: The estimate, or ``None`` when the snapshot failed before producing one
            (stored as NaN rows).
        message: Error text of a failed snapshot.
        step_size: The SGLD step size the snapshot used; ``None``: the result's
            ``config.step_size`` (NaN for a failed snapshot without a result).
        calibration: Evidence of a step-size calibration run just before this snapshot
            (JSON-compatible, e.g. ``CalibrationResult.summary()``), or ``None``.
    """

    step: int
    epoch: int
    wall_time: float
    duration_s: float
    status: str
    result: BIFResult | None
    message: str = ""
    step_size: float | None = None
    calibration: dict[str, Any] | None = None

    def used_step_size(self) -> float:
        """The step size of this snapshot: ``step_size``, else the result's, else NaN."""
        if self.step_size is not None:
            return float(self.step_size)
        step_size = None if self.result is None else self.result.config.step_size
        return math.nan if step_size is None else float(step_size)
