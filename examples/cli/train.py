"""Influence snapshots in a LightningCLI project, configured from ``config.yaml`` alone.

The datasets live inside the DataModule and exist only after its ``setup``, so the callback names
them: ``DataModuleExamples("train", count=32)`` and ``DataModuleExamples("val", indices=[...])``
are resolved when the fit is set up. Run from the repository root::

    python examples/cli/train.py fit --config examples/cli/config.yaml
    lightning-bif summary examples/cli/runs/lightning_logs/version_0/influence.h5

Any setting can be overridden on the command line, e.g. ``--trainer.max_steps=20``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset, random_split


class BlobsDataModule(pl.LightningDataModule):
    """Gaussian blobs, one per class, split into train and validation sets in ``setup``.

    Args:
        examples: Number of examples before the split.
        features: Input dimension.
        classes: Number of classes (blobs).
        batch_size: Training batch size.
        seed: Seed of the data and of the split.
    """

    def __init__(self, examples: int = 512, features: int = 8, classes: int = 3, batch_size: int = 32,
                 seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        h = self.hparams
        generator = torch.Generator().manual_seed(h.seed)
        centers = 2.0 * torch.randn(h.classes, h.features, generator=generator)
        labels = torch.randint(h.classes, (h.examples,), generator=generator)
        inputs = centers[labels] + torch.randn(h.examples, h.features, generator=generator)
        self.train_set, self.val_set = random_split(TensorDataset(inputs, labels), [0.8, 0.2], generator=generator)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class Classifier(pl.LightningModule):
    """An MLP classifier with the ``per_example_loss`` hook ``BIFCallback`` uses.

    Args:
        features: Input dimension.
        classes: Number of classes.
        hidden: Hidden width.
        lr: SGD learning rate.
    """

    def __init__(self, features: int = 8, classes: int = 3, hidden: int = 32, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def per_example_loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.per_example_loss(batch).mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.per_example_loss(batch).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main() -> None:
    torch.set_num_threads(1)  # tiny kernels: more threads only contend (see docs/lightning.md, "Threads")
    LightningCLI(Classifier, BlobsDataModule)


if __name__ == "__main__":
    main()
