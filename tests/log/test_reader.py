"""The notebook reader: ids vs positions, to_dataframe / to_xarray on selections, group names, old logs, CLI prints."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import C, D, N, P, make_identity, make_result, record

from lightning_bif import open_log
from lightning_bif.log import FORMAT_VERSION, LogWriter, RunIdentity, UnknownIdError, repair
from lightning_bif.viewers.cli import main

DATA = Path(__file__).parents[1] / "data"
TRAIN_IDS = [f"doc{i}" for i in range(N)]  # string ids: a position can never be mistaken for one
PROBE_IDS = [100, 200, 300]
TRAIN_NAMES = {0: "zeros", 1: "ones", 2: "twos"}
PROBE_NAMES = {0: "cats", 1: "dogs"}
STEPS = (10, 20, 35, 50)


def write_log(path: Path, **identity: object) -> list:
    """A log of four snapshots (the second failed) with string train ids, int probe ids and group names."""
    values = dict(train_ids=TRAIN_IDS, probe_ids=PROBE_IDS, train_group_names=TRAIN_NAMES,
                  probe_group_names=PROBE_NAMES)
    values.update(identity)
    records = [record(STEPS[0]), record(STEPS[1], "failed", message="boom"), record(STEPS[2], "diverged"),
               record(STEPS[3])]
    with LogWriter(path, make_identity(**values)) as writer:
        for r in records:
            writer.append(r)
    return records


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "bif.h5"
    write_log(path)
    return path


def test_methods_take_ids_or_positions_and_agree(log_path: Path) -> None:
    with open_log(log_path) as log:
        by_position = log.trajectory(probe=2, train=5)
        for kwargs in ({"probe_id": 300, "train_id": "doc5"}, {"probe": 2, "train_id": "doc5"},
                       {"probe_id": np.int64(300), "train": -3}):
            by_id = log.trajectory(**kwargs)
            for name in ("steps", "influence", "stderr", "correlation"):
                np.testing.assert_array_equal(getattr(by_id, name), getattr(by_position, name))
        with pytest.raises(TypeError):
            log.trajectory(2, 5)  # keyword-only: two bare numbers could be ids or positions
        with pytest.raises(ValueError, match=r"exactly one of probe= .position. or probe_id="):
            log.trajectory(probe=2, probe_id=300, train=5)
        with pytest.raises(ValueError, match="exactly one of train="):
            log.trajectory(probe=2)
        with pytest.raises(UnknownIdError, match=r"No train example with id 5 .*ids are strings \('doc0', 'doc1'"):
            log.trajectory(probe=2, train_id=5)  # a position passed as an id
        with pytest.raises(KeyError):  # UnknownIdError is a KeyError (and a ValueError, for the CLI)
            log.trajectory(probe_id=2, train=5)
        with pytest.raises(TypeError, match="train= is a position"):
            log.trajectory(probe=2, train="doc5")
        with pytest.raises(IndexError, match="probe position 3 out of range"):
            log.trajectory(probe=3, train=0)

        snap = log.snapshot(step=35)
        assert snap.index == 2 and snap.step == 35
        np.testing.assert_array_equal(snap.influence, log.snapshot(2).influence)
        with pytest.raises(ValueError, match=r"No snapshot at step 30 .*nearest snapshot is at step 35"):
            log.snapshot(step=30)
        with pytest.raises(ValueError, match="exactly one of index"):
            log.snapshot(2, step=35)
        with pytest.raises(ValueError, match="Step 5000 is after the last snapshot \\(step 50\\)"):
            log.nearest(5000)
        assert log.nearest(5000, clip=True) == 3 and log.nearest(40) == 2


def test_token_trajectory_takes_ids(tmp_path: Path, capsys) -> None:
    tokens = 4
    identity = make_identity(train_ids=TRAIN_IDS, probe_ids=PROBE_IDS, tokens=tokens)
    generator = torch.Generator().manual_seed(0)
    result = dataclasses.replace(make_result(1), token_influence=torch.randn(P, tokens, N, generator=generator),
                                 token_stderr=torch.rand(P, tokens, N, generator=generator))
    with LogWriter(tmp_path / "bif.h5", identity) as writer:
        writer.append(record(10, result=result))
    with open_log(tmp_path / "bif.h5") as log:
        by_id = log.token_trajectory(probe_id=200, train_id="doc7")
        np.testing.assert_array_equal(by_id.influence, log.token_trajectory(probe=1, train=7).influence)
        np.testing.assert_array_equal(by_id.influence[0], result.token_influence[1, :, 7].numpy())
        with pytest.raises(UnknownIdError, match="No probe example with id 1 "):
            log.token_trajectory(probe_id=1, train=7)
    assert main(["tokens", str(tmp_path / "bif.h5"), "--step", "5000"]) == 1  # like export --step
    assert "--step 5000 is outside" in (err := capsys.readouterr().err) and "only snapshot is at step 10" in err


def test_sign_changes_carry_ids_and_positions(tmp_path: Path) -> None:
    def result(value: float):
        influence = torch.zeros(P, N)
        influence[1, 6] = value
        return dataclasses.replace(make_result(0), influence=influence, stderr=torch.ones(P, N))

    path = tmp_path / "bif.h5"
    with LogWriter(path, make_identity(train_ids=TRAIN_IDS, probe_ids=PROBE_IDS)) as writer:
        writer.append(record(10, result=result(-5.0)))
        writer.append(record(20, result=result(5.0)))
    with open_log(path) as log:
        (change,) = log.sign_changes()
        assert (change.probe, change.train, change.probe_id, change.train_id) == (1, 6, 200, "doc6")
        curve = log.trajectory(probe_id=change.probe_id, train_id=change.train_id)
        np.testing.assert_array_equal(curve.influence, [-5.0, 5.0])


def test_dataframe_is_the_arrays_in_long_format(log_path: Path) -> None:
    with open_log(log_path) as log:
        frame = log.to_dataframe()
        assert list(frame.columns) == ["step", "status", "probe_id", "probe_group", "probe_group_name", "train_id",
                                       "train_group", "train_group_name", "influence", "stderr", "correlation"]
        assert len(frame) == 3 * P * N and sorted(set(frame.step)) == [10, 35, 50]  # the failed snapshot is dropped
        for name in ("influence", "stderr", "correlation"):
            np.testing.assert_array_equal(frame[name].to_numpy().reshape(3, P, N), getattr(log, name)[[0, 2, 3]])
        first = frame.iloc[: P * N]
        assert first.probe_id.tolist() == np.repeat(PROBE_IDS, N).tolist()
        assert first.train_id.tolist() == TRAIN_IDS * P
        assert first.train_group.tolist() == (np.arange(N) % 3).tolist() * P
        assert first.train_group_name.tolist() == [TRAIN_NAMES[i % 3] for i in range(N)] * P
        assert first.probe_group_name.tolist() == ["cats"] * N + ["dogs"] * 2 * N
        assert frame.status.tolist() == ["ok"] * P * N + ["diverged"] * P * N + ["ok"] * P * N
        row = frame[(frame.step == 35) & (frame.probe_id == 300) & (frame.train_id == "doc4")]
        assert row.influence.item() == log.trajectory(probe_id=300, train_id="doc4").influence[2]

        everything = log.to_dataframe(include_failed=True)
        assert len(everything) == 4 * P * N and everything[everything.step == 20].influence.isna().all()


def test_selections_read_what_they_name(log_path: Path) -> None:
    with open_log(log_path) as log:
        frame = log.to_dataframe(steps=slice(20, 50), probe_ids=[300, 100], train_groups=[2])
        assert sorted(set(frame.step)) == [35, 50] and sorted(set(frame.probe_id)) == [100, 300]
        assert sorted(set(frame.train_id)) == ["doc2", "doc5"]
        expected = log.influence[[2, 3]][:, [0, 2]][:, :, [2, 5]]
        np.testing.assert_array_equal(frame.influence.to_numpy().reshape(2, 2, 2), expected)
        same = log.to_dataframe(rows=[3, 2], probes=[0, 2], trains=slice(2, 6, 3))
        np.testing.assert_array_equal(same.to_numpy(), frame.to_numpy())
        assert len(log.to_dataframe(steps=10, probe_groups=0)) == N
        assert len(log.to_dataframe(steps=[20])) == 0  # a failed snapshot holds no values

        with pytest.raises(ValueError, match=r"No snapshot at step 30 .*covers steps 10..50.*nearest .* step 35"):
            log.to_dataframe(steps=[10, 30])
        with pytest.raises(ValueError, match=r"No snapshot in steps 500..None .*covers steps 10..50"):
            log.to_dataframe(steps=slice(500, None))
        with pytest.raises(ValueError, match=r"at most one of trains= .positions., train_ids="):
            log.to_dataframe(trains=[0], train_ids=["doc0"])
        with pytest.raises(UnknownIdError, match="doc99"):
            log.to_dataframe(train_ids=["doc1", "doc99"])
        with pytest.raises(UnknownIdError, match=r"No probe group 7 .*groups are \[0, 1\]"):
            log.to_dataframe(probe_groups=[7])
        with pytest.raises(TypeError, match="takes positions"):
            log.to_dataframe(trains=["doc1"])
        with pytest.raises(IndexError, match="rows position 4 out of range"):
            log.to_dataframe(rows=[4])


def test_xarray_has_ids_as_coordinates(log_path: Path) -> None:
    with open_log(log_path) as log:
        ds = log.to_xarray(steps=slice(None, 40))
        assert ds.influence.dims == ("step", "probe", "train") and ds.influence.shape == (2, P, N)
        assert ds.step.values.tolist() == [10, 35] and ds.train.values.tolist() == TRAIN_IDS
        assert ds.status.values.tolist() == ["ok", "diverged"]
        assert ds.probe_group_name.values.tolist() == ["cats", "dogs", "dogs"]
        np.testing.assert_array_equal(ds.stderr.values, log.stderr[[0, 2]])
        by_id = ds.influence.sel(probe=200, train="doc3").values
        np.testing.assert_array_equal(by_id, log.trajectory(probe_id=200, train_id="doc3").influence[[0, 2]])
        np.testing.assert_array_equal(ds.split_half.values, log.split_half[[0, 2]])


def test_missing_pandas_or_xarray_names_the_extra(log_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # what an environment without pandas raises on import
    monkeypatch.setitem(sys.modules, "xarray", None)
    with open_log(log_path) as log:
        with pytest.raises(ImportError, match=r"to_dataframe\(\) needs pandas.*pip install 'lightning-bif\[pandas\]'"):
            log.to_dataframe()
        with pytest.raises(ImportError, match=r"pip install 'lightning-bif\[xarray\]'"):
            log.to_xarray()


def test_a_step_range_reads_only_its_rows(tmp_path: Path) -> None:
    # 80 snapshots of 3 float32 [100, 400] matrices: 38 MB of values; a 2-snapshot selection needs ~1 MB.
    probes, train, rows = 100, 400, 80
    identity = RunIdentity({"sgld": {}}, train_ids=np.arange(train), probe_ids=np.arange(probes), chains=C, draws=D)
    base = make_result(0, probes=probes, train=train)
    with LogWriter(tmp_path / "big.h5", identity) as writer:
        for step in range(rows):
            writer.append(record(step, result=dataclasses.replace(base, influence=base.influence + step)))
    full_bytes = rows * 3 * probes * train * 4
    with open_log(tmp_path / "big.h5") as log:
        log.to_dataframe(rows=0, trains=0), log.to_xarray(rows=0, trains=0)  # imports pandas, xarray: not measured
        tracemalloc.start()
        try:
            frame = log.to_dataframe(steps=slice(30, 31))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(frame) == 2 * probes * train and sorted(set(frame.step)) == [30, 31]
        np.testing.assert_allclose(frame.influence.to_numpy()[: probes * train],
                                   (base.influence + 30).numpy().reshape(-1))
        assert peak < full_bytes / 4, f"reading 2 of {rows} snapshots peaked at {peak / 1e6:.1f} MB"

        tracemalloc.start()
        try:
            log.to_xarray(rows=[5], probes=slice(0, 10))
            _, peak_small = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak_small < 3 * probes * train * 4  # one snapshot's bounding box, not the log


def test_group_names_round_trip_and_are_checked(tmp_path: Path) -> None:
    write_log(tmp_path / "ints.h5")
    with open_log(tmp_path / "ints.h5") as log:
        assert log.format_version == FORMAT_VERSION == 3
        assert log.train_group_names == TRAIN_NAMES and log.probe_group_names == PROBE_NAMES
        assert all(type(label) is int for label in log.train_group_names)
    repair(tmp_path / "ints.h5")  # a repaired copy keeps the names
    with open_log(tmp_path / "ints.repaired.h5") as log:
        assert log.train_group_names == TRAIN_NAMES and log.probe_group_names == PROBE_NAMES
    write_log(tmp_path / "strings.h5", train_groups=["even", "odd"] * (N // 2), train_group_names={"odd": "Odd ✓"},
              probe_group_names=None)
    with open_log(tmp_path / "strings.h5") as log:
        assert log.train_group_names == {"odd": "Odd ✓"} and log.probe_group_names is None
        frame = log.to_dataframe(steps=10)
        assert "probe_group_name" not in frame and frame.train_group_name.tolist()[:2] == ["even", "Odd ✓"]

    # Labels as NumPy or tensor scalars (as BIFCallback users pass them) are stored as plain ints.
    identity = make_identity(train_group_names={np.int64(1): "one", torch.tensor(2): 2})
    assert identity.train_group_names == {1: "one", 2: "2"}
    # One exception type (ValueError): BIFCallback reports it at fit start as a configuration error on every rank.
    with pytest.raises(ValueError, match="train_group_names needs train_groups"):
        make_identity(train_groups=None, train_group_names={0: "zero"})
    with pytest.raises(ValueError, match="label '0' is not an integer like the probe_groups labels"):
        make_identity(probe_group_names={"0": "zero"})
    with pytest.raises(ValueError, match="must be a mapping"):
        make_identity(probe_group_names=["zero", "one"])


def test_a_version_1_log_opens_and_reads(tmp_path: Path, capsys) -> None:
    path = tmp_path / "v1.h5"
    shutil.copy(DATA / "log_v1.h5", path)
    with open_log(path) as log:
        assert log.format_version == 1 and len(log) == 3
        assert log.train_group_names is None and log.probe_group_names is None
        np.testing.assert_array_equal(log.influence[0], record(10).result.influence.numpy())
        frame = log.to_dataframe()
        assert "train_group_name" not in frame and len(frame) == 2 * P * N
        np.testing.assert_array_equal(log.trajectory(probe_id=2, train_id="doc3").influence[[0, 2]],
                                      frame[(frame.probe_id == 2) & (frame.train_id == "doc3")].influence)
    assert main(["summary", str(path)]) == 0
    assert "probe id " in capsys.readouterr().out


def test_cli_prints_ids_and_group_names(log_path: Path, tmp_path: Path, capsys) -> None:
    assert main(["summary", str(log_path)]) == 0
    out = capsys.readouterr().out
    assert "by id: log.trajectory(probe_id=..., train_id=...)" in out
    header = next(line for line in out.splitlines() if "zeros" in line)
    assert header.split() == ["zeros", "ones", "twos"]
    assert any(line.startswith("cats ") for line in out.splitlines())
    line = next(line for line in out.splitlines() if line.strip().startswith("50 "))
    assert "probe id 100 <- train id doc" in line or "probe id 200 <- train id doc" in line or "probe id 300" in line

    assert main(["export", str(log_path), "--step", "5000", "--csv", str(tmp_path / "x.csv")]) == 1
    err = capsys.readouterr().err
    assert "--step 5000 is outside" in err and "50 for the last snapshot" in err and not (tmp_path / "x.csv").exists()
    assert main(["export", str(log_path), "--step", "50", "--csv", "-"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(",correlation,probe_group_name,train_group_name")
    assert lines[1].startswith("50,100,0,doc0,0,") and lines[1].endswith(",cats,zeros")


def test_cli_sign_changes_print_ids_and_names(tmp_path: Path, capsys) -> None:
    def result(value: float):
        influence = torch.zeros(P, N)
        influence[2, 4] = value
        return dataclasses.replace(make_result(0), influence=influence, stderr=torch.ones(P, N))

    path = tmp_path / "bif.h5"
    identity = make_identity(train_ids=TRAIN_IDS, probe_ids=PROBE_IDS, train_group_names=TRAIN_NAMES,
                             probe_group_names=PROBE_NAMES)
    with LogWriter(path, identity) as writer:
        writer.append(record(10, result=result(-5.0)))
        writer.append(record(20, result=result(5.0)))
    assert main(["sign-changes", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "probe id (group)" in lines[3] and "train id (group)" in lines[3]
    assert lines[-1].split()[:6] == ["15.0", "harmful", "300", "(dogs)", "doc4", "(ones)"]


def test_help_imports_no_torch_lightning_or_matplotlib() -> None:
    code = (
        "import sys\n"
        "from lightning_bif.viewers.cli import main\n"
        "for argv in (['--help'], ['export', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'lightning', 'matplotlib', 'pandas') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert "usage: lightning-bif" in done.stdout
    assert done.stdout.splitlines()[-1] == "HEAVY []"
