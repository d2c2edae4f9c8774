"""Watch training examples influence a digit classifier while it trains (about a minute on a laptop CPU).

scikit-learn's bundled 8x8 digits, a small MLP, and ``BIFCallback`` on a log-spaced schedule:
200 tracked training examples (20 per digit) and 50 probes from the held-out digits (5 per
digit), both grouped by their class. Outputs go under ``runs/digits/version_N/``: TensorBoard
events, the HDF5 influence log ``influence.h5`` and its figures in ``figures/`` (docs/figures.md).

    python examples/digits.py             # train with BIF snapshots
    python examples/digits.py --no-bif    # the same training without the callback (for timing)
    python examples/digits.py --preconditioner lowrank   # curvature-preconditioned SGLD
    python examples/digits.py --horizon none   # the config's γ and ε instead of the horizon's (docs/horizon.md)
    python examples/digits.py --overhead 0.1   # snapshots may take 10 % of the fit (docs/self-tuning.md)
    tensorboard --logdir runs --samples_per_plugin images=100   # then http://localhost:6006/#scalars&_smoothingWeight=0
    lightning-bif summary runs/digits/version_0/influence.h5
    python examples/analyze_digits.py     # offline analysis of the newest log: sign changes, top digits
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_bif import BIFCallback, LogSpaced, SGLDConfig, open_log
from lightning_bif.viewers.plot import write_figures
from lightning_bif.viewers.tensorboard import open_command


class DigitsMLP(pl.LightningModule):
    """A two-layer MLP on 8x8 digit images with the ``per_example_loss`` hook BIFCallback uses."""

    def __init__(self, hidden: int = 64, lr: float = 0.05, weight_decay: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_example_loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """One cross-entropy per example, ``[B]``: what the influence is measured on."""
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.per_example_loss(batch).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/accuracy", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # BIFCallback reads this weight decay as its SGLD prior, so w* is a stationary point of the posterior.
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9,
                               weight_decay=self.hparams.weight_decay)


def digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, held-out) splits of the 1797 digits, pixels scaled to [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(labels))
    x = torch.tensor(images[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(labels[order], dtype=torch.long)
    return TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:])


def per_class(dataset: TensorDataset, count: int) -> Subset:
    """The first ``count`` examples of every class, ordered by class."""
    labels = dataset.tensors[1]
    return Subset(dataset, [int(i) for c in range(10) for i in (labels == c).nonzero().flatten()[:count]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-bif", action="store_true", help="train without the callback (timing baseline)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--snapshots", type=int, default=12, help="log-spaced snapshots (plus one at the start)")
    parser.add_argument("--root", default="runs", help="directory for TensorBoard runs and the log")
    parser.add_argument("--preconditioner", choices=["auto", "none", "lowrank"], default="auto",
                        help="SGLD preconditioner; 'lowrank' mixes the flat directions faster (docs/how-it-works.md); "
                             "'auto' uses it when it fits (docs/self-tuning.md)")
    parser.add_argument("--horizon", choices=["interval", "rest", "none"], default="interval",
                        help="the question a snapshot answers (docs/horizon.md); 'none': the config's γ and ε")
    parser.add_argument("--overhead", type=float, default=None,
                        help="the fraction of the fit's wall time snapshots may take (BIFCallback(overhead=...)); "
                             "default: no time budget, so the snapshots do not depend on the machine's speed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny model: threads cost more than they give
    start = time.perf_counter()

    pl.seed_everything(0)
    train, held_out = digits()
    tracked, probes = per_class(train, 20), per_class(held_out, 5)
    callbacks = []
    if not args.no_bif:
        callbacks.append(BIFCallback(
            train=tracked,
            probes=probes,
            train_groups=train.tensors[1][tracked.indices],
            probe_groups=held_out.tensors[1][probes.indices],
            train_group_names={c: f"digit_{c}" for c in range(10)},
            probe_group_names={c: f"digit_{c}" for c in range(10)},
            log_spaced=LogSpaced(args.snapshots, first=4),
            at_fit_start=True,
            config=SGLDConfig(chains=8, draws=100, burn_in=50, thin=1, localization=1000.0, batch_size=64,
                              preconditioner=None if args.preconditioner == "auto" else args.preconditioner),
            horizon=None if args.horizon == "none" else args.horizon,
            overhead=args.overhead,
        ))
    logger = TensorBoardLogger(args.root, name="digits")
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=callbacks, logger=logger, log_every_n_steps=10,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    model = DigitsMLP()
    fit_start = time.perf_counter()
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True), DataLoader(held_out, batch_size=512))
    fit_s = time.perf_counter() - fit_start

    accuracy = float(trainer.callback_metrics["val/accuracy"])
    print(f"\nTrained {trainer.global_step} steps in {time.perf_counter() - start:.1f} s; "
          f"held-out accuracy {accuracy:.3f}.")
    print(f"TensorBoard:   {open_command(args.root)}")
    if args.no_bif:
        return
    path = callbacks[0].resolved_log_path
    with open_log(path) as log:
        last = log.influence[-1]
        same = log.probe_groups[:, None] == log.train_groups[None, :]
        print(f"Influence log: {path} ({len(log)} snapshots at steps {log.steps.tolist()})")
        print(f"Snapshots took {log.duration_s.sum():.1f} s of the fit's {fit_s:.1f} s "
              f"({log.duration_s.sum() / fit_s:.1%}); chains per snapshot {np.asarray(log.chains_used).astype(int)}")
        print(f"Final snapshot: mean BIF of a training digit on a probe of the same class {last[same].mean():+.2e}, "
              f"of another class {last[~same].mean():+.2e} (negative = helpful)")
        probe, train = np.unravel_index(np.abs(last).argmax(), last.shape)  # the final snapshot's largest |BIF|
        probe_id, train_id = log.probe_ids[probe].item(), log.train_ids[train].item()
        figures = write_figures(log, path.parent / "figures")
    print(f"Figures:       {', '.join(str(figure) for figure in figures)}")
    print(f"Summary:       lightning-bif summary {path}")
    print(f"Report:        lightning-bif report {path} --out {path.parent / 'report.html'}   (one HTML page to open "
          "or send: settings, snapshots, figures, diagnostics)")
    print(f"Sign changes:  lightning-bif sign-changes {path}   (pairs that turn helpful -> harmful or back)")
    print(f"Analysis:      python examples/analyze_digits.py {path}   (sign-change curves, most influential digits)")
    print(f"In Python:     log = lightning_bif.open_log({str(Path(path))!r}); "
          f"log.trajectory(probe_id={probe_id}, train_id={train_id})   (dataset ids, as summary prints them)")


if __name__ == "__main__":
    main()
