"""The HDF5 influence log: one versioned schema, an append-only writer and a reader.

This module is the only code that knows the file layout; everything else goes through
:class:`LogWriter` and :func:`open_log`. Layout (``S`` snapshots, ``P`` probes, ``N`` tracked
training examples, ``C`` chains, ``D`` draws per chain)::

    /                         attrs: format, format_version, package_version, created, config (JSON),
                                     chains, draws
    train_ids [N], probe_ids [P]            int64 dataset indices or fixed-length UTF-8 keys
    train_groups [N], probe_groups [P]      optional group labels (int64 or UTF-8)
    step [S]                                training step of each snapshot (written last: the commit marker)
    epoch [S], wall_time [S], duration_s [S], status [S], message [S]
    influence [S, P, N], correlation [S, P, N], stderr [S, P, N]     float32
    train_loss [S, N], probe_loss [S, P]                             losses at w*
    split_half [S], loss_rise [S], ess [S], nbeta [S], step_size [S]      step_size: the ε that snapshot used
    calibration [S]                         JSON evidence of a step-size calibration run before that snapshot, or ""
    diagnostics/sampling_loss [S, C, D], diagnostics/draw_loss [S, C, D], diagnostics/diverged [S, C]
    token_influence [S, P, T, N], token_influence_se [S, P, T, N]    float32; only in logs of per-token runs,
                                     whose root attrs also hold tokens (T)

Every per-snapshot dataset is resizable along its first axis and chunked one snapshot per chunk.
The writer works in HDF5's single-writer/multiple-reader (SWMR) mode and flushes after every
snapshot, so a reader in another process sees each completed snapshot and a crash loses at most
the snapshot in flight.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from ..analysis import flatten_config

if TYPE_CHECKING:
    from .estimator import BIFResult

FORMAT = "lightning-bif"
FORMAT_VERSION = 1
STATUSES = ("ok", "diverged", "failed")

# Lowest HDF5 format that supports SWMR (readable by HDF5 >= 1.10). Files are opened without OS
# file locks (``locking=False``): a notebook holding the log open must not stop a training run from
# resuming it. A second writer is kept out by ``_writer_lock`` instead.
_LIBVER = ("v110", "latest")
_MAX_ID_BYTES = 256
_STATUS_BYTES = 16
_MESSAGE_BYTES = 1024
_CALIBRATION_BYTES = 4096
# Largest chunk in elements (4 MiB of float32): one snapshot per chunk unless a row is larger.
_MAX_CHUNK_ELEMENTS = 1 << 20
_MODES = ("error", "overwrite", "resume")

PathLike = str | os.PathLike[str]


@dataclass
class RunIdentity:
    """What makes two runs the same run: a resumed log must match it exactly.

    Attributes:
        config: JSON-compatible settings that produced the log, e.g.
            ``{"sgld": SGLDConfig.to_dict(), "callback": {...}}``.
        train_ids: Dataset indices (int) or keys (str) of the tracked training examples, ``[N]``.
        probe_ids: Indices or names of the probes, ``[P]``.
        train_groups: Optional group label (int or str) of each training example, ``[N]``.
        probe_groups: Optional group label of each probe, ``[P]``.
        chains: Chains per snapshot (C), the size of the diagnostics axes.
        draws: Draws per chain (D).
        tokens: Tokens per probe (T) of a per-token run (``SGLDConfig(per_token=True)``): the log then
            stores ``token_influence`` and ``token_influence_se`` ``[S, P, T, N]``. ``None``: no token axis.
    """

    config: dict[str, Any]
    train_ids: Any
    probe_ids: Any
    train_groups: Any = None
    probe_groups: Any = None
    chains: int = 4
    draws: int = 200
    tokens: int | None = None

    def __post_init__(self) -> None:
        try:
            json.dumps(self.config, sort_keys=True)
        except (TypeError, ValueError) as error:
            raise TypeError(f"RunIdentity.config must be JSON-serializable: {error}") from error
        self.train_ids = _labels(self.train_ids, "train_ids")
        self.probe_ids = _labels(self.probe_ids, "probe_ids")
        for name, ids in (("train_groups", self.train_ids), ("probe_groups", self.probe_ids)):
            groups = getattr(self, name)
            if groups is not None:
                groups = _labels(groups, name)
                if len(groups) != len(ids):
                    raise ValueError(f"RunIdentity.{name} has {len(groups)} labels for {len(ids)} examples.")
                setattr(self, name, groups)
        for name in ("chains", "draws"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RunIdentity.{name} must be a positive integer, got {value!r}.")
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 1):
            raise ValueError(f"RunIdentity.tokens must be a positive integer or None, got {self.tokens!r}.")

    @property
    def config_json(self) -> str:
        """The config as canonical JSON (sorted keys), as stored in the file."""
        return json.dumps(self.config, sort_keys=True)


@dataclass
class SnapshotRecord:
    """One snapshot as handed to the sinks (HDF5 log, TensorBoard).

    Attributes:
        step: Training step (``trainer.global_step``) at which the snapshot was taken.
        epoch: Training epoch.
        wall_time: Unix time when the snapshot finished.
        duration_s: Seconds the snapshot took.
        status: ``"ok"``, ``"diverged"`` (some chains diverged) or ``"failed"``.
        result: The estimate, or ``None`` when the snapshot failed before producing one
            (stored as NaN rows).
        message: Error text of a failed snapshot.
        step_size: The SGLD step size the snapshot used; ``None``: the result's
            ``config.step_size`` (NaN for a failed snapshot without a result).
        calibration: Evidence of a step-size calibration run just before this snapshot
            (JSON-compatible, e.g. ``CalibrationResult.summary()``), or ``None``.
    """

    step: int
    epoch: int
    wall_time: float
    duration_s: float
    status: str
    result: BIFResult | None
    message: str = ""
    step_size: float | None = None
    calibration: dict[str, Any] | None = None

    def used_step_size(self) -> float:
        """The step size of this snapshot: ``step_size``, else the result's, else NaN."""
        if self.step_size is not None:
            return float(self.step_size)
        return float(self.result.config.step_size) if self.result is not None else math.nan


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


def _labels(values: Any, name: str) -> np.ndarray:
    """Ids or group labels as a 1-D int64 or str array; other kinds are an error."""
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}.")
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind in "USO":
        if not all(isinstance(v, (str, np.str_)) for v in array.tolist()):
            raise TypeError(f"{name} must be all integers or all strings.")
        array = array.astype(str)
        longest = max((len(v.encode()) for v in array.tolist()), default=0)
        if longest > _MAX_ID_BYTES:
            raise ValueError(f"{name}: keys are limited to {_MAX_ID_BYTES} UTF-8 bytes; the longest has {longest}.")
        return array
    raise TypeError(f"{name} must be integers or strings, got dtype {array.dtype}.")


def _label_dataset(group: h5py.Group, name: str, labels: np.ndarray) -> None:
    if labels.dtype.kind == "U":
        width = max(1, max((len(v.encode()) for v in labels.tolist()), default=1))
        text = h5py.string_dtype("utf-8", width)
        group.create_dataset(name, data=np.char.encode(labels, "utf-8").astype(text), dtype=text)
    else:
        group.create_dataset(name, data=labels, dtype=np.int64)


def _read_labels(dataset: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(dataset.dtype) is not None:
        return np.array(dataset.asstr()[()].tolist(), dtype=str)
    return dataset[()].astype(np.int64)


def _bounded_text(text: str, limit: int) -> bytes:
    """UTF-8 bytes of ``text`` cut to ``limit`` bytes without splitting a character."""
    return text.encode()[:limit].decode(errors="ignore").encode()


def _calibration_text(evidence: dict[str, Any] | None) -> bytes:
    """Calibration evidence as JSON of at most ``_CALIBRATION_BYTES``; leading candidates are dropped if needed."""
    if evidence is None:
        return b""
    evidence = dict(evidence)
    candidates = list(evidence.get("candidates", []))
    omitted = 0
    while True:
        text = json.dumps(evidence, sort_keys=True).encode()
        if len(text) <= _CALIBRATION_BYTES or not candidates:
            return _bounded_text(text.decode(), _CALIBRATION_BYTES)
        # The last candidates (the accepted one and its nearest rejections) are the informative ones.
        candidates.pop(0)
        omitted += 1
        evidence.update(candidates=candidates, omitted_candidates=omitted)


def _row_chunks(tail: tuple[int, ...]) -> tuple[int, ...]:
    """Chunk shape for one snapshot row of shape ``tail``, split along the leading axes when too big."""
    chunk = list(tail)
    for axis in range(len(chunk)):
        rest = math.prod(chunk[axis + 1:])
        if math.prod(chunk) <= _MAX_CHUNK_ELEMENTS:
            break
        chunk[axis] = max(1, _MAX_CHUNK_ELEMENTS // max(rest, 1))
    return (1, *[max(1, c) for c in chunk])


def _layout(
    probes: int, train: int, chains: int, draws: int, tokens: int | None = None
) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per-snapshot datasets: name -> (row shape, dtype). ``step`` comes last: it commits a row."""
    text = h5py.string_dtype("utf-8", _STATUS_BYTES)
    per_token = {} if tokens is None else {
        "token_influence": ((probes, tokens, train), np.float32),
        "token_influence_se": ((probes, tokens, train), np.float32),
    }
    return {
        "epoch": ((), np.int64),
        "wall_time": ((), np.float64),
        "duration_s": ((), np.float64),
        "status": ((), text),
        "message": ((), h5py.string_dtype("utf-8", _MESSAGE_BYTES)),
        "influence": ((probes, train), np.float32),
        "correlation": ((probes, train), np.float32),
        "stderr": ((probes, train), np.float32),
        "train_loss": ((train,), np.float32),
        "probe_loss": ((probes,), np.float32),
        "split_half": ((), np.float64),
        "loss_rise": ((), np.float64),
        "ess": ((), np.float64),
        "nbeta": ((), np.float64),
        "step_size": ((), np.float64),
        "calibration": ((), h5py.string_dtype("utf-8", _CALIBRATION_BYTES)),
        "diagnostics/sampling_loss": ((chains, draws), np.float32),
        "diagnostics/draw_loss": ((chains, draws), np.float32),
        "diagnostics/diverged": ((chains,), np.bool_),
        **per_token,
        "step": ((), np.int64),
    }


def _stored_tokens(file: h5py.File) -> int | None:
    """T of a per-token log; ``None`` for logs without a token axis (all logs written before it existed)."""
    return int(file.attrs["tokens"]) if "tokens" in file.attrs else None


def _file_layout(file: h5py.File) -> dict[str, tuple[tuple[int, ...], Any]]:
    return _layout(len(file["probe_ids"]), len(file["train_ids"]), int(file.attrs["chains"]),
                   int(file.attrs["draws"]), _stored_tokens(file))


def _check_format(file: h5py.File, path: PathLike) -> None:
    if file.attrs.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lightning-bif log (no format={FORMAT!r} attribute).")
    version = int(file.attrs["format_version"])
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has log format version {version}, newer than this lightning-bif reads ({FORMAT_VERSION}); "
            "upgrade lightning-bif to read it."
        )


def check_writable(path: PathLike) -> None:
    """Raise now, with the path in the message, if a log cannot be created at ``path``.

    Creates missing parent directories. Meant for the start of training, so that a bad
    ``log_path`` fails in seconds rather than at the first snapshot.

    Raises:
        OSError: The directory cannot be created or written, or ``path`` is a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"The influence log path {path} is a directory; pass a file path like {path}/bif.h5.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".bif-write-test-"):
            pass
    except OSError as error:
        raise OSError(f"Cannot write the influence log at {path}: {error.strerror or error}. "
                      "Choose a log_path in a writable directory.") from error
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"The influence log {path} exists but is not writable; choose another log_path.")


class LogWriter:
    """Appends snapshots to an HDF5 influence log, one row per snapshot, flushed every time.

    Args:
        path: The ``.h5`` file; parent directories are created.
        identity: The run's identity: config, ids, groups, chains and draws.
        if_exists: What to do when ``path`` exists: ``"error"`` (raise), ``"overwrite"``
            (start a new log) or ``"resume"`` (append to it; the stored identity must match).
            Resuming a log whose writer was killed recovers every completed snapshot.

    Example:
        >>> import numpy as np, tempfile, os
        >>> identity = RunIdentity({"sgld": {}}, train_ids=np.arange(5), probe_ids=np.arange(2), chains=2, draws=3)
        >>> path = os.path.join(tempfile.mkdtemp(), "bif.h5")
        >>> with LogWriter(path, identity) as writer:
        ...     writer.append(SnapshotRecord(step=10, epoch=0, wall_time=0.0, duration_s=1.0,
        ...                                  status="failed", result=None, message="out of memory"))
        0
    """

    def __init__(self, path: PathLike, identity: RunIdentity, *, if_exists: str = "error") -> None:
        if if_exists not in _MODES:
            raise ValueError(f"if_exists must be one of {_MODES}, got {if_exists!r}.")
        self.path = Path(path)
        self.identity = identity
        check_writable(self.path)
        if self.path.exists() and if_exists == "error":
            raise FileExistsError(
                f"The influence log {self.path} already exists. Pass if_exists='resume' to append to it "
                "(same run), if_exists='overwrite' to replace it, or choose another path."
            )
        guard = _writer_lock(self.path) if self.path.exists() else None
        try:
            if guard is not None and if_exists == "resume":
                self._file = self._open_existing()
            else:
                if guard is not None:
                    # Unlink rather than truncate: a reader that still has the old file open keeps a valid file.
                    self.path.unlink()
                self._file = self._create()
        except BaseException:
            _unlock(guard)
            raise
        if guard is not None and os.path.samestat(os.fstat(guard), os.stat(self.path)):
            self._lock = guard
        else:  # a new or recovered file: lock the file we will write
            _unlock(guard)
            self._lock = _writer_lock(self.path)
        self._layout = _file_layout(self._file)
        self._steps = self._file["step"][()].astype(np.int64)
        self._file.swmr_mode = True

    def _create(self) -> h5py.File:
        from .. import __version__

        identity = self.identity
        file = h5py.File(self.path, "w", libver=_LIBVER, locking=False)
        file.attrs.update({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": identity.config_json,
            "chains": identity.chains,
            "draws": identity.draws,
            **({} if identity.tokens is None else {"tokens": identity.tokens}),
        })
        for name in ("train_ids", "probe_ids", "train_groups", "probe_groups"):
            labels = getattr(identity, name)
            if labels is not None:
                _label_dataset(file, name, labels)
        layout = _layout(len(identity.probe_ids), len(identity.train_ids), identity.chains, identity.draws,
                         identity.tokens)
        for name, (tail, dtype) in layout.items():
            file.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), chunks=_row_chunks(tail),
                                dtype=dtype, fillvalue=np.nan if np.dtype(dtype).kind == "f" else None)
        file.flush()
        return file

    def _open_existing(self) -> h5py.File:
        with h5py.File(self.path, "r", swmr=True, locking=False) as stored:
            _check_format(stored, self.path)
            self._check_identity(stored)
        try:
            file = h5py.File(self.path, "r+", libver=_LIBVER, locking=False)
        except OSError as error:
            if "already open for read-only" in str(error):
                raise OSError(f"Cannot resume the influence log {self.path}: this process has it open for reading "
                              "(open_log); close that reader first.") from error
            if "already open for write" not in str(error):
                raise
            # The previous writer was killed (no live writer holds _writer_lock) and left the file
            # marked as open for writing; its completed snapshots are intact: copy them to a clean file.
            _recover(self.path)
            file = h5py.File(self.path, "r+", libver=_LIBVER, locking=False)
        # Drop a snapshot in flight when the previous writer died: rows past the last committed step.
        committed = len(file["step"])
        for name in _file_layout(file):
            if len(file[name]) != committed:
                file[name].resize(committed, axis=0)
        return file

    def _check_identity(self, stored: h5py.File) -> None:
        identity = self.identity
        differences = []
        before = flatten_config(json.loads(stored.attrs["config"]))
        now = flatten_config(json.loads(identity.config_json))
        unset = "<unset>"
        changed = sorted(key for key in before.keys() | now.keys() if before.get(key, unset) != now.get(key, unset))
        if changed:
            shown = ", ".join(f"{key}: {before.get(key, unset)!r} -> {now.get(key, unset)!r}" for key in changed[:5])
            differences.append(f"config ({shown}{', ...' if len(changed) > 5 else ''})")
        for name in ("chains", "draws"):
            if int(stored.attrs[name]) != getattr(identity, name):
                differences.append(f"{name} (stored {int(stored.attrs[name])}, now {getattr(identity, name)})")
        if _stored_tokens(stored) != identity.tokens:
            differences.append(f"tokens (stored {_stored_tokens(stored)}, now {identity.tokens})")
        for name in ("train_ids", "probe_ids", "train_groups", "probe_groups"):
            mine = getattr(identity, name)
            theirs = _read_labels(stored[name]) if name in stored else None
            if (mine is None) != (theirs is None) or (
                mine is not None and (mine.shape != theirs.shape or not np.array_equal(mine, theirs))
            ):
                differences.append(name)
        if differences:
            raise ValueError(
                f"Cannot resume the influence log {self.path}: this run differs from the logged one in "
                f"{'; '.join(differences)}. Use the same settings to resume, or pass if_exists='overwrite' "
                "(or a new log path) to start a new log."
            )

    @property
    def steps(self) -> np.ndarray:
        """Training steps of the stored snapshots, ``[S]``."""
        return self._steps.copy()

    def __len__(self) -> int:
        return len(self._steps)

    def append(self, record: SnapshotRecord) -> int:
        """Append one snapshot and flush it to disk.

        Args:
            record: The snapshot; its step must be larger than every stored step.

        Returns:
            The row index of the snapshot.

        Raises:
            ValueError: The step is not increasing, the status is unknown, or an array of the
                result does not match the log's shape.
        """
        if self._file is None:
            raise ValueError(f"The influence log {self.path} is closed.")
        if len(self._steps) and record.step <= self._steps[-1]:
            raise ValueError(
                f"Snapshot step {record.step} is not after the last logged step {int(self._steps[-1])} in "
                f"{self.path}. Steps must increase; after restoring an earlier checkpoint call "
                "truncate_after(step) first."
            )
        if record.status not in STATUSES:
            raise ValueError(f"SnapshotRecord.status must be one of {STATUSES}, got {record.status!r}.")
        values = self._row(record)
        row = len(self._steps)
        for name in self._layout:
            if name != "step":
                self._write(name, row, values[name])
        # The step is the commit marker: it reaches the disk only after the rest of the row did.
        self._file.flush()
        self._write("step", row, values["step"])
        self._file.flush()
        self._steps = np.append(self._steps, np.int64(record.step))
        return row

    def _write(self, name: str, row: int, value: Any) -> None:
        dataset = self._file[name]
        dataset.resize(row + 1, axis=0)
        dataset[row] = value

    def _row(self, record: SnapshotRecord) -> dict[str, Any]:
        values: dict[str, Any] = {
            "step": record.step,
            "epoch": record.epoch,
            "wall_time": record.wall_time,
            "duration_s": record.duration_s,
            "status": _bounded_text(record.status, _STATUS_BYTES),
            "message": _bounded_text(record.message, _MESSAGE_BYTES),
            "step_size": record.used_step_size(),
            "calibration": _calibration_text(record.calibration),
        }
        result = record.result
        if result is None:
            for name, (tail, dtype) in self._layout.items():
                if name not in values:
                    values[name] = np.zeros(tail, bool) if np.dtype(dtype).kind == "b" else np.full(tail, np.nan)
            return values
        d = result.diagnostics
        arrays = {
            "influence": result.influence, "correlation": result.correlation, "stderr": result.stderr,
            "train_loss": result.train_loss, "probe_loss": result.probe_loss,
            "diagnostics/sampling_loss": d.sampling_loss, "diagnostics/draw_loss": d.draw_loss,
            "diagnostics/diverged": d.diverged,
        }
        if "token_influence" in self._layout:
            if result.token_influence is None or result.token_stderr is None:
                raise ValueError(f"The influence log {self.path} stores per-token influence (tokens="
                                 f"{self._layout['token_influence'][0][1]}), but the result has none: run the "
                                 "estimate with SGLDConfig(per_token=True).")
            arrays.update(token_influence=result.token_influence, token_influence_se=result.token_stderr)
        for name, tensor in arrays.items():
            array = np.asarray(tensor.detach().cpu())
            expected = self._layout[name][0]
            if array.shape != expected:
                raise ValueError(
                    f"{name} has shape {array.shape} but the log {self.path} stores {expected} per snapshot "
                    "(probes, train examples, chains and draws are fixed for a log)."
                )
            values[name] = array
        values.update(split_half=d.split_half, loss_rise=d.loss_rise, ess=d.ess, nbeta=d.nbeta)
        return values

    def truncate_after(self, step: int) -> int:
        """Remove the snapshots taken after ``step`` (an abandoned timeline after a checkpoint restore).

        Args:
            step: The last step to keep.

        Returns:
            How many snapshots were removed.
        """
        keep = int(np.searchsorted(self._steps, step, side="right"))
        removed = len(self._steps) - keep
        if removed:
            # ``step`` shrinks first so a live reader never counts a row whose data is gone.
            for name in reversed(self._layout):
                self._file[name].resize(keep, axis=0)
            self._file.flush()
            self._steps = self._steps[:keep]
        return removed

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            _unlock(self._lock)

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _writer_lock(path: Path) -> int | None:
    """Take the advisory lock that one live writer holds on its log; ``None`` where fcntl is unavailable.

    HDF5's own locks are off (see ``_LIBVER``) and a killed writer's file looks like a live one's,
    so this lock, which the OS drops when its process dies, is what tells the two apart.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one writer per log is up to the user
        return None
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        raise OSError(f"The influence log {path} is being written by another LogWriter (another training run "
                      "or process). Wait for it to finish, or choose another log path.") from error
    return descriptor


def _unlock(descriptor: int | None) -> None:
    if descriptor is not None:
        os.close(descriptor)  # closing the descriptor releases its flock


def _recover(path: Path) -> None:
    """Rewrite a log whose writer died into a clean file with the same content."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".recover", delete=False) as tmp:
        target = Path(tmp.name)
    try:
        with h5py.File(path, "r", swmr=True, locking=False) as source, \
                h5py.File(target, "w", libver=_LIBVER, locking=False) as copy:
            copy.attrs.update(dict(source.attrs))
            for name in source:
                source.copy(source[name], copy, name=name)
        os.replace(target, path)
    finally:
        target.unlink(missing_ok=True)


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
    ``tokens``, in other logs; see :meth:`token_trajectory`). ``step_size`` ``[S]`` is the SGLD step
    size each snapshot used, and ``calibration`` is a list ``[S]`` holding the evidence of a
    step-size calibration run before that snapshot (``CalibrationResult.summary()`` as a dict)
    or ``None``. Call :meth:`refresh` to see snapshots appended since opening.

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
        try:
            self._file = h5py.File(self.path, "r", swmr=True, locking=False)
        except OSError as error:
            raise OSError(f"Cannot open the influence log {self.path} as HDF5: {error}") from error
        try:
            _check_format(self._file, self.path)
        except ValueError:
            self._file.close()
            raise
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
        # One handle per dataset for the reader's lifetime: a SWMR refresh applies to the handle it
        # is called on, and a handle opened later can still see stale chunks.
        names = ["step", *(name for name in _file_layout(self._file) if name != "step")]
        self._datasets = {name: self._file[name] for name in names}
        self._load_rows()

    def _load_rows(self) -> None:
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


def open_log(path: PathLike) -> InfluenceLog:
    """Open an influence log for reading (also while training still appends to it).

    Args:
        path: The ``.h5`` file written by ``BIFCallback`` or :class:`LogWriter`.

    Returns:
        An :class:`InfluenceLog`; call ``refresh()`` on it to see newly appended snapshots.

    Example:
        >>> from lightning_bif import open_log
        >>> log = open_log("runs/exp/influence.h5")        # doctest: +SKIP
        >>> log.trajectory(probe=3, train=17).influence    # doctest: +SKIP
    """
    return InfluenceLog(path)
