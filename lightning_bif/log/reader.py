"""Reading an influence log, also while a run still appends to it: :func:`open_log` and :class:`InfluenceLog`."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..analysis import SignChange, sign_changes
from .recover import DamagedLogError, damage_as_error, first_inconsistent_row, open_swmr, salvage
from .schema import (
    HORIZON_COLUMNS,
    PathLike,
    _check_format,
    _file_layout,
    _read_labels,
    _read_texts,
    _stored_tokens,
)


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


@dataclass
class Snapshot:
    """Every stored array of one snapshot (row of the log). Matrices are ``[probe, train]``."""

    index: int
    step: int
    epoch: int
    wall_time: float
    duration_s: float
    status: str
    message: str
    influence: np.ndarray
    correlation: np.ndarray
    stderr: np.ndarray
    train_loss: np.ndarray
    probe_loss: np.ndarray
    split_half: float
    loss_rise: float
    ess: float
    nbeta: float
    step_size: float
    calibration: dict[str, Any] | None
    sampling_loss: np.ndarray
    draw_loss: np.ndarray
    diverged: np.ndarray
    token_influence: np.ndarray | None = None
    token_influence_se: np.ndarray | None = None
    horizon_steps: float | None = None
    learning_rate: float | None = None
    momentum: float | None = None
    localization: float | None = None
    lambda_min: float | None = None
    tuning: dict[str, Any] | None = None


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

    Small per-snapshot values (``steps``, ``status``, ``split_half``...) are NumPy arrays
    ``[S]``; the big ones (``influence``, ``correlation``, ``stderr``, ``train_loss``,
    ``probe_loss``, ``sampling_loss``, ``draw_loss``, ``diverged``) are lazy :class:`RowView`
    objects that read from disk only what is indexed. Logs of per-token runs also have ``tokens`` (T)
    and the views ``token_influence`` and ``token_influence_se`` ``[S, P, T, N]`` (``None``, like
    ``tokens``, in other logs; see :meth:`token_trajectory`). ``probe_tokens`` (the display string of
    every probe token, ``[P][T]``) and ``train_text`` (of every tracked training example, ``[N]``) are
    lists of str when the run stored them (format 2), else ``None``. ``step_size`` ``[S]`` is the SGLD step
    size each snapshot used, and ``calibration`` is a list ``[S]`` holding the evidence of a
    step-size calibration run before that snapshot (``CalibrationResult.summary()`` as a dict)
    or ``None``. ``horizon_steps``, ``learning_rate``, ``momentum``, ``localization`` (γ) and
    ``lambda_min`` ``[S]`` say what horizon question each snapshot answered (NaN without a horizon;
    ``None`` in logs of format version 1). ``tuning`` is a list ``[S]`` of the settings each snapshot chose
    automatically with their evidence (``autotune.Tuning.summary()`` as a dict; ``None`` in version-1
    logs and for failed snapshots). Call :meth:`refresh` to see snapshots appended since opening.

    Args:
        path: The ``.h5`` log.

    Example:
        >>> log = open_log("runs/exp/influence.h5")                      # doctest: +SKIP
        >>> log.steps, log.influence[-1].shape                          # doctest: +SKIP
        >>> t = log.trajectory(probe=0, train=17); t.steps, t.influence  # doctest: +SKIP
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
        _check_format(self._file, self.path)
        attrs = self._file.attrs
        self.format_version = int(attrs["format_version"])
        self.package_version = str(attrs["package_version"])
        self.created = str(attrs["created"])
        self.config: dict[str, Any] = json.loads(attrs["config"])
        self.chains = int(attrs["chains"])
        self.draws = int(attrs["draws"])
        self.tokens = _stored_tokens(self._file)
        self.train_ids = _read_labels(self._file["train_ids"])
        self.probe_ids = _read_labels(self._file["probe_ids"])
        self.train_groups = _read_labels(self._file["train_groups"]) if "train_groups" in self._file else None
        self.probe_groups = _read_labels(self._file["probe_groups"]) if "probe_groups" in self._file else None
        probe_tokens, train_text = _read_texts(self._file, "probe_tokens"), _read_texts(self._file, "train_text")
        self.probe_tokens: list[list[str]] | None = None if probe_tokens is None else probe_tokens.tolist()
        self.train_text: list[str] | None = None if train_text is None else train_text.tolist()
        # One handle per dataset for the reader's lifetime: a SWMR refresh applies to the handle it
        # is called on, and a handle opened later can still see stale chunks.
        names = ["step", *(name for name in _file_layout(self._file) if name != "step")]
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
        file = self._datasets
        self._rows = rows = len(file["step"])
        self.steps = file["step"][()].astype(np.int64)
        self.epochs = file["epoch"][:rows].astype(np.int64)
        self.wall_time = file["wall_time"][:rows]
        self.duration_s = file["duration_s"][:rows]
        self.status = np.array(file["status"].asstr()[:rows].tolist(), dtype=str).reshape(rows)
        self.message = np.array(file["message"].asstr()[:rows].tolist(), dtype=str).reshape(rows)
        self.split_half = file["split_half"][:rows]
        self.loss_rise = file["loss_rise"][:rows]
        self.ess = file["ess"][:rows]
        self.nbeta = file["nbeta"][:rows]
        self.step_size = file["step_size"][:rows]
        self.calibration: list[dict[str, Any] | None] = [
            json.loads(text) if text else None for text in file["calibration"].asstr()[:rows].tolist()
        ]
        # Format version 2 (None in older logs): H, η, μ, γ and λ_min per snapshot (NaN without a horizon).
        for name in HORIZON_COLUMNS:
            setattr(self, name, file[name][:rows] if name in file else None)
        # Format version 2: the automatic sampler choices per snapshot (None in older logs and failed snapshots).
        self.tuning: list[dict[str, Any] | None] = [
            json.loads(text) if text else None for text in file["tuning"].asstr()[:rows].tolist()
        ] if "tuning" in file else [None] * rows
        self.influence = RowView(file["influence"], rows)
        self.correlation = RowView(file["correlation"], rows)
        self.stderr = RowView(file["stderr"], rows)
        self.train_loss = RowView(file["train_loss"], rows)
        self.probe_loss = RowView(file["probe_loss"], rows)
        self.sampling_loss = RowView(file["diagnostics/sampling_loss"], rows)
        self.draw_loss = RowView(file["diagnostics/draw_loss"], rows)
        self.diverged = RowView(file["diagnostics/diverged"], rows)
        per_token = self.tokens is not None
        self.token_influence = RowView(file["token_influence"], rows) if per_token else None
        self.token_influence_se = RowView(file["token_influence_se"], rows) if per_token else None

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

    def trajectory(self, probe: int, train: int) -> Trajectory:
        """The influence of training example ``train`` on probe ``probe`` over all snapshots.

        Args:
            probe: Position of the probe (row of the ``[P, N]`` matrices; see ``probe_ids``).
            train: Position of the training example (see ``train_ids``).

        Returns:
            A :class:`Trajectory` of steps, influence, standard errors and correlations.
        """
        self._check_positions(probe, train)
        return Trajectory(
            steps=self.steps.copy(),
            influence=self.influence[:, probe, train],
            stderr=self.stderr[:, probe, train],
            correlation=self.correlation[:, probe, train],
        )

    def token_trajectory(self, probe: int, train: int) -> TokenTrajectory:
        """The influence of training example ``train`` on every token of probe ``probe`` over all snapshots.

        Args:
            probe: Position of the probe (see ``probe_ids``).
            train: Position of the training example (see ``train_ids``).

        Returns:
            A :class:`TokenTrajectory` with ``[S, T]`` influence and standard errors.

        Raises:
            ValueError: The log has no token axis (the run did not use ``SGLDConfig(per_token=True)``).
        """
        if self.token_influence is None or self.token_influence_se is None:
            raise ValueError(f"The influence log {self.path} has no per-token influence: the run did not use "
                             "SGLDConfig(per_token=True).")
        self._check_positions(probe, train)
        return TokenTrajectory(
            steps=self.steps.copy(),
            influence=self.token_influence[:, probe, :, train],
            stderr=self.token_influence_se[:, probe, :, train],
        )

    def sign_changes(self, z: float = 3.0) -> list[SignChange]:
        """Every (probe, train) pair whose influence changes sign significantly over the run.

        Reads the ``ok`` snapshots one at a time; see :func:`lightning_bif.analysis.sign_changes`
        for what counts as a change and how often noise fakes one.

        Args:
            z: How many standard errors from zero an entry must be to count (default 3).

        Returns:
            :class:`~lightning_bif.analysis.SignChange` records (positions, steps, zero crossing), earliest first.
        """
        return sign_changes(self.steps, self.influence, self.stderr, z=z, usable=self.status == "ok")

    def _check_positions(self, probe: int, train: int) -> None:
        for name, position, size in (("probe", probe, len(self.probe_ids)), ("train", train, len(self.train_ids))):
            if not -size <= position < size:
                raise IndexError(f"{name} position {position} out of range for {size} {name} examples.")

    def nearest(self, step: int) -> int:
        """Index of the snapshot whose step is nearest ``step`` (the earlier one on a tie)."""
        if not self._rows:
            raise ValueError(f"The influence log {self.path} has no snapshots yet.")
        return int(np.argmin(np.abs(self.steps - step)))

    def position(self, *, train: Any = None, probe: Any = None) -> int:
        """Position of a training example or probe given its id (dataset index or key).

        Example:
            >>> log.trajectory(probe=log.position(probe=3), train=log.position(train=1017))  # doctest: +SKIP
        """
        if (train is None) == (probe is None):
            raise ValueError("Pass exactly one of train= or probe=.")
        ids, value, name = (self.train_ids, train, "train") if train is not None else (self.probe_ids, probe, "probe")
        hits = np.flatnonzero(ids == value)
        if not len(hits):
            raise KeyError(f"No {name} example with id {value!r} in {self.path}.")
        return int(hits[0])

    def snapshot(self, index: int) -> Snapshot:
        """Every stored array of snapshot ``index`` (negative counts from the end)."""
        if not -self._rows <= index < self._rows:
            raise IndexError(f"snapshot index {index} out of range for {self._rows} snapshots.")
        index %= self._rows
        return Snapshot(
            index=index, step=int(self.steps[index]), epoch=int(self.epochs[index]),
            wall_time=float(self.wall_time[index]), duration_s=float(self.duration_s[index]),
            status=str(self.status[index]), message=str(self.message[index]),
            influence=self.influence[index], correlation=self.correlation[index], stderr=self.stderr[index],
            train_loss=self.train_loss[index], probe_loss=self.probe_loss[index],
            split_half=float(self.split_half[index]), loss_rise=float(self.loss_rise[index]),
            ess=float(self.ess[index]), nbeta=float(self.nbeta[index]),
            step_size=float(self.step_size[index]), calibration=self.calibration[index],
            sampling_loss=self.sampling_loss[index], draw_loss=self.draw_loss[index],
            diverged=self.diverged[index],
            token_influence=None if self.token_influence is None else self.token_influence[index],
            token_influence_se=None if self.token_influence_se is None else self.token_influence_se[index],
            **{name: None if getattr(self, name) is None else float(getattr(self, name)[index])
               for name in HORIZON_COLUMNS},
            tuning=self.tuning[index],
        )

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
