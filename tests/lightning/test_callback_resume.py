"""Crash safety: a training run killed with SIGKILL leaves a readable log, and resuming finishes it cleanly."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_bif import open_log

SCRIPTS = Path(__file__).parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # the killed script's own modules, imported the way it imports them
from toy import ToyClassifier, loader, toy_dataset  # noqa: E402
from train_until_killed import make_trainer  # noqa: E402

DONE = re.compile(r"snapshot at step (\d+) done")


def snapshots_in(path: Path) -> int:
    try:
        with open_log(path) as log:
            return len(log)
    except (OSError, KeyError, ValueError):  # not created yet, or caught between creation and the first flush
        return 0


def newest_loadable_checkpoint(directory: Path) -> tuple[Path, int]:
    """The checkpoint with the highest step that loads (the kill may have hit one being written)."""
    candidates = sorted(directory.glob("*.ckpt"), key=lambda p: int(re.search(r"step=(\d+)", p.name).group(1)))
    for path in reversed(candidates):
        try:
            return path, torch.load(path, weights_only=False)["global_step"]
        except Exception:  # a truncated file: take the one before
            continue
    raise AssertionError(f"no loadable checkpoint in {directory}")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_run_leaves_a_readable_log_and_resuming_finishes_it_cleanly(tmp_path):
    torch.set_num_threads(1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(SCRIPTS / "train_until_killed.py"), str(tmp_path), "3000"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 600
            while snapshots_in(tmp_path / "bif.h5") < 3 or not list((tmp_path / "ckpt").glob("*.ckpt")):
                assert process.poll() is None, stderr_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "the training run made no progress"
                time.sleep(0.1)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == -signal.SIGKILL

    reported = [int(s) for s in DONE.findall(stderr_path.read_text())]
    with open_log(tmp_path / "bif.h5") as log:
        steps = log.steps.tolist()
        assert len(steps) >= 3 and steps == sorted(set(steps))
        assert steps[: len(reported)] == reported  # every completed snapshot is there...
        assert len(steps) <= len(reported) + 1  # ...plus at most the one written just before the kill
        assert (log.status == "ok").all() and np.isfinite(log.influence[:]).all()

    checkpoint, checkpoint_step = newest_loadable_checkpoint(tmp_path / "ckpt")
    final = checkpoint_step + 7
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, final)
    trainer.fit(ToyClassifier(), loader(toy_dataset()), ckpt_path=checkpoint)
    assert trainer.global_step == final
    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == list(range(3, final + 1, 3))  # strictly increasing, nothing missing or twice
        assert (log.status == "ok").all() and np.isfinite(log.influence[:]).all()
