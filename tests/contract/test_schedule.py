"""The snapshot schedule: pure step/epoch arithmetic, no trainer."""

import math

import pytest

from lightning_bif.schedule import LogSpaced, SnapshotSchedule, log_spaced_steps


def steps_due(schedule: SnapshotSchedule, last: int) -> list[int]:
    return [s for s in range(last + 1) if schedule.due("step", step=s, epoch=0)]


def test_every_n_steps_counts_optimizer_steps_and_skips_step_zero():
    assert steps_due(SnapshotSchedule(every_n_steps=3), 10) == [3, 6, 9]


def test_at_steps_are_sorted_deduplicated_and_exact():
    schedule = SnapshotSchedule(at_steps=(7, 2, 7))
    assert schedule.at_steps == (2, 7)
    assert steps_due(schedule, 10) == [2, 7]


def test_union_of_step_rules():
    schedule = SnapshotSchedule(every_n_steps=4, at_steps=(1, 4, 5))
    assert steps_due(schedule, 9) == [1, 4, 5, 8]


def test_every_n_epochs_fires_at_the_end_of_every_nth_epoch():
    schedule = SnapshotSchedule(every_n_epochs=2)
    assert [e for e in range(6) if schedule.due("epoch_end", step=0, epoch=e)] == [1, 3, 5]
    assert not schedule.due("step", step=2, epoch=1)


def test_fit_start_and_end_flags():
    schedule = SnapshotSchedule(at_fit_start=True)
    assert schedule.due("fit_start", 0, 0) and not schedule.due("fit_end", 10, 1)
    schedule = SnapshotSchedule(at_fit_end=True)
    assert schedule.due("fit_end", 10, 1) and not schedule.due("fit_start", 0, 0)
    with pytest.raises(ValueError, match="Unknown event"):
        schedule.due("validation", 0, 0)


def test_log_spaced_steps_are_geometric_distinct_and_include_both_ends():
    assert log_spaced_steps(4, 1, 1000) == (1, 10, 100, 1000)
    steps = log_spaced_steps(20, 1, 50)
    assert steps[0] == 1 and steps[-1] == 50
    assert list(steps) == sorted(set(steps))
    assert len(steps) < 20  # rounding collapses the crowded early steps
    ratios = [b / a for a, b in zip(steps[-5:-1], steps[-4:], strict=True)]
    assert max(ratios) / min(ratios) < 1.3  # geometric where rounding does not bite
    assert log_spaced_steps(1, 1, 30) == (30,)


@pytest.mark.parametrize("args", [(0, 1, 10), (3, 0, 10), (3, 5, 4)])
def test_log_spaced_steps_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        log_spaced_steps(*args)


def test_log_spaced_without_last_must_be_bound_to_the_training_length():
    schedule = SnapshotSchedule(log_spaced=5)
    assert schedule.log_spaced == LogSpaced(5) and schedule.needs_total_steps
    with pytest.raises(RuntimeError, match="bound"):
        schedule.due("step", 1, 0)
    bound = schedule.bind(total_steps=10_000)
    assert bound.steps == (1, 10, 100, 1000, 10_000)
    assert steps_due(bound, 200) == [1, 10, 100]
    with pytest.raises(ValueError, match="training length"):
        schedule.bind(total_steps=math.inf)


def test_log_spaced_with_last_needs_no_binding_and_merges_with_at_steps():
    schedule = SnapshotSchedule(at_steps=(3,), log_spaced=LogSpaced(3, first=1, last=100))
    assert not schedule.needs_total_steps
    assert schedule.bind(5) is schedule
    assert schedule.steps == (1, 3, 10, 100)


def test_empty_or_invalid_schedules_are_rejected_with_the_argument_named():
    with pytest.raises(ValueError, match="empty"):
        SnapshotSchedule()
    with pytest.raises(ValueError, match="every_n_steps"):
        SnapshotSchedule(every_n_steps=0)
    with pytest.raises(ValueError, match="at_fit_start"):
        SnapshotSchedule(at_steps=(0,))


def test_from_keywords_is_the_constructor_with_unused_keywords_left_out():
    assert SnapshotSchedule.from_keywords(every_n_steps=5, every_n_epochs=None, at_steps=iter([3, 1]),
                                          log_spaced=None, at_fit_start=True, at_fit_end=False) == \
        SnapshotSchedule(every_n_steps=5, at_steps=(1, 3), at_fit_start=True)
    given = SnapshotSchedule(log_spaced=4)
    assert SnapshotSchedule.from_keywords(given, every_n_steps=None, at_fit_end=False) is given
    with pytest.raises(ValueError, match="must be a positive integer"):
        SnapshotSchedule.from_keywords(every_n_steps=0)


def test_from_keywords_refuses_a_schedule_and_keywords_together():
    with pytest.raises(ValueError, match="every_n_steps, at_fit_end were both given"):
        SnapshotSchedule.from_keywords(SnapshotSchedule(at_fit_start=True), every_n_steps=2, at_fit_end=True)
    with pytest.raises(ValueError, match="must be a SnapshotSchedule"):
        SnapshotSchedule.from_keywords({"every_n_steps": 2})  # type: ignore[arg-type]
