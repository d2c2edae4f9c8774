"""Offline summaries: group means, extremes, flattened configs, and sign changes of influence curves."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lightning_bif import open_log
from lightning_bif.estimation.result import BIFResult
from lightning_bif.log import LogWriter
from lightning_bif.log.summaries import SignChange, extremes, flatten_config, group_labels, group_means, sign_changes
from lightning_bif.viewers.cli import main as cli_main

STEPS = np.array([0, 10, 20, 30, 40])


def curves(*pairs: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Influence ``[S, 1, N]`` with one column per curve, and unit standard errors."""
    influence = np.array(pairs, dtype=np.float64).T[:, None, :]
    return influence, np.ones_like(influence)


def test_group_means_average_each_block_against_a_loop_over_its_entries() -> None:
    influence = np.random.default_rng(0).normal(size=(5, 7))
    probe_groups, train_groups = ["b", "a", "b", "c", "a"], [2, 0, 0, 1, 2, 2, 0]
    result = group_means(influence, probe_groups, train_groups)
    assert result.probe_groups.tolist() == ["a", "b", "c"] and result.train_groups.tolist() == [0, 1, 2]
    for a, probe_label in enumerate(result.probe_groups):
        for b, train_label in enumerate(result.train_groups):
            rows = [i for i, g in enumerate(probe_groups) if g == probe_label]
            cols = [j for j, g in enumerate(train_groups) if g == train_label]
            assert result.means[a, b] == pytest.approx(influence[np.ix_(rows, cols)].mean())
    whole = group_means(influence)
    assert whole.probe_groups.tolist() == whole.train_groups.tolist() == ["all"]
    assert whole.means.shape == (1, 1) and whole.means[0, 0] == pytest.approx(influence.mean())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_entry_spoils_only_its_own_block(bad: float) -> None:
    influence = np.arange(12.0).reshape(3, 4)
    influence[0, 0] = bad
    means = group_means(influence, [0, 1, 1], [0, 0, 1, 1]).means
    assert np.isnan(means[0, 0]) if np.isnan(bad) else means[0, 0] == np.inf
    assert means[0, 1] == pytest.approx(2.5) and means[1, 0] == pytest.approx(6.5) and means[1, 1] == pytest.approx(8.5)


def test_group_labels_are_sorted_and_extremes_skip_nan() -> None:
    labels, members = group_labels(np.array(["x", "y", "x"]), 3)
    assert labels.tolist() == ["x", "y"] and members.tolist() == [0, 1, 0]
    influence = np.array([[np.nan, -2.0, 1.0], [3.0, np.nan, 0.5]])
    helpful, harmful = extremes(influence)
    assert (helpful.probe, helpful.train, helpful.influence) == (0, 1, -2.0)
    assert (harmful.probe, harmful.train, harmful.influence) == (1, 0, 3.0)
    assert extremes(np.full((2, 2), np.nan)) is None


def test_flatten_config_names_nested_entries_with_dots() -> None:
    assert flatten_config({"sgld": {"chains": 4, "prior": {"wd": 0.1}}, "every": 10}) == {
        "sgld.chains": 4, "sgld.prior.wd": 0.1, "every": 10}
    assert flatten_config(3, "x") == {"x": 3}


def test_a_helpful_pair_that_turns_harmful_through_an_unresolved_snapshot_changes_once() -> None:
    influence, stderr = curves([-5, -5, 0.1, 5, 5])
    (change,) = sign_changes(STEPS, influence, stderr, z=3)
    assert change == SignChange(probe=0, train=0, turns="harmful", before_step=10, after_step=30,
                                crossing=pytest.approx(10 + 10 * 5 / 5.1), z_before=-5.0, z_after=5.0)


def test_every_change_is_found_in_order_and_noise_within_z_is_not_a_change() -> None:
    influence, stderr = curves([4, -4, 4, 4, 4], [1, -1, 2, -2.9, 0], [-4, -4, -4, 4, 4])
    changes = sign_changes(STEPS, influence, stderr, z=3)
    assert [(c.train, c.turns, c.before_step, c.after_step) for c in changes] == [
        (0, "helpful", 0, 10), (0, "harmful", 10, 20), (2, "harmful", 20, 30)]
    assert [c.crossing for c in changes] == pytest.approx([5, 15, 25])
    assert {c.train for c in sign_changes(STEPS, influence, stderr, z=0.5)} == {0, 1, 2}  # at a low z noise counts


def test_unusable_snapshots_and_nan_entries_are_skipped() -> None:
    influence, stderr = curves([-4, 99, np.nan, -4, 4])
    usable = np.array([True, False, True, True, True])
    (change,) = sign_changes(STEPS, influence, stderr, z=3, usable=usable)
    assert (change.before_step, change.after_step, change.crossing) == (30, 40, pytest.approx(35))
    assert len(sign_changes(STEPS, influence, stderr, z=3)) == 3  # with the failed snapshot's 99 read too


def test_a_log_and_the_cli_report_the_sign_changes_of_its_ok_snapshots(tmp_path, capsys) -> None:
    from helpers import N, P, make_identity, make_result, record  # the log fixtures

    def result(value: float) -> BIFResult:
        influence = torch.zeros(P, N)
        influence[1, 2] = value
        return dataclasses.replace(make_result(0), influence=influence, stderr=torch.ones(P, N))

    path = tmp_path / "bif.h5"
    with LogWriter(path, make_identity()) as writer:
        writer.append(record(10, result=result(-5.0)))
        writer.append(record(20, "failed"))
        writer.append(record(25, "diverged", result=result(5.0)))  # not ok: not read
        writer.append(record(30, result=result(-5.0)))
        writer.append(record(40, result=result(5.0)))
    with open_log(path) as log:
        (change,) = log.sign_changes(z=3)
    assert (change.probe, change.train, change.turns) == (1, 2, "harmful")
    assert (change.before_step, change.after_step, change.crossing) == (30, 40, pytest.approx(35))
    assert cli_main(["sign-changes", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"1 sign change(s) in 1 of {P * N} (probe, train) pairs over 3 ok snapshots, at |BIF| > 3 ")
    assert out.splitlines()[-1].split() == ["35.0", "harmful", "1", "(1)", "14", "(2)", "30-40", "-5.0", "+5.0"]
