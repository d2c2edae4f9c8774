"""Significant sign changes of influence curves, from arrays and from a log."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lightning_bif import open_log
from lightning_bif.analysis import SignChange, sign_changes
from lightning_bif.cli import main as cli_main
from lightning_bif.estimator import BIFResult
from lightning_bif.log import LogWriter

STEPS = np.array([0, 10, 20, 30, 40])


def curves(*pairs: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Influence ``[S, 1, N]`` with one column per curve, and unit standard errors."""
    influence = np.array(pairs, dtype=np.float64).T[:, None, :]
    return influence, np.ones_like(influence)


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
