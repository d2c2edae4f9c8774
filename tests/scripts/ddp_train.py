"""Two-process DDP (gloo, CPU) training with BIFCallback, for the DDP test.

Usage: python ddp_train.py OUT_DIR
Snapshots at steps 0, 2 and 4 (each after a step-size calibration on rank 0); the one at step 2 fails on rank 1 only.
A second callback logs per-token influence (a token per class, ``toy.class_losses``) at step 4 to OUT_DIR/tokens.h5.
Every rank writes OUT_DIR/rank<r>.json (its global step, training losses, whether it opened the
log); global rank 0 also saves the final weights to OUT_DIR/final.pt. The log is OUT_DIR/bif.h5.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from toy import FAST, ToyClassifier, class_losses, loader, toy_dataset, tracked_sets

from lightning_bif import BIFCallback
from lightning_bif.log import LogWriter
from lightning_bif.viewers.tensorboard import TensorBoardSink

CONFIG = FAST.replace(chains=4)


def fails_on_rank_1_at_step_2(model: ToyClassifier, batch) -> torch.Tensor:
    """The toy loss, except that rank 1's share of the step-2 snapshot raises (the other rank must not hang)."""
    if model.trainer.global_rank == 1 and model.trainer.global_step == 2:
        raise RuntimeError("simulated failure on rank 1")
    return model.per_example_loss(batch)


class Report(Callback):
    def __init__(self, out: Path, bif: BIFCallback) -> None:
        self.out = out
        self.bif = bif

    def on_train_end(self, trainer: pl.Trainer, pl_module: ToyClassifier) -> None:
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "losses": [float(x) for x in pl_module.losses],
            "opened_log": any(isinstance(s, LogWriter) for s in self.bif._sinks.sinks),
            "tensorboard": any(isinstance(s, TensorBoardSink) for s in self.bif._sinks.sinks),
            "step_size": self.bif.resolved_config.step_size,
            "collectives": [self.bif._snapshotter.collectives.rank, self.bif._snapshotter.collectives.world_size],
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
        if trainer.is_global_zero:
            torch.save(pl_module.state_dict(), self.out / "final.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    train, probes = tracked_sets(toy_dataset())
    # Calibration runs on rank 0 and is broadcast; cheap pilots, as only the agreement of the ranks is tested.
    calibration = {"pilot_steps": 20, "pilot_chains": 1, "tracked": 16, "step_sizes": [1e-2, 1e-4]}
    bif = BIFCallback(train, probes, loss_fn=fails_on_rank_1_at_step_2, every_n_steps=2, at_fit_start=True,
                      config=CONFIG, log_path=out / "bif.h5", calibrate=calibration)
    tokens = BIFCallback(train, probes, probe_fn=class_losses, at_steps=[4], config=CONFIG.replace(per_token=True),
                         log_path=out / "tokens.h5", tensorboard=False)
    pl.seed_everything(0)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=4,
                         callbacks=[bif, tokens, Report(out, bif)],
                         logger=TensorBoardLogger(out, name="tb"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ToyClassifier(), loader(toy_dataset()))
