"""What a snapshot shows in a dashboard: the chart names, their tags, and their values for one snapshot.

One declaration for every sink: :class:`~lightning_bif.viewers.tensorboard.TensorBoardSink` writes these
values with TensorBoard's API, :class:`~lightning_bif.viewers.metrics.MetricsSink` with any logger's
``log_metrics`` (W&B, MLflow, CSV), under the same tags and at the same training steps.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..log import PathLike, RunIdentity, open_log
from ..log.columns import COLUMNS, Column, value
from ..log.summaries import group_labels, group_means
from ..snapshot.record import SnapshotRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Scalar charts: the log columns that declare one, by chart name.
SCALAR_CHARTS: dict[str, Column] = {column.chart.name: column for column in COLUMNS if column.chart is not None}
DEFAULT_CHARTS = ("groups", "matrix", *(name for name, c in SCALAR_CHARTS.items() if c.chart.default), "status")
OPTIONAL_CHARTS = (*(name for name, c in SCALAR_CHARTS.items() if not c.chart.default), "histogram", "groups_figure",
                   "all_groups")
#: The group curve of a probe group (TensorBoard: in the run of each train group).
GROUP_TAG = "bif_x_nbeta/probes_{}"
#: The run (TensorBoard: a directory) of a train group; other loggers append it to the group tag.
GROUP_RUN = "train_{}"
#: Train-group runs by default: with the main run and ``other`` they fit TensorBoard's 7 line colours.
MAX_GROUP_RUNS = 5
#: The run of the train groups beyond :data:`MAX_GROUP_RUNS` (their examples' mean); ``all_groups`` gives each its own.
OTHER_GROUPS = "other"
MATRIX_TAG = "bif/matrix"
GROUPS_FIGURE_TAG = "bif/groups"
STATUS_TAG = "bif_diag/status"
_DPI = 100


def tag_part(label: Any) -> str:
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


class SnapshotCharts:
    """The chosen charts of a run, and their values for one snapshot.

    Args:
        identity: The run identity; its ``train_groups``/``probe_groups`` define the curves
            (without groups everything is one group called ``"all"``).
        train_group_names: Optional display names of train group labels, e.g. ``{0: "zeros"}``.
        probe_group_names: Optional display names of probe group labels.
        charts: ``True`` (:data:`DEFAULT_CHARTS`), ``"all"``, or names from :data:`DEFAULT_CHARTS` and
            :data:`OPTIONAL_CHARTS`.
        log_path: The HDF5 log the snapshots are appended to (before they reach a sink); needed by
            ``"groups_figure"``.

    Raises:
        ValueError: An unknown chart name, or ``"groups_figure"`` without ``log_path``.
    """

    def __init__(
        self,
        identity: RunIdentity,
        train_group_names: Mapping[Any, str] | None = None,
        probe_group_names: Mapping[Any, str] | None = None,
        charts: bool | Collection[str] = True,
        log_path: PathLike | None = None,
    ) -> None:
        self.identity = identity
        self.names = check_charts(charts)
        if "groups_figure" in self.names and log_path is None:
            raise ValueError("The TensorBoard chart 'groups_figure' draws from the HDF5 log: pass log_path.")
        self.log_path = log_path
        self._warned_unreadable = False
        train_labels, _ = group_labels(identity.train_groups, len(identity.train_ids))
        probe_labels, _ = group_labels(identity.probe_groups, len(identity.probe_ids))
        self.train_names = [str((train_group_names or {}).get(label, label)) for label in train_labels.tolist()]
        self.probe_names = [str((probe_group_names or {}).get(label, label)) for label in probe_labels.tolist()]
        self.group_tags = [GROUP_TAG.format(tag_part(name)) for name in self.probe_names]
        self._groups = "groups" in self or "all_groups" in self
        # The train groups with a run of their own: all when they fit (or with all_groups), else the strongest,
        # chosen at the first snapshot with an estimate (runs must not change during a fit).
        self._kept: np.ndarray | None = None
        if self._groups and ("all_groups" in self or len(self.train_names) <= MAX_GROUP_RUNS):
            self._kept = np.arange(len(self.train_names))
        self.group_runs = self._runs()

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def scalars(self, record: SnapshotRecord) -> dict[str, float]:
        """The chosen scalar charts by tag: a column of the estimate when there is one, a column of the record
        when finite."""
        scalars = {}
        for name in self.names:
            column = SCALAR_CHARTS.get(name)
            raw = None if column is None else value(column, record)
            if raw is None:
                continue
            scalar = column.chart.scalar(column.encode_value(raw))
            if column.from_result or math.isfinite(scalar):
                scalars[column.chart.tag] = scalar
        return scalars

    def status_text(self, record: SnapshotRecord) -> str | None:
        """The ``status`` chart's text for a snapshot that is not ``ok`` (Markdown), else ``None``."""
        if "status" not in self or record.status == "ok":
            return None
        return f"step {record.step}: **{record.status}**" + (f" — {record.message}" if record.message else "")

    def _runs(self) -> list[str]:
        if self._kept is None:
            return []
        others = len(self._kept) < len(self.train_names)
        return [GROUP_RUN.format(tag_part(self.train_names[i])) for i in self._kept] + (
            [GROUP_RUN.format(OTHER_GROUPS)] if others else [])

    def group_curves(self, record: SnapshotRecord) -> dict[str, dict[str, float]]:
        """``{train-group run: {group tag: nβ × mean BIF}}`` of a snapshot with an estimate (empty without).

        Beyond :data:`MAX_GROUP_RUNS` train groups (without ``all_groups``), the groups of the largest
        ``max |mean BIF|`` over probe groups at the first snapshot with an estimate keep their run, and the run
        ``train_other`` holds the mean over the examples of the rest.
        """
        if not self._groups or record.result is None:
            return {}
        values = influence(record)
        identity = self.identity
        means = group_means(values, identity.probe_groups, identity.train_groups).means
        if self._kept is None:
            strength = np.nan_to_num(np.abs(means), nan=-1.0).max(axis=0)
            self._kept = np.sort(np.argsort(-strength, kind="stable")[:MAX_GROUP_RUNS])
            self.group_runs = self._runs()
        columns = [means[:, column] for column in self._kept]
        if len(self._kept) < len(self.train_names):
            _, members = group_labels(identity.train_groups, len(identity.train_ids))
            rest = ~np.isin(members, self._kept)
            columns.append(group_means(values[:, rest], identity.probe_groups).means[:, 0])
        nbeta = record.result.diagnostics.nbeta
        return {run: {tag: nbeta * float(column[row]) for row, tag in enumerate(self.group_tags)}
                for run, column in zip(self.group_runs, columns, strict=True)}

    def images(self, record: SnapshotRecord) -> dict[str, np.ndarray]:
        """The chosen figures of a snapshot with an estimate, by tag, as RGB images ``[H, W, 3]``."""
        images: dict[str, np.ndarray] = {}
        if record.result is None:
            return images
        if "matrix" in self:
            from .plot import matrix_figure

            title = f"BIF at step {record.step}" + ("" if record.status == "ok" else f" ({record.status})")
            figure = matrix_figure([influence(record)], [title], self.identity.probe_groups,
                                   self.identity.train_groups, self.probe_names, self.train_names)
            images[MATRIX_TAG] = figure_image(figure)
        if "groups_figure" in self and self.log_path is not None:
            from .plot import plot_groups

            try:
                with open_log(self.log_path) as log:
                    if (log.status == "ok").any():
                        images[GROUPS_FIGURE_TAG] = figure_image(plot_groups(log), dpi=80)
            except OSError as error:
                # A log that cannot be read (a failed write, a full disk) must not stop training.
                if not self._warned_unreadable:
                    self._warned_unreadable = True
                    warnings.warn(f"lightning-bif: no {GROUPS_FIGURE_TAG} image while the log {self.log_path} "
                                  f"cannot be read ({error}); tried again at every snapshot. (Shown once.)",
                                  stacklevel=3)
        return images


def influence(record: SnapshotRecord) -> np.ndarray:
    """The ``[probe, train]`` influence of a record with an estimate, as float64 on the CPU."""
    return record.result.influence.detach().cpu().double().numpy()
