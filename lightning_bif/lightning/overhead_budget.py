"""``OverheadBudget``: the share of a fit's wall time that ``BIFCallback(overhead=...)`` lets snapshots take.

Snapshots may take the fraction ``overhead`` of the whole fit, so over the fit they may take o/(1 − o) times the
training time (the fit's time outside snapshots). Before each snapshot the training time of the whole fit is
extrapolated from the steps taken so far (seconds per optimizer step × the fit's steps); what the allowance has
left, after the snapshots so far, is shared equally by this snapshot and those the schedule still plans. That
share is the snapshot's ``SGLDConfig.max_seconds``: its rounds of chains stop there (the first round always runs,
so a fit may overshoot by up to what one snapshot's first round costs).

Before the first optimizer step (a snapshot at fit start) nothing is known about the fit's speed: that snapshot
gets the smallest budget, i.e. its first round of chains only, and the log says whether that fell short of the
target. Lightning-free; the clock is injectable, so tests do not wait.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from ..schedule import SnapshotSchedule

#: The budget of a snapshot for which nothing is left (or nothing is known yet): the first round only.
FIRST_ROUND_ONLY = 1e-9
#: The most scheduled steps counted ahead (a schedule of every step in a very long fit stays cheap to count).
_MAX_COUNTED = 100_000


def planned_after(schedule: SnapshotSchedule, step: int, steps_per_epoch: int, end: int | None) -> int | None:
    """How many snapshots the bound ``schedule`` still takes after ``step`` (``at_fit_end`` included).

    ``None`` when the fit's end is unknown (an infinite or unsized fit).
    """
    if end is None:
        return None
    count, current = 0, step
    while count < _MAX_COUNTED:
        following = schedule.next_step(current, steps_per_epoch)
        if following is None or following > end:
            break
        count, current = count + 1, following
    return count + int(schedule.at_fit_end and current != end)  # at the last step the two are one snapshot


def check_overhead(overhead: object) -> None:
    """Refuse an ``overhead`` that is not a fraction in (0, 1) (or ``None``)."""
    if overhead is not None and not (isinstance(overhead, (int, float)) and not isinstance(overhead, bool)
                                     and 0 < overhead < 1):
        raise ValueError(f"BIFCallback(overhead={overhead!r}) must be the fraction of the fit's wall time snapshots "
                         "may take, a number in (0, 1) such as 0.1, or None (no time budget).")


class OverheadBudget:
    """Per-snapshot time budgets that keep snapshots to ``overhead`` of the fit's wall time.

    Args:
        overhead: The fraction of the fit's wall time snapshots may take, in (0, 1).
        clock: Seconds, monotonic (default ``time.perf_counter``).
    """

    def __init__(self, overhead: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.overhead = overhead
        self.clock = clock
        self.started = clock()
        self.start_step = 0
        self.spent = 0.0
        self.snapshots = 0
        self.short = 0  # snapshots whose budget ran out below their target

    def start(self, step: int) -> None:
        """The fit (its training) starts now, at optimizer step ``step``."""
        self.started = self.clock()
        self.start_step = step

    def snapshot_seconds(self, step: int, total_steps: int | float, planned_after: int | None) -> float:
        """The ``max_seconds`` of a snapshot at ``step``.

        Args:
            step: The optimizer step of the snapshot.
            total_steps: The fit's optimizer steps (``trainer.estimated_stepping_batches``; ``inf`` when unknown).
            planned_after: Snapshots still planned after this one (:func:`planned_after`); ``None`` when unknown.
        """
        training = max(self.clock() - self.started - self.spent, 0.0)
        done = step - self.start_step
        if done <= 0:
            return FIRST_ROUND_ONLY
        if math.isfinite(total_steps) and total_steps > self.start_step:
            training *= (total_steps - self.start_step) / done
        allowance = self.overhead / (1 - self.overhead) * training - self.spent
        share = allowance / (1 + (planned_after or 0))
        return max(share, FIRST_ROUND_ONLY)

    def record(self, seconds: float, budget_ran_out: bool) -> None:
        """A snapshot took ``seconds``; whether its budget ran out below its target."""
        self.spent += seconds
        self.snapshots += 1
        self.short += int(budget_ran_out)

    def report(self) -> str:
        """What the snapshots spent, for the end of the fit."""
        fit = self.clock() - self.started
        share = self.spent / fit if fit > 0 else math.nan
        short = (f"; {self.short} of them ran out of budget below their split-half target (the log's below_target "
                 "column; raise overhead to give them more)" if self.short else "")
        return (f"BIFCallback: {self.snapshots} snapshot(s) took {self.spent:.1f} s of the fit's {fit:.1f} s "
                f"({share:.1%}; overhead={self.overhead:g}){short}.")
