"""A tiny seeded classification task and LightningModule shared by the callback tests and their subprocess scripts."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_bif import SGLDConfig

FAST = SGLDConfig(chains=2, draws=10, burn_in=5, thin=1, step_size=1e-4, batch_size=32, localization=100.0,
                  target_split_half=None)


def toy_dataset(n: int = 192, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Linearly separable-ish classes with label noise; always the same tensors."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = (x @ torch.randn(features, classes, generator=generator)).argmax(dim=1)
    flip = torch.rand(n, generator=generator) < 0.1
    y[flip] = torch.randint(classes, (int(flip.sum()),), generator=generator)
    return TensorDataset(x, y)


def tracked_sets(dataset: TensorDataset) -> tuple[Subset, Subset]:
    """(train subset, probe subset) of ``dataset``: 12 tracked examples and 4 probes."""
    return Subset(dataset, list(range(0, 24, 2))), Subset(dataset, [1, 3, 5, 7])


class ToyClassifier(pl.LightningModule):
    """An MLP with an optional dropout layer and the ``per_example_loss`` hook."""

    def __init__(self, features: int = 8, classes: int = 3, hidden: int = 16, dropout: float = 0.0,
                 lr: float = 0.1, weight_decay: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Dropout(dropout),
                                 nn.Linear(hidden, classes))
        self.losses: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_example_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch, batch_idx):
        loss = self.per_example_loss(batch).mean()
        self.losses.append(loss.detach().clone())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.per_example_loss(batch).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9,
                               weight_decay=self.hparams.weight_decay)


def loader(dataset: TensorDataset, shuffle: bool = True, batch_size: int = 32) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def class_losses(model: nn.Module, batch) -> torch.Tensor:
    """``[B, classes]``: the loss the model would have if each class were the label (a per-token probe_fn)."""
    return -F.log_softmax(model(batch[0]), dim=1)
