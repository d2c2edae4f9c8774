"""Appending snapshots to an influence log: :class:`LogWriter`, its file lock and crash recovery.

The writer works in HDF5's single-writer/multiple-reader (SWMR) mode and flushes after every
snapshot, so a reader in another process sees each completed snapshot and a crash loses at most
the snapshot in flight.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..snapshot.record import SnapshotRecord
from ..version import __version__
from . import columns
from .recover import (
    SalvageReport,
    check_space,
    damage_as_error,
    new_temporary,
    open_swmr,
    recover_in_place,
    remove_stale_temporaries,
)
from .schema import (
    FORMAT,
    FORMAT_VERSION,
    LIBVER,
    STATUSES,
    PathLike,
    RunIdentity,
    check_format,
    file_layout,
    read_labels,
    read_texts,
    row_chunks,
    stored_tokens,
    write_group_names,
    write_labels,
    write_texts,
)
from .summaries import flatten_config

_MODES = ("error", "overwrite", "resume")
# A snapshot is written only when the log's filesystem has room for everything appending it can
# allocate (row_space): HDF5 that runs out of space mid-flush leaves half-written metadata. Per
# dataset and row: one chunk (its data and a 4-byte Fletcher-32 checksum) and its entry in the chunk
# index (an extensible array: 16 bytes per chunk with filters); now and then the index allocates a new
# data block for the rows to come, never more entries than the rows already stored (measured: at row
# 116 of a 26-dataset log, 60 entries per dataset; at row 2036, 235). _SLACK covers the filesystem's
# block rounding and object headers rewritten at the flush. On a real 1 MiB tmpfs this writes 93 rows
# of 9.8 KB where 99 fit, and HDF5 never met a full disk (docs/reliability.md).
_CHUNK_OVERHEAD = 64
_INDEX_ENTRY = 16
_MIN_INDEX_BLOCK = 64
_SLACK = 16 << 10


def row_space(row_bytes: int, datasets: int, rows: int) -> int:
    """Bytes to have free before appending a row of ``row_bytes`` over ``datasets`` datasets to a log of ``rows``."""
    return row_bytes + datasets * (_CHUNK_OVERHEAD + _INDEX_ENTRY * max(rows, _MIN_INDEX_BLOCK)) + _SLACK


class LogWriteError(OSError):
    """A snapshot could not be written to the log (e.g. no space left, an I/O error).

    The row is not in the log (nothing of it is counted as a snapshot), the snapshots before it are
    intact, and the writer stays usable: a later append is tried again.
    """


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
    blocking = next((parent for parent in reversed(path.parents) if parent.is_file()), None)
    if blocking is not None:
        raise NotADirectoryError(f"Cannot write the influence log at {path}: {blocking} is a file, not a directory. "
                                 "Choose a log_path whose parent directories are directories (or can be created).")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"Cannot write the influence log at {path}: {error.strerror or error}. "
                      "Choose a log_path in a writable directory.") from error
    error = _unwritable(path.parent)
    if error is not None:
        raise OSError(f"Cannot write the influence log at {path}: {error}. "
                      "Choose a log_path in a writable directory.")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"The influence log {path} exists but is not writable; choose another log_path.")


def _unwritable(directory: Path) -> str | None:
    """Why ``directory`` cannot take a new file, or ``None``: without leaving a file behind, even when killed.

    An unnamed ``O_TMPFILE`` (Linux) is created and closed; where the file system has none, ``os.access``.
    A named probe file would stay behind if the process were killed while it exists.
    """
    flag = getattr(os, "O_TMPFILE", None)
    if flag is not None:
        try:
            os.close(os.open(directory, flag | os.O_WRONLY, 0o600))
            return None
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                return error.strerror or str(error)
    return None if os.access(directory, os.W_OK | os.X_OK) else f"{directory} is not writable"


def _creation_error(path: Path, error: OSError) -> OSError:
    """``error`` from creating the log's temporary file, told with the user's ``path`` (not our temporary name)."""
    reason = os.strerror(error.errno) if error.errno else "the file could not be created"  # h5py's text names it
    return type(error)(f"Cannot write the influence log at {path}: {reason} (while creating it under a temporary "
                       "name beside it). Choose another log_path.")


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
        #: What crash recovery salvaged when this writer resumed a log whose writer was killed, else None.
        self.recovered: SalvageReport | None = None
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
                self._file = self._create()
        except BaseException:
            _unlock(guard)
            raise
        if guard is not None and os.path.samestat(os.fstat(guard), os.stat(self.path)):
            self._lock = guard
        else:  # a new or recovered file: lock the file we will write
            _unlock(guard)
            self._lock = _writer_lock(self.path)
        self._layout = file_layout(self._file)
        # One handle per dataset for the writer's lifetime: a handle closed after each write would flush its
        # chunks while being freed, where a failed write (a full disk) is only printed, never raised.
        self._datasets = {name: self._file[name] for name in self._layout}
        self._steps = self._file["step"][()].astype(np.int64)
        self._row_bytes = sum(math.prod(tail) * np.dtype(dtype).itemsize for tail, dtype in self._layout.values())
        if not self._file.swmr_mode:
            self._file.swmr_mode = True

    def _create(self) -> h5py.File:
        """Build the new log under a temporary name and rename it into place once it is complete.

        A reader then finds either no file or a complete one in SWMR mode; a failure (a full disk)
        leaves nothing behind; an existing log is replaced in one step, and a reader that still has
        it open keeps a valid file.
        """
        remove_stale_temporaries(self.path)
        try:
            temporary = new_temporary(self.path, "creating")
        except OSError as error:
            if not error.filename:  # our own message (too many temporaries) already names the path
                raise
            raise _creation_error(self.path, error) from error
        file = None
        try:
            file = self._build(temporary)
            file.flush()
            file.swmr_mode = True
            os.replace(temporary, self.path)
        except BaseException as error:
            if file is not None:
                with contextlib.suppress(Exception):
                    file.close()
            temporary.unlink(missing_ok=True)
            if isinstance(error, OSError) and temporary.name in str(error):
                raise _creation_error(self.path, error) from error
            raise
        return file

    def _build(self, path: Path) -> h5py.File:

        identity = self.identity
        file = h5py.File(path, "w", libver=LIBVER, locking=False)
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
                write_labels(file, name, labels)
        write_group_names(file, identity)
        for name in ("probe_tokens", "train_text"):
            texts = getattr(identity, name)
            if texts is not None:
                write_texts(file, name, texts)
        for name, (tail, dtype) in columns.layout(identity.sizes).items():
            # fletcher32: a checksum per chunk, so bytes overwritten inside a snapshot's data are found when read.
            file.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), chunks=row_chunks(tail),
                                dtype=dtype, fillvalue=np.nan if np.dtype(dtype).kind == "f" else None,
                                fletcher32=True)
        return file

    def _open_existing(self) -> h5py.File:
        with open_swmr(self.path) as stored, damage_as_error(self.path):
            check_format(stored, self.path)
            self._check_identity(stored)
        try:
            file = h5py.File(self.path, "r+", libver=LIBVER, locking=False)
        except OSError as error:
            if "already open for read-only" in str(error):
                raise OSError(f"Cannot resume the influence log {self.path}: this process has it open for reading "
                              "(open_log); close that reader first.") from error
            if "already open for write" not in str(error):
                raise
            # The previous writer was killed (no live writer holds _writer_lock) and left the file
            # marked as open for writing; its completed snapshots are intact: copy them to a clean file.
            self.recovered = recover_in_place(self.path)
            file = h5py.File(self.path, "r+", libver=LIBVER, locking=False)
        # Rows written from now on may hold statuses older versions do not know ("suspect", format 3): such
        # a version must say "newer format", not "damaged". Attributes cannot change once SWMR is on.
        if int(file.attrs["format_version"]) < FORMAT_VERSION:
            file.attrs["format_version"] = FORMAT_VERSION
        # SWMR at once: until then the file is marked open for writing without SWMR, which readers cannot open.
        file.swmr_mode = True
        # Drop a snapshot in flight when the previous writer died: rows past the last committed step.
        committed = len(file["step"])
        for name in file_layout(file):
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
        if stored_tokens(stored) != identity.tokens:
            differences.append(f"tokens (stored {stored_tokens(stored)}, now {identity.tokens})")
        for name in ("train_ids", "probe_ids", "train_groups", "probe_groups"):
            mine = getattr(identity, name)
            theirs = read_labels(stored[name]) if name in stored else None
            if (mine is None) != (theirs is None) or (
                mine is not None and (mine.shape != theirs.shape or not np.array_equal(mine, theirs))
            ):
                differences.append(name)
        for name in ("probe_tokens", "train_text"):
            mine, theirs = getattr(identity, name), read_texts(stored, name)
            if (mine is None) != (theirs is None) or (mine is not None and not np.array_equal(mine, theirs)):
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
        try:
            check_space(self.path.parent, row_space(self._row_bytes, len(self._layout), row), "the snapshot")
        except OSError as error:
            raise LogWriteError(
                error.errno, f"The snapshot at step {record.step} could not be written to the influence log "
                             f"{self.path} ({error.strerror}); it is left out, the {row} snapshot(s) before it "
                             "are intact"
            ) from error
        try:
            for name in self._layout:
                if name != "step":
                    self._write(name, row, values[name])
            # The step is the commit marker: it reaches the disk only after the rest of the row did.
            self._file.flush()
            self._write("step", row, values["step"])
            self._file.flush()
        except (OSError, RuntimeError) as error:
            self._roll_back(row)
            code, reason = _os_error(error)
            raise LogWriteError(
                code, f"The snapshot at step {record.step} could not be written to the influence log {self.path} "
                      f"({reason}); it is left out, the {row} snapshot(s) before it are intact"
            ) from error
        self._steps = np.append(self._steps, np.int64(record.step))
        return row

    def write(self, record: SnapshotRecord) -> None:
        """:meth:`append`, as a snapshot sink (:class:`~lightning_bif.snapshot.snapshotter.SnapshotSink`)."""
        self.append(record)

    def _roll_back(self, row: int) -> None:
        """Shrink every dataset back to ``row`` rows after a failed append (best effort: the disk may still fail)."""
        for name in reversed(self._layout):
            with contextlib.suppress(Exception):
                if len(self._datasets[name]) > row:
                    self._datasets[name].resize(row, axis=0)
        with contextlib.suppress(Exception):
            self._file.flush()

    def _write(self, name: str, row: int, value: Any) -> None:
        dataset = self._datasets[name]
        dataset.resize(row + 1, axis=0)
        dataset[row] = value

    def _row(self, record: SnapshotRecord) -> dict[str, Any]:
        """The stored value of every column of this log (:mod:`~lightning_bif.log.columns`) for ``record``."""
        values: dict[str, Any] = {}
        for name, (tail, _) in self._layout.items():
            column = columns.BY_NAME[name]
            raw = columns.value(column, record)
            if raw is None:
                if column.shape and record.result is not None and column.from_result:
                    what = f"per-token influence (tokens={tail[1]})" if column.optional else f"{name} {tail}"
                    hint = ": run the estimate with SGLDConfig(per_token=True)" if column.optional else ""
                    raise ValueError(f"The influence log {self.path} stores {what}, but the result has none{hint}.")
                values[name] = column.fill(tail)
                continue
            stored = column.encode_value(raw)
            if column.shape[:1] == ("C",) and stored.shape[0] < tail[0]:  # fewer chains than rounds may run
                stored = np.concatenate([stored, column.fill((tail[0] - stored.shape[0], *stored.shape[1:]))])
            if column.shape and stored.shape != tail:
                raise ValueError(
                    f"{name} has shape {stored.shape} but the log {self.path} stores {tail} per snapshot "
                    "(probes, train examples, chains and draws are fixed for a log)."
                )
            values[name] = stored
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
                self._datasets[name].resize(keep, axis=0)
            self._file.flush()
            self._steps = self._steps[:keep]
        return removed

    def close(self) -> None:
        """Flush and close the file (idempotent).

        Raises:
            LogWriteError: The final flush failed (e.g. no space left); the file is closed all the same.
        """
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            file.close()
        except (OSError, RuntimeError) as error:
            code, reason = _os_error(error)
            raise LogWriteError(code, f"Closing the influence log {self.path} failed ({reason})") from error
        finally:
            _unlock(self._lock)

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _os_error(error: BaseException) -> tuple[int, str]:
    """The OS error behind an h5py write error: ``(errno, "strerror: what HDF5 was doing")``."""
    text = str(error)
    found = re.search(r"errno = (\d+)", text)
    code = getattr(error, "errno", None) or (int(found.group(1)) if found else 0)
    doing = text.split(" (", 1)[0]
    return code, f"{os.strerror(code)}: {doing}" if code else text


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

