"""``OverheadBudget``: the share of a fit's wall time that ``BIFCallback(overhead=...)`` lets snapshots take.

Snapshots may take the fraction o = ``overhead`` of the fit, i.e. o/(1 − o) times its training time (the fit's
time outside snapshots). Pay as you go: at a scheduled snapshot, what training so far has earned,
o/(1 − o) × training seconds − seconds spent on snapshots, is what may be spent now. The snapshot gets the
share of the whole fit's allowance (extrapolated from seconds per step) that this one and the snapshots still
planned split equally, at least what the cheapest snapshot costs and at most what has been earned: that is its
``SGLDConfig.max_seconds`` (the rounds stop there), and its first round runs as many of the configured chains as
fit (at least 2), at the cost per chain and the fixed cost (tuning) the last snapshot measured. A snapshot whose
cheapest form (tuning and two chains) has not been earned yet is skipped: the fit's end says how many.

The first snapshot (often at fit start) knows no costs and is taken as configured: a fit spends at most o of its
time on snapshots plus what that first one costs. Lightning-free; the clock is injectable, so tests do not wait.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..schedule import SnapshotSchedule

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
    """Per-snapshot decisions that keep snapshots to ``overhead`` of the fit's wall time.

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
        self.skipped = 0
        self.short = 0  # snapshots whose budget ran out below their target
        self.fixed_s: float | None = None  # the last snapshot's cost outside its chains (tuning)
        self.chain_s: float | None = None  # and per chain

    def start(self, step: int) -> None:
        """The fit (its training) starts now, at optimizer step ``step``."""
        self.started = self.clock()
        self.start_step = step

    def plan(self, step: int, total_steps: int | float, planned_after: int | None,
             chains: int) -> SnapshotBudget | None:
        """The budget of a snapshot at ``step``, or ``None`` to skip it.

        Args:
            step: The optimizer step of the snapshot.
            total_steps: The fit's optimizer steps (``trainer.estimated_stepping_batches``; ``inf`` when unknown).
            planned_after: Snapshots still planned after this one (:func:`planned_after`); ``None`` when unknown.
            chains: The configured chains (the first round runs at most these).
        """
        if self.chain_s is None or self.fixed_s is None:
            return SnapshotBudget(None, chains)  # nothing measured yet: as configured
        training = max(self.clock() - self.started - self.spent, 0.0)
        ratio = self.overhead / (1 - self.overhead)
        earned = ratio * training - self.spent
        cheapest = self.fixed_s + 2 * self.chain_s
        if earned < cheapest:
            self.skipped += 1
            return None
        done = step - self.start_step
        whole = training * (total_steps - self.start_step) / done \
            if done > 0 and math.isfinite(total_steps) and total_steps > step else training
        share = (ratio * whole - self.spent) / (1 + (planned_after or 0))
        seconds = min(earned, max(share, cheapest))
        first = int(min(chains, max(2, (seconds - self.fixed_s) // self.chain_s)))
        return SnapshotBudget(seconds, first)

    def record(self, seconds: float, fixed_s: float, chains: int, budget_ran_out: bool) -> None:
        """A snapshot took ``seconds``, ``fixed_s`` of them outside its ``chains`` chains (tuning); whether its
        budget ran out below its target."""
        self.spent += seconds
        self.snapshots += 1
        self.short += int(budget_ran_out)
        if chains > 0:
            self.fixed_s = max(fixed_s, 0.0)
            self.chain_s = max(seconds - self.fixed_s, 0.0) / chains

    def report(self) -> str:
        """What the snapshots spent, for the end of the fit."""
        fit = self.clock() - self.started
        share = self.spent / fit if fit > 0 else math.nan
        skipped = (f"; {self.skipped} scheduled snapshot(s) skipped, their cheapest form not yet earned"
                   if self.skipped else "")
        short = (f"; {self.short} ran out of budget below their split-half target (the log's below_target "
                 "column; raise overhead to give them more)" if self.short else "")
        return (f"BIFCallback: {self.snapshots} snapshot(s) took {self.spent:.1f} s of the fit's {fit:.1f} s "
                f"({share:.1%}; overhead={self.overhead:g}){skipped}{short}.")


@dataclass(frozen=True)
class SnapshotBudget:
    """What one snapshot may spend: ``max_seconds`` (``None``: no time budget) and the chains of its first round."""

    max_seconds: float | None
    chains: int
