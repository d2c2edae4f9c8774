"""The charts reach every logger of the trainer (CSV, MLflow, W&B offline): read back from what each one stored."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from PIL import Image
from scripts.toy import FAST, ToyClassifier, loader, toy_dataset, tracked_sets

from lightning_bif import BIFCallback, open_log
from lightning_bif.viewers.charts import GROUP_RUN, GROUP_TAG

DATA = toy_dataset()
TRAIN, PROBES = tracked_sets(DATA)
LABELS = DATA.tensors[1]
PROBE_NAMES = {0: "zero", 1: "one", 2: "two"}
MATRIX = "bif/matrix"


def fit(tmp_path: Path, logger, **kwargs) -> BIFCallback:
    callback = BIFCallback(TRAIN, PROBES, every_n_steps=2, config=FAST, min_split_half=None,
                           train_groups=LABELS[TRAIN.indices], probe_groups=LABELS[PROBES.indices],
                           probe_group_names=PROBE_NAMES, log_path=tmp_path / "bif.h5", **kwargs)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=4, logger=logger, callbacks=[callback], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         log_every_n_steps=1)
    trainer.fit(ToyClassifier(), loader(DATA))
    return callback


def expected_curves(callback: BIFCallback) -> dict[str, list[float]]:
    """The metric of every (probe group, train group) pair and of split_half, per snapshot, from the log."""
    with open_log(callback.resolved_log_path) as log:
        curves = {"bif_diag/split_half": log.split_half.tolist()}
        for probe in np.unique(log.probe_groups):
            for train in np.unique(log.train_groups):
                block = np.ix_(log.probe_groups == probe, log.train_groups == train)
                tag = f"{GROUP_TAG.format(PROBE_NAMES[probe])}/{GROUP_RUN.format(train)}"
                curves[tag] = [log.nbeta[row] * log.influence[row][block].astype(np.float64).mean()
                               for row in range(len(log))]
        assert log.steps.tolist() == [2, 4]
    return curves


def decoded(png: bytes) -> np.ndarray:
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert picture.shape[0] >= 200 and picture.shape[1] >= 400  # the labelled figure, not a blown-up matrix
    return picture


def test_a_csv_logger_gets_every_curve_at_the_training_step_and_no_image(tmp_path: Path) -> None:
    callback = fit(tmp_path, CSVLogger(tmp_path, name="csv"))
    with open(Path(callback.resolved_log_path).parent / "csv" / "version_0" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("bif_diag/split_half")]
    assert [int(row["step"]) for row in rows] == [2, 4]
    for tag, values in expected_curves(callback).items():
        np.testing.assert_allclose([float(row[tag]) for row in rows], values, rtol=1e-5, err_msg=tag)
    assert not any(key.startswith("bif/") for key in rows[0])


def test_an_mlflow_logger_gets_the_metric_history_and_the_matrix_as_artifacts(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    # A local store: runs in SQLite (MLflow 3's file store is deprecated), artifacts in a folder.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="bif", tracking_uri=uri, artifact_location=(tmp_path / "artifacts").as_uri())
    callback = fit(tmp_path, logger)
    client = MlflowClient(tracking_uri=uri)
    for tag, values in expected_curves(callback).items():
        history = client.get_metric_history(logger.run_id, tag)
        assert [m.step for m in history] == [2, 4], tag
        np.testing.assert_allclose([m.value for m in history], values, rtol=1e-5, err_msg=tag)
    artifacts = [a.path for a in client.list_artifacts(logger.run_id, MATRIX)]
    assert artifacts == [f"{MATRIX}/step_00000002.png", f"{MATRIX}/step_00000004.png"]
    local = client.download_artifacts(logger.run_id, artifacts[-1], str(tmp_path / "download"))
    decoded(Path(local).read_bytes())


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its ``.wandb`` file once the run's exit record is there.

    The file is a LevelDB-style log (a 7-byte file header, 32 KiB blocks of records with a 7-byte header:
    CRC, length, type full/first/middle/last) of ``Record`` protobufs; W&B has no public reader for it.
    W&B's service process writes it on after ``finish()`` returns, so it is read again until it is complete.
    """
    deadline = time.monotonic() + 120  # a hang guard only
    while True:
        rows, complete = _wandb_records(next(run_dir.glob("*.wandb")).read_bytes())
        if complete or time.monotonic() > deadline:
            assert complete, f"the offline run {run_dir} has no exit record"
            return rows
        time.sleep(0.2)


def _wandb_records(data: bytes) -> tuple[list[dict], bool]:
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    block, position, pending, rows, complete = 32768, 7, b"", [], False
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # full, or the last piece of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            kind = record.WhichOneof("record_type")
            complete = complete or kind == "exit"
            if kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows, complete


def test_a_wandb_logger_offline_stores_the_curves_and_the_matrix_images(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="bif")
    callback = fit(tmp_path, logger)
    logger.experiment.finish()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    rows = wandb_history(run_dir)
    curves = [row for row in rows if "bif_diag/split_half" in row]
    assert [row["trainer/global_step"] for row in curves] == [2, 4]
    for tag, values in expected_curves(callback).items():
        np.testing.assert_allclose([row[tag] for row in curves], values, rtol=1e-5, err_msg=tag)
    images = [row for row in rows if f"{MATRIX}/filenames" in row]
    assert [row["trainer/global_step"] for row in images] == [2, 4]
    for row in images:
        decoded((run_dir / "files" / row[f"{MATRIX}/filenames"][0]).read_bytes())


def test_loggers_chooses_which_of_the_trainers_loggers_get_the_charts(tmp_path: Path) -> None:
    callback = fit(tmp_path, [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")],
                   loggers=["tensorboard"])
    with open(Path(callback.resolved_log_path).parent / "csv" / "version_0" / "metrics.csv") as file:
        header = next(csv.reader(file))
    assert "train_loss" in header and not any(key.startswith("bif") for key in header)
    assert (tmp_path / "tb" / "version_0" / "train_0").is_dir()


@pytest.mark.parametrize(("loggers", "message"), [
    (["tensorbord"], r"unknown logger name 'tensorbord'"),
    ([CSVLogger], None),
    ([int], r"int.* neither a logger name .* nor a subclass"),
    ([CSVLogger("runs")], r"pass the class, not an instance"),
    (42, r"takes None"),
])
def test_an_unknown_logger_name_or_type_fails_when_the_callback_is_made(loggers, message) -> None:
    if message is None:
        BIFCallback(TRAIN, PROBES, every_n_steps=2, loggers=loggers)
        return
    with pytest.raises(MisconfigurationException, match=message):
        BIFCallback(TRAIN, PROBES, every_n_steps=2, loggers=loggers)
