"""Selections of a log (lightning_bif/log/tables.py): positions from steps, ids and groups, and block-wise reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import N, P, make_identity, record

from lightning_bif import open_log
from lightning_bif.log import LogWriter
from lightning_bif.log.tables import UnknownIdError, ids_to_positions, read, select


@pytest.fixture
def log(tmp_path: Path):
    path = tmp_path / "bif.h5"
    with LogWriter(path, make_identity()) as writer:  # train ids 0, 7, ..., 49; train groups i % 3
        for step in (10, 20, 30, 40, 50):
            writer.append(record(step, "failed" if step == 20 else "ok"))
    with open_log(path) as opened:
        yield opened


def test_snapshots_by_step_range_or_position_and_failed_ones_only_on_request(log) -> None:
    assert select(log).rows.tolist() == [0, 2, 3, 4]
    assert select(log, include_failed=True).rows.tolist() == [0, 1, 2, 3, 4]
    assert select(log, steps=slice(15, 40)).rows.tolist() == [2, 3]
    assert select(log, steps=[50, 10]).rows.tolist() == [0, 4]
    assert select(log, rows=[-1, 0, 0]).rows.tolist() == [0, 4]


def test_examples_by_position_id_or_group(log) -> None:
    assert ids_to_positions(log, "train", [49, 0, 7]).tolist() == [7, 0, 1]
    assert select(log, train_ids=[49, 0]).trains.tolist() == [0, 7]
    assert select(log, train_groups=[2]).trains.tolist() == [2, 5]
    assert select(log, probe_groups=1).probes.tolist() == [1, 2]
    assert select(log, trains=slice(None, None, 3)).trains.tolist() == [0, 3, 6]
    assert select(log).probes.tolist() == list(range(P)) and len(select(log).trains) == N


def test_a_block_wise_read_equals_indexing_the_whole_array(log) -> None:
    whole = np.asarray(log.influence)
    selection = select(log, rows=[0, 2, 4], probes=[0, 2], trains=[1, 4, 6])
    expected = whole[[0, 2, 4]][:, [0, 2]][:, :, [1, 4, 6]]
    for budget in (1, 100, 1 << 20):  # one row per read, a few, all at once
        np.testing.assert_array_equal(read(log.influence, selection, budget=budget), expected)
    empty = select(log, steps=slice(45, 60), probes=[])
    assert read(log.influence, empty).shape == (1, 0, N)


def test_what_cannot_be_selected_is_explained(log) -> None:
    with pytest.raises(UnknownIdError, match=r"No train example with id 3 .* its 8 train ids are integers") as caught:
        select(log, train_ids=[0, 3])
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, ValueError)
    assert not str(caught.value).startswith("'")  # not quoted as a KeyError would be
    with pytest.raises(UnknownIdError, match="No train group 5"):
        select(log, train_groups=[5])
    with pytest.raises(ValueError, match="at most one of trains="):
        select(log, trains=[0], train_ids=[0])
    with pytest.raises(ValueError, match="at most one of steps="):
        select(log, steps=[10], rows=[0])
    with pytest.raises(ValueError, match=r"No snapshot at step 25 .* the nearest snapshot is at step (20|30)"):
        select(log, steps=[25])
    with pytest.raises(ValueError, match="takes no stride"):
        select(log, steps=slice(10, 50, 2))
    with pytest.raises(TypeError, match="trains takes positions"):
        select(log, trains=["a"])
    with pytest.raises(IndexError, match="rows position 5 out of range for 5"):
        select(log, rows=[5])
