"""Uniform access to the example sets a BIF estimate reads: tracked train, probes, SGLD data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

Batch = Any
ExampleSource = Dataset | DataLoader | Sequence[torch.Tensor]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait for the GPU.

    A copy from ordinary (pageable) host memory to a GPU first waits for all queued GPU work,
    which would stall the SGLD loop once per step; a copy from pinned memory is queued instead.
    """
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def move_to(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor in a (nested) batch to ``device``."""
    return tree_map(lambda x: to_device(x, device) if isinstance(x, torch.Tensor) else x, batch)


def _tensor_view(source: Any) -> tuple[list[torch.Tensor], torch.Tensor | None] | None:
    """The backing tensors (and index map) of a tensor-backed source, or None for other datasets."""
    if isinstance(source, TensorDataset):
        return list(source.tensors), None
    if isinstance(source, Subset):
        inner = _tensor_view(source.dataset)
        if inner is None:
            return None
        tensors, index = inner
        subset_index = torch.as_tensor(list(source.indices), dtype=torch.long)
        return tensors, subset_index if index is None else index[subset_index]
    return None


class _Examples(Dataset):
    """A Python list of examples as a map-style ``Dataset`` (what ``DataLoader`` accepts as its dataset)."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class ExampleSet:
    """A fixed, indexable set of examples that yields collated batches on a device.

    Accepts a map-style ``Dataset`` (``TensorDataset`` and ``Subset`` of one take a fast path
    that gathers rows directly), a ``DataLoader`` over one (its ``collate_fn`` is used; a
    ``DataLoader`` over a Python list of examples works too), a tuple of column tensors sharing
    their first dimension, or a list of examples that are not bare tensors (e.g. ``(x, y)``
    pairs). Batches look like what a ``DataLoader`` with the default collate function would
    yield: a list of tensors for tensor sources. A list of bare tensors is refused as ambiguous
    (columns or examples?), and examples of different shapes need a ``DataLoader`` whose
    ``collate_fn`` pads them: the error says so.

    Args:
        source: The examples.
        name: What the set is called in error messages (``"train"``, ``"probes"``, ``"data"``).
    """

    def __init__(self, source: ExampleSource, name: str) -> None:
        self.name = name
        self._collate: Callable[[list[Any]], Batch] = default_collate
        self._tensors: list[torch.Tensor] | None = None
        self._index: torch.Tensor | None = None
        if isinstance(source, DataLoader):
            self._collate = source.collate_fn or default_collate
            source = source.dataset
            if isinstance(source, (tuple, list)):  # a DataLoader's dataset may be any sequence of examples
                source = _Examples(source)
        if isinstance(source, list) and source and all(isinstance(t, torch.Tensor) for t in source):
            raise TypeError(
                f"{name} is a list of {len(source)} tensors, which is ambiguous: columns or examples? Pass columns "
                f"as a tuple, e.g. {name}=(inputs, targets) sharing their first (example) dimension; pass one "
                f"example per tensor as {name}=torch.stack(tensors) (equal shapes) or "
                f"{name}=DataLoader(tensors, collate_fn=pad) (different lengths; its collate_fn makes the batches)."
            )
        if isinstance(source, list):
            if not all(any(isinstance(leaf, torch.Tensor) for leaf in tree_flatten(item)[0]) for item in source):
                raise TypeError(
                    f"{name}: a tuple/list source must hold tensors only: a tuple of column tensors (inputs, targets), "
                    "or a list of examples made of tensors, such as (x, y) pairs."
                )
            source = _Examples(source)
        if isinstance(source, tuple):
            source = self._tensor_tuple(source, name)
        if isinstance(source, IterableDataset):
            raise TypeError(
                f"{name}: an IterableDataset cannot be indexed; pass a map-style Dataset "
                "(one with __len__ and __getitem__) or a tuple of tensors."
            )
        if not isinstance(source, Dataset) or not hasattr(source, "__len__"):
            raise TypeError(
                f"{name} must be a map-style torch Dataset, a DataLoader over one, or a tuple of "
                f"tensors; got {type(source).__name__}."
            )
        self.dataset = source
        # Gathering rows directly reproduces default_collate only: a custom collate_fn sees every item.
        view = _tensor_view(source) if self._collate is default_collate else None
        if view is not None:
            self._tensors, self._index = view
        self._length = len(source)
        if self._length == 0:
            raise ValueError(f"{name} is empty: pass at least one example.")

    @staticmethod
    def _tensor_tuple(tensors: Sequence[Any], name: str) -> TensorDataset:
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError(f"{name}: a tuple source must hold column tensors only (e.g. (inputs, targets)).")
        lengths = {t.shape[0] if t.ndim else None for t in tensors}
        if len(lengths) != 1 or None in lengths:
            raise ValueError(
                f"{name}: the tensors must share their first (example) dimension; got shapes "
                f"{[tuple(t.shape) for t in tensors]}."
            )
        return TensorDataset(*tensors)

    def __len__(self) -> int:
        return self._length

    def ids(self) -> torch.Tensor:
        """Dataset indices of the examples: positions in the innermost dataset of (nested) ``Subset``s."""
        positions = torch.arange(self._length)
        source = self.dataset
        while isinstance(source, Subset):
            positions = torch.as_tensor(list(source.indices), dtype=torch.long)[positions]
            source = source.dataset
        return positions

    def gather(self, index: torch.Tensor, device: torch.device) -> Batch:
        """The batch of the examples at positions ``index`` (a CPU long tensor), on ``device``."""
        if self._tensors is not None:
            rows = index if self._index is None else self._index[index]
            return [to_device(t[to_device(rows, t.device)], device) for t in self._tensors]
        items = [self.dataset[int(i)] for i in index]
        try:
            batch = self._collate(items)
        except RuntimeError as error:
            if self._collate is not default_collate or "equal size" not in str(error):
                raise
            raise ValueError(
                f"{self.name}: the examples have different shapes, so the default collate cannot stack them into a "
                f"batch ({error}). Pass a DataLoader whose collate_fn pads them: {self.name}=DataLoader(dataset, "
                "collate_fn=pad) (only its dataset and collate_fn are used), with losses that ignore the padding. "
                "SGLD minibatches use the training DataLoader's collate_fn (or BIFCallback(data=...)'s)."
            ) from error
        return move_to(batch, device)

    def batches(self, batch_size: int, device: torch.device) -> list[tuple[int, Batch]]:
        """All examples in order, as ``(size, batch)`` pairs of at most ``batch_size`` examples."""
        order = torch.arange(self._length)
        return [(len(chunk), self.gather(chunk, device)) for chunk in order.split(batch_size)]
