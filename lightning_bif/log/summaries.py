"""Offline summaries for the log, the TensorBoard sink and the CLI: group means, extremes, sign changes, configs."""

from __future__ import annotations

from collections.abc import Sequence
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
    # Summed block by block (not as one-hot matrix products, where 0 · NaN would spread a NaN to every block).
    sums = np.zeros((len(probe_labels), len(train_labels)))
    np.add.at(sums, (probe_members[:, None], train_members[None, :]), influence)
    counts = np.outer(np.bincount(probe_members, minlength=len(probe_labels)),
                      np.bincount(train_members, minlength=len(train_labels)))
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


@dataclass
class SignChange:
    """A pair whose influence turned from significantly helpful to significantly harmful, or back.

    Attributes:
        probe: Position of the probe (row of the ``[P, N]`` matrices).
        train: Position of the training example (column).
        turns: ``"harmful"`` (BIF went from < 0 to > 0) or ``"helpful"`` (from > 0 to < 0).
        before_step: Step of the last snapshot significant with the old sign.
        after_step: Step of the first snapshot significant with the new sign.
        crossing: Step where the influence crosses zero, interpolated linearly between the last
            snapshot with the old sign and the next one (between ``before_step`` and ``after_step``).
        z_before: ``influence / stderr`` at ``before_step``.
        z_after: ``influence / stderr`` at ``after_step``.
        probe_id: Id of the probe (filled in by ``InfluenceLog.sign_changes``; ``None`` from arrays).
        train_id: Id of the training example (likewise).
    """

    probe: int
    train: int
    turns: str
    before_step: int
    after_step: int
    crossing: float
    z_before: float
    z_after: float
    probe_id: Any = None
    train_id: Any = None


def sign_changes(
    steps: Sequence[int] | np.ndarray,
    influence: Any,
    stderr: Any,
    z: float = 3.0,
    usable: Sequence[bool] | np.ndarray | None = None,
) -> list[SignChange]:
    """Every significant change of sign of every (probe, train) influence curve.

    An entry is significant when ``|influence| > z·stderr``; entries within that band (or NaN,
    or in a snapshot that is not ``usable``) do not end a sign. A change is recorded when a
    significant entry has the opposite sign of the pair's previous significant entry, so a curve
    that goes helpful → unresolved → harmful changes once. With independent noise a pair of true
    influence 0 shows a spurious change with probability about S·Φ(−z)² over S snapshots (z = 3:
    2e-5 for 13 snapshots); snapshots share their chains' random numbers, which makes it rarer.

    Args:
        steps: Training step of each snapshot, ``[S]``.
        influence: BIF per snapshot, ``[S, P, N]`` (an array, or a lazy log view read a snapshot at a time).
        stderr: Its standard errors, ``[S, P, N]``.
        z: How many standard errors from zero an entry must be to count.
        usable: Which snapshots to read (e.g. ``status == "ok"``); default all.

    Returns:
        The changes, ordered by ``crossing`` step.

    Example:
        >>> log = open_log("runs/exp/influence.h5")                                      # doctest: +SKIP
        >>> log.sign_changes(z=3)[:5]  # the first five pairs that flip, earliest first  # doctest: +SKIP
    """
    steps = np.asarray(steps)
    usable = np.ones(len(steps), dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
    last_sign: np.ndarray | None = None  # [P, N]: sign of the last significant entry, 0 before any
    last_row: np.ndarray | None = None  # [P, N]: the snapshot that entry came from
    found: list[tuple[int, int, int, int]] = []  # (probe, train, before row, after row)
    for row in np.flatnonzero(usable):
        value = np.asarray(influence[row], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            sign = np.where(np.abs(value) > z * np.asarray(stderr[row], dtype=np.float64), np.sign(value), 0)
        if last_sign is None or last_row is None:
            last_sign, last_row = np.zeros_like(sign), np.zeros(sign.shape, dtype=np.int64)
        flipped = (sign != 0) & (last_sign != 0) & (sign != last_sign)
        for probe, train in zip(*np.nonzero(flipped), strict=True):
            found.append((int(probe), int(train), int(last_row[probe, train]), int(row)))
        last_sign = np.where(sign != 0, sign, last_sign)
        last_row = np.where(sign != 0, row, last_row)
    changes = [_sign_change(steps, influence, stderr, usable, *entry) for entry in found]
    return sorted(changes, key=lambda change: (change.crossing, change.probe, change.train))


def _sign_change(
    steps: np.ndarray, influence: Any, stderr: Any, usable: np.ndarray, probe: int, train: int, before: int,
    after: int,
) -> SignChange:
    """The change of pair (probe, train) between snapshot rows ``before`` and ``after``, with its zero crossing."""
    values = {r: float(influence[r, probe, train]) for r in range(before, after + 1) if usable[r]}
    rows = [r for r, v in values.items() if np.isfinite(v)]  # both ends are: they are significant
    curve = np.array([values[r] for r in rows])
    old = np.sign(curve[0])
    last_old = max(i for i, v in enumerate(curve[:-1]) if np.sign(v) == old)
    a, b = curve[last_old], curve[last_old + 1]
    crossing = steps[rows[last_old]] + (steps[rows[last_old + 1]] - steps[rows[last_old]]) * a / (a - b)
    return SignChange(
        probe=probe, train=train, turns="harmful" if old < 0 else "helpful",
        before_step=int(steps[before]), after_step=int(steps[after]), crossing=float(crossing),
        z_before=float(curve[0] / float(stderr[before, probe, train])),
        z_after=float(curve[-1] / float(stderr[after, probe, train])),
    )
