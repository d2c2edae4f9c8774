"""Offline summaries shared by the log, the TensorBoard sink and the CLI: group means, extremes, configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ALL = "all"


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": value}``, to name config entries one per line or in a difference."""
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten_config(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


@dataclass
class GroupMeans:
    """Mean influence of each train group on each probe group.

    Attributes:
        probe_groups: Probe group labels, ``[Gp]`` (``["all"]`` without probe groups).
        train_groups: Train group labels, ``[Gt]``.
        means: ``means[a, b]`` is the mean BIF over probes in group ``a`` and training examples
            in group ``b``, ``[Gp, Gt]`` (negative = the group helps, positive = it harms).
    """

    probe_groups: np.ndarray
    train_groups: np.ndarray
    means: np.ndarray


def group_labels(groups: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct labels and each example's position among them; one group ``"all"`` for ``None``."""
    if groups is None:
        return np.array([ALL]), np.zeros(size, dtype=np.int64)
    labels, members = np.unique(np.asarray(groups), return_inverse=True)
    return labels, members.reshape(-1)


def group_means(influence: np.ndarray, probe_groups: Any = None, train_groups: Any = None) -> GroupMeans:
    """Average a ``[P, N]`` influence matrix over probe groups × train groups.

    Args:
        influence: BIF matrix ``[P, N]``.
        probe_groups: Group label of each probe ``[P]``, or ``None`` for one group.
        train_groups: Group label of each training example ``[N]``, or ``None``.

    Returns:
        :class:`GroupMeans`; a NaN entry in a block makes that block's mean NaN.
    """
    influence = np.asarray(influence, dtype=np.float64)
    probe_labels, probe_members = group_labels(probe_groups, influence.shape[0])
    train_labels, train_members = group_labels(train_groups, influence.shape[1])
    probe_onehot = np.eye(len(probe_labels))[probe_members]  # [P, Gp]
    train_onehot = np.eye(len(train_labels))[train_members]  # [N, Gt]
    sums = probe_onehot.T @ influence @ train_onehot
    counts = np.outer(probe_onehot.sum(0), train_onehot.sum(0))
    return GroupMeans(probe_labels, train_labels, sums / counts)


@dataclass
class Pair:
    """One entry of an influence matrix, by position."""

    probe: int
    train: int
    influence: float


def extremes(influence: np.ndarray) -> tuple[Pair, Pair] | None:
    """The most helpful (most negative) and most harmful (most positive) pair; ``None`` if all NaN."""
    influence = np.asarray(influence)
    if not np.isfinite(influence).any():
        return None
    pairs = []
    for position in (np.nanargmin(influence), np.nanargmax(influence)):
        probe, train = np.unravel_index(position, influence.shape)
        pairs.append(Pair(int(probe), int(train), float(influence[probe, train])))
    return pairs[0], pairs[1]
