"""Training run with checkpoints every 4 steps and BIF snapshots every 3 steps, for the SIGKILL test.

Usage: python train_until_killed.py OUT_DIR MAX_STEPS
Writes OUT_DIR/bif.h5 and OUT_DIR/ckpt/*.ckpt; runs slowly enough (a short sleep per batch)
that the test can kill it in the middle.
"""

import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from toy import FAST, ToyClassifier, loader, toy_dataset, tracked_sets

from lightning_bif import BIFCallback


class Slow(Callback):
    def on_train_batch_end(self, *args) -> None:
        time.sleep(0.02)


def make_callbacks(out: Path) -> list[Callback]:
    train, probes = tracked_sets(toy_dataset())
    return [
        BIFCallback(train, probes, every_n_steps=3, config=FAST, log_path=out / "bif.h5", min_split_half=None),
        ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=4, save_top_k=-1),
        Slow(),
    ]


def make_trainer(out: Path, max_steps: int) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, callbacks=make_callbacks(out), logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, steps = Path(sys.argv[1]), int(sys.argv[2])
    pl.seed_everything(0)
    make_trainer(out_dir, steps).fit(ToyClassifier(), loader(toy_dataset()))
