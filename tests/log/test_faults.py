"""Fault injection: every fault of docs/reliability.md reproduced, and what must survive it.

Damaged files (truncated, overwritten, half-written rows), failed writes (an injected I/O error from
the write layer, and a real full disk: a 3 MiB tmpfs where this machine lets us mount one), blown-up
chains, a constant probe, killed writers and recoveries, and a storm of SIGKILLs during appends and
recoveries.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import (
    classification_data,
    cross_entropy,
    every_warning,
    make_identity,
    make_result,
    mlp,
    record,
    resume_until_killed,
    train_briefly,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from scripts.toy import FAST, ToyClassifier, loader, toy_dataset, tracked_sets

from lightning_bif import BIFCallback, DamagedLogError, SGLDConfig, estimate_bif, open_log
from lightning_bif.log import LogWriteError, LogWriter, salvage
from lightning_bif.viewers.cli import main as cli

SCRIPTS = Path(__file__).parents[1] / "scripts"
DATA = toy_dataset()
TRAIN, PROBES = tracked_sets(DATA)
# An open of a damaged log must fail in about this time, not hang (HDF5's SWMR retries: > 10 min before).
OPEN_LIMIT_S = 5.0


def write_log(path: Path, steps: range = range(10, 210, 10)) -> None:
    with LogWriter(path, make_identity()) as writer:
        for step in steps:
            writer.append(record(step, "ok" if step % 30 else "failed"))


def opens_fast_as_damaged(path: Path) -> DamagedLogError:
    start = time.monotonic()
    with pytest.raises(DamagedLogError) as caught:
        open_log(path)
    assert time.monotonic() - start < OPEN_LIMIT_S
    assert str(path) in str(caught.value) and "lightning-bif repair" in str(caught.value)
    return caught.value


def assert_rows_equal(repaired: Path, original: Path) -> list[int]:
    """Every row of ``repaired`` is the row of ``original`` with the same step; returns the steps."""
    with open_log(repaired) as fixed, open_log(original) as full:
        for row, step in enumerate(fixed.steps.tolist()):
            source = int(np.flatnonzero(full.steps == step)[0])
            a, b = fixed.snapshot(row), full.snapshot(source)
            assert (a.status, a.message, a.epoch) == (b.status, b.message, b.epoch)
            np.testing.assert_array_equal(a.influence, b.influence)
            np.testing.assert_array_equal(a.draw_loss, b.draw_loss)
        return fixed.steps.tolist()


# ---------------------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1, 100, 0])
def test_a_truncated_log_fails_at_once_and_repair_keeps_every_intact_snapshot(tmp_path, keep):
    original = tmp_path / "full.h5"
    write_log(original)
    damaged = tmp_path / "bif.h5"
    shutil.copy(original, damaged)
    size = original.stat().st_size
    os.truncate(damaged, int(size * keep) if isinstance(keep, float) else keep)

    error = opens_fast_as_damaged(damaged)
    assert ("truncated" if keep else "empty") in error.problem or "header" in error.problem
    assert cli(["summary", str(damaged)]) == 1  # the CLI says the same, at once
    if keep in (0, 100, 0.1):  # the ids or the root group may be gone: then a clear error and no repaired file
        try:
            report = salvage(damaged)
        except DamagedLogError:
            assert keep != 0.1 or not (tmp_path / "bif.repaired.h5").exists()
            return
        assert keep == 0.1
    else:
        report = salvage(damaged)
    assert report.target == tmp_path / "bif.repaired.h5" and report.kept + len(report.lost) == report.found == 20
    kept = assert_rows_equal(report.target, original)
    assert kept == list(range(10, 10 * (report.kept + 1), 10))  # a prefix: the file was cut at the end
    assert report.kept >= (15 if keep == 0.9 else 5 if keep == 0.5 else 0)


def test_an_overwritten_header_or_metadata_block_fails_at_once(tmp_path):
    original = tmp_path / "full.h5"
    write_log(original)
    for offset, length in ((0, 8), (20, 4), (600, 512)):  # signature, header field (checksum), object headers
        damaged = tmp_path / f"bif-{offset}.h5"
        shutil.copy(original, damaged)
        with open(damaged, "r+b") as file:
            file.seek(offset)
            file.write(b"\0" * length)
        start = time.monotonic()
        with pytest.raises(DamagedLogError):
            with open_log(damaged) as log:  # a damaged block may only show when it is read
                log.influence[:]
        assert time.monotonic() - start < OPEN_LIMIT_S


def test_half_written_rows_are_refused_with_what_is_intact_and_repair_leaves_them_out(tmp_path):
    path = tmp_path / "bif.h5"
    write_log(path, range(10, 60, 10))
    with h5py.File(path, "r+", libver="latest") as file:  # what a failed flush left behind before this fix
        per_row = []
        file.visititems(lambda name, item: per_row.append(item) if isinstance(item, h5py.Dataset)
                        and item.maxshape[0] is None else None)
        for dataset in per_row:
            dataset.resize(7, axis=0)  # row 5: never written (step 0, status ''); row 6: ok with NaN data
        file["step"][6] = 70
        file["status"][6] = b"ok"
    error = opens_fast_as_damaged(path)
    assert error.intact == 5 and "status ''" in error.problem
    with pytest.warns(UserWarning, match="salvaged 5 of 7"):
        log = open_log(path, recover=True)
    with log:
        assert log.path == tmp_path / "bif.repaired.h5" and log.steps.tolist() == [10, 20, 30, 40, 50]
    report = salvage(path, tmp_path / "again.h5")
    assert [row for row, _ in report.lost] == [5, 6] and "non-finite influence" in report.lost[1][1]
    with h5py.File(path, "r+") as file:  # only the NaN 'ok' row left: the reader finds it from its scalars
        file["step"][5] = 60
        file["status"][5] = b"failed"
    error = opens_fast_as_damaged(path)
    assert error.intact == 6 and "is 'ok' but its values are missing" in error.problem


def test_raw_errors_of_damaged_logs_become_one_clear_exception(tmp_path):
    def damaged(edit) -> Path:
        path = tmp_path / f"bif-{edit.__name__}.h5"
        write_log(path, range(10, 40, 10))
        with h5py.File(path, "r+") as file:
            edit(file)
        return path

    def no_chains(file):
        del file.attrs["chains"]

    def no_probe_ids(file):
        del file["probe_ids"]

    def bad_text(file):
        file["status"][1] = b"\xff\xfe"

    for edit in (no_chains, no_probe_ids, bad_text):  # were KeyError, KeyError, UnicodeDecodeError
        opens_fast_as_damaged(damaged(edit))


def test_repair_in_place_keeps_the_damaged_file_and_the_mode(tmp_path, capsys):
    path = tmp_path / "bif.h5"
    write_log(path)
    os.chmod(path, 0o640)
    os.truncate(path, path.stat().st_size // 2)
    assert cli(["repair", str(path), "--in-place"]) == 0
    assert "salvaged" in capsys.readouterr().out
    assert (tmp_path / "bif.damaged.h5").exists() and path.stat().st_mode & 0o777 == 0o640
    assert not list(tmp_path.glob(".*"))  # no temporary files left
    with open_log(path) as log:
        assert len(log) > 0
    with LogWriter(path, make_identity(), if_exists="resume") as writer:  # a run can resume the repaired log
        writer.append(record(1000))


# ---------------------------------------------------------------------------------------------- failed writes


class FailingFlush:
    """Makes ``h5py.File.flush`` raise ``OSError(errno)`` on the chosen calls: a write error from the write layer."""

    def __init__(self, monkeypatch, fail_calls: set[int], code: int = errno.EIO) -> None:
        self.calls, self.fail_calls, self.code = 0, fail_calls, code
        flush = h5py.File.flush

        def failing(file):
            self.calls += 1
            if self.calls in self.fail_calls:
                raise OSError(self.code, os.strerror(self.code))
            return flush(file)

        monkeypatch.setattr(h5py.File, "flush", failing)


def test_an_injected_write_error_leaves_no_row_behind_and_the_writer_goes_on(tmp_path, monkeypatch):
    path = tmp_path / "bif.h5"
    writer = LogWriter(path, make_identity())
    writer.append(record(10))
    injected = FailingFlush(monkeypatch, set())
    injected.fail_calls = {1, 4}  # the first flush of the next append; the step (second) flush of the one after
    for step in (20, 30):
        with pytest.raises(LogWriteError, match=f"step {step} could not be written.*Input/output error") as caught:
            writer.append(record(step))
        assert caught.value.errno == errno.EIO
    writer.append(record(40))
    writer.close()
    with open_log(path) as log:
        assert log.steps.tolist() == [10, 40] and (log.status == "ok").all()


def test_a_log_that_cannot_be_created_leaves_no_file(tmp_path, monkeypatch):
    FailingFlush(monkeypatch, {1}, errno.ENOSPC)
    with pytest.raises(OSError, match="No space left"):
        LogWriter(tmp_path / "bif.h5", make_identity())
    assert list(tmp_path.iterdir()) == []  # neither the log nor its temporary file


def test_training_goes_on_through_write_errors_and_the_end_says_how_many_were_lost(tmp_path, monkeypatch):
    pl_seed(0)
    callback = BIFCallback(TRAIN, PROBES, every_n_steps=2, config=FAST, min_split_half=None,
                           log_path=tmp_path / "bif.h5")
    trainer = toy_trainer(tmp_path, callback, max_steps=10)
    injected = FailingFlush(monkeypatch, set())
    original_append = LogWriter.append

    def append_with_fault(writer, rec):  # the flushes of the snapshots at steps 4 and 8 fail
        injected.fail_calls = {injected.calls + 1} if rec.step in (4, 8) else set()
        return original_append(writer, rec)

    monkeypatch.setattr(LogWriter, "append", append_with_fault)
    with every_warning() as caught:
        trainer.fit(ToyClassifier(), loader(DATA))
    assert trainer.global_step == 10
    messages = [str(w.message) for w in caught if "could not be written" in str(w.message)]
    assert len(messages) == 2  # once when it happens (with the OS error), once at the end with the count
    assert "step 4" in messages[0] and "Input/output error" in messages[0]
    assert "2 snapshot(s) of this fit could not be written" in messages[1] and "steps 4, 8" in messages[1]
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [2, 6, 10]


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB filesystem (tmpfs); skipped where mounting is not allowed (the injected errors cover the rest)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as file:
        file.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_during_training(small_disk):
    """Training on a full disk: snapshots are lost, counted and reported, nothing phantom, no crash at exit."""
    fill(small_disk, 120_000)  # room for the new log and a few snapshots (writer.row_space)
    done = subprocess.run([sys.executable, str(SCRIPTS / "train_on_full_disk.py"), str(small_disk), "12"],
                          env=script_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # before: a segfault at exit
    assert "Exception ignored" not in done.stderr and done.stderr.count("Training goes on; later snapshots") == 1
    assert done.stderr.count("snapshot(s) of this fit could not be written") == 1
    with open_log(small_disk / "bif.h5") as log:
        steps = log.steps.tolist()
        assert 0 < len(steps) < 12 and steps == list(range(1, len(steps) + 1))  # a prefix, nothing phantom
        assert (log.status == "ok").all() and np.isfinite(log.influence[:]).all()


def test_a_full_disk_inside_hdf5_and_a_disk_full_at_creation(small_disk, tmp_path):
    """With the free-space check off, HDF5 itself hits ENOSPC mid-flush: still no phantom rows, no crash."""
    script = f"""
import os, sys
import numpy as np
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
import lightning_bif.log.writer as writer_module
from lightning_bif.log import LogWriter, LogWriteError
from helpers import make_identity, record
writer_module.row_space = lambda *sizes: -(1 << 40)
writer = LogWriter({str(small_disk / 'bif.h5')!r}, make_identity())
filler = open({str(small_disk / 'filler')!r}, 'wb')
filler.write(b'0' * (os.statvfs({str(small_disk)!r}).f_bavail * os.statvfs({str(small_disk)!r}).f_frsize - 40_000))
filler.close()
lost = []
for step in range(1, 101):
    if step == 80:
        os.unlink({str(small_disk / 'filler')!r})
    try:
        writer.append(record(step))
    except LogWriteError as error:
        lost.append(step)
print(len(lost), lost[0], lost[-1])
"""
    done = subprocess.run([sys.executable, "-c", script], env=script_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr
    lost = int(done.stdout.split()[0])
    with open_log(small_disk / "bif.h5") as log:
        steps = log.steps.tolist()
    assert lost > 0 and len(steps) == 100 - lost and steps == sorted(steps) and steps[-1] == 100
    os.unlink(small_disk / "bif.h5")
    fill(small_disk, 0)
    with pytest.raises(OSError):
        LogWriter(small_disk / "new.h5", make_identity())
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no 0-byte log, no temporary file


def test_recovery_needs_room_for_a_copy_and_says_so(small_disk):
    path = small_disk / "bif.h5"
    killed_writer(path, steps=20)
    fill(small_disk, path.stat().st_size // 2)
    with pytest.raises(OSError, match="Not enough space for recovering the influence log"):
        LogWriter(path, make_identity(), if_exists="resume")
    os.unlink(small_disk / "filler")
    with LogWriter(path, make_identity(), if_exists="resume") as writer:
        assert writer.recovered is not None and len(writer) == 20
    assert sorted(p.name for p in small_disk.iterdir()) == ["bif.h5"]


# ---------------------------------------------------------------------------------------------- killed writers


def script_env() -> dict[str, str]:
    paths = [str(SCRIPTS), str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


def killed_writer(path: Path, steps: int) -> None:
    """A writer that appended ``steps`` snapshots and was killed (SIGKILL) with the log open."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            writer = LogWriter(path, make_identity(), if_exists="resume")
            for step in range(len(writer) + 1, len(writer) + steps + 1):
                writer.append(record(step))
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_recovery_keeps_the_mode_and_cleans_up_after_a_crash_during_recovery(tmp_path):
    path = tmp_path / "bif.h5"
    killed_writer(path, steps=3)
    os.chmod(path, 0o640)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".bif.h5.{dead.pid}.0.recover").write_bytes(b"half a copy")  # a recovery that was killed itself
    with LogWriter(path, make_identity(), if_exists="resume") as writer:
        assert writer.recovered is not None and writer.steps.tolist() == [1, 2, 3]
        writer.append(record(4))
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["bif.h5"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_kill_and_resume_storm_loses_nothing_that_was_committed(tmp_path):
    """Ten SIGKILLs at random times: during appends and during the recovery that starts each resume.

    On a busy machine more resumes are killed before their recovery finishes: the storm goes on (up to 40
    kills, a hang guard) until three recoveries completed, so its outcome does not depend on the load.
    """
    path = tmp_path / "bif.h5"
    rng = random.Random(0)
    committed: list[int] = []
    recoveries = interrupted = kill = 0
    while kill < 10 or (recoveries < 3 and kill < 40):
        kill += 1
        early = kill % 3 == 1  # early kills hit the recovery that starts a resume
        told = resume_until_killed(path, rng.uniform(0.0, 0.02) if early else rng.uniform(0.1, 0.6))
        recoveries += "R1" in told
        last = kill >= 10 and (recoveries >= 3 or kill >= 40)  # the storm ends here: reopen it with a resume
        interrupted += kill > 1 and not told  # killed before the resume (and its recovery) finished
        committed += [int(t) for t in told if not t.startswith("R")]
        if not path.exists():  # killed before the new log was renamed into place: nothing was committed
            assert not committed
            continue
        with LogWriter(path, make_identity(), if_exists="resume") if last else open_log(path) as log:
            steps = log.steps.tolist()
        assert steps[: len(committed)] == committed  # every committed snapshot, in order...
        assert len(steps) <= len(committed) + 1  # ...plus at most the one in flight
        committed = steps
    print(f"storm: {kill} SIGKILLs, {recoveries} completed recoveries, {interrupted} kills before a resume finished, "
          f"{len(committed)} snapshots committed and all kept")
    assert len(committed) > 10 and recoveries >= 3
    with open_log(path) as log:
        for row in (0, len(log) // 2, len(log) - 1):
            step = int(log.steps[row])
            np.testing.assert_array_equal(log.influence[row], make_result(step).influence.numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["bif.h5"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_log_whose_writer_died_before_switching_to_swmr_is_read_as_it_is(tmp_path):
    path = tmp_path / "bif.h5"
    write_log(path, range(10, 40, 10))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: open for writing without SWMR, then die
        file = h5py.File(path, "r+", libver=("v110", "latest"), locking=False)  # as LogWriter opens it
        file.attrs["format"] = file.attrs["format"]  # any change that reaches the disk marks the file open
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    with pytest.raises(OSError, match="not already open for SWMR writing"):
        h5py.File(path, "r", swmr=True, locking=False)  # what open_log ran into before
    with open_log(path) as log:
        assert log.steps.tolist() == [10, 20, 30]
        log.refresh()
        assert len(log) == 3
    with LogWriter(path, make_identity(), if_exists="resume") as writer:  # and a resume recovers it
        assert writer.recovered is not None and writer.steps.tolist() == [10, 20, 30]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_reader_never_sees_a_log_being_created_or_resumed(tmp_path):
    """Before: a reader opening right after creation sometimes got "file is not already open for SWMR writing"."""
    path = tmp_path / "bif.h5"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: create, append, close, resume, again and again
        try:
            for round_ in range(15):
                with LogWriter(path, make_identity(), if_exists="overwrite" if round_ % 3 == 0 else "resume") as writer:
                    writer.append(record(len(writer) + 1))
        finally:
            os._exit(0)
    opened = 0
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        try:
            with open_log(path) as log:
                assert log.steps.tolist() == list(range(1, len(log) + 1))
                opened += 1
        except FileNotFoundError:  # before the first log is renamed into place
            continue
    assert opened > 0


def test_resuming_with_the_log_deleted_or_damaged_is_an_error_that_says_what_to_do(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps: int, **fit_kwargs) -> None:
        callback = BIFCallback(TRAIN, PROBES, every_n_steps=2, config=FAST, min_split_half=None,
                               log_path=tmp_path / "bif.h5")
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
        toy_trainer(tmp_path, [callback, checkpoints], max_steps=max_steps).fit(ToyClassifier(), loader(DATA),
                                                                                **fit_kwargs)

    pl_seed(0)
    run(4)
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    shutil.copy(tmp_path / "bif.h5", tmp_path / "saved.h5")
    os.unlink(tmp_path / "bif.h5")
    with pytest.raises(MisconfigurationException, match=r"influence log .*bif.h5 is missing"):
        run(6, ckpt_path=checkpoint)
    assert not (tmp_path / "bif.h5").exists()

    shutil.copy(tmp_path / "saved.h5", tmp_path / "bif.h5")
    os.truncate(tmp_path / "bif.h5", (tmp_path / "bif.h5").stat().st_size - 1000)
    with pytest.raises(MisconfigurationException, match=r"is damaged: it is truncated.*lightning-bif repair"):
        run(6, ckpt_path=checkpoint)
    assert cli(["repair", str(tmp_path / "bif.h5"), "--in-place"]) == 0
    run(6, ckpt_path=checkpoint)
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist()[-1] == 6 and log.steps.tolist() == sorted(set(log.steps.tolist()))


# ---------------------------------------------------------------------------------------------- honest statuses


def toy_problem() -> tuple[torch.nn.Module, tuple, tuple, tuple]:
    x, y = classification_data(96)
    model = train_briefly(mlp(), cross_entropy, x, y, steps=100)
    return model, (x[:12], y[:12]), (x[12:16], y[12:16]), (x, y)


@pytest.mark.parametrize("step_size", [0.3, 1.0])
def test_chains_that_blow_up_are_diverged_with_the_reason_even_when_finite(step_size):
    """Before: 0.3 was 'ok' with a loss rise of 1e16; 1.0 'diverged' with 0 diverged chains and NaN influence."""
    pl_seed(0)
    result = estimate_bif(ToyClassifier(), lambda model, batch: model.per_example_loss(batch), TRAIN, PROBES,
                          data=DATA, config=FAST.replace(step_size=step_size))
    assert not result.ok
    assert result.divergence.startswith("2 of 2 chains left the neighbourhood of w*: 2 climbed a mean loss rise")


def test_healthy_chains_and_a_legitimate_loss_rise_stay_ok():
    model, train, probes, data = toy_problem()
    result = estimate_bif(model, cross_entropy, train, probes, data=data,
                          config=SGLDConfig(chains=2, draws=10, burn_in=5, thin=1, step_size=1e-4,
                                            target_split_half=None))  # the 2 chains, no rounds
    assert result.ok and result.divergence is None
    d = result.diagnostics
    assert d.loss_rise < d.loss_rise_bound / 1e3  # orders of magnitude inside the bound
    # A horizon-style localization far from a minimum: a rise of five times the loss at w* is legitimate.
    loss = float(result.train_loss.mean())
    d.draw_loss = torch.full_like(d.draw_loss, 6 * loss)
    assert result.divergence is None
    d.draw_loss[1] = 1e16
    assert result.divergence.startswith("1 of 2 chains")


def test_a_constant_probe_is_explained_not_blamed_on_noise(tmp_path):
    def constant(model, batch):
        return torch.ones(len(batch[0]))

    pl_seed(0)
    callback = BIFCallback(TRAIN, PROBES, probe_fn=constant, at_fit_start=True, config=FAST,
                           log_path=tmp_path / "bif.h5")
    with every_warning() as caught:
        toy_trainer(tmp_path, callback, max_steps=1).fit(ToyClassifier(), loader(DATA))
    (message,) = [str(w.message) for w in caught if "BIFCallback" in str(w.message)]
    assert "4 of 4 probe(s) took the same value in every SGLD draw" in message and "disagree" not in message
    with open_log(tmp_path / "bif.h5") as log:
        assert log.status.tolist() == ["ok"] and (log.influence[0] == 0).all()


def test_one_draw_is_refused_when_the_config_is_made():
    with pytest.raises(ValueError, match=r"draws must be >= 2.*two draws"):
        SGLDConfig(draws=1)


# ---------------------------------------------------------------------------------------------- validation first


def test_bad_arguments_are_refused_before_any_file_exists(tmp_path):
    with pytest.raises(MisconfigurationException, match="log_spaced needs num >= 1"):
        BIFCallback(TRAIN, PROBES, log_spaced=0, log_path=tmp_path / "bif.h5")
    with pytest.raises(MisconfigurationException, match=r"at_steps must hold integer optimizer steps, got \['a'\]"):
        BIFCallback(TRAIN, PROBES, at_steps=["a"], log_path=tmp_path / "bif.h5")
    (tmp_path / "file").write_text("x")
    callback = BIFCallback(TRAIN, PROBES, every_n_steps=1, config=FAST, log_path=tmp_path / "file" / "bif.h5")
    with pytest.raises(MisconfigurationException, match="file is a file, not a directory"):
        toy_trainer(tmp_path, callback, max_steps=1).fit(ToyClassifier(), loader(DATA))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---------------------------------------------------------------------------------------------- helpers


def pl_seed(seed: int) -> None:
    import lightning.pytorch as pl

    pl.seed_everything(seed, verbose=False)


def toy_trainer(tmp_path: Path, callbacks, max_steps: int):
    import lightning.pytorch as pl

    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=any(
        type(c).__name__ == "ModelCheckpoint" for c in callbacks), enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path)
