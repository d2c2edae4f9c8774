"""examples/digits.py runs end to end (shortened) and leaves the outputs it promises."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from lightning_bif import open_log

EXAMPLE = Path(__file__).parents[2] / "examples" / "digits.py"


def test_digits_example_writes_a_log_and_tensorboard_events_and_says_where(tmp_path):
    run = subprocess.run([sys.executable, str(EXAMPLE), "--epochs", "1", "--snapshots", "2", "--root", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    path = Path(re.search(r"Influence log: (\S+)", run.stdout).group(1))
    assert path == tmp_path / "digits" / "version_0" / "influence.h5"
    assert f"tensorboard --logdir {tmp_path}" in run.stdout and f"lightning-bif summary {path}" in run.stdout
    assert list(path.parent.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (path.parent / "figures").iterdir()) == sorted(
        f"{name}.png" for name in ("groups", "pairs", "matrix", "sign_changes", "top_examples"))
    assert f"Figures:       {path.parent / 'figures' / 'groups.png'}" in run.stdout
    with open_log(path) as log:
        assert log.steps.tolist() == [0, 4, 24] and (log.status == "ok").all()
        assert log.influence[-1].shape == (50, 200) and np.isfinite(log.influence[-1]).all()
        assert sorted(set(log.train_groups.tolist())) == list(range(10))
