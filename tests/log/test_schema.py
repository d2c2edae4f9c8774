"""The log's run identity and file helpers (lightning_bif/log/schema.py): checks, labels and texts, chunks."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from lightning_bif.log import RunIdentity
from lightning_bif.log.schema import (
    _MAX_CHUNK_ELEMENTS,
    check_format,
    read_group_names,
    read_labels,
    read_texts,
    row_chunks,
    write_group_names,
    write_labels,
    write_texts,
)


def test_ids_and_groups_become_int64_or_str_arrays_and_sizes_follow_them() -> None:
    identity = RunIdentity({"a": 1}, train_ids=torch.tensor([3, 1]), probe_ids=["p0", "p1", "p2"],
                           train_groups=np.array([0, 1], dtype=np.int8), chains=2, draws=5, tokens=4)
    assert identity.train_ids.dtype == np.int64 and identity.train_groups.dtype == np.int64
    assert identity.probe_ids.tolist() == ["p0", "p1", "p2"] and identity.probe_ids.dtype.kind == "U"
    assert identity.sizes == {"P": 3, "N": 2, "C": 2, "D": 5, "T": 4}
    assert identity.config_json == '{"a": 1}'


@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"config": {"f": object()}}, TypeError, "JSON-serializable"),
    ({"train_ids": [[0, 1]]}, ValueError, "one-dimensional"),
    ({"train_ids": np.array([0, "a"], dtype=object)}, TypeError, "all integers or all strings"),
    ({"train_ids": [0, "a"]}, TypeError, "all integers or all strings"),
    ({"train_groups": (1, "b")}, TypeError, "all integers or all strings"),
    ({"train_ids": [0.5, 1.5]}, TypeError, "integers or strings"),
    ({"train_ids": ["x" * 300, "y"]}, ValueError, "limited to 256 UTF-8 bytes"),
    ({"train_groups": [0]}, ValueError, "1 labels for 2 examples"),
    ({"chains": 0}, ValueError, "RunIdentity.chains"),
    ({"tokens": 0}, ValueError, "RunIdentity.tokens"),
    ({"train_group_names": {0: "a"}}, ValueError, "needs train_groups"),
    ({"train_groups": [0, 1], "train_group_names": {"0": "a"}}, ValueError, "is not an integer"),
    ({"probe_tokens": [["a"]]}, ValueError, "needs a token axis"),
    ({"train_text": ["one"]}, ValueError, r"shape \[2\]"),
])
def test_an_identity_that_cannot_be_stored_is_refused(changes: dict, error: type, match: str) -> None:
    values = dict(config={}, train_ids=[0, 1], probe_ids=[0])
    with pytest.raises(error, match=match):
        RunIdentity(**{**values, **changes})


def test_labels_texts_and_group_names_round_trip_through_a_file(tmp_path: Path) -> None:
    identity = RunIdentity({}, train_ids=["ä", "bb"], probe_ids=[7], train_groups=[1, 2],
                           train_group_names={np.int64(1): "one", 2: "two"}, train_text=["é" * 600, "short"])
    assert identity.train_group_names == {1: "one", 2: "two"}
    assert len(identity.train_text[0].encode()) == 1024  # cut to 1024 bytes without splitting a character
    with h5py.File(tmp_path / "x.h5", "w") as file:
        write_labels(file, "train_ids", identity.train_ids)
        write_labels(file, "probe_ids", identity.probe_ids)
        write_texts(file, "train_text", identity.train_text)
        write_group_names(file, identity)
    with h5py.File(tmp_path / "x.h5", "r") as file:
        np.testing.assert_array_equal(read_labels(file["train_ids"]), ["ä", "bb"])
        assert read_labels(file["probe_ids"]).dtype == np.int64
        assert read_texts(file, "train_text").tolist() == identity.train_text.tolist()
        assert read_texts(file, "probe_tokens") is None
        assert read_group_names(file, "train") == {1: "one", 2: "two"} and read_group_names(file, "probe") is None


def test_a_row_is_one_chunk_unless_it_is_too_large() -> None:
    assert row_chunks((3, 8)) == (1, 3, 8)
    assert row_chunks(()) == (1,)
    big = row_chunks((4096, 4096))
    assert big[0] == 1 and math.prod(big) <= _MAX_CHUNK_ELEMENTS and big[2] == 4096


def test_only_lightning_bif_logs_of_a_readable_version_pass(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "x.h5", "w") as file:
        with pytest.raises(ValueError, match="is not a lightning-bif log"):
            check_format(file, "x.h5")
        file.attrs["format"], file.attrs["format_version"] = "lightning-bif", 99
        with pytest.raises(ValueError, match="format version 99, newer than"):
            check_format(file, "x.h5")
        file.attrs["format_version"] = 1
        check_format(file, "x.h5")
