"""Damaged logs: found at once with a clear error, and every intact snapshot salvaged into a new file.

A log can be damaged by what happens to the disk rather than by the writer: a file truncated by a
full disk or a partial copy, a header overwritten, a row half-written when a flush failed. HDF5's
SWMR reader retries a metadata read whose checksum fails (a live writer may be rewriting that
block), sleeping longer before each attempt; on a damaged file that loop runs for many minutes.
So every open here first checks the file's header (signature, checksum, stored end of file against
the real size, the same check HDF5 skips in SWMR mode) and caps the retries, so a damaged file fails
in well under a second with :class:`DamagedLogError`.

:func:`salvage` reads a damaged file through a view that pads a truncated file with zeros and marks
the file as closed, so HDF5 opens it without retries, then copies each snapshot that reads back
whole and consistent into a new log. The writer uses it to finish the log of a killed run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import io
import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .schema import FORMAT, LIBVER, STATUSES, PathLike, file_layout, row_chunks

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Superblock versions 2 and 3 (every file this package writes: libver v110): 12 bytes of signature,
# version, sizes and status flags, four 8-byte addresses, a 4-byte lookup3 checksum.
_SUPERBLOCK_BYTES = 48
_FLAGS_OFFSET = 11
_EOF_OFFSET = 28
# Metadata read attempts in SWMR mode (HDF5's default is 100, with a doubling sleep between them:
# many minutes on a damaged block). 20 attempts still give a live writer about a second to finish
# rewriting a block, and fail a damaged one in a fraction of a second.
_READ_ATTEMPTS = 20
# How long a header whose stored end of file lies past the real one is re-read while a live writer
# holds the log (a writer extends the file before it records the new end, so this never lasts).
_LIVE_WRITER_WAIT_S = 1.0


class DamagedLogError(ValueError):
    """An influence log that cannot be read as it is: truncated, overwritten or half-written.

    Attributes:
        path: The damaged file.
        problem: What is wrong with it.
        intact: How many leading snapshots read back intact, when that is known (else ``None``).
    """

    def __init__(self, path: PathLike, problem: str, intact: int | None = None) -> None:
        self.path = Path(path)
        self.problem = problem
        self.intact = intact
        kept = "" if intact is None else f" The first {intact} snapshot(s) are intact."
        super().__init__(
            f"The influence log {path} is damaged: {problem}.{kept} Copy every intact snapshot into a new file "
            f"with `lightning-bif repair {path}` (writes {repaired_path(path)}; --in-place replaces the log and "
            "keeps the damaged file), or open_log(path, recover=True)."
        )


def repaired_path(path: PathLike) -> Path:
    """Where :func:`salvage` writes by default: ``bif.h5`` -> ``bif.repaired.h5`` next to it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.repaired{path.suffix or '.h5'}")


# ---------------------------------------------------------------------------------------------- header


def _lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` with seed 0: HDF5's metadata checksum."""
    mask = 0xFFFFFFFF
    rot = lambda x, k: ((x << k) | (x >> (32 - k))) & mask  # noqa: E731
    a = b = c = (0xDEADBEEF + len(data)) & mask
    padded = data + b"\0" * (-len(data) % 12 if data else 12)
    blocks = len(padded) // 12
    for index in range(blocks):
        x, y, z = struct.unpack_from("<3I", padded, 12 * index)
        a, b, c = (a + x) & mask, (b + y) & mask, (c + z) & mask
        if index == blocks - 1:
            break
        a = (a - c) & mask; a ^= rot(c, 4); c = (c + b) & mask  # noqa: E702
        b = (b - a) & mask; b ^= rot(a, 6); a = (a + c) & mask  # noqa: E702
        c = (c - b) & mask; c ^= rot(b, 8); b = (b + a) & mask  # noqa: E702
        a = (a - c) & mask; a ^= rot(c, 16); c = (c + b) & mask  # noqa: E702
        b = (b - a) & mask; b ^= rot(a, 19); a = (a + c) & mask  # noqa: E702
        c = (c - b) & mask; c ^= rot(b, 4); b = (b + a) & mask  # noqa: E702
    if not data:
        return c
    c ^= b; c = (c - rot(b, 14)) & mask  # noqa: E702
    a ^= c; a = (a - rot(c, 11)) & mask  # noqa: E702
    b ^= a; b = (b - rot(a, 25)) & mask  # noqa: E702
    c ^= b; c = (c - rot(b, 16)) & mask  # noqa: E702
    a ^= c; a = (a - rot(c, 4)) & mask  # noqa: E702
    b ^= a; b = (b - rot(a, 14)) & mask  # noqa: E702
    c ^= b; c = (c - rot(b, 24)) & mask  # noqa: E702
    return c


def _superblock(path: Path, head: bytes) -> int | None:
    """The stored end of file of a version 2/3 superblock (``None`` for older versions); raise if damaged."""
    if not head:
        raise DamagedLogError(path, "the file is empty (0 bytes): the run that created it stopped before "
                                    "writing anything, so it holds no snapshots (delete it)")
    if head[:8] != _SIGNATURE:
        raise DamagedLogError(path, "it does not start with the HDF5 signature (overwritten, or not an "
                                    "influence log at all)")
    if head[8] not in (2, 3):
        return None
    if len(head) < _SUPERBLOCK_BYTES:
        raise DamagedLogError(path, f"the file ends inside its HDF5 header ({len(head)} bytes)")
    stored = struct.unpack_from("<I", head, _SUPERBLOCK_BYTES - 4)[0]
    if _lookup3(head[: _SUPERBLOCK_BYTES - 4]) != stored:
        raise DamagedLogError(path, "its HDF5 header fails its checksum (overwritten)")
    return struct.unpack_from("<Q", head, _EOF_OFFSET)[0]


def live_writer(path: PathLike) -> bool:
    """Whether a live :class:`~lightning_bif.log.LogWriter` holds ``path`` (``False`` where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(descriptor)  # also drops the shared lock just taken
    return False


def check_file(path: PathLike) -> None:
    """Raise :class:`DamagedLogError` at once if ``path``'s HDF5 header is damaged or the file is truncated.

    Raises:
        DamagedLogError: Empty file, no HDF5 signature, a header failing its checksum, or a file
            shorter than the end of file its header records.
    """
    path = Path(path)
    deadline = time.monotonic() + _LIVE_WRITER_WAIT_S
    while True:
        with open(path, "rb") as file:
            head = file.read(_SUPERBLOCK_BYTES)
            size = os.fstat(file.fileno()).st_size  # after the header: a live writer only grows the file
        stored_end = _superblock(path, head)
        if stored_end is None or size >= stored_end:
            return
        if not live_writer(path) or time.monotonic() > deadline:
            raise DamagedLogError(path, f"it is truncated: {size:,} bytes of the {stored_end:,} its header "
                                        "records (a full disk, or an interrupted copy)")
        time.sleep(0.05)


@functools.cache
def _hdf5_library() -> ctypes.CDLL | None:
    """The HDF5 library h5py runs on, for the one setting h5py does not expose (Linux only; else ``None``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libhdf5" in line and "libhdf5_hl" not in line}
    except OSError:
        return None
    for candidate in sorted(paths):
        with contextlib.suppress(OSError):
            library = ctypes.CDLL(candidate)
            if hasattr(library, "H5Pset_metadata_read_attempts"):
                return library
    return None


def open_swmr(path: PathLike) -> h5py.File:
    """Open a log for reading in SWMR mode, in bounded time even when it is damaged.

    Raises:
        DamagedLogError: The file is damaged (see :func:`check_file`) or HDF5 cannot open it.
    """
    path = Path(path)
    check_file(path)
    deadline = time.monotonic() + _LIVE_WRITER_WAIT_S
    while True:
        try:
            return _open_swmr(path)
        except PermissionError:
            raise
        except OSError as error:
            if "not already open for SWMR writing" not in str(error):
                raise DamagedLogError(path, f"HDF5 cannot open it ({error})") from error
        # Marked open for writing without SWMR: a writer between opening the file and switching to SWMR
        # (wait for it), or one killed in that moment, whose file no longer changes (read it as it is).
        if not live_writer(path) or time.monotonic() > deadline:
            with damage_as_error(path):
                return h5py.File(_PatchedFile(path), "r", locking=False)
        time.sleep(0.05)


def _open_swmr(path: Path) -> h5py.File:
    library = _hdf5_library()
    if library is None:
        return h5py.File(path, "r", swmr=True, locking=False)
    access = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    access.set_file_locking(False, True)
    library.H5Pset_metadata_read_attempts(ctypes.c_int64(access.id), ctypes.c_uint(_READ_ATTEMPTS))
    return h5py.File(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=access))


@contextlib.contextmanager
def damage_as_error(path: PathLike, intact: int | None = None) -> Iterator[None]:
    """Turn the raw errors of reading a damaged file (a missing attribute or dataset, an unreadable block,
    undecodable text) into one :class:`DamagedLogError`."""
    try:
        yield
    except DamagedLogError:
        raise
    except (KeyError, IndexError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedLogError(path, f"a part of it is missing or unreadable ({type(error).__name__}: {error})",
                              intact) from error
    except (OSError, RuntimeError) as error:
        if isinstance(error, (PermissionError, FileNotFoundError)):
            raise
        raise DamagedLogError(path, f"HDF5 cannot read a part of it ({error})", intact) from error


def first_inconsistent_row(steps: np.ndarray, status: np.ndarray, loss_rise: np.ndarray) -> tuple[int, str] | None:
    """The first row that no writer could have written: an unknown status, a step not after the previous
    one, or an ``ok`` row without a finite loss rise (every ``ok`` estimate has one; a row whose data never
    reached the disk reads as NaN). Only these per-snapshot scalars are read, so the check stays cheap.

    Returns:
        ``(row, what is wrong)``, or ``None`` when every row is consistent.
    """
    for row, (step, state, rise) in enumerate(zip(steps.tolist(), status.tolist(), loss_rise.tolist(), strict=True)):
        if state not in STATUSES:
            return row, f"snapshot row {row} has status {state!r} (a row that was never completely written)"
        if step < 0 or (row and step <= steps[row - 1]):
            return row, f"snapshot row {row} has step {step}, not after the previous row's (a half-written row)"
        if state == "ok" and not np.isfinite(rise):
            return row, f"snapshot row {row} (step {step}) is 'ok' but its values are missing (never written)"
    return None


# ---------------------------------------------------------------------------------------------- salvage


class _PatchedFile(io.RawIOBase):
    """A read-only view of a log file for salvaging: the header says "closed" (no SWMR retries needed or
    possible), a truncated file reads as zero-padded up to its recorded end, and every read that reaches
    past the real end is counted, so a row built from missing bytes is recognised and left out."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = open(path, "rb")  # closed in close()
        self.size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(_SUPERBLOCK_BYTES)
        stored_end = _superblock(path, head)
        self._head = b""
        if stored_end is not None:
            patched = bytearray(head)
            patched[_FLAGS_OFFSET] = 0
            patched[-4:] = struct.pack("<I", _lookup3(bytes(patched[:-4])))
            self._head = bytes(patched)
        self.length = max(self.size, stored_end or 0)
        self.missing_reads = 0
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.length}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self.length - self._position))
        start = self._position
        real = max(0, min(count, self.size - start))
        self._file.seek(start)
        got = self._file.readinto(view[:real]) if real else 0
        view[got:count] = bytes(count - got)
        if got < count:
            self.missing_reads += 1
        if start < len(self._head):
            end = min(len(self._head), start + count)
            view[: end - start] = self._head[start:end]
        self._position += count
        return count

    def close(self) -> None:
        self._file.close()
        super().close()


@dataclass
class SalvageReport:
    """What :func:`salvage` kept and left out.

    Attributes:
        source: The damaged log.
        target: The new log holding every intact snapshot.
        found: Snapshot rows the damaged log records.
        kept: Rows copied, in order.
        lost: ``(row, reason)`` of each row left out.
        lost_columns: Per-snapshot datasets whose header was lost; the new log has them with their fill
            value (NaN, 0 or empty text) in every row.
    """

    source: Path
    target: Path
    found: int
    kept: int
    lost: list[tuple[int, str]] = field(default_factory=list)
    lost_columns: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"salvaged {self.kept} of {self.found} snapshot(s) from {self.source} into {self.target}"]
        if self.lost_columns:
            lines.append(f"  lost columns (empty in every kept row): {', '.join(self.lost_columns)}")
        lines += [f"  left out row {row}: {reason}" for row, reason in self.lost[:20]]
        if len(self.lost) > 20:
            lines.append(f"  ... and {len(self.lost) - 20} more row(s)")
        return "\n".join(lines)


def _datasets(group: h5py.Group, prefix: str = "") -> dict[str, h5py.Dataset]:
    """Every dataset that can still be opened, by path; a damaged object is skipped, not fatal."""
    found: dict[str, h5py.Dataset] = {}
    for name in group:
        try:
            item = group[name]
        except (OSError, RuntimeError, KeyError, ValueError):
            continue
        if isinstance(item, h5py.Group):
            found.update(_datasets(item, f"{prefix}{name}/"))
        elif isinstance(item, h5py.Dataset):
            found[f"{prefix}{name}"] = item
    return found


_READ_ERRORS = (OSError, RuntimeError, ValueError, KeyError, IndexError)
# Without these a snapshot is not a snapshot; any other lost column is recreated empty (see SalvageReport).
_CORE_COLUMNS = frozenset({"step", "status", "influence", "correlation", "stderr", "loss_rise"})


def _column(view: _PatchedFile, dataset: h5py.Dataset, found: int, bad: dict[int, str]) -> list[np.ndarray]:
    """The first ``found`` rows of a per-snapshot dataset; rows that cannot be read whole go into ``bad``.

    One read for the whole column when it succeeds from bytes that are in the file, else row by row
    (the file is opened without a chunk cache, so every row read reaches the file and is checked).
    """
    before = view.missing_reads
    with contextlib.suppress(*_READ_ERRORS):
        values = dataset[:found]
        if view.missing_reads == before:
            for row in range(len(values), found):
                bad.setdefault(row, f"{dataset.name.lstrip('/')} has no row {row}")
            return list(values)
    column = []
    for row in range(found):
        before = view.missing_reads
        try:
            column.append(dataset[row])
        except _READ_ERRORS as error:
            column.append(None)
            bad.setdefault(row, f"{dataset.name.lstrip('/')} is unreadable ({error})")
            continue
        if view.missing_reads != before:
            bad.setdefault(row, f"{dataset.name.lstrip('/')} lies past the end of the truncated file")
    return column


def _row_problem(columns: dict[str, list], row: int, last_step: int | None) -> str | None:
    text = columns["status"][row]
    status = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    step = int(columns["step"][row])
    if status not in STATUSES:
        return f"status {status!r}: never completely written"
    if step < 0 or (last_step is not None and step <= last_step):
        return f"step {step} is not after the previous kept snapshot's"
    if status == "ok" and not (np.isfinite(columns["influence"][row]).all() and np.isfinite(columns["loss_rise"][row])):
        return "status 'ok' with non-finite influence or loss rise (its data never reached the disk)"
    for name, column in columns.items():
        if isinstance(column[row], bytes):
            try:
                text = column[row].decode()
                if name == "calibration" and text:
                    json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError):
                return f"{name} is not readable text (overwritten)"
    return None


def salvage(source: PathLike, target: PathLike | None = None) -> SalvageReport:
    """Copy every intact snapshot of a (damaged) log into a new log.

    A snapshot is kept when every one of its stored values reads back from bytes that are in the
    file, its status is one a writer records, its step comes after the previous kept one, and an
    ``ok`` snapshot's influence is finite. The run's attributes, ids and groups are copied as they are.
    The new file is written under a temporary name next to ``target`` and renamed into place when
    complete, so a crash during salvage leaves no half file at ``target``.

    Args:
        source: The damaged log (left as it is).
        target: Where to write; default :func:`repaired_path` of ``source``. Replaced if it exists.

    Returns:
        A :class:`SalvageReport`.

    Raises:
        DamagedLogError: Nothing can be salvaged: the run's attributes or ids are lost.
        OSError: The new file cannot be written (e.g. no space left: the message says how much is needed).
    """
    source = Path(source)
    return _salvage(source, repaired_path(source) if target is None else Path(target))


def _salvage(source: Path, target: Path, mode: int | None = None, keep_as: Path | None = None) -> SalvageReport:
    """:func:`salvage`; the new file gets ``mode`` when given, and an existing ``target`` is first renamed to
    ``keep_as`` when given (both renames after the copy is complete)."""
    view = _PatchedFile(source)
    try:
        with damage_as_error(source), h5py.File(view, "r", locking=False, rdcc_nbytes=0) as stored:
            attrs = dict(stored.attrs)
            if attrs.get("format") != FORMAT:
                raise DamagedLogError(source, "its lightning-bif attributes are lost: nothing can be salvaged")
            datasets = _datasets(stored)
            per_row = {name: d for name, d in datasets.items() if d.maxshape and d.maxshape[0] is None}
            fixed = {name: d for name, d in datasets.items() if name not in per_row}
            if not {"train_ids", "probe_ids"} <= fixed.keys() or not {"step", "status"} <= per_row.keys():
                raise DamagedLogError(source, "its ids or its step or status column are lost: nothing can be "
                                              "salvaged")
            labels = {name: d[()] for name, d in fixed.items()}
            found = len(per_row["step"])
            bad: dict[int, str] = {}
            columns = {name: _column(view, dataset, found, bad) for name, dataset in per_row.items()}
            # A column whose header is lost is recreated empty (its fill value) rather than losing every row.
            layout = {name: (tail, np.dtype(dtype)) for name, (tail, dtype) in file_layout(stored).items()}
            lost_columns = sorted(set(layout) - set(per_row))
            if set(lost_columns) & _CORE_COLUMNS:
                raise DamagedLogError(source, f"its {', '.join(sorted(set(lost_columns) & _CORE_COLUMNS))} column "
                                              "is lost: no snapshot is intact")
            lost: list[tuple[int, str]] = []
            kept: list[int] = []
            for row in range(found):
                problem = bad.get(row) or _row_problem(columns, row, int(columns["step"][kept[-1]]) if kept else None)
                if problem is None:
                    kept.append(row)
                else:
                    lost.append((row, problem))
            needed = sum(d.dtype.itemsize * int(np.prod(d.shape[1:])) for d in per_row.values()) * len(kept)
            shapes = {name: (d.shape[1:], d.dtype, d.chunks, d.fillvalue) for name, d in per_row.items()}
            shapes.update({name: (tail, dtype, None, None) for name, (tail, dtype) in layout.items()
                           if name in lost_columns})
            _write_log(target, attrs, fixed, labels, shapes, columns, kept, needed, mode, keep_as)
    finally:
        view.close()
    return SalvageReport(source=source, target=target, found=found, kept=len(kept), lost=lost,
                         lost_columns=lost_columns)


def _write_log(target: Path, attrs: dict, fixed: dict[str, h5py.Dataset], labels: dict[str, np.ndarray],
               shapes: dict[str, tuple], columns: dict[str, list], kept: list[int], needed: int,
               mode: int | None, keep_as: Path | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    check_space(target.parent, needed + (1 << 20), f"writing the salvaged log {target}")
    temporary = new_temporary(target, "recover")
    try:
        with h5py.File(temporary, "w", libver=LIBVER, locking=False) as copy:
            copy.attrs.update(attrs)
            for name, dataset in fixed.items():
                copy.create_dataset(name, data=labels[name], dtype=dataset.dtype)
            # ``step`` last, as the writer does: its length is the number of committed rows.
            for name in sorted(shapes, key=lambda n: n == "step"):
                tail, dtype, chunks, fill = shapes[name]
                if fill is None and dtype.kind == "f":
                    fill = np.nan
                out = copy.create_dataset(name, shape=(len(kept), *tail), maxshape=(None, *tail),
                                          chunks=chunks or row_chunks(tail), dtype=dtype, fillvalue=fill,
                                          fletcher32=True)
                if kept and name in columns:
                    out[...] = np.stack([np.asarray(columns[name][row], dtype=dtype) for row in kept])
        if mode is not None:
            os.chmod(temporary, mode)
        if keep_as is not None:
            os.replace(target, keep_as)
        os.replace(temporary, target)
    except OSError as error:
        if error.errno == errno.ENOSPC or "No space" in str(error):
            raise OSError(errno.ENOSPC, f"No space left on the device of {target} while writing the salvaged log "
                                        f"(about {needed / 2**20:.1f} MiB needed); free some space and repair "
                                        "again") from error
        raise
    finally:
        temporary.unlink(missing_ok=True)


def new_temporary(path: Path, kind: str) -> Path:
    """Create an empty, hidden ``.<name>.<pid>.<n>.<kind>`` next to ``path`` with the umask's usual mode.

    (``tempfile`` would make it 0600, and the file becomes the log once renamed.)
    """
    for attempt in range(1000):
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{attempt}.{kind}")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"Cannot create a temporary file next to {path}: remove the .{path.name}.*.{kind} "
                          "files there.")


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"


def check_space(directory: PathLike, needed: int, doing: str) -> None:
    """Raise an ``ENOSPC`` :class:`OSError` naming ``doing`` when ``directory`` has < ``needed`` bytes free."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # no figure to go by: the write itself will tell
    if free < needed:
        raise OSError(errno.ENOSPC, f"Not enough space for {doing}: {_size(needed)} needed, "
                                    f"{_size(free)} free on the filesystem of {directory}. Free some space "
                                    "(or choose a log_path on a larger disk) and try again")


def recover_in_place(path: PathLike) -> SalvageReport:
    """Replace a log whose writer died with a clean copy of its intact snapshots, keeping the file's mode.

    Leftover temporary files of an earlier recovery that was itself killed are removed first (the
    caller holds the log's writer lock, so no other recovery of this log is running).
    """
    path = Path(path)
    remove_stale_temporaries(path)
    check_space(path.parent, path.stat().st_size + (1 << 20),
                f"recovering the influence log {path} (a clean copy of it is written next to it)")
    return _salvage(path, path, mode=path.stat().st_mode & 0o7777)


def remove_stale_temporaries(path: PathLike) -> None:
    """Remove the temporary files next to ``path`` (``.<name>.<pid>.<n>.creating`` or ``.recover``) left by a
    process that was killed while creating or recovering the log; those of a live process are kept."""
    path = Path(path)
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.*.*"):
        pid, _, kind = candidate.name[len(path.name) + 2:].split(".", 2)
        if kind in ("creating", "recover") and pid.isdigit() and not _alive(int(pid)):
            candidate.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process holds the writer lock: a file of its own here is from an earlier attempt
    if sys.platform == "win32":
        return True  # os.kill would terminate the process there; keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def repair(path: PathLike, target: PathLike | None = None, *, in_place: bool = False) -> SalvageReport:
    """Salvage a damaged log into ``target`` (default ``<stem>.repaired.h5``), or replace it (``in_place``).

    With ``in_place`` the damaged file is kept as ``<stem>.damaged.h5`` and the log's path then holds
    the salvaged snapshots, so a training run can resume it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No influence log at {path}.")
    if live_writer(path):
        raise OSError(f"The influence log {path} is being written by a live training run; repair it after that "
                      "run has stopped.")
    if not in_place:
        return salvage(path, target)
    return _salvage(path, path, mode=path.stat().st_mode & 0o7777,
                    keep_as=path.with_name(f"{path.stem}.damaged{path.suffix or '.h5'}"))
