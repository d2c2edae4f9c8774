"""TensorBoard sink: a few dozen charts per run that show how influence evolves during training.

Per snapshot it writes (``step`` is the training step):

- ``bif/<probe group>/<train group>``: mean BIF of a train group on a probe group. A custom
  scalars layout draws each probe group as one chart with a line per train group.
- ``bif/influence_hist``: histogram of every BIF entry.
- ``bif/influence_heatmap``: the ``[probe, train]`` matrix as an image, rows and columns sorted by
  group, on a diverging colour scale symmetric around 0: **blue = negative = helpful**,
  white = 0, **red = positive = harmful**, grey = NaN. The scale saturates at the 99th
  percentile of ``|BIF|`` of that snapshot.
- ``bif_diag/*``: mean SGLD sampling loss, loss rise over the loss at w*, split-half
  reliability, effective sample size, number of diverged chains, snapshot duration and the
  SGLD step size used (which changes when the callback calibrates it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from .analysis import group_labels, group_means
from .log import RunIdentity, SnapshotRecord

# Diverging scale anchors (ColorBrewer RdBu ends): helpful, neutral, harmful; NaN is grey.
HELPFUL_RGB = np.array([33, 102, 172], dtype=np.float64)
NEUTRAL_RGB = np.array([247, 247, 247], dtype=np.float64)
HARMFUL_RGB = np.array([178, 24, 43], dtype=np.float64)
NAN_RGB = np.array([128, 128, 128], dtype=np.uint8)
_MAX_SIDE = 512  # heatmap pixels per side before block averaging
_MIN_SIDE = 128  # a short side is stretched to about this many pixels so that it stays visible


def _tag_part(label: Any) -> str:
    """A group label as one tag component (TensorBoard splits tags on '/')."""
    return re.sub(r"[^\w.\-]+", "_", str(label)) or "_"


def diverging_colors(values: np.ndarray, limit: float) -> np.ndarray:
    """RGB uint8 colours ``[..., 3]`` for ``values`` on a blue-white-red scale over ``[-limit, limit]``."""
    scaled = np.clip(np.nan_to_num(values / limit), -1.0, 1.0)[..., None]
    anchor = np.where(scaled < 0, HELPFUL_RGB, HARMFUL_RGB)
    rgb = NEUTRAL_RGB + np.abs(scaled) * (anchor - NEUTRAL_RGB)
    rgb = np.rint(rgb).astype(np.uint8)
    rgb[np.isnan(values)] = NAN_RGB
    return rgb


def _block_mean(matrix: np.ndarray, axis: int, bins: int) -> np.ndarray:
    """Average consecutive runs along ``axis`` down to ``bins`` entries (NaN only where a run is all NaN)."""
    starts = np.linspace(0, matrix.shape[axis], bins + 1).astype(int)[:-1]
    finite = np.isfinite(matrix)
    sums = np.add.reduceat(np.where(finite, matrix, 0.0), starts, axis=axis)
    counts = np.add.reduceat(finite, starts, axis=axis)
    with np.errstate(invalid="ignore"):
        return sums / counts


def heatmap(influence: np.ndarray, probe_order: np.ndarray, train_order: np.ndarray) -> np.ndarray:
    """The influence matrix as an RGB image ``[H, W, 3]`` (uint8), rows/columns in the given order."""
    matrix = np.asarray(influence, dtype=np.float64)[np.ix_(probe_order, train_order)]
    for axis in (0, 1):
        if matrix.shape[axis] > _MAX_SIDE:
            matrix = _block_mean(matrix, axis, _MAX_SIDE)
    finite = np.abs(matrix[np.isfinite(matrix)])
    limit = float(np.percentile(finite, 99)) if finite.size else 0.0
    image = diverging_colors(matrix, limit if limit > 0 else 1.0)
    for axis in (0, 1):
        image = np.repeat(image, max(1, _MIN_SIDE // image.shape[axis]), axis=axis)
    return image


class TensorBoardSink:
    """Writes each BIF snapshot to TensorBoard as group-mean curves, a histogram and a heatmap.

    Args:
        writer: A ``SummaryWriter`` (Lightning's ``TensorBoardLogger.experiment`` is one).
        identity: The run identity; its ``train_groups``/``probe_groups`` define the curves
            (without groups everything is one group called ``"all"``).
        train_group_names: Optional display names of train group labels, e.g. ``{0: "zeros"}``.
        probe_group_names: Optional display names of probe group labels.

    Example:
        >>> from torch.utils.tensorboard import SummaryWriter        # doctest: +SKIP
        >>> sink = TensorBoardSink(SummaryWriter("runs/exp"), identity)  # doctest: +SKIP
        >>> sink.write(step=500, record=record)                      # doctest: +SKIP
    """

    def __init__(
        self,
        writer: SummaryWriter,
        identity: RunIdentity,
        train_group_names: Mapping[Any, str] | None = None,
        probe_group_names: Mapping[Any, str] | None = None,
    ) -> None:
        self.writer = writer
        self.identity = identity
        train_labels, train_members = group_labels(identity.train_groups, len(identity.train_ids))
        probe_labels, probe_members = group_labels(identity.probe_groups, len(identity.probe_ids))
        # Stable sorts keep the original order inside a group.
        self._train_order = np.argsort(train_members, kind="stable")
        self._probe_order = np.argsort(probe_members, kind="stable")
        train_names = [_tag_part((train_group_names or {}).get(label, label)) for label in train_labels.tolist()]
        probe_names = [_tag_part((probe_group_names or {}).get(label, label)) for label in probe_labels.tolist()]
        self._tags = [[f"bif/{probe}/{train}" for train in train_names] for probe in probe_names]
        charts = {
            f"probes {probe}": ["Multiline", [f"^{re.escape(tag)}$" for tag in row]]
            for probe, row in zip(probe_names, self._tags, strict=True)
        }
        writer.add_custom_scalars({"BIF: mean influence of each train group (negative = helpful)": charts})

    @property
    def scalar_tags(self) -> list[str]:
        """The group-mean tags, one per (probe group, train group)."""
        return [tag for row in self._tags for tag in row]

    def write(self, step: int, record: SnapshotRecord) -> None:
        """Write one snapshot at training step ``step`` and flush.

        A failed snapshot (``record.result is None``) only records its duration and step size (when known).
        """
        writer = self.writer
        writer.add_scalar("bif_diag/duration_s", record.duration_s, step)
        step_size = record.used_step_size()
        if math.isfinite(step_size):
            writer.add_scalar("bif_diag/step_size", step_size, step)
        result = record.result
        if result is not None:
            influence = result.influence.detach().cpu().double().numpy()
            means = group_means(influence, self.identity.probe_groups, self.identity.train_groups).means
            for row, tags in enumerate(self._tags):
                for column, tag in enumerate(tags):
                    writer.add_scalar(tag, means[row, column], step)
            finite = influence[np.isfinite(influence)]
            if finite.size:
                writer.add_histogram("bif/influence_hist", finite, step)
            writer.add_image("bif/influence_heatmap", heatmap(influence, self._probe_order, self._train_order),
                             step, dataformats="HWC")
            diagnostics = result.diagnostics
            sampling = diagnostics.sampling_loss.detach().cpu().double().numpy()
            sampling = sampling[np.isfinite(sampling)]
            writer.add_scalar("bif_diag/sampling_loss", sampling.mean() if sampling.size else float("nan"), step)
            writer.add_scalar("bif_diag/loss_rise", diagnostics.loss_rise, step)
            writer.add_scalar("bif_diag/split_half", diagnostics.split_half, step)
            writer.add_scalar("bif_diag/ess", diagnostics.ess, step)
            writer.add_scalar("bif_diag/diverged_chains", int(diagnostics.diverged.sum()), step)
        writer.flush()
