"""Where ``BIFCallback`` writes its log when no ``log_path`` is given: a directory no other run uses."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

#: File name of the influence log inside a run's directory.
LOG_NAME = "influence.h5"
#: Directory (under the trainer's ``default_root_dir``) of versioned logs for runs without a versioned logger.
VERSIONED_ROOT = "bif_logs"

_VERSION = re.compile(r"version_(\d+)")


def default_log_path(trainer: pl.Trainer) -> Path:
    """The default log path of a fit; call it on every rank (rank 0's choice is used everywhere).

    With a ``TensorBoardLogger`` or ``CSVLogger`` first among the trainer's loggers, the log goes
    into that logger's versioned directory (``<log_dir>/influence.h5``), next to its metrics.
    Otherwise (``logger=False``, ``fast_dev_run``, other loggers, whose directories are shared by
    all runs) it goes to ``<default_root_dir>/bif_logs/version_<N>/influence.h5`` with the next
    free ``N``, numbered like Lightning's own ``version_N`` directories, so two runs never collide.

    Args:
        trainer: The trainer of the fit.

    Returns:
        The path of the log file.
    """
    logger = trainer.loggers[0] if trainer.loggers else None
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return Path(trainer.log_dir) / LOG_NAME  # log_dir broadcasts: every rank must call it
    path = None
    if trainer.is_global_zero:
        root = Path(trainer.default_root_dir) / VERSIONED_ROOT
        path = root / f"version_{next_version(root)}" / LOG_NAME
    return Path(trainer.strategy.broadcast(path))


def next_version(root: Path) -> int:
    """One more than the largest ``N`` of the ``version_N`` directories in ``root`` (0 when there are none)."""
    if not root.is_dir():
        return 0
    versions = [int(match.group(1)) for entry in root.iterdir()
                if entry.is_dir() and (match := _VERSION.fullmatch(entry.name))]
    return max(versions, default=-1) + 1
