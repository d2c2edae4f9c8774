"""Damage checks and recovery helpers of the log (lightning_bif/log/recover.py), one function at a time.

tests/log/test_faults.py reproduces whole faults (kills, full disks, damaged files) end to end.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_identity, record

from lightning_bif.log import LogWriter
from lightning_bif.log.recover import (
    DamagedLogError,
    _lookup3,
    check_file,
    check_space,
    damage_as_error,
    first_inconsistent_row,
    live_writer,
    new_temporary,
    remove_stale_temporaries,
    repaired_path,
)


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "bif.h5"
    with LogWriter(path, make_identity()) as writer:
        writer.append(record(10))
    return path


def test_repaired_path_is_next_to_the_log() -> None:
    assert repaired_path("runs/bif.h5") == Path("runs/bif.repaired.h5")
    assert repaired_path("runs/bif") == Path("runs/bif.repaired.h5")


def test_the_header_checksum_is_hdf5s_lookup3() -> None:
    # Bob Jenkins' published values of hashlittle(key, 0) (lookup3.c, driver5).
    assert _lookup3(b"") == 0xDEADBEEF
    assert _lookup3(b"Four score and seven years ago") == 0x17770551


def test_a_whole_log_passes_and_each_kind_of_damage_is_named(log_file: Path, tmp_path: Path) -> None:
    check_file(log_file)
    data = log_file.read_bytes()
    cases = {
        "empty": (b"", "the file is empty"),
        "foreign": (b"not hdf5" + data[8:], "does not start with the HDF5 signature"),
        "header": (data[:20], "ends inside its HDF5 header"),
        "checksum": (data[:12] + bytes([data[12] ^ 0xFF]) + data[13:], "fails its checksum"),
        "truncated": (data[: len(data) // 2], f"it is truncated: {len(data) // 2:,} bytes of the {len(data):,}"),
    }
    for name, (content, problem) in cases.items():
        damaged = tmp_path / f"{name}.h5"
        damaged.write_bytes(content)
        with pytest.raises(DamagedLogError, match=problem) as caught:
            check_file(damaged)
        assert caught.value.path == damaged and f"lightning-bif repair {damaged}" in str(caught.value)


def test_rows_no_writer_could_have_written_are_found() -> None:
    status = np.array(["ok", "diverged", "failed"], dtype=object)
    steps, rise = np.array([10, 20, 30]), np.array([0.1, 5.0, np.nan])
    assert first_inconsistent_row(steps, status, rise) is None  # a failed row has no loss rise
    assert first_inconsistent_row(steps, np.array(["ok", "", "failed"], dtype=object), rise)[0] == 1
    assert "not after the previous row's" in first_inconsistent_row(np.array([10, 10, 30]), status, rise)[1]
    assert first_inconsistent_row(np.array([-1, 20, 30]), status, rise)[0] == 0
    row, problem = first_inconsistent_row(steps, status, np.array([np.nan, 5.0, np.nan]))
    assert row == 0 and "'ok' but its values are missing" in problem


def test_read_errors_become_one_damaged_log_error_but_missing_files_stay_what_they_are(tmp_path: Path) -> None:
    with pytest.raises(DamagedLogError, match=r"missing or unreadable \(KeyError.*The first 3 snapshot"):
        with damage_as_error(tmp_path / "bif.h5", intact=3):
            raise KeyError("influence")
    with pytest.raises(DamagedLogError, match="HDF5 cannot read a part of it"):
        with damage_as_error(tmp_path / "bif.h5"):
            raise OSError("bad block")
    with pytest.raises(FileNotFoundError), damage_as_error(tmp_path / "bif.h5"):
        raise FileNotFoundError("gone")


def test_a_live_writer_holds_the_log(tmp_path: Path) -> None:
    path = tmp_path / "bif.h5"
    assert not live_writer(path)  # no file
    writer = LogWriter(path, make_identity())
    try:
        assert live_writer(path)
    finally:
        writer.close()
    assert not live_writer(path)


def test_temporaries_of_dead_processes_are_removed_and_those_of_live_ones_kept(log_file: Path) -> None:
    mine = new_temporary(log_file, "recover")
    assert mine.name == f".bif.h5.{os.getpid()}.0.recover" and mine.stat().st_size == 0
    assert new_temporary(log_file, "recover").name == f".bif.h5.{os.getpid()}.1.recover"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = log_file.with_name(f".bif.h5.{int(dead.stdout)}.0.creating")
    parent = log_file.with_name(f".bif.h5.{os.getppid()}.0.creating")  # a live process
    other = log_file.with_name(f".bif.h5.{int(dead.stdout)}.0.other")  # not a kind recovery writes
    for path in (stale, parent, other):
        path.touch()
    remove_stale_temporaries(log_file)
    left = sorted(p.name for p in log_file.parent.iterdir())
    assert left == sorted([log_file.name, parent.name, other.name])  # this process's own count as stale


def test_too_little_space_is_an_enospc_error_naming_the_job(tmp_path: Path) -> None:
    check_space(tmp_path, 1, "a tiny write")
    with pytest.raises(OSError, match="Not enough space for recovering the log") as caught:
        check_space(tmp_path, 1 << 62, "recovering the log")
    assert caught.value.errno == errno.ENOSPC
