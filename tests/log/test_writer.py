"""The HDF5 influence log: round trip, identity checks, resume/truncate, live readers, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import C, D, N, P, make_identity, make_result, record

from lightning_bif import open_log
from lightning_bif.log import FORMAT_VERSION, LogWriter, RunIdentity, check_writable


def test_round_trip_stores_every_array_of_every_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "bif.h5"
    records = [record(10), record(20, "failed", message="CUDA out of memory ✗"), record(35, "diverged")]
    with LogWriter(path, make_identity()) as writer:
        assert [writer.append(r) for r in records] == [0, 1, 2]
        np.testing.assert_array_equal(writer.steps, [10, 20, 35])

    with open_log(path) as log:
        assert len(log) == 3 and log.format_version == FORMAT_VERSION
        assert log.config == make_identity().config and (log.chains, log.draws) == (C, D)
        np.testing.assert_array_equal(log.train_ids, np.arange(N) * 7)
        np.testing.assert_array_equal(log.probe_groups, [0, 1, 1])
        np.testing.assert_array_equal(log.steps, [10, 20, 35])
        np.testing.assert_array_equal(log.epochs, [0, 0, 0])
        assert log.status.tolist() == ["ok", "failed", "diverged"]
        assert log.message.tolist() == ["", "CUDA out of memory ✗", ""]
        np.testing.assert_allclose(log.duration_s, [0.51, 0.52, 0.535])
        for row in (0, 2):
            expected, snap = records[row].result, log.snapshot(row)
            for name in ("influence", "correlation", "stderr", "train_loss", "probe_loss"):
                np.testing.assert_array_equal(getattr(snap, name), getattr(expected, name).numpy())
            np.testing.assert_array_equal(snap.sampling_loss, expected.diagnostics.sampling_loss.numpy())
            np.testing.assert_array_equal(snap.draw_loss, expected.diagnostics.draw_loss.numpy())
            np.testing.assert_array_equal(snap.diverged, expected.diagnostics.diverged.numpy())
            assert snap.split_half == pytest.approx(expected.diagnostics.split_half)
            assert snap.loss_rise == pytest.approx(expected.diagnostics.loss_rise)
            assert (snap.ess, snap.nbeta) == (expected.diagnostics.ess, 100.0)
        failed = log.snapshot(1)
        assert np.isnan(failed.influence).all() and np.isnan(failed.sampling_loss).all()
        assert np.isnan([failed.split_half, failed.loss_rise, failed.ess]).all()
        assert log.influence.shape == (3, P, N) and np.asarray(log.influence).shape == (3, P, N)
        # Without an explicit step size: the result's config, NaN for a failed row.
        assert log.step_size[[0, 2]].tolist() == [1e-4] * 2 and np.isnan(log.step_size[1])
        assert log.calibration == [None, None, None]


def test_step_size_and_calibration_evidence_per_snapshot(tmp_path: Path) -> None:
    candidate = {"step_size": 1e-3, "loss_rise": 0.5, "drift": 0.0, "diverged": False, "bias": float("nan"),
                 "accepted": False, "reason": "drift " + "x" * 300}
    many = {"step_size": 1e-4, "ok": True, "candidates": [candidate] * 40 + [{**candidate, "accepted": True}]}
    records = [record(10), record(20, "failed", message="boom"), record(30)]
    records[0].step_size, records[0].calibration = 5e-4, {"step_size": 5e-4, "ok": False, "candidates": [candidate]}
    records[1].step_size, records[1].calibration = 5e-4, many
    records[2].step_size = 1e-4
    with LogWriter(tmp_path / "bif.h5", make_identity()) as writer:
        for r in records:
            writer.append(r)
    with open_log(tmp_path / "bif.h5") as log:
        np.testing.assert_array_equal(log.step_size, [5e-4, 5e-4, 1e-4])
        first, second, third = log.calibration
        assert first["ok"] is False and first["candidates"][0]["reason"] == candidate["reason"]
        assert np.isnan(first["candidates"][0]["bias"])
        # Evidence too long for its fixed-size field keeps the last candidates (the accepted one) and counts the rest.
        assert second["ok"] is True and second["candidates"][-1]["accepted"] is True
        assert second["omitted_candidates"] + len(second["candidates"]) == 41 and second["omitted_candidates"] > 0
        assert third is None
        assert log.snapshot(1).step_size == 5e-4 and log.snapshot(1).calibration == second


def test_lazy_views_trajectory_nearest_and_position(tmp_path: Path) -> None:
    path = tmp_path / "bif.h5"
    records = [record(step) for step in (0, 10, 30)]
    with LogWriter(path, make_identity()) as writer:
        for r in records:
            writer.append(r)
    log = open_log(path)
    stacked = np.stack([r.result.influence.numpy() for r in records])
    np.testing.assert_array_equal(log.influence[-1], stacked[-1])
    np.testing.assert_array_equal(log.influence[[2, 0], 1], stacked[[2, 0], 1])
    np.testing.assert_array_equal(log.influence[..., 4], stacked[..., 4])
    np.testing.assert_array_equal(log.influence[1:, :, ::2], stacked[1:, :, ::2])
    with pytest.raises(IndexError):
        log.influence[3]

    trajectory = log.trajectory(probe=2, train=5)
    np.testing.assert_array_equal(trajectory.steps, [0, 10, 30])
    np.testing.assert_array_equal(trajectory.influence, stacked[:, 2, 5])
    np.testing.assert_array_equal(trajectory.stderr, [r.result.stderr[2, 5].item() for r in records])
    with pytest.raises(IndexError, match="train position 8"):
        log.trajectory(probe=0, train=8)

    assert [log.nearest(s) for s in (0, 4, 5, 6, 21, 30)] == [0, 0, 0, 1, 2, 2]
    assert [log.nearest(s, clip=True) for s in (-5, 100)] == [0, 2]
    with pytest.raises(ValueError, match=r"Step 100 is after the last snapshot \(step 30\).*covers steps 0..30"):
        log.nearest(100)
    assert log.position(train=35) == 5 and log.position(probe=2) == 2
    with pytest.raises(KeyError, match="id 36"):
        log.position(train=36)
    log.close()


def test_string_ids_and_groups_round_trip(tmp_path: Path) -> None:
    identity = make_identity(train_ids=[f"doc-{i}-é" for i in range(N)], probe_ids=["cat", "dog", "a longer probe"],
                             train_groups=["even", "odd"] * (N // 2), probe_groups=None)
    with LogWriter(tmp_path / "bif.h5", identity) as writer:
        writer.append(record(1))
    with open_log(tmp_path / "bif.h5") as log:
        assert log.train_ids.tolist() == [f"doc-{i}-é" for i in range(N)]
        assert log.probe_ids.tolist() == ["cat", "dog", "a longer probe"]
        assert log.train_groups.tolist() == ["even", "odd"] * (N // 2) and log.probe_groups is None
        assert log.position(probe="dog") == 1
    with pytest.raises(ValueError, match="limited to 256"):
        make_identity(probe_ids=["x" * 300, "b", "c"])
    with pytest.raises(TypeError, match="integers or strings"):
        make_identity(probe_ids=[0.5, 1.5, 2.5])
    with pytest.raises(ValueError, match="train_groups has 3 labels for 8"):
        make_identity(train_groups=[0, 1, 2])


def test_append_rejects_bad_records(tmp_path: Path) -> None:
    with LogWriter(tmp_path / "bif.h5", make_identity()) as writer:
        writer.append(record(10))
        with pytest.raises(ValueError, match=r"step 10 is not after the last logged step 10.*truncate_after"):
            writer.append(record(10))
        with pytest.raises(ValueError, match="status must be one of"):
            writer.append(record(11, status="fine"))
        with pytest.raises(ValueError, match=r"influence has shape \(3, 9\)"):
            writer.append(record(12, result=make_result(0, train=N + 1)))
        with pytest.raises(ValueError, match=r"sampling_loss has shape \(3, 5\)"):
            writer.append(record(12, result=make_result(0, chains=3)))
        assert writer.append(record(12)) == 1
    assert open_log(tmp_path / "bif.h5").steps.tolist() == [10, 12]


def test_if_exists_modes_and_identity_checks(tmp_path: Path) -> None:
    path = tmp_path / "bif.h5"
    with LogWriter(path, make_identity()) as writer:
        writer.append(record(10))
    with pytest.raises(FileExistsError, match=r"bif.h5 already exists.*if_exists='resume'.*if_exists='overwrite'"):
        LogWriter(path, make_identity())
    with pytest.raises(ValueError, match="if_exists must be one of"):
        LogWriter(path, make_identity(), if_exists="append")

    other_config = make_identity().config | {"callback": {"every_n_steps": 20}}
    with pytest.raises(ValueError, match=r"config \(callback.every_n_steps: 10 -> 20\).*if_exists='overwrite'"):
        LogWriter(path, make_identity(config=other_config), if_exists="resume")
    with pytest.raises(ValueError, match=r"logged one in train_ids\. Use the same settings"):
        LogWriter(path, make_identity(train_ids=np.arange(N)), if_exists="resume")
    with pytest.raises(ValueError, match=r"chains \(stored 2, now 3\)"):
        LogWriter(path, make_identity(chains=3), if_exists="resume")
    with pytest.raises(ValueError, match="probe_groups"):
        LogWriter(path, make_identity(probe_groups=None), if_exists="resume")

    with LogWriter(path, make_identity(), if_exists="resume") as writer:
        np.testing.assert_array_equal(writer.steps, [10])
        writer.append(record(20))
    assert open_log(path).steps.tolist() == [10, 20]

    with LogWriter(path, make_identity(chains=3, draws=4), if_exists="overwrite") as writer:
        assert len(writer) == 0
        writer.append(record(5, result=make_result(5, chains=3, draws=4)))
    log = open_log(path)
    assert log.steps.tolist() == [5] and log.sampling_loss.shape == (1, 3, 4)


def test_a_second_writer_is_refused_while_the_first_is_alive(tmp_path: Path) -> None:
    path = tmp_path / "bif.h5"
    first = LogWriter(path, make_identity())
    first.append(record(10))
    for if_exists in ("resume", "overwrite"):
        with pytest.raises(OSError, match="being written by another LogWriter"):
            LogWriter(path, make_identity(), if_exists=if_exists)
    first.append(record(20))
    first.close()
    reader = open_log(path)  # HDF5 cannot open a file for writing that this process reads
    with pytest.raises(OSError, match="has it open for reading"):
        LogWriter(path, make_identity(), if_exists="resume")
    reader.close()
    with LogWriter(path, make_identity(), if_exists="resume") as second:
        second.append(record(30))
    assert open_log(path).steps.tolist() == [10, 20, 30]


def test_truncate_after_removes_the_abandoned_timeline(tmp_path: Path) -> None:
    path = tmp_path / "bif.h5"
    with LogWriter(path, make_identity()) as writer:
        for step in (10, 20, 30, 40):
            writer.append(record(step))
    with LogWriter(path, make_identity(), if_exists="resume") as writer:
        assert writer.truncate_after(25) == 2
        assert writer.truncate_after(25) == 0
        writer.append(record(30, result=make_result(99)))
    with open_log(path) as log:
        assert log.steps.tolist() == [10, 20, 30]
        np.testing.assert_array_equal(log.influence[2], make_result(99).influence.numpy())
        np.testing.assert_array_equal(log.influence[1], make_result(20).influence.numpy())


def test_reader_in_the_same_process_sees_new_and_removed_rows_after_refresh(tmp_path: Path) -> None:
    path = tmp_path / "bif.h5"
    writer = LogWriter(path, make_identity())
    log = open_log(path)
    assert len(log) == 0 and log.influence.shape == (0, P, N)
    with pytest.raises(ValueError, match="no snapshots yet"):
        log.nearest(0)
    writer.append(record(10))
    writer.append(record(20))
    assert len(log) == 0
    log.refresh()
    assert log.steps.tolist() == [10, 20]
    np.testing.assert_array_equal(log.influence[1], make_result(20).influence.numpy())
    writer.truncate_after(10)
    log.refresh()
    assert log.steps.tolist() == [10] and log.influence.shape == (1, P, N)
    writer.close()
    log.close()


_READER = textwrap.dedent("""
    import sys
    from lightning_bif import open_log
    log = open_log(sys.argv[1])
    print(len(log), flush=True)
    for line in sys.stdin:
        log.refresh()
        print(len(log), log.status.tolist()[-1], float(log.influence[-1].sum()), flush=True)
""")


def test_reader_in_another_process_sees_rows_appended_while_it_is_open_even_after_a_resume(tmp_path: Path) -> None:
    path = tmp_path / "bif.h5"
    writer = LogWriter(path, make_identity())
    writer.append(record(10))
    with subprocess.Popen([sys.executable, "-c", _READER, str(path)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as reader:
        try:
            assert reader.stdout.readline().strip() == "1"
            for step in (20, 30):
                if step == 30:  # a resumed run appends to the file the reader holds open
                    writer.close()
                    writer = LogWriter(path, make_identity(), if_exists="resume")
                writer.append(record(step, "diverged"))
                reader.stdin.write("refresh\n")
                reader.stdin.flush()
                count, status, total = reader.stdout.readline().split()
                assert (int(count), status) == (step // 10, "diverged")
                assert float(total) == pytest.approx(float(make_result(step).influence.sum()), rel=1e-5)
            reader.stdin.close()
            assert reader.wait(timeout=600) == 0, reader.stderr.read()
        finally:
            if reader.poll() is None:
                reader.kill()
            writer.close()


_WRITER = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np, torch
    from lightning_bif import BIFResult, Diagnostics, SGLDConfig
    from lightning_bif.log import LogWriter, RunIdentity, SnapshotRecord
    path, probes, train = sys.argv[1], 40, 2000

    def result(step):
        full = lambda *shape: torch.full(shape, float(step))
        diagnostics = Diagnostics(full(2, 5), full(2, 5), torch.zeros(2, dtype=torch.bool), 0.0, 1.0, 10.0,
                                  True, 1.0, 0.1)
        return BIFResult(full(probes, train), full(probes, train), full(probes, train), full(train),
                         full(probes), diagnostics, SGLDConfig(chains=2, draws=5))

    identity = RunIdentity({"run": "crash"}, np.arange(train), np.arange(probes), chains=2, draws=5)
    writer = LogWriter(path, identity, if_exists="resume")
    if sys.argv[2] == "kill-at-commit":
        # Die at the worst moment: the third snapshot's data is on disk, its step (the commit) is not.
        write, calls = writer._write, []
        def dying_write(name, row, value):
            calls.append(name)
            if name == "step" and calls.count("step") == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            write(name, row, value)
        writer._write = dying_write
    step = int(writer.steps[-1]) + 1 if len(writer.steps) else 0
    while True:
        writer.append(SnapshotRecord(step, 0, time.time(), 0.1, "ok", result(step)))
        print(step, flush=True)
        step += 1
""")


def test_killed_writer_leaves_every_completed_snapshot_readable_and_resumable(tmp_path: Path) -> None:
    path = tmp_path / "bif.h5"
    completed: list[int] = []
    for mode in ("kill-at-commit", "loop"):
        with subprocess.Popen([sys.executable, "-c", _WRITER, str(path), mode], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as writer:
            try:
                for _ in range(2 if mode == "kill-at-commit" else 3):
                    line = writer.stdout.readline()
                    assert line, writer.stderr.read()
                    completed.append(int(line))
                if mode == "loop":
                    time.sleep(0.002)  # the kill lands between appends or in the middle of one
                    os.kill(writer.pid, signal.SIGKILL)
            finally:
                assert writer.wait(timeout=600) == -signal.SIGKILL
        with open_log(path) as log:
            steps = log.steps.tolist()
            # Every reported snapshot is there (the writer may have finished more before the kill landed).
            assert steps[:len(completed)] == completed and steps == list(range(len(steps)))
            if mode == "kill-at-commit":  # the third row's data reached the file; the reader ignores it
                assert len(steps) == 2
                with h5py.File(path, "r", swmr=True, locking=False) as raw:
                    assert len(raw["influence"]) == 3 and len(raw["step"]) == 2
            completed = steps
            for row, step in enumerate(steps):
                assert (log.influence[row] == step).all() and (log.train_loss[row] == step).all()
                assert (log.sampling_loss[row] == step).all() and log.status[row] == "ok"
    identity = RunIdentity({"run": "crash"}, np.arange(2000), np.arange(40), chains=2, draws=5)
    with LogWriter(path, identity, if_exists="resume") as writer:
        assert writer.steps.tolist() == list(range(len(completed)))
    with h5py.File(path, "r"):  # recovered: an ordinary HDF5 file again
        pass


def test_check_writable_and_bad_files(tmp_path: Path) -> None:
    check_writable(tmp_path / "new" / "dir" / "bif.h5")
    assert (tmp_path / "new" / "dir").is_dir() and not (tmp_path / "new" / "dir" / "bif.h5").exists()
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # no probe file left behind (a kill could strand one)
    if Path("/proc/1").is_dir():  # a directory that takes no new file, even for root
        with pytest.raises(OSError, match=r"Cannot write the influence log at /proc/1/bif\.h5"):
            check_writable("/proc/1/bif.h5")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        check_writable(tmp_path / "new")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match=r"Cannot write the influence log at .*file/bif.h5"):
        check_writable(tmp_path / "file" / "bif.h5")
    with pytest.raises(OSError, match="Cannot write the influence log"):
        LogWriter(tmp_path / "file" / "bif.h5", make_identity())

    with pytest.raises(FileNotFoundError, match="No influence log"):
        open_log(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "other.h5", "w", libver="latest") as other:
        other["x"] = 1
    with pytest.raises(ValueError, match="is not a lightning-bif log"):
        open_log(tmp_path / "other.h5")
    with LogWriter(tmp_path / "future.h5", make_identity()):
        pass
    with h5py.File(tmp_path / "future.h5", "r+") as future:
        future.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match="upgrade lightning-bif"):
        open_log(tmp_path / "future.h5")


def test_identity_config_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="JSON-serializable"):
        make_identity(config={"model": object()})
    identity = make_identity(train_ids=torch.arange(N))
    assert identity.train_ids.dtype == np.int64
    with LogWriter(tmp_path / "bif.h5", identity):
        pass
    with h5py.File(tmp_path / "bif.h5", "r") as file:
        assert json.loads(file.attrs["config"]) == identity.config
        assert file["influence"].chunks == (1, P, N) and file["influence"].maxshape == (None, P, N)
