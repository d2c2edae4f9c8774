"""Tracked examples and probes taken from the trainer's DataModule, picked by dataloader name and indices.

In a LightningCLI project the datasets exist only inside the DataModule, after its ``setup``:
:class:`DataModuleExamples` names them (``"train"``, ``"val"``, ...) so that ``BIFCallback`` can
be configured from a YAML file, and resolves them when the fit is set up.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Subset

from ..example_sets import ExampleSet

Split = Literal["train", "val", "test", "predict"]


class DataModuleExamples:
    """Examples of one of the trainer's dataloaders, chosen by position in its dataset.

    Resolved at the fit's ``setup`` (after the DataModule's own ``setup``): the dataloader's dataset,
    restricted to the chosen positions, read with that dataloader's ``collate_fn`` (its batch size,
    sampler and workers are not used). Without a DataModule the LightningModule's own
    ``<split>_dataloader()`` method is used. The log's ids are positions in that dataset.

    Args:
        dataloader: Which dataloader: ``"train"``, ``"val"``, ``"test"`` or ``"predict"``.
        indices: Positions in its dataset. Leave out (with ``count``) for evenly spread examples.
        count: That many examples spread evenly over the dataset (positions ``⌊k·len/count⌋``);
            with neither ``indices`` nor ``count``, all of its examples.

    Raises:
        ValueError: When both ``indices`` and ``count`` are given, or either is empty or negative.

    Example::

        from lightning_bif import BIFCallback, DataModuleExamples

        bif = BIFCallback(train=DataModuleExamples("train", count=64),
                          probes=DataModuleExamples("val", indices=[0, 5, 9]), every_n_steps=100)

    In a LightningCLI ``config.yaml``::

        trainer:
          callbacks:
            - class_path: lightning_bif.BIFCallback
              init_args:
                train: {class_path: lightning_bif.DataModuleExamples, init_args: {dataloader: train, count: 64}}
                probes: {class_path: lightning_bif.DataModuleExamples, init_args: {dataloader: val, indices: [0, 5]}}
                every_n_steps: 100
    """

    def __init__(self, dataloader: Split = "train", indices: list[int] | None = None,
                 count: int | None = None) -> None:
        if dataloader not in ("train", "val", "test", "predict"):
            raise ValueError(f"DataModuleExamples(dataloader={dataloader!r}): use 'train', 'val', 'test' or 'predict'.")
        if indices is not None and count is not None:
            raise ValueError("DataModuleExamples takes indices or count, not both.")
        if indices is not None:
            indices = [int(i) for i in indices]
            if not indices or min(indices) < 0:
                raise ValueError(f"DataModuleExamples(indices=...) needs positions >= 0, got {indices[:10]}.")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise ValueError(f"DataModuleExamples(count={count!r}) must be a positive integer.")
        self.dataloader = dataloader
        self.indices = indices
        self.count = count

    @property
    def size(self) -> int | None:
        """Number of examples, when known before resolution."""
        return len(self.indices) if self.indices is not None else self.count

    def __repr__(self) -> str:
        chosen = f"indices={self.indices}" if self.indices is not None else f"count={self.count}"
        return f"DataModuleExamples({self.dataloader!r}, {chosen})"

    def resolve(self, trainer: pl.Trainer, name: str) -> DataLoader:
        """The chosen examples as a ``DataLoader`` over a ``Subset`` of the named dataloader's dataset.

        Args:
            trainer: The trainer, at ``setup`` or later.
            name: What the examples are called in error messages (``"train"``, ``"probes"``).

        Raises:
            ValueError: When there is no such dataloader, it is not a single map-style ``DataLoader``,
                or a position is out of range.
        """
        source = trainer.datamodule if trainer.datamodule is not None else trainer.lightning_module
        method = f"{self.dataloader}_dataloader"
        owner = type(source).__name__
        try:
            loader = getattr(source, method)()
        except (NotImplementedError, MisconfigurationException) as error:  # the hook's default implementation
            raise ValueError(f"{name}={self!r}: {owner} has no {method}() (define it, or pass the examples).") \
                from error
        if not isinstance(loader, DataLoader):
            raise ValueError(f"{name}={self!r}: {owner}.{method}() returned a {type(loader).__name__}, not one "
                             "DataLoader; pass the examples themselves (a Dataset, Subset or DataLoader).")
        length = len(ExampleSet(loader, name))
        if self.indices is not None:
            positions = self.indices
        else:
            count = min(self.count or length, length)
            positions = [k * length // count for k in range(count)]
        if max(positions) >= length:
            raise ValueError(f"{name}={self!r}: position {max(positions)} is out of range for the {length} "
                             f"examples of {owner}.{method}().")
        return DataLoader(Subset(loader.dataset, positions), collate_fn=loader.collate_fn)
