"""The default log path (lightning/log_path.py): a logger's versioned directory, else the next free version."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from lightning_bif.lightning.log_path import LOG_NAME, VERSIONED_ROOT, default_log_path, next_version


def test_next_version_is_one_past_the_largest_version_directory(tmp_path: Path) -> None:
    assert next_version(tmp_path / "missing") == 0
    assert next_version(tmp_path) == 0
    for name in ("version_0", "version_7", "version_x", "other_9"):
        (tmp_path / name).mkdir()
    (tmp_path / "version_12").write_text("a file, not a run")
    assert next_version(tmp_path) == 8


def test_without_a_versioned_logger_runs_get_their_own_directory(tmp_path: Path) -> None:
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    first = default_log_path(trainer)
    assert first == tmp_path / VERSIONED_ROOT / "version_0" / LOG_NAME
    first.parent.mkdir(parents=True)
    assert default_log_path(trainer) == tmp_path / VERSIONED_ROOT / "version_1" / LOG_NAME


def test_with_a_csv_logger_the_log_goes_next_to_its_metrics(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="run", version=3)
    trainer = pl.Trainer(logger=logger, default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    assert default_log_path(trainer) == Path(logger.log_dir) / LOG_NAME == tmp_path / "run" / "version_3" / LOG_NAME
