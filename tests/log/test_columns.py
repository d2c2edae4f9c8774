"""The log's columns are declared once (lightning_bif/log/columns.py): docs, writer, reader, TensorBoard agree."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from lightning_bif import SGLDConfig, open_log
from lightning_bif.estimation.estimator import BIFEstimator
from lightning_bif.estimation.result import BIFResult, Diagnostics
from lightning_bif.log import LogWriter, RunIdentity, Snapshot
from lightning_bif.log import SnapshotRecord as LogSnapshotRecord
from lightning_bif.log.columns import (
    ALIASES,
    BY_NAME,
    COLUMNS,
    END,
    START,
    Chart,
    Column,
    documented_table,
    layout,
    markdown_table,
    update_docs,
    value,
)
from lightning_bif.log.schema import SnapshotRecord as SchemaSnapshotRecord
from lightning_bif.log.schema import file_layout
from lightning_bif.snapshot.record import SnapshotRecord
from lightning_bif.tuning.autotune import Tuning
from lightning_bif.tuning.horizon import HorizonCheck
from lightning_bif.viewers.tensorboard import DEFAULT_CHARTS, OPTIONAL_CHARTS

ROOT = Path(__file__).resolve().parents[2]
P, N, T, C, D = 2, 5, 3, 2, 4
STEP_SIZE = 3e-4


def full_result() -> BIFResult:
    """A per-token result with a horizon and a tuning record: every column of the declaration has a value."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    tuning = Tuning(chosen={"draws": D}, reasons={"draws": "budget"}, lambda_min=-0.5, lambda_max=40.0,
                    top_eigenvalues=[40.0, 10.0])
    horizon = HorizonCheck(horizon_steps=50, learning_rate=0.1, momentum=0.9, damping=0.02, lambda_min=-0.5,
                           lambda_max=40.0, localization=12.0, step_size=STEP_SIZE)
    diagnostics = Diagnostics(sampling_loss=randn(C, D), draw_loss=randn(C, D), diverged=torch.tensor([False, True]),
                              loss_rise=0.25, split_half=0.75, ess=17.0, vectorized=False, nbeta=123.0,
                              duration_s=1.0, horizon=horizon, tuning=tuning)
    config = SGLDConfig(chains=C, draws=D, per_token=True, step_size=STEP_SIZE, localization=12.0, horizon_steps=50,
                        learning_rate=0.1, momentum=0.9)
    return BIFResult(influence=randn(P, N), correlation=randn(P, N).tanh(), stderr=randn(P, N).abs(),
                     train_loss=randn(N).abs(), probe_loss=randn(P).abs(), diagnostics=diagnostics, config=config,
                     token_influence=randn(P, T, N), token_stderr=randn(P, T, N).abs())


def write_log(path: Path) -> list[SnapshotRecord]:
    identity = RunIdentity({"sgld": {}}, train_ids=np.arange(N), probe_ids=np.arange(P), chains=C, draws=D, tokens=T)
    records = [
        SnapshotRecord(step=7, epoch=2, wall_time=1.7e9, duration_s=1.5, status="diverged", result=full_result(),
                       message="one chain left out", calibration={"step_size": STEP_SIZE, "candidates": []}),
        SnapshotRecord(step=9, epoch=3, wall_time=1.8e9, duration_s=0.5, status="failed", result=None,
                       message="CUDA out of memory", step_size=2e-4),
    ]
    with LogWriter(path, identity) as writer:
        for record in records:
            writer.append(record)
    return records


def expected(column: Column, record: SnapshotRecord) -> object:
    """What the reader must give for ``column`` of ``record``: the value in the stored dtype, or the fill."""
    raw = value(column, record)
    if column.dtype == "json":
        return None if raw is None else json.loads(json.dumps(raw, default=float))
    if raw is None:  # a failed snapshot: NaN, no diverged chain, empty text
        shape = column.row_shape({"P": P, "N": N, "T": T, "C": C, "D": D})
        if column.dtype == "bool":
            return np.zeros(shape, bool)
        return np.full(shape, np.nan) if column.shape else ("" if column.dtype == "text" else math.nan)
    if hasattr(raw, "numpy"):
        return raw.numpy().astype(column.h5_dtype())
    return raw


def test_docs_table_is_the_declaration() -> None:
    page = ROOT / "docs" / "user-guide.md"
    assert documented_table(page.read_text()) == markdown_table(), (
        "docs/user-guide.md's table of log columns differs from lightning_bif/log/columns.py: "
        "run python -m lightning_bif.log.columns docs/user-guide.md")
    assert len(markdown_table().splitlines()) == len(COLUMNS) + 2


def test_update_docs_rewrites_only_the_table(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"before\n{START}\n| stale |\n{END}\nafter\n")
    assert update_docs(page) and not update_docs(page)
    text = page.read_text()
    assert text.startswith(f"before\n{START}\n| dataset |") and text.endswith(f"{END}\nafter\n")
    assert "| stale |" not in text and documented_table(text) == markdown_table()
    page.write_text("no markers")
    with pytest.raises(ValueError, match="lacks the markers"):
        update_docs(page)


def test_every_declared_column_is_written_and_read_back(tmp_path: Path) -> None:
    records = write_log(tmp_path / "bif.h5")
    with h5py.File(tmp_path / "bif.h5", "r") as file:
        assert list(file_layout(file)) == list(layout({"P": P, "N": N, "T": T, "C": C, "D": D}))
        assert set(file_layout(file)) == set(BY_NAME) and list(file_layout(file))[-1] == "step"
    with open_log(tmp_path / "bif.h5") as log:
        assert {f.name for f in dataclasses.fields(Snapshot)} == {"index"} | {c.field for c in COLUMNS}
        for row, record in enumerate(records):
            snapshot = log.snapshot(row)
            for column in COLUMNS:
                series, cell, want = getattr(log, column.accessor), getattr(snapshot, column.field), expected(column,
                                                                                                             record)
                assert len(series) == len(records), column.name
                if column.shape:
                    assert series.shape == (len(records), *np.shape(want)), column.name
                    np.testing.assert_array_equal(cell, want, err_msg=column.name)
                elif isinstance(want, float) and math.isnan(want):
                    assert math.isnan(cell), column.name
                else:
                    assert cell == want, column.name
        # The first record set every column: nothing of it is a fill value.
        first = log.snapshot(0)
        assert all(getattr(first, c.field) not in (None, "") for c in COLUMNS if c.dtype in ("json", "text")
                   and c.name != "message") and first.message == "one chain left out"
        assert first.localization == 12.0 and first.lambda_min == -0.5 and first.step_size == STEP_SIZE
        assert first.tuning["top_eigenvalues"] == [40.0, 10.0] and log.snapshot(1).tuning is None


def test_deprecated_reader_names_warn_and_read_the_same(tmp_path: Path) -> None:
    assert ALIASES == {"token_influence_se": "token_stderr"}
    write_log(tmp_path / "bif.h5")
    with open_log(tmp_path / "bif.h5") as log:
        with pytest.warns(DeprecationWarning, match=r"InfluenceLog.token_influence_se is deprecated; use "
                                                    r"InfluenceLog.token_stderr"):
            old = log.token_influence_se
        np.testing.assert_array_equal(old[0], log.token_stderr[0])
        snapshot = log.snapshot(0)
        with pytest.warns(DeprecationWarning, match="Snapshot.token_influence_se is deprecated"):
            np.testing.assert_array_equal(snapshot.token_influence_se, snapshot.token_stderr)
        with pytest.raises(AttributeError, match="no attribute 'token_se'"):
            _ = log.token_se


def test_deprecated_estimator_names_warn() -> None:
    model = torch.nn.Linear(3, 1)
    data = (torch.randn(6, 3), torch.randn(6, 1))

    def loss_fn(module: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (module(batch[0]) - batch[1]).square().squeeze(1)

    estimator = BIFEstimator(model, loss_fn, data, data, config=SGLDConfig(chains=2, draws=2, step_size=1e-4))
    estimator.check_losses()
    assert estimator.train_loss.shape == (6,) and estimator.probe_loss.shape[0] >= 6
    with pytest.warns(DeprecationWarning, match="train_loss0 is deprecated; use BIFEstimator.train_loss"):
        assert estimator.train_loss0 is estimator.train_loss
    with pytest.warns(DeprecationWarning, match="probe_loss0 is deprecated; use BIFEstimator.probe_loss"):
        assert estimator.probe_loss0 is estimator.probe_loss


def test_tensorboard_scalar_charts_come_from_the_declaration() -> None:
    charted = {c.chart.name: c for c in COLUMNS if c.chart is not None}
    assert set(DEFAULT_CHARTS) - {"groups", "matrix", "status"} == {n for n, c in charted.items() if c.chart.default}
    assert set(OPTIONAL_CHARTS) - {"histogram", "groups_figure"} == {n for n, c in charted.items()
                                                                     if not c.chart.default}
    text = (ROOT / "docs" / "tensorboard.md").read_text()
    assert all(f"`{name}`" in text for name in charted), "docs/tensorboard.md names every scalar chart"
    assert Chart("x", False, "sum").scalar(torch.tensor([True, False, True]).numpy()) == 2
    assert Chart("x", False, "finite_mean").scalar(np.array([1.0, np.nan, 3.0])) == 2.0
    assert math.isnan(Chart("x", False, "finite_mean").scalar(np.array([np.nan])))


def test_a_bad_declaration_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        Column("x", "float16", (), "record.step", "x")
    with pytest.raises(ValueError, match=r"unknown axes \['Q'\]"):
        Column("x", "float32", ("Q",), "result.influence", "x")
    with pytest.raises(ValueError, match=r"source must start with 'record\.' or 'result\.'"):
        Column("x", "float64", (), "diagnostics.ess", "x")
    with pytest.raises(ValueError, match="need a width"):
        Column("x", "text", (), "record.message", "x")


def test_snapshot_record_lives_outside_the_log_and_is_still_importable_there() -> None:
    assert LogSnapshotRecord is SnapshotRecord and SchemaSnapshotRecord is SnapshotRecord
    assert SnapshotRecord.__module__ == "lightning_bif.snapshot.record"


def test_a_version_1_log_reads_every_column_it_has_and_none_for_later_ones() -> None:
    with open_log(ROOT / "tests" / "data" / "log_v1.h5") as log:
        assert log.format_version == 1 and len(log) == 3
        snapshot = log.snapshot(0)
        for column in COLUMNS:
            series, cell = getattr(log, column.accessor), getattr(snapshot, column.field)
            if column.since > 1:
                assert series == ([None] * 3 if column.dtype == "json" else None) and cell is None, column.name
            elif column.optional:  # no token axis in this log
                assert series is None and cell is None, column.name
            else:  # calibration is stored, and empty for this snapshot
                assert len(series) == 3 and (cell is not None or column.dtype == "json"), column.name
        assert snapshot.status == "ok" and snapshot.step == 10 and snapshot.influence.shape == (3, 8)


def test_a_new_json_column_is_stored_as_bounded_json_without_its_own_encoder() -> None:
    column = Column("extra", "json", (), "result.diagnostics.tuning.summary", "x", width=24)
    assert column.encode_value({"b": 1.5, "a": "é"}) == b'{"a": "\\u00e9", "b": 1.5}'[:24]
    text = Column("note", "text", (), "record.message", "x", width=4).encode_value("ééé")
    assert text == "éé".encode()  # cut at 4 bytes without splitting a character
