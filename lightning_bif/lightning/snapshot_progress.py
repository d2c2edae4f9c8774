"""A snapshot's progress on screen: on the trainer's tqdm training bar, else a line every 10 seconds (rank 0)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_info

_PROGRESS_EVERY_S = 10.0


def progress_display(trainer: pl.Trainer, step: int) -> Callable[[int, int], None]:
    """``report(done, total)`` for the SGLD steps of the snapshot at ``step``."""
    bar = _tqdm_train_bar(trainer)
    last_line = [time.perf_counter()]

    def report(done: int, total: int) -> None:
        if bar is not None:
            if done == total or done % max(total // 50, 1) == 0:
                bar.set_postfix_str(f"BIF snapshot {100 * done // total}%", refresh=True)
        elif time.perf_counter() - last_line[0] > _PROGRESS_EVERY_S:
            last_line[0] = time.perf_counter()
            rank_zero_info(f"BIFCallback: snapshot at step {step}: {done}/{total} SGLD steps")

    return report


def _tqdm_train_bar(trainer: pl.Trainer) -> Any:
    bar = trainer.progress_bar_callback
    if not isinstance(bar, TQDMProgressBar) or not bar.is_enabled:
        return None
    try:
        return bar.train_progress_bar
    except TypeError:
        return None
