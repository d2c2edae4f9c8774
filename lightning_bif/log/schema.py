"""What an influence log file looks like: format constants, dataset layout and chunking, label encoding.

The writer and the reader share these; nothing outside :mod:`lightning_bif.log` should need them.
:class:`RunIdentity` and :class:`SnapshotRecord` are what a run hands to the writer (and to the
TensorBoard sink).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

if TYPE_CHECKING:
    from ..estimator import BIFResult

FORMAT = "lightning-bif"
FORMAT_VERSION = 2
STATUSES = ("ok", "diverged", "failed")

# Lowest HDF5 format that supports SWMR (readable by HDF5 >= 1.10). Files are opened without OS
# file locks (``locking=False``): a notebook holding the log open must not stop a training run from
# resuming it. A second writer is kept out by ``_writer_lock`` instead.
_LIBVER = ("v110", "latest")
_MAX_ID_BYTES = 256
_STATUS_BYTES = 16
_MESSAGE_BYTES = 1024
_CALIBRATION_BYTES = 4096
# Version 2: per snapshot, the horizon H, the optimizer's η and μ it was read with, the γ used and the least
# Hessian eigenvalue of the saddle check (NaN when a snapshot had no horizon). Version-1 files lack them.
HORIZON_COLUMNS = ("horizon_steps", "learning_rate", "momentum", "localization", "lambda_min")
# Version 2: per snapshot, the automatically chosen sampler settings and their evidence
# (``autotune.Tuning.summary()`` as JSON, cut to this many bytes; empty for a failed snapshot).
_TUNING_BYTES = 4096
# Token strings and training texts (format 2) are display aids: each one is cut to this many UTF-8 bytes.
_MAX_TOKEN_BYTES = 256
_MAX_TEXT_BYTES = 1024
# Largest chunk in elements (4 MiB of float32): one snapshot per chunk unless a row is larger.
_MAX_CHUNK_ELEMENTS = 1 << 20

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
        train_group_names: Optional display name of each train group label, ``{label: name}`` (format
            version 2). Display only: a resumed log keeps the names it was created with.
        probe_group_names: Optional display name of each probe group label.
        probe_tokens: Optional display string of every token of every probe, ``[P][T]`` (needs ``tokens``);
            each string is cut to 256 UTF-8 bytes.
        train_text: Optional display text of every tracked training example, ``[N]``; each is cut to
            1024 UTF-8 bytes.
    """

    config: dict[str, Any]
    train_ids: Any
    probe_ids: Any
    train_groups: Any = None
    probe_groups: Any = None
    chains: int = 4
    draws: int = 200
    tokens: int | None = None
    train_group_names: Any = None
    probe_group_names: Any = None
    probe_tokens: Any = None
    train_text: Any = None

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
        self.train_group_names = _check_group_names(self.train_group_names, self.train_groups, "train")
        self.probe_group_names = _check_group_names(self.probe_group_names, self.probe_groups, "probe")
        if self.probe_tokens is not None:
            if self.tokens is None:
                raise ValueError("RunIdentity.probe_tokens needs a token axis: set tokens (T) as well.")
            self.probe_tokens = _texts(self.probe_tokens, (len(self.probe_ids), self.tokens), "probe_tokens",
                                       _MAX_TOKEN_BYTES)
        if self.train_text is not None:
            self.train_text = _texts(self.train_text, (len(self.train_ids),), "train_text", _MAX_TEXT_BYTES)

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
        step_size = None if self.result is None else self.result.config.step_size
        return math.nan if step_size is None else float(step_size)


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


def _check_group_names(names: Any, groups: Any, kind: str) -> dict[int | str, str] | None:
    """Group display names as ``{label: name}`` with plain int or str labels of the same kind as ``groups``.

    Args:
        names: ``{label: name}`` (labels may be NumPy or tensor scalars), or ``None`` / empty.
        groups: The group label of each example (``[N]`` or ``[P]``), or ``None``.
        kind: ``"train"`` or ``"probe"``, for messages.

    Returns:
        The checked mapping, or ``None`` when ``names`` is empty.

    Raises:
        ValueError: ``names`` is not a mapping, names are given without group labels, or a label is not
            of the kind (integer or string) of the group labels. One exception type: the callback turns
            it into a configuration error on every rank at fit start.
    """
    if not names:
        return None
    if not isinstance(names, Mapping):
        raise ValueError(f"{kind}_group_names must be a mapping {{label: name}}, got {type(names).__name__}.")
    if groups is None:
        raise ValueError(f"{kind}_group_names needs {kind}_groups: names are given per group label.")
    want_int = _labels(groups, f"{kind}_groups").dtype.kind == "i"
    checked: dict[int | str, str] = {}
    for label, name in names.items():
        label = label.item() if hasattr(label, "item") else label
        if isinstance(label, bool) or not isinstance(label, int if want_int else str):
            expected = "an integer" if want_int else "a string"
            raise ValueError(f"{kind}_group_names: label {label!r} is not {expected} like the {kind}_groups labels.")
        checked[label] = str(name)
    return checked


def _store_group_names(file: h5py.File, identity: RunIdentity) -> None:
    """Group names as root attributes holding JSON ``[[label, name], ...]`` (JSON keeps int labels int)."""
    for kind in ("train", "probe"):
        names = getattr(identity, f"{kind}_group_names")
        if names is not None:
            file.attrs[f"{kind}_group_names"] = json.dumps([[label, name] for label, name in names.items()])


def _read_group_names(file: h5py.File, kind: str) -> dict[int | str, str] | None:
    """``{label: name}`` stored by :func:`_store_group_names`; ``None`` in logs without them (all version-1 logs)."""
    text = file.attrs.get(f"{kind}_group_names")
    return None if text is None else {label: name for label, name in json.loads(text)}
def _texts(values: Any, shape: tuple[int, ...], name: str, limit: int) -> np.ndarray:
    """Display strings as an object array of ``shape``, each cut to ``limit`` UTF-8 bytes."""
    array = np.array(values, dtype=object)
    if array.shape != shape:
        raise ValueError(f"RunIdentity.{name} must have shape {list(shape)}, got {list(array.shape)}.")
    if not all(isinstance(v, str) for v in array.flat):
        raise TypeError(f"RunIdentity.{name} must hold strings only.")
    return np.vectorize(lambda v: v.encode()[:limit].decode(errors="ignore"), otypes=[object])(array)


def _text_dataset(group: h5py.Group, name: str, texts: np.ndarray) -> None:
    group.create_dataset(name, data=texts, dtype=h5py.string_dtype("utf-8"))


def _read_texts(group: h5py.Group, name: str) -> np.ndarray | None:
    """A stored ``_texts`` array (object dtype of str), or ``None`` when the log has none (e.g. format 1)."""
    if name not in group:
        return None
    return np.array(group[name].asstr()[()], dtype=object)


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
        **{name: ((), np.float64) for name in HORIZON_COLUMNS},
        "tuning": ((), h5py.string_dtype("utf-8", _TUNING_BYTES)),
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
    """The layout of a stored file: the datasets its format version has (older files lack later columns)."""
    layout = _layout(len(file["probe_ids"]), len(file["train_ids"]), int(file.attrs["chains"]),
                     int(file.attrs["draws"]), _stored_tokens(file))
    return {name: entry for name, entry in layout.items() if name in file}


def _check_format(file: h5py.File, path: PathLike) -> None:
    if file.attrs.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lightning-bif log (no format={FORMAT!r} attribute).")
    version = int(file.attrs["format_version"])
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has log format version {version}, newer than this lightning-bif reads ({FORMAT_VERSION}); "
            "upgrade lightning-bif to read it."
        )
