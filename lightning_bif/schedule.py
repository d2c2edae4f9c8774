"""When to take a BIF snapshot: every n steps or epochs, at given steps, log-spaced, at fit start/end.

Steps count optimizer steps (Lightning's ``trainer.global_step``): a snapshot "at step s" sees
the weights after s optimizer steps, and step 0 is the untrained model. Under manual optimization
every ``optimizer.step()`` of every optimizer counts (as for ``max_steps``), so a batch that steps
two optimizers advances the step by 2; the callback then takes a step named inside a batch at the
end of that batch, and sizes ``log_spaced`` in the same unit (``lightning_bif.lightning.training_length``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Event = Literal["fit_start", "step", "epoch_end", "fit_end"]


def log_spaced_steps(num: int, first: int = 1, last: int = 1000) -> tuple[int, ...]:
    """About ``num`` steps spaced evenly in log(step) from ``first`` to ``last`` (both included).

    Rounding can make neighbouring steps equal early on; duplicates are dropped, so fewer than
    ``num`` steps come back when ``last / first`` is small compared to ``num``.

    Args:
        num: Number of steps wanted.
        first: First step (>= 1: the log of step 0 is undefined; use ``at_fit_start`` for it).
        last: Last step (>= ``first``).

    Returns:
        The sorted, distinct steps.

    Example:
        >>> log_spaced_steps(5, first=1, last=10000)
        (1, 10, 100, 1000, 10000)
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"log_spaced needs num >= 1 snapshots, got {num!r}.")
    if first < 1 or last < first:
        raise ValueError(f"log_spaced needs 1 <= first <= last, got first={first!r}, last={last!r}.")
    if num == 1:
        return (int(last),)
    ratio = math.log(last / first) / (num - 1)
    return tuple(sorted({round(first * math.exp(ratio * k)) for k in range(num)} | {int(first), int(last)}))


@dataclass(frozen=True)
class LogSpaced:
    """A log-spaced schedule: ``num`` snapshots from step ``first`` to step ``last``.

    Influence changes fastest early in training, so log spacing puts most snapshots there.

    Args:
        num: Number of snapshots.
        first: First step (>= 1).
        last: Last step; ``None`` means the end of training, read from the trainer's
            ``estimated_stepping_batches`` when training starts.
    """

    num: int
    first: int = 1
    last: int | None = None

    def __post_init__(self) -> None:
        # Checked here, not when the steps are computed at fit start: by then the log file exists.
        for name in ("num", "first"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"log_spaced needs {name} >= 1 (an integer), got {name}={value!r}.")
        if self.last is not None and (not isinstance(self.last, int) or isinstance(self.last, bool)
                                      or self.last < self.first):
            raise ValueError(f"log_spaced needs last >= first={self.first} (an integer) or None, "
                             f"got last={self.last!r}.")

    def steps(self, total_steps: int | float | None = None) -> tuple[int, ...]:
        """The concrete steps, with ``total_steps`` standing in for ``last`` when it is ``None``."""
        last = self.last if self.last is not None else total_steps
        if last is None or not math.isfinite(last):
            raise ValueError(
                "log_spaced with last=None needs a training length, but the trainer's length is unknown "
                "(max_steps=-1 and max_epochs=-1, or an iterable dataset of unknown length). "
                "Pass LogSpaced(num, first, last=<step>) or set max_steps/max_epochs."
            )
        return log_spaced_steps(self.num, self.first, max(int(last), self.first))


@dataclass(frozen=True)
class SnapshotSchedule:
    """Which training events get a snapshot. Any combination may be set; their union is used.

    Args:
        every_n_steps: A snapshot after every ``n``-th optimizer step (steps n, 2n, ...).
        every_n_epochs: A snapshot at the end of every ``n``-th training epoch.
        at_steps: Snapshots after exactly these optimizer steps.
        log_spaced: A :class:`LogSpaced` schedule (or just its ``num``).
        at_fit_start: A snapshot before the first training step (step 0, or the step resumed from).
        at_fit_end: A snapshot when training ends.

    Example:
        >>> schedule = SnapshotSchedule(every_n_steps=100, at_fit_start=True)
        >>> [s for s in range(0, 301) if schedule.due("step", step=s, epoch=0)]
        [100, 200, 300]
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_steps: tuple[int, ...] = ()
    log_spaced: LogSpaced | None = None
    at_fit_start: bool = False
    at_fit_end: bool = False
    _log_steps: frozenset[int] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        steps = list(self.at_steps)
        try:
            if any(isinstance(s, bool) for s in steps):
                raise TypeError
            steps = [operator.index(s) for s in steps]
        except TypeError:
            raise ValueError(f"at_steps must hold integer optimizer steps, got {steps!r}.") from None
        object.__setattr__(self, "at_steps", tuple(sorted(set(steps))))
        if isinstance(self.log_spaced, int):
            object.__setattr__(self, "log_spaced", LogSpaced(self.log_spaced))
        for name in ("every_n_steps", "every_n_epochs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        if any(s < 1 for s in self.at_steps):
            raise ValueError(
                f"at_steps must hold optimizer steps >= 1, got {list(self.at_steps)}; "
                "use at_fit_start=True for a snapshot before training."
            )
        if not self.is_set:
            raise ValueError(
                "The snapshot schedule is empty: set every_n_steps, every_n_epochs, at_steps, log_spaced, "
                "at_fit_start or at_fit_end."
            )
        if self.log_spaced is not None and self.log_spaced.last is not None and self._log_steps is None:
            object.__setattr__(self, "_log_steps", frozenset(self.log_spaced.steps()))

    @classmethod
    def from_keywords(cls, schedule: SnapshotSchedule | None = None, **keywords: Any) -> SnapshotSchedule:
        """``schedule``, or the schedule its keywords describe (``None`` and ``False`` meaning "not used").

        ``BIFCallback``'s schedule keywords are a shorthand for this class: ``BIFCallback(every_n_steps=100)``
        is ``BIFCallback(schedule=SnapshotSchedule(every_n_steps=100))``.

        Args:
            schedule: A schedule given as one value, or ``None``.
            **keywords: This class's fields (``at_steps`` may be any iterable of steps).

        Raises:
            ValueError: Both a schedule and keywords are given, or ``schedule`` is not a ``SnapshotSchedule``.
        """
        given = {name: value for name, value in keywords.items() if value is not None and value is not False}
        if schedule is None:
            if "at_steps" in given:
                given["at_steps"] = tuple(given["at_steps"])
            return cls(**given)
        if not isinstance(schedule, SnapshotSchedule):
            raise ValueError(f"schedule must be a SnapshotSchedule, got {type(schedule).__name__}.")
        if given:
            raise ValueError(
                f"schedule=SnapshotSchedule(...) and the schedule keyword(s) {', '.join(given)} were both given; "
                "pass the schedule one way: put them into the SnapshotSchedule, or leave schedule= out."
            )
        return schedule

    @property
    def is_set(self) -> bool:
        """Whether any event is scheduled."""
        return bool(self.every_n_steps or self.every_n_epochs or self.at_steps or self.log_spaced
                    or self.at_fit_start or self.at_fit_end)

    @property
    def needs_total_steps(self) -> bool:
        """Whether :meth:`bind` needs the training length (a log-spaced schedule without ``last``)."""
        return self.log_spaced is not None and self.log_spaced.last is None

    def bind(self, total_steps: int | float | None = None) -> SnapshotSchedule:
        """A copy with the log-spaced steps made concrete for a run of ``total_steps`` optimizer steps."""
        if not self.needs_total_steps:
            return self
        return replace(self, _log_steps=frozenset(self.log_spaced.steps(total_steps)))

    @property
    def steps(self) -> tuple[int, ...]:
        """The explicit steps (``at_steps`` and, once bound, the log-spaced ones), sorted."""
        return tuple(sorted(set(self.at_steps) | (self._log_steps or set())))

    def next_step(self, step: int, steps_per_epoch: int = 0, end: int | None = None) -> int | None:
        """The step of the next snapshot after ``step`` (bound schedule), at most ``end``; ``None`` when none is known.

        Args:
            step: The current optimizer step.
            steps_per_epoch: Optimizer steps per epoch (for ``every_n_epochs``); 0 when unknown.
            end: The step training stops at, scheduled or not; ``None`` when unknown.
        """
        candidates = [s for s in self.steps if s > step]
        if self.every_n_steps:
            candidates.append((step // self.every_n_steps + 1) * self.every_n_steps)
        if self.every_n_epochs and steps_per_epoch > 0:
            epochs = self.every_n_epochs
            candidates.append(((step // steps_per_epoch) // epochs + 1) * epochs * steps_per_epoch)
        if end is not None:
            candidates.append(end)
        return min(candidates) if candidates else None

    def due(self, event: Event, step: int, epoch: int) -> bool:
        """Whether ``event`` at optimizer step ``step`` in epoch ``epoch`` (0-based) calls for a snapshot.

        Args:
            event: ``"fit_start"`` (before training), ``"step"`` (after an optimizer step),
                ``"epoch_end"`` (end of a training epoch) or ``"fit_end"`` (training finished).
            step: ``trainer.global_step``: optimizer steps taken so far.
            epoch: ``trainer.current_epoch``.
        """
        if event == "fit_start":
            return self.at_fit_start
        if event == "fit_end":
            return self.at_fit_end
        if event == "epoch_end":
            return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0
        if event != "step":
            raise ValueError(f"Unknown event {event!r}; expected 'fit_start', 'step', 'epoch_end' or 'fit_end'.")
        if self.log_spaced is not None and self._log_steps is None:
            raise RuntimeError("A log-spaced schedule without `last` must be bound to the training length first.")
        if self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0:
            return True
        return step in self.at_steps or step in (self._log_steps or ())
