"""BIFCallback(overhead=...)'s time budget (lightning/overhead_budget.py), on a fake clock: no test waits."""

from __future__ import annotations

import pytest

from lightning_bif.lightning.overhead_budget import FIRST_ROUND_ONLY, OverheadBudget, check_overhead, planned_after
from lightning_bif.schedule import SnapshotSchedule


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_snapshots_planned_after_a_step() -> None:
    every = SnapshotSchedule(every_n_steps=10)
    assert planned_after(every, 10, 0, 100) == 9
    assert planned_after(SnapshotSchedule(every_n_steps=10, at_fit_end=True), 10, 0, 105) == 10
    assert planned_after(SnapshotSchedule(every_n_steps=10, at_fit_end=True), 100, 0, 100) == 0
    assert planned_after(SnapshotSchedule(at_steps=(5, 50, 500)), 0, 0, 100) == 2
    assert planned_after(SnapshotSchedule(every_n_epochs=2), 0, 10, 100) == 5
    assert planned_after(every, 10, 0, None) is None


def test_the_budget_shares_the_fits_extrapolated_allowance_among_the_planned_snapshots() -> None:
    clock = FakeClock()
    budget = OverheadBudget(0.1, clock)
    budget.start(0)
    assert budget.snapshot_seconds(0, 100, 10) == FIRST_ROUND_ONLY  # nothing known of the fit's speed yet
    budget.record(0.5, budget_ran_out=True)
    clock.now = 10.5  # 10 s of training for 10 of 100 steps: 100 s in all, so snapshots may take 100/9 s
    seconds = budget.snapshot_seconds(10, 100, 9)
    assert seconds == pytest.approx((100 / 9 - 0.5) / 10)
    budget.record(seconds, budget_ran_out=False)
    clock.now = 10.5 + seconds + 90  # the rest of training
    budget.record(20.0, budget_ran_out=False)  # one snapshot overran: nothing is left for the next
    assert budget.snapshot_seconds(100, 100, 0) == FIRST_ROUND_ONLY
    report = budget.report()
    assert "3 snapshot(s)" in report and "overhead=0.1" in report and "1 of them ran out of budget" in report


def test_an_unsized_fit_gives_this_snapshot_what_the_elapsed_training_allows() -> None:
    clock = FakeClock()
    budget = OverheadBudget(0.5, clock)
    budget.start(3)
    clock.now = 4.0
    assert budget.snapshot_seconds(7, float("inf"), None) == pytest.approx(4.0)


@pytest.mark.parametrize("overhead", [0, 1, 1.5, -0.1, True, "0.1"])
def test_an_overhead_outside_zero_one_is_refused(overhead) -> None:
    with pytest.raises(ValueError, match="overhead"):
        check_overhead(overhead)
    check_overhead(None)
    check_overhead(0.1)
