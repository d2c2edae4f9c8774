"""Training run with a BIF snapshot after every step, its log on a (nearly full) disk, for the disk-full test.

Usage: python train_on_full_disk.py LOG_DIR MAX_STEPS
Writes LOG_DIR/bif.h5; the test checks the exit status (no crash at exit), the warnings and the log.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from toy import FAST, ToyClassifier, loader, toy_dataset, tracked_sets

from lightning_bif import BIFCallback

if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, steps = Path(sys.argv[1]), int(sys.argv[2])
    pl.seed_everything(0, verbose=False)
    train, probes = tracked_sets(toy_dataset())
    callback = BIFCallback(train, probes, every_n_steps=1, config=FAST, min_split_half=None,
                           log_path=out_dir / "bif.h5")
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out_dir)
    trainer.fit(ToyClassifier(), loader(toy_dataset()))
