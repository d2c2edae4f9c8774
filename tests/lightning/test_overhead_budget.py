"""BIFCallback(overhead=...)'s time budget (lightning/overhead_budget.py), on a fake clock: no test waits."""

from __future__ import annotations

import pytest

from lightning_bif.lightning.overhead_budget import OverheadBudget, SnapshotBudget, check_overhead, planned_after
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


def test_the_first_snapshot_runs_as_configured_and_later_ones_pay_as_they_go() -> None:
    clock = FakeClock()
    budget = OverheadBudget(0.1, clock)
    budget.start(0)
    assert budget.plan(0, 100, 10, chains=16) == SnapshotBudget(None, 16)  # no costs measured yet
    budget.record(5.0, fixed_s=1.0, chains=16, budget_ran_out=False)  # 1 s tuning, 0.25 s per chain
    clock.now = 5.0 + 9.0  # 9 s of training earn 1 s, and the snapshot cost 5: skip
    assert budget.plan(10, 100, 9, chains=16) is None and budget.skipped == 1
    clock.now = 5.0 + 90.0  # 90 s earn 10 s, 5 spent: 5 s may be spent now
    # The fit: 90 s for 50 of 100 steps, 180 s in all, 20 s of snapshots; (20 - 5) / (1 + 4) = 3 s each.
    planned = budget.plan(50, 100, 4, chains=16)
    assert planned.max_seconds == pytest.approx(3.0) and planned.chains == 8  # (3 - 1) / 0.25 chains
    budget.record(3.0, fixed_s=1.0, chains=8, budget_ran_out=True)
    clock.now = 5.0 + 90.0 + 3.0 + 9.0  # 99 s of training earn 11 s, 8 spent: 3 s, but 1.5 s is the cheapest
    assert budget.plan(55, 100, 0, chains=16).max_seconds == pytest.approx(3.0)
    report = budget.report()
    assert "2 snapshot(s) took 8.0 s" in report and "overhead=0.1" in report and "1 scheduled snapshot(s) skipped" \
        in report and "1 ran out of budget" in report


def test_a_snapshot_gets_at_least_its_cheapest_form_and_at_most_what_was_earned() -> None:
    clock = FakeClock()
    budget = OverheadBudget(0.5, clock)
    budget.start(0)
    budget.record(2.0, fixed_s=1.0, chains=4, budget_ran_out=False)  # 0.25 s per chain: 1.5 s at the least
    clock.now = 2.0 + 4.0  # 4 s of training earn 4 s, 2 spent: 2 s
    planned = budget.plan(1, 1000, 100, chains=4)  # the share of a long fit's allowance is large ...
    assert planned.max_seconds == pytest.approx(2.0) and planned.chains == 4  # ... but only 2 s are earned
    planned = budget.plan(1, float("inf"), None, chains=4)
    assert planned.max_seconds == pytest.approx(2.0)


@pytest.mark.parametrize("overhead", [0, 1, 1.5, -0.1, True, "0.1"])
def test_an_overhead_outside_zero_one_is_refused(overhead) -> None:
    with pytest.raises(ValueError, match="overhead"):
        check_overhead(overhead)
    check_overhead(None)
    check_overhead(0.1)
