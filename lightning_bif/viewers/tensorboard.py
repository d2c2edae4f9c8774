"""TensorBoard sink: group curves a reader can tell apart, a labelled influence matrix, a few diagnostics.

Per snapshot (``step`` is the training step) it writes, by default:

- ``bif_x_nbeta/probes_<probe group>`` in one run per train group (``<log dir>/train_<train group>``),
  so TensorBoard draws each probe group as one chart with a line per train group in its own colour.
  The value is nβ × the mean BIF of the train group on the probe group: the same sign (negative =
  helps), in units where a damped classical influence function is O(1), so that late-training
  values near 1e-5 do not round to 0 in TensorBoard's tables. Divide by nβ (in the log) for BIF.
- ``bif/matrix`` (Images): the ``[probe, train]`` matrix of the snapshot as a labelled figure
  (:func:`lightning_bif.viewers.plot.matrix_figure`): sorted by group, group borders, axis labels, a
  symmetric colour bar, **blue = helps, red = harms**.
- ``bif_diag/split_half``, ``bif_diag/loss_rise``, ``bif_diag/diverged_chains``; and
  ``bif_diag/status`` (Text) for every snapshot that is not ``ok``.

The ``bif_diag/`` scalars are the log columns that declare a chart (:attr:`lightning_bif.log.columns.Column.chart`).
Opt in to more with ``charts`` (``BIFCallback(tensorboard=[...])``): ``duration_s``, ``ess``, ``step_size``,
``sampling_loss`` (scalars under ``bif_diag/``), ``histogram`` (``bif/influence_hist``) and
``groups_figure`` (``bif/groups``, Images: :func:`lightning_bif.viewers.plot.plot_groups` of the log so far,
with a log step axis and a colour per train group; it re-reads the log and draws a figure of
several panels at every snapshot, so it costs seconds per snapshot).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..log import PathLike, RunIdentity, open_log
from ..log.columns import COLUMNS, Column, value
from ..log.summaries import group_labels, group_means
from ..snapshot.record import SnapshotRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

# Scalar charts: the log columns that declare one, by chart name.
SCALAR_CHARTS: dict[str, Column] = {column.chart.name: column for column in COLUMNS if column.chart is not None}
DEFAULT_CHARTS = ("groups", "matrix", *(name for name, c in SCALAR_CHARTS.items() if c.chart.default), "status")
OPTIONAL_CHARTS = (*(name for name, c in SCALAR_CHARTS.items() if not c.chart.default), "histogram", "groups_figure")
GROUP_TAG = "bif_x_nbeta/probes_{}"
_DPI = 100


def _tag_part(label: Any) -> str:
    """A group label as one tag or directory component (TensorBoard splits tags on '/')."""
    return re.sub(r"[^\w.\-]+", "_", str(label)) or "_"


def check_charts(charts: bool | Collection[str]) -> tuple[str, ...]:
    """The charts to write: ``True`` for :data:`DEFAULT_CHARTS`, ``"all"``, or a collection of names.

    Raises:
        ValueError: An unknown chart name.
    """
    if charts is True:
        return DEFAULT_CHARTS
    if charts is False:
        return ()
    if charts == "all":
        return DEFAULT_CHARTS + OPTIONAL_CHARTS
    if isinstance(charts, str):
        charts = (charts,)
    unknown = sorted(set(charts) - set(DEFAULT_CHARTS) - set(OPTIONAL_CHARTS))
    if unknown:
        raise ValueError(f"Unknown TensorBoard chart(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(DEFAULT_CHARTS + OPTIONAL_CHARTS)}, or True (defaults) / 'all'.")
    return tuple(name for name in DEFAULT_CHARTS + OPTIONAL_CHARTS if name in charts)


def figure_image(figure: Figure, dpi: int = _DPI) -> np.ndarray:
    """A matplotlib figure rendered as an RGB image ``[H, W, 3]`` (uint8), without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure.set_dpi(dpi)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class TensorBoardSink:
    """Writes each BIF snapshot to TensorBoard: group curves (a run per train group), a matrix figure, diagnostics.

    Args:
        writer: A ``SummaryWriter`` (Lightning's ``TensorBoardLogger.experiment`` is one); the
            train-group runs are written next to its events, in ``<log_dir>/train_<group>``.
        identity: The run identity; its ``train_groups``/``probe_groups`` define the curves
            (without groups everything is one group called ``"all"``).
        train_group_names: Optional display names of train group labels, e.g. ``{0: "zeros"}``.
        probe_group_names: Optional display names of probe group labels.
        charts: Which charts to write: ``True`` (:data:`DEFAULT_CHARTS`), ``"all"``, or names from
            :data:`DEFAULT_CHARTS` and :data:`OPTIONAL_CHARTS`.
        log_path: The HDF5 log the snapshots are appended to (before they reach the sink); needed
            by ``"groups_figure"``.

    Raises:
        ValueError: An unknown chart name, or ``"groups_figure"`` without ``log_path``.

    Attributes:
        group_runs: Directories of the train-group runs, in sorted label order (empty without ``"groups"``).

    Example:
        >>> from torch.utils.tensorboard import SummaryWriter        # doctest: +SKIP
        >>> sink = TensorBoardSink(SummaryWriter("runs/exp"), identity)  # doctest: +SKIP
        >>> sink.write(record)                                       # doctest: +SKIP
        >>> sink.close()                                             # doctest: +SKIP
    """

    def __init__(
        self,
        writer: SummaryWriter,
        identity: RunIdentity,
        train_group_names: Mapping[Any, str] | None = None,
        probe_group_names: Mapping[Any, str] | None = None,
        charts: bool | Collection[str] = True,
        log_path: PathLike | None = None,
    ) -> None:
        self.writer = writer
        self.identity = identity
        self.charts = check_charts(charts)
        if "groups_figure" in self.charts and log_path is None:
            raise ValueError("The TensorBoard chart 'groups_figure' draws from the HDF5 log: pass log_path.")
        self.log_path = log_path
        self._warned_unreadable = False
        train_labels, _ = group_labels(identity.train_groups, len(identity.train_ids))
        probe_labels, _ = group_labels(identity.probe_groups, len(identity.probe_ids))
        self._train_names = [str((train_group_names or {}).get(label, label)) for label in train_labels.tolist()]
        self._probe_names = [str((probe_group_names or {}).get(label, label)) for label in probe_labels.tolist()]
        self._group_tags = [GROUP_TAG.format(_tag_part(name)) for name in self._probe_names]
        # TensorBoard colours lines by run: one run per train group tells the lines of a chart apart.
        self.group_runs = ([str(Path(writer.log_dir) / f"train_{_tag_part(name)}") for name in self._train_names]
                           if "groups" in self.charts else [])
        self._group_writers: list[SummaryWriter] = []
        if self.group_runs:
            from torch.utils.tensorboard import SummaryWriter

            self._group_writers = [SummaryWriter(run) for run in self.group_runs]

    @property
    def group_tags(self) -> list[str]:
        """The group-curve tag of each probe group (the same tags in every train-group run)."""
        return list(self._group_tags)

    def write(self, record: SnapshotRecord) -> None:
        """Write one snapshot at its training step (``record.step``) and flush.

        A failed snapshot (``record.result is None``) writes its status text and, when chosen, its
        duration and step size.
        """
        writer, charts, step = self.writer, self.charts, record.step
        self._write_scalars(step, record)
        if "status" in charts and record.status != "ok":
            writer.add_text("bif_diag/status", f"step {step}: **{record.status}**"
                            + (f" — {record.message}" if record.message else ""), step)
        result = record.result
        if result is not None:
            influence = result.influence.detach().cpu().double().numpy()
            self._write_groups(step, influence, result.diagnostics.nbeta)
            finite = influence[np.isfinite(influence)]
            if "histogram" in charts and finite.size:
                writer.add_histogram("bif/influence_hist", finite, step)
            if "matrix" in charts:
                from .plot import matrix_figure

                title = f"BIF at step {step}" + ("" if record.status == "ok" else f" ({record.status})")
                figure = matrix_figure([influence], [title], self.identity.probe_groups, self.identity.train_groups,
                                       self._probe_names, self._train_names)
                writer.add_image("bif/matrix", figure_image(figure), step, dataformats="HWC")
            if "groups_figure" in charts and self.log_path is not None:
                from .plot import plot_groups

                try:
                    with open_log(self.log_path) as log:
                        if (log.status == "ok").any():
                            writer.add_image("bif/groups", figure_image(plot_groups(log), dpi=80), step,
                                             dataformats="HWC")
                except OSError as error:
                    # A log that cannot be read (a failed write, a full disk) must not stop training.
                    if not self._warned_unreadable:
                        self._warned_unreadable = True
                        warnings.warn(f"TensorBoardSink: no bif/groups image while the log {self.log_path} cannot be "
                                      f"read ({error}); tried again at every snapshot. (Shown once.)", stacklevel=2)
        writer.flush()

    def _write_scalars(self, step: int, record: SnapshotRecord) -> None:
        """The chosen scalar charts: a column of the estimate when there is one, a column of the record when finite."""
        for name in self.charts:
            column = SCALAR_CHARTS.get(name)
            raw = None if column is None else value(column, record)
            if raw is None:
                continue
            scalar = column.chart.scalar(column.encode_value(raw))
            if column.from_result or math.isfinite(scalar):
                self.writer.add_scalar(column.chart.tag, scalar, step)

    def _write_groups(self, step: int, influence: np.ndarray, nbeta: float) -> None:
        if not self._group_writers:
            return
        means = group_means(influence, self.identity.probe_groups, self.identity.train_groups).means
        for column, group_writer in enumerate(self._group_writers):
            for row, tag in enumerate(self._group_tags):
                group_writer.add_scalar(tag, nbeta * means[row, column], step)
            group_writer.flush()

    def close(self) -> None:
        """Close the train-group writers (the main writer belongs to the caller)."""
        for group_writer in self._group_writers:
            group_writer.close()
        self._group_writers = []
