"""What an influence log file looks like: format constants, the run's identity, chunking, label encoding.

The writer and the reader share these; nothing outside :mod:`lightning_bif.log` should need them. The
per-snapshot datasets are declared in :mod:`lightning_bif.log.columns`. :class:`RunIdentity` is what a
run hands to the writer (and to the TensorBoard sink) once; :class:`~lightning_bif.snapshot.record.SnapshotRecord`
(re-exported here) what it hands them per snapshot.
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

from ..estimation.rounds import chain_capacity
from ..snapshot.record import SnapshotRecord as SnapshotRecord
from .columns import layout

if TYPE_CHECKING:
    from ..config import SGLDConfig
    from ..snapshot.snapshotter import Snapshotter

FORMAT = "lightning-bif"
FORMAT_VERSION = 3
# Format 3 adds "suspect": chains that rose beyond what chains near w* rise, short of diverging.
STATUSES = ("ok", "suspect", "diverged", "failed")

# Lowest HDF5 format that supports SWMR (readable by HDF5 >= 1.10). Files are opened without OS
# file locks (``locking=False``): a notebook holding the log open must not stop a training run from
# resuming it. A second writer is kept out by the writer's own lock instead.
LIBVER = ("v110", "latest")
_MAX_ID_BYTES = 256
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
            stores ``token_influence`` and its standard error ``[S, P, T, N]``. ``None``: no token axis.
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

    @classmethod
    def for_snapshots(
        cls, snapshotter: Snapshotter, config: SGLDConfig, *, tokens: int | None = None,
        settings: dict[str, Any] | None = None, **labels: Any,
    ) -> RunIdentity:
        """The identity of a log of ``snapshotter``'s snapshots taken with ``config``.

        Args:
            snapshotter: The :class:`~lightning_bif.snapshot.snapshotter.Snapshotter` (its examples give the ids).
            config: The snapshots' settings (stored as ``config["sgld"]``; C and D size the diagnostics).
            tokens: Tokens per probe of a per-token config (``Snapshotter.check_losses`` returns it).
            settings: More JSON-compatible settings stored next to ``"sgld"`` (e.g. the callback's).
            **labels: The optional labels: ``train_groups``, ``probe_groups``, ``train_group_names``,
                ``probe_group_names``, ``probe_tokens``, ``train_text``.
        """
        train_ids, probe_ids = snapshotter.example_ids()
        return cls(config={"sgld": config.to_dict(), **(settings or {})}, train_ids=train_ids, probe_ids=probe_ids,
                   chains=chain_capacity(config), draws=snapshotter.planned_draws(config), tokens=tokens, **labels)

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
    def sizes(self) -> dict[str, int | None]:
        """The size of each axis of :data:`~lightning_bif.log.columns.AXES` (``T``: ``None`` without tokens)."""
        return {"P": len(self.probe_ids), "N": len(self.train_ids), "C": self.chains, "D": self.draws,
                "T": self.tokens}

    @property
    def config_json(self) -> str:
        """The config as canonical JSON (sorted keys), as stored in the file."""
        return json.dumps(self.config, sort_keys=True)


def _labels(values: Any, name: str) -> np.ndarray:
    """Ids or group labels as a 1-D int64 or str array; other kinds are an error."""
    if isinstance(values, (list, tuple)) and len({isinstance(v, (str, np.str_)) for v in values}) > 1:
        raise TypeError(f"{name} must be all integers or all strings.")  # NumPy would turn the integers into text
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


def write_group_names(file: h5py.File, identity: RunIdentity) -> None:
    """Group names as root attributes holding JSON ``[[label, name], ...]`` (JSON keeps int labels int)."""
    for kind in ("train", "probe"):
        names = getattr(identity, f"{kind}_group_names")
        if names is not None:
            file.attrs[f"{kind}_group_names"] = json.dumps([[label, name] for label, name in names.items()])


def read_group_names(file: h5py.File, kind: str) -> dict[int | str, str] | None:
    """``{label: name}`` stored by :func:`write_group_names`; ``None`` in logs without them (all version-1 logs)."""
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


def write_texts(group: h5py.Group, name: str, texts: np.ndarray) -> None:
    """Store display strings (checked by ``RunIdentity``) as a variable-length UTF-8 dataset."""
    group.create_dataset(name, data=texts, dtype=h5py.string_dtype("utf-8"))


def read_texts(group: h5py.Group, name: str) -> np.ndarray | None:
    """A stored ``_texts`` array (object dtype of str), or ``None`` when the log has none (e.g. format 1)."""
    if name not in group:
        return None
    return np.array(group[name].asstr()[()], dtype=object)


def write_labels(group: h5py.Group, name: str, labels: np.ndarray) -> None:
    """Store ids or group labels: int64, or fixed-length UTF-8 as wide as the longest label."""
    if labels.dtype.kind == "U":
        width = max(1, max((len(v.encode()) for v in labels.tolist()), default=1))
        text = h5py.string_dtype("utf-8", width)
        group.create_dataset(name, data=np.char.encode(labels, "utf-8").astype(text), dtype=text)
    else:
        group.create_dataset(name, data=labels, dtype=np.int64)


def read_labels(dataset: h5py.Dataset) -> np.ndarray:
    """Ids or group labels stored by :func:`write_labels`, as an int64 or str array."""
    if h5py.check_string_dtype(dataset.dtype) is not None:
        return np.array(dataset.asstr()[()].tolist(), dtype=str)
    return dataset[()].astype(np.int64)


def row_chunks(tail: tuple[int, ...]) -> tuple[int, ...]:
    """Chunk shape for one snapshot row of shape ``tail``, split along the leading axes when too big."""
    chunk = list(tail)
    for axis in range(len(chunk)):
        rest = math.prod(chunk[axis + 1:])
        if math.prod(chunk) <= _MAX_CHUNK_ELEMENTS:
            break
        chunk[axis] = max(1, _MAX_CHUNK_ELEMENTS // max(rest, 1))
    return (1, *[max(1, c) for c in chunk])


def stored_tokens(file: h5py.File) -> int | None:
    """T of a per-token log; ``None`` for logs without a token axis (all logs written before it existed)."""
    return int(file.attrs["tokens"]) if "tokens" in file.attrs else None


def file_layout(file: h5py.File) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The per-snapshot datasets a stored file has (older format versions lack later columns), name -> entry.

    The entries are those of :func:`~lightning_bif.log.columns.layout`: (row shape, HDF5 dtype), ``step`` last.
    """
    sizes = {"P": len(file["probe_ids"]), "N": len(file["train_ids"]), "C": int(file.attrs["chains"]),
             "D": int(file.attrs["draws"]), "T": stored_tokens(file)}
    return {name: entry for name, entry in layout(sizes).items() if name in file}


def check_format(file: h5py.File, path: PathLike) -> None:
    """Raise ``ValueError`` unless ``file`` is a lightning-bif log of a format version this package reads."""
    if file.attrs.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lightning-bif log (no format={FORMAT!r} attribute).")
    version = int(file.attrs["format_version"])
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has log format version {version}, newer than this lightning-bif reads ({FORMAT_VERSION}); "
            "upgrade lightning-bif to read it."
        )
