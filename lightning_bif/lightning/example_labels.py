"""The display labels of a ``BIFCallback``'s tracked examples and probes, checked against the sets they label.

Group labels, group names, probe token strings and training texts are given when the callback is made;
they are checked once the example sets are concrete (at once, or at setup for ``DataModuleExamples``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..example_sets import ExampleSet

#: Group labels as a user passes them: one per example.
Groups = torch.Tensor | np.ndarray | Sequence[int] | Sequence[str]


@dataclass(frozen=True)
class ExampleLabels:
    """The labels of the tracked examples (``train_*``) and the probes (``probe_*``); every field may be ``None``.

    Attributes:
        train_groups, probe_groups: A group label per example (int64 or str arrays once checked).
        train_group_names, probe_group_names: Display names of the group labels, ``{label: name}``.
        probe_tokens: Display strings of every probe token, ``[P][T]``.
        train_text: Display text of every tracked example, ``[N]``.
    """

    train_groups: Any = None
    probe_groups: Any = None
    train_group_names: Mapping[Any, str] | None = None
    probe_group_names: Mapping[Any, str] | None = None
    probe_tokens: Sequence[Sequence[str]] | None = None
    train_text: Sequence[str] | None = None

    def checked(self, train: ExampleSet, probes: ExampleSet) -> ExampleLabels:
        """The labels checked against the sizes of ``train`` and ``probes``, as arrays and lists.

        Raises:
            ValueError: A label set of the wrong length or kind; the message names the argument.
        """
        return ExampleLabels(
            train_groups=labels_per_example(self.train_groups, len(train), "train_groups", "train"),
            probe_groups=labels_per_example(self.probe_groups, len(probes), "probe_groups", "probes"),
            train_group_names=dict(self.train_group_names) if self.train_group_names else None,
            probe_group_names=dict(self.probe_group_names) if self.probe_group_names else None,
            probe_tokens=display_texts(self.probe_tokens, len(probes), "probe_tokens", "probes", True),
            train_text=display_texts(self.train_text, len(train), "train_text", "train", False),
        )

    def as_keywords(self) -> dict[str, Any]:
        """The labels as :class:`~lightning_bif.log.RunIdentity`'s keyword arguments."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def labels_per_example(groups: Groups | None, size: int, name: str, what: str) -> np.ndarray | None:
    """``train_groups``/``probe_groups`` checked: one label per example as int64 or str, ``[size]``; ``None`` stays."""
    if groups is None:
        return None
    if isinstance(groups, (list, tuple)) and len({isinstance(v, (str, np.str_)) for v in groups}) > 1:
        raise ValueError(f"BIFCallback({name}=...) needs labels that are all integers or all strings.")
    array = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    if array.ndim != 1 or array.shape[0] != size:
        raise ValueError(
            f"BIFCallback({name}=...) needs one label per example of {what} ({size}), got shape {array.shape}."
        )
    return array if array.dtype.kind in "US" else array.astype(np.int64)


def display_texts(texts: Sequence | None, size: int, name: str, what: str, nested: bool) -> list | None:
    """Display strings as lists, one entry per example (``nested``: a list of token strings per example)."""
    if texts is None:
        return None
    if isinstance(texts, str) or len(texts) != size or not all(
        not isinstance(entry, str) and all(isinstance(v, str) for v in entry) if nested else isinstance(entry, str)
        for entry in texts
    ):
        kind = "a list of token strings" if nested else "a str"
        raise ValueError(f"BIFCallback({name}=...) needs {kind} for each of the {size} examples of {what}, in order.")
    return [list(entry) for entry in texts] if nested else list(texts)
