"""Metrics sink: the TensorBoard charts of each snapshot, through any logger's ``log_metrics`` (W&B, MLflow, CSV).

Lightning-free: the logger is duck-typed (anything with ``log_metrics(metrics, step)``), and the Lightning
layer hands over how it takes an image (:func:`lightning_bif.lightning.loggers.image_writer`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

import numpy as np

from ..log import PathLike, RunIdentity
from ..snapshot.record import SnapshotRecord
from .charts import SnapshotCharts, check_charts

#: ``write_image(tag, image [H, W, 3] uint8, step)``.
ImageWriter = Callable[[str, np.ndarray, int], None]


class MetricsLogger(Protocol):
    """What the sink needs of a logger: Lightning's ``Logger.log_metrics``."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...


class MetricsSink:
    """Writes each BIF snapshot's charts to one logger, with TensorBoard's tags and the training step as x axis.

    A logger has one run, so the group curve of probe group ``p`` and train group ``t`` (TensorBoard: tag
    ``bif_x_nbeta/probes_<p>`` in the run ``train_<t>``) is the metric ``bif_x_nbeta/probes_<p>/train_<t>``.
    The ``bif_diag/`` scalars keep their tags. Figures (``bif/matrix``, ``bif/groups``) go through
    ``write_image`` when the logger takes images; the ``histogram`` and ``status`` text charts are
    TensorBoard's alone (the status of every snapshot is in the log and the report).

    Args:
        logger: Anything with ``log_metrics(metrics, step)``, such as a Lightning logger.
        identity: The run identity (groups, ids).
        train_group_names: Optional display names of train group labels.
        probe_group_names: Optional display names of probe group labels.
        charts: The chart names, as for :class:`~lightning_bif.viewers.tensorboard.TensorBoardSink`.
        log_path: The HDF5 log (``"groups_figure"`` draws from it).
        write_image: How the logger takes an RGB image; ``None``: it takes none, figures are skipped.

    Example:
        >>> from lightning.pytorch.loggers import CSVLogger            # doctest: +SKIP
        >>> sink = MetricsSink(CSVLogger("runs"), identity)             # doctest: +SKIP
        >>> sink.write(record)                                          # doctest: +SKIP
    """

    def __init__(
        self,
        logger: MetricsLogger,
        identity: RunIdentity,
        train_group_names: Mapping[Any, str] | None = None,
        probe_group_names: Mapping[Any, str] | None = None,
        charts: bool | Collection[str] = True,
        log_path: PathLike | None = None,
        write_image: ImageWriter | None = None,
    ) -> None:
        self.logger = logger
        self.write_image = write_image
        self.charts = SnapshotCharts(identity, train_group_names, probe_group_names,
                                     charts if write_image is not None else _without_figures(charts), log_path)

    def metrics(self, record: SnapshotRecord) -> dict[str, float]:
        """The scalars of one snapshot by metric name."""
        metrics = self.charts.scalars(record)
        for run, curves in self.charts.group_curves(record).items():
            metrics.update({f"{tag}/{run}": scalar for tag, scalar in curves.items()})
        return metrics

    def write(self, record: SnapshotRecord) -> None:
        """Log one snapshot's scalars and (when the logger takes images) its figures at ``record.step``."""
        metrics = self.metrics(record)
        if metrics:
            self.logger.log_metrics(metrics, step=record.step)
        if self.write_image is not None:
            for tag, image in self.charts.images(record).items():
                self.write_image(tag, image, record.step)

    def close(self) -> None:
        """Nothing to close: the logger belongs to the trainer, which finalizes it."""


def _without_figures(charts: bool | Collection[str]) -> tuple[str, ...]:
    """The chosen charts less the figures, which a logger without images would draw for nothing."""
    return tuple(name for name in check_charts(charts) if name not in ("matrix", "groups_figure"))
