"""``lightning-bif summary`` and ``export`` on a log written from known records."""

from __future__ import annotations

import csv
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from helpers import make_identity, record

from lightning_bif.log import LogWriter
from lightning_bif.viewers.cli import main


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "bif.h5"
    with LogWriter(path, make_identity(train_ids=[f"doc{i}" for i in range(8)])) as writer:
        for r in (record(10), record(20, "failed", message="CUDA out of memory"), record(35, "diverged")):
            writer.append(r)
    return path


def test_summary_prints_config_counts_and_one_line_per_snapshot(log_path: Path, capsys) -> None:
    assert main(["summary", str(log_path)]) == 0
    out = capsys.readouterr().out
    assert "probes: 3 in 2 groups   train examples: 8 in 3 groups   chains: 2   draws: 5" in out
    assert "  callback.every_n_steps = 10\n" in out and "  sgld.step_size = 0.0001\n" in out
    assert "snapshots: 3, steps 10..35; diverged 1, failed 1, ok 1" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()[:2] in ("10", "20", "35")}
    assert "CUDA out of memory" in lines["20"] and " failed " in lines["20"]
    assert " step size " in out and " 0.0001 " in lines["10"]  # the step size each snapshot used
    for step in (10, 35):
        influence = record(step).result.influence.numpy()
        helpful = np.unravel_index(influence.argmin(), influence.shape)
        harmful = np.unravel_index(influence.argmax(), influence.shape)
        assert f"probe id {helpful[0]} <- train id doc{helpful[1]}: {influence[helpful]:+.3g} | " in lines[str(step)]
        assert f"probe id {harmful[0]} <- train id doc{harmful[1]}: {influence[harmful]:+.3g}" in lines[str(step)]
    # Group means of the last usable snapshot: probe group 1 = probes 1, 2; train group 2 = examples 2, 5.
    influence = record(35).result.influence.numpy().astype(np.float64)
    means_row = next(line for line in out.splitlines() if line.startswith("1 "))
    assert float(means_row.split()[3]) == pytest.approx(influence[1:, [2, 5]].mean(), rel=2e-3)

    assert main(["summary", str(log_path), "--last", "1"]) == 0
    out = capsys.readouterr().out
    assert "      35     0  diverged" in out and "      20     0  failed" not in out


def test_export_writes_the_nearest_snapshot_as_a_long_table(log_path: Path, tmp_path: Path, capsys) -> None:
    out_path = tmp_path / "bif.csv"
    assert main(["export", str(log_path), "--step", "12", "--csv", str(out_path)]) == 0
    expected = f"wrote step 10, the snapshot nearest --step 12 (3 x 8 pairs) to {out_path}"
    assert capsys.readouterr().out.strip() == expected
    with open(out_path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 3 * 8
    expected = record(10).result
    for row in rows:
        probe, train = int(row["probe_id"]), int(row["train_id"].removeprefix("doc"))
        assert row["step"] == "10" and row["train_group"] == str(train % 3)
        assert float(row["influence"]) == expected.influence[probe, train].item()
        assert float(row["stderr"]) == expected.stderr[probe, train].item()
        assert float(row["correlation"]) == expected.correlation[probe, train].item()

    assert main(["export", str(log_path), "--csv", "-"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("35,0,0,doc0,0,")


def test_errors_name_the_file_and_the_console_script_is_main(tmp_path: Path, log_path: Path, capsys) -> None:
    assert main(["summary", str(tmp_path / "missing.h5")]) == 1
    assert "No influence log at" in capsys.readouterr().err
    empty = tmp_path / "empty.h5"
    LogWriter(empty, make_identity()).close()
    assert main(["summary", str(empty)]) == 0
    assert "snapshots: 0; " in capsys.readouterr().out
    assert main(["export", str(empty), "--csv", "-"]) == 1
    assert "has no snapshots yet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(log_path)])  # --csv is required

    (script,) = entry_points(group="console_scripts", name="lightning-bif")
    assert script.load() is main
