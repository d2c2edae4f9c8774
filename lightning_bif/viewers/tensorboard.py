"""TensorBoard sink: group curves a reader can tell apart, a labelled influence matrix, a few diagnostics.

Per snapshot (``step`` is the training step) it writes, by default:

- ``bif_x_nbeta/probes_<probe group>`` in one run per train group (``<log dir>/train_<train group>``),
  so TensorBoard draws each probe group as one chart with a line per train group in its own colour.
  Beyond 5 train groups the 5 strongest keep a run and the others share ``train_other`` (TensorBoard has
  7 line colours); the chart ``all_groups`` gives every train group its run.
  The value is nβ × the mean BIF of the train group on the probe group: the same sign (negative =
  helps), in units where a damped classical influence function is O(1), so that late-training
  values near 1e-5 do not round to 0 in TensorBoard's tables. Divide by nβ (in the log) for BIF.
- ``bif/matrix`` (Images): the ``[probe, train]`` matrix of the snapshot as a labelled figure
  (:func:`lightning_bif.viewers.plot.matrix_figure`): sorted by group, group borders, axis labels, a
  symmetric colour bar, **blue = helps, red = harms**.
- ``bif_diag/split_half``, ``bif_diag/loss_rise``, ``bif_diag/diverged_chains``; and
  ``bif_diag/status`` (Text) for every snapshot that is not ``ok`` (``suspect``, ``diverged``, ``failed``,
  with the reason); the matrix title names such a status too.

The ``bif_diag/`` scalars are the log columns that declare a chart (:attr:`lightning_bif.log.columns.Column.chart`).
Opt in to more with ``charts`` (``BIFCallback(tensorboard=[...])``): ``duration_s``, ``ess``, ``step_size``,
``sampling_loss`` (scalars under ``bif_diag/``), ``histogram`` (``bif/influence_hist``) and
``groups_figure`` (``bif/groups``, Images: :func:`lightning_bif.viewers.plot.plot_groups` of the log so far,
with a log step axis and a colour per train group; it re-reads the log and draws a figure of
several panels at every snapshot, so it costs seconds per snapshot).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..log import PathLike, RunIdentity
from ..snapshot.record import SnapshotRecord
from .charts import STATUS_TAG, SnapshotCharts, influence

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

#: TensorBoard's page with smoothing off: its default (0.6) bends curves of a dozen snapshots out of shape.
URL = "http://localhost:6006/#scalars&_smoothingWeight=0"


def open_command(logdir: str | Path) -> str:
    """The shell command that shows ``logdir`` in TensorBoard, and the page to open (smoothing off)."""
    return f"tensorboard --logdir {logdir} --samples_per_plugin images=100   then open {URL}"


class TensorBoardSink:
    """Writes each BIF snapshot to TensorBoard: group curves (a run per train group), a matrix figure, diagnostics.

    Args:
        writer: A ``SummaryWriter`` (Lightning's ``TensorBoardLogger.experiment`` is one); the
            train-group runs are written next to its events, in ``<log_dir>/train_<group>``.
        identity: The run identity; its ``train_groups``/``probe_groups`` define the curves
            (without groups everything is one group called ``"all"``).
        train_group_names: Optional display names of train group labels, e.g. ``{0: "zeros"}``.
        probe_group_names: Optional display names of probe group labels.
        charts: Which charts to write: ``True`` (:data:`~lightning_bif.viewers.charts.DEFAULT_CHARTS`), ``"all"``,
            or names from :data:`~lightning_bif.viewers.charts.DEFAULT_CHARTS` and
            :data:`~lightning_bif.viewers.charts.OPTIONAL_CHARTS`.
        log_path: The HDF5 log the snapshots are appended to (before they reach the sink); needed
            by ``"groups_figure"``.

    Raises:
        ValueError: An unknown chart name, or ``"groups_figure"`` without ``log_path``.

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
        self.charts = SnapshotCharts(identity, train_group_names, probe_group_names, charts, log_path)
        # TensorBoard colours lines by run: one run per train group tells the lines of a chart apart.
        self._group_writers: dict[str, SummaryWriter] = {}
        for run in self.charts.group_runs:
            self._group_writer(run)

    @property
    def group_runs(self) -> list[str]:
        """Directories of the train-group runs: in sorted label order, then ``train_other`` when groups share it
        (chosen at the first snapshot with an estimate beyond :data:`~lightning_bif.viewers.charts.MAX_GROUP_RUNS`
        groups; empty without ``"groups"``)."""
        return [str(Path(self.writer.log_dir) / run) for run in self.charts.group_runs]

    def _group_writer(self, run: str) -> SummaryWriter:
        if run not in self._group_writers:
            from torch.utils.tensorboard import SummaryWriter

            self._group_writers[run] = SummaryWriter(str(Path(self.writer.log_dir) / run))
        return self._group_writers[run]

    @property
    def group_tags(self) -> list[str]:
        """The group-curve tag of each probe group (the same tags in every train-group run)."""
        return list(self.charts.group_tags)

    def write(self, record: SnapshotRecord) -> None:
        """Write one snapshot at its training step (``record.step``) and flush.

        A failed snapshot (``record.result is None``) writes its status text and, when chosen, its
        duration and step size.
        """
        writer, step = self.writer, record.step
        for tag, scalar in self.charts.scalars(record).items():
            writer.add_scalar(tag, scalar, step)
        text = self.charts.status_text(record)
        if text is not None:
            writer.add_text(STATUS_TAG, text, step)
        for run, curves in self.charts.group_curves(record).items():
            group_writer = self._group_writer(run)
            for tag, scalar in curves.items():
                group_writer.add_scalar(tag, scalar, step)
            group_writer.flush()
        if record.result is not None and "histogram" in self.charts:
            values = influence(record)
            finite = values[np.isfinite(values)]
            if finite.size:
                writer.add_histogram("bif/influence_hist", finite, step)
        for tag, image in self.charts.images(record).items():
            writer.add_image(tag, image, step, dataformats="HWC")
        writer.flush()

    def close(self) -> None:
        """Close the train-group writers (the main writer belongs to the caller)."""
        for group_writer in self._group_writers.values():
            group_writer.close()
        self._group_writers = {}
