"""What ``BIFCallback`` checks of the trainer and the LightningModule before the first snapshot.

Each check fails with a ``MisconfigurationException`` that says what to change, or warns once (rank 0).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader

from ..example_sets import Batch, ExampleSet
from ..functional import LossFn
from ..snapshot.threads import oversubscription

#: Name of the LightningModule method used when no ``loss_fn`` is given.
LOSS_HOOK = "per_example_loss"

_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def module_per_example_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The default ``loss_fn``: the LightningModule's own ``per_example_loss(batch) -> Tensor[B]``."""
    return getattr(model, LOSS_HOOK)(batch)


def check_strategy(trainer: pl.Trainer) -> None:
    """Refuse sharded strategies: every rank samples from the full weights."""
    if isinstance(trainer.strategy, _SHARDED):
        raise MisconfigurationException(
            f"BIFCallback does not support the sharded strategy {type(trainer.strategy).__name__}: every rank "
            "needs the full weights to sample from. Use strategy='ddp' (or a single device)."
        )


def check_loss_hook(pl_module: pl.LightningModule, loss_fn: LossFn | None) -> None:
    """Without ``loss_fn``, the module must define ``per_example_loss``."""
    if loss_fn is None and not callable(getattr(pl_module, LOSS_HOOK, None)):
        raise MisconfigurationException(
            f"BIFCallback needs per-example losses: add a method `def {LOSS_HOOK}(self, batch) -> Tensor` "
            f"to {type(pl_module).__name__} returning one loss per example (shape [B], e.g. "
            "F.cross_entropy(self(x), y, reduction='none')), or pass BIFCallback(loss_fn=(model, batch) -> Tensor)."
        )


def check_probe_tokens(probe_tokens: list[list[str]] | None, tokens: int | None) -> None:
    """``probe_tokens`` needs per-token probe losses (``tokens``: T per probe, ``None`` if not per token), T per row."""
    if probe_tokens is None:
        return
    if tokens is None:
        raise MisconfigurationException(
            "BIFCallback(probe_tokens=...) needs per-token probe losses: set SGLDConfig(per_token=True) "
            "with a probe_fn that returns [B, T], or leave probe_tokens out."
        )
    lengths = sorted({len(row) for row in probe_tokens})
    if lengths != [tokens]:
        raise MisconfigurationException(
            f"BIFCallback(probe_tokens=...) has rows of length {', '.join(map(str, lengths))}, but probe_fn "
            f"returns T = {tokens} token losses per probe: pass one string per token loss."
        )


def trainer_data(trainer: pl.Trainer) -> DataLoader:
    """The trainer's training ``DataLoader`` as the SGLD data, checked to be indexable."""
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        raise MisconfigurationException(
            f"BIFCallback takes SGLD minibatches from the trainer's training DataLoader, but it is a "
            f"{type(loader).__name__}; pass BIFCallback(data=...) with the examples to sample from."
        )
    try:
        ExampleSet(loader, "data")
    except (TypeError, ValueError) as error:
        raise MisconfigurationException(
            f"BIFCallback cannot index the trainer's training data ({error}); pass BIFCallback(data=...)."
        ) from error
    return loader


def check_threads(trainer: pl.Trainer, pl_module: pl.LightningModule, num_threads: int | None) -> None:
    """Warn when CPU snapshots would run more threads than there are cores (``num_threads`` unset).

    Called at train start, once the training DataLoader (and its workers) is known.
    """
    if num_threads is not None or pl_module.device.type != "cpu":
        return
    loader = trainer.train_dataloader
    reason = oversubscription(loader.num_workers if isinstance(loader, DataLoader) else 0)
    if reason is not None:
        rank_zero_warn(
            f"BIFCallback: {reason}. Snapshots of small models are many tiny kernels, which slow down many "
            "times over when threads outnumber free cores; pass BIFCallback(num_threads=1) (set only during "
            "snapshots) or call torch.set_num_threads(1). See docs/lightning.md, 'Threads'."
        )
