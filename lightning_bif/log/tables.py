"""Selections of an influence log as tables: what :meth:`InfluenceLog.to_dataframe` and ``to_xarray`` read.

A selection names snapshots by training step (``steps``) or by position (``rows``), and probes and
training examples by position, by dataset id or by group label. Only the selected snapshots are
read, a block of rows at a time, so a selection of a log larger than memory fits in memory when
the selection does.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .columns import COLUMNS

# Largest block of one dataset read at once when a selection spans many snapshots.
_READ_BUDGET_BYTES = 64 << 20
# The [probe, train] columns: one table column (or xarray variable) each.
VALUES = tuple(column.accessor for column in COLUMNS if column.shape == ("P", "N"))


class UnknownIdError(KeyError, ValueError):
    """An id (dataset index or key) that the log does not track; a ``KeyError`` and a ``ValueError``."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SelectableLog(Protocol):
    """What a selection reads of a log: :class:`~lightning_bif.log.reader.InfluenceLog` has all of it."""

    path: Path
    steps: np.ndarray
    status: np.ndarray
    train_ids: np.ndarray
    probe_ids: np.ndarray
    train_groups: np.ndarray | None
    probe_groups: np.ndarray | None
    train_group_names: dict[Any, str]
    probe_group_names: dict[Any, str]
    format_version: int

    def __len__(self) -> int: ...

    def nearest(self, step: int, *, clip: bool = False) -> int: ...


class Rows(Protocol):
    """A ``[S, ...]`` dataset read row block by row block (:class:`~lightning_bif.log.reader.RowView`)."""

    dtype: np.dtype

    def __getitem__(self, key: Any) -> np.ndarray: ...


@dataclass
class Selection:
    """Sorted, distinct positions of the selected snapshots (rows), probes and training examples."""

    rows: np.ndarray
    probes: np.ndarray
    trains: np.ndarray


def _optional_import(module: str, extra: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{what} needs {module}, which is not installed: pip install 'lightning-bif[{extra}]' "
                          f"(or pip install {module}).") from error


def ids_to_positions(log: SelectableLog, kind: str, ids: Any) -> np.ndarray:
    """Positions of the ``kind`` (``"train"`` or ``"probe"``) examples with the given ids, in the given order.

    Raises:
        UnknownIdError: An id is not in the log; the message names it and the kind of ids the log has.
    """
    stored = log.train_ids if kind == "train" else log.probe_ids
    wanted = [value.item() if hasattr(value, "item") else value for value in _as_list(ids)]
    by_id: dict[Any, int] = {}
    for position, value in enumerate(stored.tolist()):
        by_id.setdefault(value, position)
    missing = [value for value in wanted if isinstance(value, bool) or value not in by_id]
    if missing:
        kind_of = "integers" if stored.dtype.kind == "i" else "strings"
        examples = ", ".join(repr(v) for v in stored[:3].tolist())
        raise UnknownIdError(
            f"No {kind} example with id {', '.join(repr(v) for v in missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} in {log.path}: its {len(stored)} {kind} ids are {kind_of} "
            f"({examples}{', ...' if len(stored) > 3 else ''}; see log.{kind}_ids). To pass a position instead, "
            f"use {kind}= rather than {kind}_id=."
        )
    return np.array([by_id[value] for value in wanted], dtype=np.int64)


def _as_list(values: Any) -> list[Any]:
    if isinstance(values, (str, bytes)) or np.ndim(values) == 0:
        return [values]
    return list(values)


def _positions(values: Any, size: int, name: str, instead: str) -> np.ndarray:
    """Sorted distinct positions from an int, a slice or a sequence of ints (negative counts from the end)."""
    if isinstance(values, slice):
        return np.arange(size)[values]
    array = np.asarray(_as_list(values))
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"{name} takes positions (integers); got {array.tolist()[:3]}. Pass {instead}.")
    bad = array[(array < -size) | (array >= size)]
    if bad.size:
        raise IndexError(f"{name} position {int(bad[0])} out of range for {size}.")
    return np.unique(array.astype(np.int64) % max(size, 1))


def _members(log: SelectableLog, kind: str, positions: Any, ids: Any, groups: Any) -> np.ndarray:
    plural = "trains" if kind == "train" else "probes"
    given = [name for name, value in ((plural, positions), (f"{kind}_ids", ids), (f"{kind}_groups", groups))
             if value is not None]
    if len(given) > 1:
        raise ValueError(f"Pass at most one of {plural}= (positions), {kind}_ids= (ids) or {kind}_groups= "
                         f"(group labels); got {' and '.join(given)}.")
    size = len(log.train_ids if kind == "train" else log.probe_ids)
    if ids is not None:
        return np.unique(ids_to_positions(log, kind, ids))
    if groups is not None:
        labels = log.train_groups if kind == "train" else log.probe_groups
        if labels is None:
            raise ValueError(f"{kind}_groups= selects by group label, but {log.path} stores no {kind} groups.")
        wanted = [value.item() if hasattr(value, "item") else value for value in _as_list(groups)]
        unknown = [value for value in wanted if value not in set(labels.tolist())]
        if unknown:
            raise UnknownIdError(f"No {kind} group {unknown[0]!r} in {log.path}; its {kind} groups are "
                                 f"{np.unique(labels).tolist()}.")
        return np.flatnonzero(np.isin(labels, np.array(wanted, dtype=labels.dtype)))
    return np.arange(size) if positions is None else _positions(positions, size, plural, f"ids with {kind}_ids=")


def _rows(log: SelectableLog, steps: Any, rows: Any) -> np.ndarray:
    if steps is not None and rows is not None:
        raise ValueError("Pass at most one of steps= (training steps) or rows= (snapshot positions).")
    if rows is not None:
        return _positions(rows, len(log), "rows", "training steps with steps=")
    if steps is None:
        return np.arange(len(log))
    covered = f"the log covers steps {log.steps[0]}..{log.steps[-1]}" if len(log) else "the log has no snapshots"
    if isinstance(steps, slice):
        if steps.step is not None:
            raise ValueError("steps= as a slice is a range of training steps, start..stop inclusive; it takes no "
                             "stride. Pass a list of steps instead.")
        low = -np.inf if steps.start is None else steps.start
        high = np.inf if steps.stop is None else steps.stop
        selected = np.flatnonzero((log.steps >= low) & (log.steps <= high))
        if not len(selected):
            raise ValueError(f"No snapshot in steps {steps.start}..{steps.stop} of {log.path}: {covered}.")
        return selected
    wanted = np.asarray(_as_list(steps))
    if wanted.size and wanted.dtype.kind not in "iu":
        raise TypeError(f"steps= takes training steps (integers) or a slice of them; got {wanted.tolist()[:3]}.")
    found = np.isin(wanted, log.steps)
    if not found.all():
        missing = int(wanted[~found][0])
        hint = ""
        if len(log) and log.steps[0] <= missing <= log.steps[-1]:
            hint = f"; the nearest snapshot is at step {int(log.steps[log.nearest(missing)])}"
        raise ValueError(f"No snapshot at step {missing} in {log.path} ({covered}{hint}). Pass logged steps "
                         "(log.steps), or a range as steps=slice(start, stop).")
    return np.flatnonzero(np.isin(log.steps, wanted))


def select(
    log: SelectableLog, *, steps: Any = None, rows: Any = None, probes: Any = None, probe_ids: Any = None,
    probe_groups: Any = None, trains: Any = None, train_ids: Any = None, train_groups: Any = None,
    include_failed: bool = False,
) -> Selection:
    """Resolve a selection (see :meth:`InfluenceLog.to_dataframe` for the arguments) into positions."""
    chosen = _rows(log, steps, rows)
    if not include_failed:
        chosen = chosen[log.status[chosen] != "failed"]
    return Selection(chosen, _members(log, "probe", probes, probe_ids, probe_groups),
                     _members(log, "train", trains, train_ids, train_groups))


def read(view: Rows, selection: Selection, budget: int = _READ_BUDGET_BYTES) -> np.ndarray:
    """``view[rows][:, probes][:, :, trains]`` of a ``[S, P, N]`` view, reading only the selected rows.

    Each read covers the bounding box of the selected probes and training examples for a block of
    rows no larger than ``budget`` bytes (at least one row).
    """
    rows, probes, trains = selection.rows, selection.probes, selection.trains
    out = np.empty((len(rows), len(probes), len(trains)), dtype=view.dtype)
    if not out.size:
        return out
    p0, p1, n0, n1 = probes[0], probes[-1] + 1, trains[0], trains[-1] + 1
    per_row = (p1 - p0) * (n1 - n0) * view.dtype.itemsize
    block = max(1, budget // per_row)
    for start in range(0, len(rows), block):
        chunk = rows[start:start + block]
        contiguous = chunk[-1] - chunk[0] + 1 == len(chunk)
        index = slice(int(chunk[0]), int(chunk[-1]) + 1) if contiguous else chunk
        values = view[index, p0:p1, n0:n1]
        out[start:start + len(chunk)] = values[:, probes - p0][:, :, trains - n0]
    return out


def _names(labels: np.ndarray, names: dict[Any, str]) -> np.ndarray:
    return np.array([names.get(label, str(label)) for label in labels.tolist()], dtype=str)


def _member_columns(log: SelectableLog, kind: str, positions: np.ndarray) -> dict[str, np.ndarray]:
    """``{kind}_id``, ``{kind}_group`` and ``{kind}_group_name`` (those the log has) of the selected members."""
    ids = log.train_ids if kind == "train" else log.probe_ids
    groups = log.train_groups if kind == "train" else log.probe_groups
    names = log.train_group_names if kind == "train" else log.probe_group_names
    columns = {f"{kind}_id": ids[positions]}
    if groups is not None:
        columns[f"{kind}_group"] = groups[positions]
        if names is not None:
            columns[f"{kind}_group_name"] = _names(groups[positions], names)
    return columns


def _expand(pd: Any, values: np.ndarray, repeat: int, tile: int) -> Any:
    """``np.tile(np.repeat(values, repeat), tile)``; text as a categorical column (one code per table row)."""
    if values.dtype.kind != "U":
        return np.tile(np.repeat(values, repeat), tile)
    categories, codes = np.unique(values, return_inverse=True)
    return pd.Categorical.from_codes(np.tile(np.repeat(codes.reshape(-1), repeat), tile), categories=categories)


def to_dataframe(log: SelectableLog, selection: Selection) -> Any:
    """The long table of a selection; see :meth:`InfluenceLog.to_dataframe`."""
    pd = _optional_import("pandas", "pandas", "InfluenceLog.to_dataframe()")
    rows, probes, trains = selection.rows, selection.probes, selection.trains
    per_row, per_probe = len(probes) * len(trains), len(trains)
    columns: dict[str, Any] = {
        "step": np.repeat(log.steps[rows], per_row),
        "status": _expand(pd, log.status[rows], per_row, 1),
    }
    for name, values in _member_columns(log, "probe", probes).items():
        columns[name] = _expand(pd, values, per_probe, len(rows))
    for name, values in _member_columns(log, "train", trains).items():
        columns[name] = _expand(pd, values, 1, len(rows) * len(probes))
    for name in VALUES:
        columns[name] = read(getattr(log, name), selection).reshape(-1)
    return pd.DataFrame(columns)


def to_xarray(log: SelectableLog, selection: Selection) -> Any:
    """The selection as an ``xarray.Dataset``; see :meth:`InfluenceLog.to_xarray`."""
    xr = _optional_import("xarray", "xarray", "InfluenceLog.to_xarray()")
    rows, probes, trains = selection.rows, selection.probes, selection.trains
    coords: dict[str, Any] = {"step": log.steps[rows]}
    for kind, positions in (("probe", probes), ("train", trains)):
        for name, values in _member_columns(log, kind, positions).items():
            coords[kind if name == f"{kind}_id" else name] = (kind, values)
    for name in ("status", "split_half", "loss_rise"):
        coords[name] = ("step", getattr(log, name)[rows])
    dims = ("step", "probe", "train")
    data = {name: (dims, read(getattr(log, name), selection)) for name in VALUES}
    return xr.Dataset(data, coords=coords, attrs={"path": str(log.path), "format_version": log.format_version})
