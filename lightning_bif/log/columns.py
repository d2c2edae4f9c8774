"""The per-snapshot columns of the influence log, declared once.

Every dataset of the HDF5 log that holds one row per snapshot is a :class:`Column` of :data:`COLUMNS`,
and everything else derives from that list: the datasets the writer creates (:func:`layout`) and what
it writes in a row (:func:`value`, :meth:`Column.encode`), the reader's attributes and the fields of
:class:`~lightning_bif.log.Snapshot`, the table of columns in docs/user-guide.md (:func:`markdown_table`;
a test keeps the two equal) and TensorBoard's scalar charts (:attr:`Column.chart`).

Adding a column is one ``Column(...)`` entry below: its dataset name, dtype, shape in the run's axes
(:data:`AXES`), where the value comes from (``source``: an attribute path of the
:class:`~lightning_bif.snapshot.record.SnapshotRecord`, ``record.…``, or of its result, ``result.…``), a
description, and ``since``: the log format version that added it (a new stored column raises
``FORMAT_VERSION``; logs without it read it as ``None``). Then regenerate the docs table with
``python -m lightning_bif.log.columns docs/user-guide.md``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

if TYPE_CHECKING:
    from ..snapshot.record import SnapshotRecord

#: The run's axes a column's shape is written in (the snapshot axis S comes first in every dataset).
AXES = {
    "P": "probes",
    "N": "tracked training examples",
    "T": "tokens per probe (per-token runs only)",
    "C": "chains",
    "D": "draws per chain",
}
#: Axes a run may lack: a column whose shape uses one exists only in logs of runs that have it.
OPTIONAL_AXES = ("T",)
DTYPES = ("int64", "float64", "float32", "bool", "text", "json")
_REDUCTIONS = ("value", "sum", "finite_mean")


@dataclass(frozen=True)
class Chart:
    """How TensorBoard shows a column: one scalar per snapshot under ``bif_diag/<name>``.

    Attributes:
        name: The chart's name in ``BIFCallback(tensorboard=[...])``, and the tag's last part.
        default: Written by default; otherwise opt-in.
        reduce: How a row becomes one scalar: ``"value"`` (a scalar column as it is), ``"sum"`` or
            ``"finite_mean"`` (the mean of the finite entries, NaN when there is none).
    """

    name: str
    default: bool
    reduce: str = "value"

    @property
    def tag(self) -> str:
        """The TensorBoard tag."""
        return f"bif_diag/{self.name}"

    def scalar(self, value: Any) -> float:
        """One scalar of a row's ``value``."""
        if self.reduce == "sum":
            return int(np.asarray(value).sum())
        if self.reduce == "finite_mean":
            array = np.asarray(value, dtype=np.float64)
            finite = array[np.isfinite(array)]
            return float(finite.mean()) if finite.size else float("nan")
        return float(value)


@dataclass(frozen=True)
class Column:
    """One per-snapshot dataset of the log.

    Attributes:
        name: The dataset's path in the file (on disk; never renamed without a format version).
        dtype: One of :data:`DTYPES`: ``"text"`` is a UTF-8 string of at most ``width`` bytes,
            ``"json"`` a JSON object of at most ``width`` bytes (empty when there is none).
        shape: A row's shape in the run's :data:`AXES`, e.g. ``("P", "N")``; ``()`` for a scalar.
        source: Where the writer takes the value: ``record.<attr>`` of the
            :class:`~lightning_bif.snapshot.record.SnapshotRecord` or ``result.<attr>.<attr>`` of its result;
            a method at the end of the path is called. A result column of a snapshot without a
            result, or a path that meets ``None``, stores NaN (float), False (bool) or "" (text, json).
        description: What it holds, for the docs and ``help(Snapshot)``.
        field: The reader's name for it: the :class:`~lightning_bif.log.Snapshot` field and, unless
            ``accessor`` says otherwise, the :class:`~lightning_bif.log.InfluenceLog` attribute.
            Default: the last part of ``name``.
        accessor: The :class:`~lightning_bif.log.InfluenceLog` attribute (``[S]`` array, list, or
            lazy ``RowView``), when it differs from ``field`` (``steps`` for ``step``).
        aliases: Earlier reader names, still readable with a ``DeprecationWarning``.
        since: The log format version that added the column; older logs read it as ``None``.
        chart: How TensorBoard shows it, or ``None``.
        width: Bytes of a ``"text"`` or ``"json"`` value.
        see: A docs page that explains the column (a relative link from docs/), or "".
        encode: For ``"json"`` columns, a function ``(value, width) -> bytes`` that fits a value in
            ``width`` bytes by dropping its least useful parts; default: plain JSON cut to ``width``.
    """

    name: str
    dtype: str
    shape: tuple[str, ...]
    source: str
    description: str
    field: str = ""
    accessor: str = ""
    aliases: tuple[str, ...] = ()
    since: int = 1
    chart: Chart | None = None
    width: int = 0
    see: str = ""
    encode: Callable[[Any, int], bytes] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"Column {self.name}: dtype must be one of {DTYPES}, got {self.dtype!r}.")
        if unknown := [axis for axis in self.shape if axis not in AXES]:
            raise ValueError(f"Column {self.name}: unknown axes {unknown}; use {list(AXES)}.")
        if self.source.split(".")[0] not in ("record", "result"):
            raise ValueError(f"Column {self.name}: source must start with 'record.' or 'result.', got {self.source!r}.")
        if (self.dtype in ("text", "json")) != (self.width > 0):
            raise ValueError(f"Column {self.name}: text and json columns need a width in bytes, others none.")
        if self.chart is not None and self.chart.reduce not in _REDUCTIONS:
            raise ValueError(f"Column {self.name}: chart.reduce must be one of {_REDUCTIONS}.")
        object.__setattr__(self, "field", self.field or self.name.rsplit("/", 1)[-1])
        object.__setattr__(self, "accessor", self.accessor or self.field)

    @property
    def optional(self) -> bool:
        """Whether only some logs of its version have it (those of runs with every axis of its shape)."""
        return any(axis in OPTIONAL_AXES for axis in self.shape)

    @property
    def from_result(self) -> bool:
        """Whether the value comes from the estimate (missing for a snapshot that failed before one)."""
        return self.source.startswith("result.")

    def h5_dtype(self) -> Any:
        """The dtype of the HDF5 dataset."""
        if self.dtype in ("text", "json"):
            return h5py.string_dtype("utf-8", self.width)
        return np.dtype(np.bool_ if self.dtype == "bool" else self.dtype)

    def row_shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """A row's shape given the size of each axis."""
        return tuple(int(sizes[axis]) for axis in self.shape)

    def fill(self, shape: tuple[int, ...]) -> Any:
        """The stored value of a missing one: NaN, False or empty text."""
        if self.dtype in ("text", "json"):
            return b""
        if self.dtype == "bool":
            return np.zeros(shape, bool)
        if self.dtype.startswith("float"):
            return np.full(shape, np.nan)
        raise ValueError(f"The log column {self.name} ({self.source}) has no value: it is required.")

    def encode_value(self, value: Any) -> Any:
        """The stored form of a value (bounded UTF-8 bytes for text and JSON, a NumPy array for tensors)."""
        if self.dtype == "text":
            return _bounded_text(str(value), self.width)
        if self.dtype == "json":
            return (self.encode or _json_text)(value, self.width)
        if hasattr(value, "detach"):
            return np.asarray(value.detach().cpu())
        return np.asarray(value) if self.shape else value

    def python_type(self) -> Any:
        """The type of a :class:`~lightning_bif.log.Snapshot` field holding one row."""
        kind = np.ndarray if self.shape else {"int64": int, "float64": float, "float32": float, "bool": bool,
                                              "text": str, "json": dict[str, Any] | None}[self.dtype]
        return kind | None if self.since > 1 or self.optional else kind


def _bounded_text(text: str, limit: int) -> bytes:
    """UTF-8 bytes of ``text`` cut to ``limit`` bytes without splitting a character."""
    return text.encode()[:limit].decode(errors="ignore").encode()


def _json_text(value: Any, width: int) -> bytes:
    return _bounded_text(json.dumps(value, sort_keys=True, default=float), width)


def _calibration_json(evidence: dict[str, Any], width: int) -> bytes:
    """Calibration evidence as JSON of at most ``width`` bytes; leading candidates are dropped if needed."""
    evidence = dict(evidence)
    candidates = list(evidence.get("candidates", []))
    omitted = 0
    while True:
        text = json.dumps(evidence, sort_keys=True).encode()
        if len(text) <= width or not candidates:
            return _bounded_text(text.decode(), width)
        # The last candidates (the accepted one and its nearest rejections) are the informative ones.
        candidates.pop(0)
        omitted += 1
        evidence.update(candidates=candidates, omitted_candidates=omitted)


def _tuning_json(summary: dict[str, Any], width: int) -> bytes:
    """``Tuning.summary()`` as JSON of at most ``width`` bytes (the eigenvalue list is the only long entry)."""
    text = json.dumps(summary, sort_keys=True, default=float)
    if len(text.encode()) > width:
        summary = {**summary, "top_eigenvalues": (summary.get("top_eigenvalues") or [])[:8]}
        text = json.dumps(summary, sort_keys=True, default=float)
    return _bounded_text(text, width)


def _horizon(name: str, what: str, source: str) -> Column:
    return Column(name, "float64", (), source, f"{what}; NaN for a snapshot without a horizon", since=2,
                  see="[What a snapshot means](horizon.md)")


#: Every per-snapshot column, in :class:`~lightning_bif.log.Snapshot` field order. ``step`` is written
#: last (:func:`layout`): a row counts once its step is on disk.
COLUMNS: tuple[Column, ...] = (
    Column("step", "int64", (), "record.step", "training step of the snapshot (the row's commit marker)",
           accessor="steps"),
    Column("epoch", "int64", (), "record.epoch", "training epoch", accessor="epochs"),
    Column("wall_time", "float64", (), "record.wall_time", "Unix time when the snapshot finished"),
    Column("duration_s", "float64", (), "record.duration_s", "seconds the snapshot took",
           chart=Chart("duration_s", default=False)),
    Column("status", "text", (), "record.status",
           "`ok`, `suspect` (format 3: chains rose beyond what chains near w* rise), `diverged` or `failed`", width=16),
    Column("message", "text", (), "record.message", "why a snapshot failed, diverged or is suspect", width=1024),
    Column("influence", "float32", ("P", "N"), "result.influence",
           "BIF = −Cov(ℓ_train, φ_probe): negative = helps, positive = harms"),
    Column("stderr", "float32", ("P", "N"), "result.stderr", "standard error of each influence entry"),
    Column("correlation", "float32", ("P", "N"), "result.correlation", "posterior correlation of the same pair"),
    Column("train_loss", "float32", ("N",), "result.train_loss", "losses of the tracked training examples at w*"),
    Column("probe_loss", "float32", ("P",), "result.probe_loss", "probe observables at w*"),
    Column("split_half", "float64", (), "result.diagnostics.split_half",
           "correlation between the BIF of two halves of the chains (reliability)",
           chart=Chart("split_half", default=True)),
    Column("loss_rise", "float64", (), "result.diagnostics.loss_rise",
           "mean rise of the tracked losses along the chains above w*", chart=Chart("loss_rise", default=True)),
    Column("ess", "float64", (), "result.diagnostics.ess", "effective sample size of the tracked losses",
           chart=Chart("ess", default=False)),
    Column("nbeta", "float64", (), "result.diagnostics.nbeta", "the nβ used"),
    Column("step_size", "float64", (), "record.used_step_size",
           "the SGLD step size used (the horizon's or the automatic one, the calibrated one, or the configured one)",
           chart=Chart("step_size", default=False)),
    Column("calibration", "json", (), "record.calibration",
           "evidence of a step-size calibration run just before the snapshot (chosen value, every candidate with "
           "its loss rise, drift, bias and verdict), or none", width=4096, encode=_calibration_json),
    Column("diagnostics/sampling_loss", "float32", ("C", "D"), "result.diagnostics.sampling_loss",
           "SGLD minibatch loss per chain and draw", chart=Chart("sampling_loss", default=False, reduce="finite_mean")),
    Column("diagnostics/draw_loss", "float32", ("C", "D"), "result.diagnostics.draw_loss",
           "mean tracked loss per chain and draw"),
    Column("diagnostics/diverged", "bool", ("C",), "result.diagnostics.diverged", "chains left out",
           chart=Chart("diverged_chains", default=True, reduce="sum")),
    Column("token_influence", "float32", ("P", "T", "N"), "result.token_influence",
           "BIF on the loss of each probe token; its mean over T is `influence`"),
    Column("token_influence_se", "float32", ("P", "T", "N"), "result.token_stderr",
           "standard error of each token_influence entry", field="token_stderr", aliases=("token_influence_se",)),
    _horizon("horizon_steps", "the horizon H", "result.config.horizon_steps"),
    _horizon("learning_rate", "the optimizer's η the horizon was read with", "result.config.learning_rate"),
    _horizon("momentum", "the optimizer's μ the horizon was read with", "result.config.momentum"),
    Column("localization", "float64", (), "result.config.localization",
           "the γ used: the horizon's (or the run's) raised to the localization floor, the floor, or as configured",
           since=2,
           see="[The localization floor](self-tuning.md#the-localization-floor)"),
    _horizon("lambda_min", "the least Hessian eigenvalue of the saddle check", "result.diagnostics.horizon.lambda_min"),
    Column("tuning", "json", (), "result.diagnostics.tuning.summary",
           "the settings the snapshot chose by itself and their evidence, or none", since=2, width=4096,
           see="[Self-tuning](self-tuning.md)", encode=_tuning_json),
    Column("vectorized", "bool", (), "result.diagnostics.vectorized",
           "whether the chains ran together under torch.func.vmap; else one after another, and under "
           "`vectorize=\"auto\"` `message` says why", since=3,
           see="[vmap](lightning.md#vmap-decided-once-for-every-function-a-snapshot-runs)"),
    *(Column(name, dtype, (), f"result.diagnostics.precision.{attr}", description, since=3, chart=chart,
             see="[Precision on demand](self-tuning.md#precision-on-demand)")
      for name, dtype, attr, description, chart in (
          ("target_split_half", "float64", "target", "the split-half reliability the rounds of chains aimed at; NaN "
           "without a target", None),
          ("chains_used", "float64", "chains", "chains the snapshot ran, over all rounds (the chain axis C is the "
           "most the rounds may run; the rows beyond are NaN)", Chart("chains_used", default=True)),
          ("draws_used", "float64", "draws", "draws kept per chain", None),
          ("rounds", "float64", "rounds", "rounds of chains (1: no chains added)", None),
          ("budget_ran_out", "bool", "budget_ran_out", "the time budget (`max_seconds`, the callback's `overhead`) or "
           "`max_chains` stopped the rounds before the target", None),
          ("below_target", "bool", "below_target", "the split-half stayed below the target (`message` says by how "
           "much, what limited it and what reaching it would cost)", Chart("below_target", default=True)),
      )),
)
BY_NAME: dict[str, Column] = {column.name: column for column in COLUMNS}
#: Deprecated reader names -> the current ones.
ALIASES: dict[str, str] = {alias: column.field for column in COLUMNS for alias in column.aliases}


def layout(sizes: Mapping[str, int | None]) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The per-snapshot datasets of a run: name -> (row shape, HDF5 dtype), ``step`` last (it commits a row).

    Args:
        sizes: The size of each axis of :data:`AXES`; ``None`` for an axis the run lacks (its columns
            are left out).
    """
    present = [column for column in COLUMNS if all(sizes.get(axis) is not None for axis in column.shape)]
    ordered = [column for column in present if column.name != "step"] + [BY_NAME["step"]]
    return {column.name: (column.row_shape(sizes), column.h5_dtype()) for column in ordered}


def value(column: Column, record: SnapshotRecord) -> Any:
    """The raw value of ``column`` in ``record`` (a tensor, number, str or dict), or ``None`` when it has none."""
    root, *path = column.source.split(".")
    current: Any = record if root == "record" else record.result
    for name in path:
        if current is None:
            return None
        current = getattr(current, name)
    return current() if callable(current) else current


def markdown_table() -> str:
    """The docs table of every column (docs/user-guide.md holds this text between its ``columns`` markers)."""
    lines = ["| dataset | shape | type | reader | TensorBoard | content |", "|---|---|---|---|---|---|"]
    for column in COLUMNS:
        shape = "[" + ", ".join(("S", *column.shape)) + "]"
        kind = f"{column.dtype} (≤ {column.width} bytes)" if column.width else column.dtype
        reader = f"`log.{column.accessor}`"
        if column.accessor != column.field:
            reader += f", `Snapshot.{column.field}`"
        reader += "".join(f" (was `{alias}`)" for alias in column.aliases)
        chart = "" if column.chart is None else f"`{column.chart.tag}`" + ("" if column.chart.default else " (opt-in)")
        notes = [f"format {column.since}"] if column.since > 1 else []
        if column.optional:
            notes.append("per-token runs only")
        content = column.description + (f" ({'; '.join(notes)})" if notes else "")
        if column.see:
            content += f"; {column.see}"
        lines.append(f"| `{column.name}` | {shape} | {kind} | {reader} | {chart} | {content} |")
    return "\n".join(lines)


START, END = "<!-- columns: generated by python -m lightning_bif.log.columns -->", "<!-- end of columns -->"


def documented_table(text: str) -> str:
    """The table between the ``columns`` markers of a docs page.

    Raises:
        ValueError: The page lacks the markers.
    """
    if START not in text or END not in text:
        raise ValueError(f"No generated columns table: the page lacks the markers {START!r} ... {END!r}.")
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def update_docs(path: str | Path) -> bool:
    """Rewrite the table between the ``columns`` markers of ``path``; whether it changed."""
    path = Path(path)
    text = path.read_text()
    old = documented_table(text)
    new = markdown_table()
    if old == new:
        return False
    before, rest = text.split(START, 1)
    path.write_text(f"{before}{START}\n{new}\n{END}{rest.split(END, 1)[1]}")
    return True


if __name__ == "__main__":
    for page in sys.argv[1:] or ["docs/user-guide.md"]:
        print(f"{page}: {'updated' if update_docs(page) else 'up to date'}")
