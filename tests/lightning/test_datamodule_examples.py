"""DataModuleExamples (lightning/datamodule_examples.py): examples named by dataloader, resolved at a fit's setup."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_bif import DataModuleExamples

DATA = TensorDataset(torch.arange(40.0).reshape(20, 2), torch.arange(20) % 2)


def stacked_rows(items: list) -> dict[str, torch.Tensor]:
    """A collate_fn of its own, so that the test can see it is kept."""
    return {"x": torch.stack([x for x, _ in items]), "y": torch.stack([y for _, y in items])}


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        x = batch["x"] if isinstance(batch, dict) else batch[0]
        return self.layer(x).square().mean()

    def validation_step(self, batch, batch_idx) -> None:  # never run (limit_val_batches=0)
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Subset(DATA, range(4, 20)), batch_size=4, collate_fn=stacked_rows)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(Subset(DATA, range(4)))


class Data(pl.LightningDataModule):
    def setup(self, stage: str) -> None:  # the datasets exist only from here on
        self.val_set = Subset(DATA, range(10, 20))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(DATA, batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=4)

    def predict_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self.val_set), DataLoader(self.val_set)]


class Resolve(pl.Callback):
    """Resolves the examples at setup, as BIFCallback does, and keeps what came out (or the error)."""

    def __init__(self, *examples: DataModuleExamples) -> None:
        self.examples = examples
        self.loaders: list[DataLoader | ValueError] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for examples in self.examples:
            try:
                self.loaders.append(examples.resolve(trainer, "probes"))
            except ValueError as error:
                self.loaders.append(error)


def resolved(*examples: DataModuleExamples, datamodule: pl.LightningDataModule | None = None) -> list:
    callback = Resolve(*examples)
    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(Model(), datamodule=datamodule)
    return callback.loaders


def test_positions_or_an_even_spread_of_the_datamodules_datasets() -> None:
    chosen, spread, everything = resolved(DataModuleExamples("val", indices=[9, 0]),
                                          DataModuleExamples("train", count=4), DataModuleExamples("val"),
                                          datamodule=Data())
    assert isinstance(chosen.dataset, Subset) and chosen.dataset.indices == [9, 0]
    assert [int(x[0]) for x, _ in chosen.dataset] == [38, 20]  # val positions 9 and 0 are examples 19 and 10
    assert spread.dataset.indices == [0, 5, 10, 15]
    assert len(everything.dataset) == 10


def test_without_a_datamodule_the_modules_own_dataloader_and_its_collate_fn() -> None:
    (loader,) = resolved(DataModuleExamples("train", count=2))
    assert loader.collate_fn is stacked_rows and loader.dataset.indices == [0, 8]
    batch = next(iter(DataLoader(loader.dataset, batch_size=2, collate_fn=loader.collate_fn)))
    assert batch["x"][:, 0].tolist() == [8.0, 24.0]  # positions 0 and 8 of examples 4..19


def test_examples_that_do_not_exist_are_named_in_the_error() -> None:
    out_of_range, missing, several = resolved(
        DataModuleExamples("val", indices=[10]), DataModuleExamples("test", count=1),
        DataModuleExamples("predict", count=1), datamodule=Data())
    assert "position 10 is out of range for the 10 examples of Data.val_dataloader()" in str(out_of_range)
    assert "Data has no test_dataloader()" in str(missing)
    assert "returned a list, not one DataLoader" in str(several)


@pytest.mark.parametrize(("arguments", "match"), [
    (dict(dataloader="validation"), "use 'train', 'val', 'test' or 'predict'"),
    (dict(indices=[1], count=1), "indices or count, not both"),
    (dict(indices=[]), "positions >= 0"),
    (dict(indices=[-1]), "positions >= 0"),
    (dict(count=0), "positive integer"),
    (dict(count=True), "positive integer"),
])
def test_arguments_are_checked_when_given(arguments: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataModuleExamples(**arguments)


def test_size_and_repr() -> None:
    assert DataModuleExamples("val", indices=[3, 1]).size == 2 and DataModuleExamples(count=5).size == 5
    assert DataModuleExamples().size is None
    assert repr(DataModuleExamples("val", indices=[3, 1])) == "DataModuleExamples('val', indices=[3, 1])"
