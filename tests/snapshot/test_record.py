"""SnapshotRecord (lightning_bif/snapshot/record.py): the step size a snapshot used."""

from __future__ import annotations

import math

from helpers import make_result, record

from lightning_bif.snapshot.record import SnapshotRecord


def test_the_used_step_size_is_the_records_own_else_the_results_else_nan() -> None:
    assert record(10).used_step_size() == 1e-4  # the fixture's SGLDConfig(step_size=1e-4)
    calibrated = SnapshotRecord(step=10, epoch=0, wall_time=0.0, duration_s=1.0, status="ok", result=make_result(0),
                                step_size=3e-5)
    assert calibrated.used_step_size() == 3e-5
    automatic = make_result(0)
    automatic.config = automatic.config.replace(step_size=None)
    assert math.isnan(SnapshotRecord(10, 0, 0.0, 1.0, "ok", automatic).used_step_size())
    failed = record(20, "failed", message="out of memory")
    assert failed.result is None and math.isnan(failed.used_step_size())
    assert SnapshotRecord(20, 0, 0.0, 1.0, "failed", None, step_size=2e-4).used_step_size() == 2e-4
