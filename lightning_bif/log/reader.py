"""Reading an influence log, also while a run still appends to it: :func:`open_log` and :class:`InfluenceLog`."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, make_dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import tables
from .columns import ALIASES, COLUMNS, Column
from .recover import DamagedLogError, damage_as_error, first_inconsistent_row, open_swmr, salvage
from .schema import PathLike, check_format, file_layout, read_group_names, read_labels, read_texts, stored_tokens
from .summaries import SignChange, sign_changes


@dataclass
class Trajectory:
    """The influence of one training example on one probe across snapshots.

    Attributes:
        steps: Training steps, ``[S]``.
        influence: BIF at each step, ``[S]`` (negative = helpful, positive = harmful).
        stderr: Standard error of each value, ``[S]``.
        correlation: Posterior correlation at each step, ``[S]``.
    """

    steps: np.ndarray
    influence: np.ndarray
    stderr: np.ndarray
    correlation: np.ndarray


@dataclass
class TokenTrajectory:
    """The influence of one training example on each token of one probe across snapshots (per-token logs).

    Attributes:
        steps: Training steps, ``[S]``.
        influence: BIF on the probe's loss at each token, ``[S, T]``; its mean over T is the probe's
            :class:`Trajectory` influence. Padded tokens (0 loss) read 0.
        stderr: Standard error of each value, ``[S, T]``.
    """

    steps: np.ndarray
    influence: np.ndarray
    stderr: np.ndarray


def _deprecated(old: str, new: str, owner: str) -> None:
    warnings.warn(f"{owner}.{old} is deprecated; use {owner}.{new} (the same values).", DeprecationWarning,
                  stacklevel=3)


def _alias(old: str, new: str) -> property:
    def read(self: Any) -> Any:
        _deprecated(old, new, type(self).__name__)
        return getattr(self, new)

    return property(read, doc=f"Deprecated name of ``{new}``.")


def _snapshot_doc() -> str:
    lines = ["Every stored value of one snapshot (row of the log). Matrices are ``[probe, train]``.", "",
             "One field per column of :data:`lightning_bif.log.columns.COLUMNS`; a column the log lacks",
             "(an older format version, or no token axis) is ``None``.", "", "Attributes:",
             "    index: Position of the snapshot in the log."]
    lines += [f"    {column.field}: {column.description[0].upper()}{column.description[1:]}"
              + (f", ``[{', '.join(column.shape)}]``." if column.shape else ".") for column in COLUMNS]
    return "\n".join(lines)


def _optional(column: Column) -> bool:
    return column.since > 1 or column.optional


Snapshot = make_dataclass(
    "Snapshot",
    [("index", int),
     *((column.field, column.python_type()) for column in COLUMNS if not _optional(column)),
     *((column.field, column.python_type(), field(default=None)) for column in COLUMNS if _optional(column))],
    namespace={"__doc__": _snapshot_doc(), "__module__": __name__,
               **{old: _alias(old, new) for old, new in ALIASES.items()}},
)


class RowView:
    """Lazy, read-only view of the first ``rows`` snapshots of one stored dataset.

    Indexing reads only what is asked for: ``log.influence[-1]`` is the last ``[P, N]`` matrix,
    ``log.influence[:, 3, 17]`` one entry over time. ``np.asarray(view)`` reads everything.
    """

    def __init__(self, dataset: h5py.Dataset, rows: int) -> None:
        self._dataset = dataset
        self._rows = rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._rows, *self._dataset.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self._dataset.dtype

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return self._read(key)
        except (OSError, RuntimeError) as error:  # an unreadable block (bad chunk checksum, lost index)
            raise DamagedLogError(self._dataset.file.filename, f"HDF5 cannot read a part of it ({error})") from error

    def _read(self, key: Any) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if first is Ellipsis:
            first, rest = slice(None), (Ellipsis, *rest)
        if isinstance(first, slice):
            first = slice(*first.indices(self._rows))
        elif isinstance(first, (int, np.integer)):
            if not -self._rows <= first < self._rows:
                raise IndexError(f"snapshot index {first} out of range for {self._rows} snapshots")
            first = int(first) % self._rows
        else:
            first = np.arange(self._rows)[first]
        if isinstance(first, np.ndarray):
            # h5py needs increasing fancy indices; read them in order and put them back.
            order = np.argsort(first, kind="stable")
            unique, inverse = np.unique(first[order], return_inverse=True)
            block = self._dataset[(unique, *rest)]
            restored = np.empty_like(block[inverse])
            restored[order] = block[inverse]
            return restored
        return self._dataset[(first, *rest)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype)

    def __iter__(self) -> Iterator[np.ndarray]:
        for row in range(self._rows):
            yield self[row]

    def __repr__(self) -> str:
        return f"RowView({self._dataset.name}, shape={self.shape}, dtype={self.dtype})"


class InfluenceLog:
    """Reader of an influence log; safe to open while a training run is still writing it.

    Every per-snapshot column (:data:`lightning_bif.log.columns.COLUMNS`; the table in the user guide) is
    an attribute named by its accessor: scalar columns as NumPy arrays ``[S]`` (``steps``, ``status``,
    ``split_half``, ``step_size``...), JSON columns as lists ``[S]`` of dicts or ``None`` (``calibration``:
    the evidence of a step-size calibration run before that snapshot; ``tuning``: the settings a snapshot
    chose by itself), and array columns (``influence``, ``stderr``, ``correlation``, ``train_loss``,
    ``sampling_loss``...) as lazy :class:`RowView` objects that read from disk only what is indexed. A
    column the log lacks reads as ``None`` (a JSON one as a list of ``None``): the format-2 horizon columns
    ``horizon_steps``, ``learning_rate``, ``momentum``, ``localization`` (γ), ``lambda_min`` in version-1
    logs, and ``token_influence`` / ``token_stderr`` ``[S, P, T, N]`` in logs of runs without a token axis
    (``tokens`` (T) is ``None`` there too; see :meth:`token_trajectory`). ``probe_tokens`` (the display
    string of every probe token, ``[P][T]``) and ``train_text`` (of every tracked training example,
    ``[N]``) are lists of str when the run stored them (format 2), else ``None``. Call :meth:`refresh` to
    see snapshots appended since opening.

    Ids and positions: ``train_ids`` / ``probe_ids`` hold the dataset index or key of every tracked
    example (what the CLI prints); a *position* is an example's place in those arrays (the column /
    row of the ``[P, N]`` matrices). Methods that pick one example take either, keyword-only:
    ``train=`` / ``probe=`` are positions, ``train_id=`` / ``probe_id=`` are ids. Snapshots likewise:
    ``index`` / ``rows=`` are positions, ``step=`` / ``steps=`` are training steps.
    ``train_group_names`` / ``probe_group_names`` are ``{group label: name}`` when the run stored
    names (format version 2), else ``None``.

    Args:
        path: The ``.h5`` log.

    Example:
        >>> log = open_log("runs/exp/influence.h5")                      # doctest: +SKIP
        >>> log.steps, log.influence[-1].shape                          # doctest: +SKIP
        >>> t = log.trajectory(probe=0, train=17); t.steps, t.influence  # doctest: +SKIP
        >>> log.trajectory(probe_id=3, train_id=1017)                   # doctest: +SKIP
        >>> log.to_dataframe(steps=slice(100, 500), probe_groups=[3])   # doctest: +SKIP
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"No influence log at {self.path}.")
        self._file = open_swmr(self.path)
        try:
            with damage_as_error(self.path):
                self._read_header()
        except ValueError:
            self._file.close()
            raise

    def _read_header(self) -> None:
        check_format(self._file, self.path)
        attrs = self._file.attrs
        self.format_version = int(attrs["format_version"])
        self.package_version = str(attrs["package_version"])
        self.created = str(attrs["created"])
        self.config: dict[str, Any] = json.loads(attrs["config"])
        self.chains = int(attrs["chains"])
        self.draws = int(attrs["draws"])
        self.tokens = stored_tokens(self._file)
        self.train_ids = read_labels(self._file["train_ids"])
        self.probe_ids = read_labels(self._file["probe_ids"])
        self.train_groups = read_labels(self._file["train_groups"]) if "train_groups" in self._file else None
        self.probe_groups = read_labels(self._file["probe_groups"]) if "probe_groups" in self._file else None
        self.train_group_names = read_group_names(self._file, "train")
        self.probe_group_names = read_group_names(self._file, "probe")
        probe_tokens, train_text = read_texts(self._file, "probe_tokens"), read_texts(self._file, "train_text")
        self.probe_tokens: list[list[str]] | None = None if probe_tokens is None else probe_tokens.tolist()
        self.train_text: list[str] | None = None if train_text is None else train_text.tolist()
        # One handle per dataset for the reader's lifetime: a SWMR refresh applies to the handle it
        # is called on, and a handle opened later can still see stale chunks.
        names = ["step", *(name for name in file_layout(self._file) if name != "step")]
        self._datasets = {name: self._file[name] for name in names}
        self._load_rows()

    def _load_rows(self) -> None:
        with damage_as_error(self.path):
            rows = {name: len(dataset) for name, dataset in self._datasets.items()}
            if min(rows.values()) < rows["step"]:  # the writer extends every dataset before ``step``
                short = min(rows, key=rows.get)
                raise DamagedLogError(self.path, f"{short} has {rows[short]} rows but step has {rows['step']}",
                                      intact=rows[short])
            self._read_rows()
        problem = first_inconsistent_row(self.steps, self.status, self.loss_rise)
        if problem is not None:
            raise DamagedLogError(self.path, problem[1], intact=problem[0])

    def _read_rows(self) -> None:
        self._rows = len(self._datasets["step"])
        for column in COLUMNS:
            setattr(self, column.accessor, self._read_column(column))

    def _read_column(self, column: Column) -> Any:
        """A column as its reader attribute: an ``[S]`` array, a list ``[S]`` (JSON) or a lazy :class:`RowView`.

        A column the log lacks (an older format version, no token axis) reads as ``None``, a JSON one as
        ``[None] * S``.
        """
        rows = self._rows
        dataset = self._datasets.get(column.name)
        if dataset is None:
            return [None] * rows if column.dtype == "json" else None
        if column.shape:
            return RowView(dataset, rows)
        if column.dtype == "json":
            return [json.loads(text) if text else None for text in dataset.asstr()[:rows].tolist()]
        if column.dtype == "text":
            return np.array(dataset.asstr()[:rows].tolist(), dtype=str).reshape(rows)
        values = dataset[:rows]
        return values.astype(np.int64) if column.dtype == "int64" else values

    def __getattr__(self, name: str) -> Any:
        if name in ALIASES:
            _deprecated(name, ALIASES[name], type(self).__name__)
            return getattr(self, ALIASES[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def refresh(self) -> None:
        """Pick up snapshots that a live writer appended (or removed) since the last look.

        A run resuming after a crash writes a recovered copy of the file; reopen the log to follow it.
        """
        # ``step`` first: the writer extends every other dataset before it, so they hold >= its rows.
        with damage_as_error(self.path):
            for dataset in self._datasets.values():
                dataset.refresh()
        self._load_rows()

    def __len__(self) -> int:
        return self._rows

    def trajectory(
        self, *, probe: int | None = None, train: int | None = None, probe_id: Any = None, train_id: Any = None
    ) -> Trajectory:
        """The influence of one training example on one probe over all snapshots.

        Name the probe by exactly one of ``probe`` / ``probe_id`` and the training example by exactly
        one of ``train`` / ``train_id``.

        Args:
            probe: Position of the probe (row of the ``[P, N]`` matrices).
            train: Position of the training example (column).
            probe_id: Id of the probe (an entry of ``probe_ids``: what the CLI prints).
            train_id: Id of the training example (an entry of ``train_ids``).

        Returns:
            A :class:`Trajectory` of steps, influence, standard errors and correlations.

        Raises:
            ValueError: Not exactly one of each kind was given.
            TypeError: A position is not an integer (an id passed as ``probe=`` / ``train=``).
            IndexError: A position is out of range.
            UnknownIdError: An id is not in the log (also a ``KeyError``).
        """
        probe, train = self._pair(probe, train, probe_id, train_id)
        return Trajectory(
            steps=self.steps.copy(),
            influence=self.influence[:, probe, train],
            stderr=self.stderr[:, probe, train],
            correlation=self.correlation[:, probe, train],
        )

    def token_trajectory(
        self, *, probe: int | None = None, train: int | None = None, probe_id: Any = None, train_id: Any = None
    ) -> TokenTrajectory:
        """The influence of one training example on every token of one probe over all snapshots.

        Name the probe by exactly one of ``probe`` / ``probe_id`` and the training example by exactly
        one of ``train`` / ``train_id``.

        Args:
            probe: Position of the probe (row of the ``[P, N]`` matrices).
            train: Position of the training example (column).
            probe_id: Id of the probe (an entry of ``probe_ids``).
            train_id: Id of the training example (an entry of ``train_ids``).

        Returns:
            A :class:`TokenTrajectory` with ``[S, T]`` influence and standard errors.

        Raises:
            ValueError: The log has no token axis (the run did not use ``SGLDConfig(per_token=True)``),
                or not exactly one of each kind was given.
            IndexError: A position is out of range.
            UnknownIdError: An id is not in the log.
        """
        if self.token_influence is None or self.token_stderr is None:
            raise ValueError(f"The influence log {self.path} has no per-token influence: the run did not use "
                             "SGLDConfig(per_token=True).")
        probe, train = self._pair(probe, train, probe_id, train_id)
        return TokenTrajectory(
            steps=self.steps.copy(),
            influence=self.token_influence[:, probe, :, train],
            stderr=self.token_stderr[:, probe, :, train],
        )

    def sign_changes(self, z: float = 3.0) -> list[SignChange]:
        """Every (probe, train) pair whose influence changes sign significantly over the run.

        Reads the ``ok`` snapshots one at a time; see :func:`lightning_bif.log.summaries.sign_changes`
        for what counts as a change and how often noise fakes one.

        Args:
            z: How many standard errors from zero an entry must be to count (default 3).

        Returns:
            :class:`~lightning_bif.log.summaries.SignChange` records, earliest first: ``probe`` / ``train``
            are positions, ``probe_id`` / ``train_id`` the ids of the same pair.
        """
        changes = sign_changes(self.steps, self.influence, self.stderr, z=z, usable=self.status == "ok")
        return [replace(c, probe_id=self.probe_ids[c.probe].item(), train_id=self.train_ids[c.train].item())
                for c in changes]

    def _pair(self, probe: int | None, train: int | None, probe_id: Any, train_id: Any) -> tuple[int, int]:
        """Positions of a (probe, train) pair named by position or id, exactly one of each kind."""
        resolved = []
        for kind, position, key, size in (("probe", probe, probe_id, len(self.probe_ids)),
                                          ("train", train, train_id, len(self.train_ids))):
            if (position is None) == (key is None):
                raise ValueError(f"Pass exactly one of {kind}= (position) or {kind}_id= (id, as in log.{kind}_ids "
                                 "and the CLI).")
            if key is not None:
                position = self.position(**{kind: key})
            elif isinstance(position, bool) or not isinstance(position, (int, np.integer)):
                raise TypeError(f"{kind}= is a position (an integer); got {position!r}. Pass ids as {kind}_id=.")
            elif not -size <= position < size:
                raise IndexError(f"{kind} position {position} out of range for {size} {kind} examples.")
            resolved.append(int(position) % size)
        return resolved[0], resolved[1]

    def nearest(self, step: int, *, clip: bool = False) -> int:
        """Index of the snapshot whose step is nearest ``step`` (the earlier one on a tie).

        Args:
            step: A training step within the logged range ``steps[0]..steps[-1]``.
            clip: Also accept a step outside that range and return the first or last snapshot.

        Raises:
            ValueError: The log has no snapshots, or ``step`` is outside the logged range and
                ``clip`` is false (a run that ended at step 480 has no snapshot near step 5000).
        """
        if not self._rows:
            raise ValueError(f"The influence log {self.path} has no snapshots yet.")
        first, last = int(self.steps[0]), int(self.steps[-1])
        if not clip and not first <= step <= last:
            where = f"before the first snapshot (step {first})" if step < first else \
                f"after the last snapshot (step {last})"
            raise ValueError(f"Step {step} is {where} of {self.path}; the log covers steps {first}..{last}. "
                             "Ask for a step in that range, or pass clip=True for the nearest end.")
        return int(np.argmin(np.abs(self.steps - step)))

    def position(self, *, train: Any = None, probe: Any = None) -> int:
        """Position of a training example or probe given its id (dataset index or key).

        Here ``train=`` / ``probe=`` are ids (the one method where they are): it maps an id to a position.

        Raises:
            UnknownIdError: No example has that id (a ``KeyError``; the message says what ids the log has).

        Example:
            >>> log.trajectory(probe=log.position(probe=3), train=log.position(train=1017))  # doctest: +SKIP
        """
        if (train is None) == (probe is None):
            raise ValueError("Pass exactly one of train= or probe=.")
        kind, value = ("train", train) if train is not None else ("probe", probe)
        return int(tables.ids_to_positions(self, kind, value)[0])

    def snapshot(self, index: int | None = None, *, step: int | None = None) -> Snapshot:
        """Every stored array of one snapshot, by position ``index`` (negative counts from the end) or by ``step``.

        Args:
            index: Position of the snapshot (row of the log).
            step: Training step of the snapshot; it must be a logged step (see :meth:`nearest` for the nearest).

        Raises:
            ValueError: Not exactly one of ``index`` and ``step``, or no snapshot at ``step``.
            IndexError: ``index`` out of range.
        """
        if (index is None) == (step is None):
            raise ValueError("Pass exactly one of index (snapshot position) or step= (training step).")
        if step is not None:
            index = int(tables.select(self, steps=[step], include_failed=True).rows[0])
        if not -self._rows <= index < self._rows:
            raise IndexError(f"snapshot index {index} out of range for {self._rows} snapshots.")
        index %= self._rows
        return Snapshot(index=index, **{column.field: self._cell(column, index) for column in COLUMNS})

    def _cell(self, column: Column, index: int) -> Any:
        """One snapshot's value of a column (``None`` when the log lacks the column)."""
        series = getattr(self, column.accessor)
        if series is None:
            return None
        cell = series[index]
        if column.shape or column.dtype == "json":
            return cell
        return {"int64": int, "text": str, "bool": bool}.get(column.dtype, float)(cell)

    def to_dataframe(
        self, *, steps: Any = None, rows: Any = None, probes: Any = None, probe_ids: Any = None,
        probe_groups: Any = None, trains: Any = None, train_ids: Any = None, train_groups: Any = None,
        include_failed: bool = False,
    ) -> Any:
        """The influence of a selection of the log as a long pandas table, one row per (step, probe, train).

        Reads only the selected snapshots, a block at a time: select steps or examples to read a part
        of a log larger than memory. Needs pandas (``pip install 'lightning-bif[pandas]'``).

        Snapshots: at most one of ``steps`` / ``rows``; probes: at most one of ``probes`` /
        ``probe_ids`` / ``probe_groups``; training examples likewise. Omitted: everything.
        Table rows come in step order, then probe position, then train position.

        Args:
            steps: Training steps: one, a list (each must be logged), or ``slice(start, stop)`` for
                every snapshot with ``start <= step <= stop`` (both inclusive; ``None`` for open ends).
            rows: Snapshot positions: an int, a list or a slice.
            probes: Probe positions (int, list or slice).
            probe_ids: Probe ids (entries of ``probe_ids``).
            probe_groups: Probe group labels (entries of ``probe_groups``).
            trains: Training example positions.
            train_ids: Training example ids.
            train_groups: Training group labels.
            include_failed: Keep failed snapshots (their values are NaN); default drops them.

        Returns:
            A ``pandas.DataFrame`` with columns ``step``, ``status``, ``probe_id``, ``probe_group``,
            ``probe_group_name``, ``train_id``, ``train_group``, ``train_group_name``, ``influence``,
            ``stderr``, ``correlation`` (the group columns only when the log has groups, the name
            columns only when it stores group names; a label without a name shows as its text).
            Text columns (``status``, string ids, labels and names) are pandas categoricals: one
            small code per table row.

        Raises:
            ImportError: pandas is not installed.
            ValueError: A step that is not logged, a step range with no snapshot, or two
                selections of one kind.
            UnknownIdError: An id or group label that the log does not have.
            IndexError: A position out of range.
        """
        selection = tables.select(self, steps=steps, rows=rows, probes=probes, probe_ids=probe_ids,
                                  probe_groups=probe_groups, trains=trains, train_ids=train_ids,
                                  train_groups=train_groups, include_failed=include_failed)
        return tables.to_dataframe(self, selection)

    def to_xarray(
        self, *, steps: Any = None, rows: Any = None, probes: Any = None, probe_ids: Any = None,
        probe_groups: Any = None, trains: Any = None, train_ids: Any = None, train_groups: Any = None,
        include_failed: bool = False,
    ) -> Any:
        """A selection of the log as an ``xarray.Dataset`` with dims ``step``, ``probe``, ``train``.

        Takes the selection arguments of :meth:`to_dataframe` and reads only what they select. The
        ``probe`` and ``train`` coordinates are the ids, so ``ds.sel(train=1017)`` picks by id and
        ``ds.isel(train=0)`` by position within the selection. Needs xarray
        (``pip install 'lightning-bif[xarray]'``).

        Returns:
            An ``xarray.Dataset`` with variables ``influence``, ``stderr``, ``correlation``
            ``[step, probe, train]``; coordinates ``step``, ``probe``, ``train`` (ids),
            ``probe_group`` / ``train_group`` and ``probe_group_name`` / ``train_group_name`` where
            the log has them, and per step ``status``, ``split_half`` and ``loss_rise``.

        Raises:
            ImportError: xarray is not installed.
            ValueError: As :meth:`to_dataframe`.
        """
        selection = tables.select(self, steps=steps, rows=rows, probes=probes, probe_ids=probe_ids,
                                  probe_groups=probe_groups, trains=trains, train_ids=train_ids,
                                  train_groups=train_groups, include_failed=include_failed)
        return tables.to_xarray(self, selection)

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()

    def __enter__(self) -> InfluenceLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"InfluenceLog({str(self.path)!r}, snapshots={self._rows}, probes={len(self.probe_ids)}, "
                f"train={len(self.train_ids)})")


def open_log(path: PathLike, *, recover: bool = False) -> InfluenceLog:
    """Open an influence log for reading (also while training still appends to it).

    A damaged log (truncated, overwritten, half-written rows) raises
    :class:`~lightning_bif.log.DamagedLogError` within a second rather than returning damage as data.

    Args:
        path: The ``.h5`` file written by ``BIFCallback`` or :class:`LogWriter`.
        recover: When the log is damaged, copy its intact snapshots into ``<stem>.repaired.h5`` next
            to it (as ``lightning-bif repair`` does; the damaged file is left as it is), warn, and
            open that copy instead of raising.

    Returns:
        An :class:`InfluenceLog`; call ``refresh()`` on it to see newly appended snapshots.

    Raises:
        DamagedLogError: The log is damaged (and ``recover`` is false).

    Example:
        >>> from lightning_bif import open_log
        >>> log = open_log("runs/exp/influence.h5")        # doctest: +SKIP
        >>> log.trajectory(probe=3, train=17).influence    # doctest: +SKIP
    """
    try:
        return InfluenceLog(path)
    except DamagedLogError as error:
        if not recover:
            raise
        report = salvage(path)
        warnings.warn(f"{error.problem}; {report}", stacklevel=2)
        return InfluenceLog(report.target)
