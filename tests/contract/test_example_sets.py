"""ExampleSet (example_sets.py): every kind of source gives the batches a DataLoader would, or a clear error."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from lightning_bif.example_sets import ExampleSet, move_to

CPU = torch.device("cpu")
X = torch.arange(20.0).reshape(10, 2)
Y = torch.arange(10)


def assert_batches_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


@pytest.mark.parametrize("source", [
    (X, Y), TensorDataset(X, Y), [(x, y) for x, y in zip(X, Y, strict=True)],
    DataLoader(TensorDataset(X, Y), batch_size=3), DataLoader([(x, y) for x, y in zip(X, Y, strict=True)]),
], ids=["tuple", "tensor-dataset", "list-of-pairs", "dataloader", "dataloader-over-list"])
def test_every_source_gathers_what_default_collate_makes(source) -> None:
    examples = ExampleSet(source, "train")
    index = torch.tensor([7, 0, 3])
    assert len(examples) == 10 and torch.equal(examples.ids(), torch.arange(10))
    assert_batches_equal(examples.gather(index, CPU), default_collate([(X[i], Y[i]) for i in index]))
    sizes = [size for size, _ in examples.batches(4, CPU)]
    assert sizes == [4, 4, 2]
    assert_batches_equal(examples.batches(4, CPU)[2][1], [X[8:], Y[8:]])


def test_nested_subsets_map_positions_to_the_innermost_dataset() -> None:
    inner = Subset(TensorDataset(X, Y), [9, 8, 7, 6, 5])
    examples = ExampleSet(Subset(inner, [4, 0]), "probes")
    assert examples.ids().tolist() == [5, 9]
    assert_batches_equal(examples.gather(torch.tensor([0, 1]), CPU), [X[[5, 9]], Y[[5, 9]]])


def test_a_dataloaders_collate_fn_makes_the_batches() -> None:
    def pad(items: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(items, batch_first=True)

    sequences = [torch.ones(n) for n in (1, 3, 2)]
    batch = ExampleSet(DataLoader(sequences, collate_fn=pad), "probes").gather(torch.tensor([0, 1]), CPU)
    assert torch.equal(batch, torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"different shapes.*collate_fn=pad"):
        ExampleSet([(s,) for s in sequences], "probes").gather(torch.tensor([0, 1]), CPU)


class Stream(IterableDataset):
    def __iter__(self):
        yield from X


@pytest.mark.parametrize(("source", "error", "match"), [
    ([X, Y], TypeError, "ambiguous: columns or examples"),
    (Stream(), TypeError, "IterableDataset cannot be indexed"),
    ((X, Y[:3]), ValueError, "share their first"),
    ((X, "labels"), TypeError, "column tensors only"),
    ([1, 2, 3], TypeError, "hold tensors only"),
    ((X[:0],), ValueError, "is empty"),
    ({"x": X}, TypeError, "map-style torch Dataset"),
])
def test_sources_that_cannot_work_are_refused_with_what_to_pass(source, error, match) -> None:
    with pytest.raises(error, match=match):
        ExampleSet(source, "data")


def test_move_to_moves_every_tensor_of_a_nested_batch() -> None:
    batch = {"x": X, "pair": (Y, "label"), "n": 3}
    moved = move_to(batch, torch.device("meta"))
    assert moved["x"].device.type == "meta" and moved["pair"][0].device.type == "meta"
    assert moved["pair"][1] == "label" and moved["n"] == 3
