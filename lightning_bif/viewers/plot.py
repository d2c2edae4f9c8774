"""Figures of an influence log (matplotlib): group curves, chosen pairs, matrices, sign changes, top examples.

Every function takes an :class:`~lightning_bif.log.InfluenceLog` (or the path of a log) and returns a
``matplotlib.figure.Figure`` without touching pyplot's global state; :func:`write_figures` saves all
of them (``lightning-bif plot LOG --out DIR`` does the same from the shell). Influence is BIF
(negative = helps the probe, positive = harms it); bands and error bars are ±2 standard errors.
The curves share a header: the training loss at w* over the snapshots, the loss along the SGLD
draws (their gap is the loss rise) and a strip of split-half reliability; snapshots that are not
``ok`` are marked by grey lines and named in the strip.

    >>> from lightning_bif.viewers import plot                                          # doctest: +SKIP
    >>> plot.plot_groups("runs/exp/influence.h5").savefig("groups.png")         # doctest: +SKIP
    >>> plot.write_figures("runs/exp/influence.h5", "figures", format="pdf")    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import MIN_SPLIT_HALF
from ..log import InfluenceLog, PathLike, open_log
from ..log.summaries import group_labels, group_means

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure

FORMATS = ("png", "pdf", "svg")
FIGURES = ("groups", "pairs", "matrix", "sign_changes", "top_examples")
SPLIT_HALF_WARN = MIN_SPLIT_HALF  # BIFCallback's default min_split_half (lightning_bif.config)
_LINE_STYLES = ("-", "--", ":", "-.")
_NON_OK = "#9e9e9e"
# A suspect snapshot has numbers that may be inflated, not none: marked apart from diverged and failed ones.
_SUSPECT = "#f0a030"


def _pyplot_free_figure(**kwargs: Any) -> Figure:
    # A bare Figure needs no GUI backend and leaves pyplot's list of open figures alone.
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


@contextmanager
def _opened(log: InfluenceLog | PathLike) -> Iterator[InfluenceLog]:
    if isinstance(log, InfluenceLog):
        yield log
        return
    with open_log(log) as opened:
        yield opened


def _check_plottable(log: InfluenceLog) -> None:
    if not (log.status == "ok").any():
        counts = ", ".join(f"{(log.status == s).sum()} {s}" for s in np.unique(log.status)) or "none"
        raise ValueError(f"The influence log {log.path} has no ok snapshot to plot (snapshots: {counts}); "
                         "`lightning-bif summary` shows why they are not ok.")


@dataclass(frozen=True)
class Quantity:
    """What a figure can show: a ``[S, P, N]`` field of the log, its standard errors and which sign helps."""

    field: str
    error: str | None
    name: str
    helps: int  # -1: negative values help the probe (BIF = -Cov); +1: positive ones do (correlation of losses)

    @property
    def sense(self) -> str:
        """E.g. ``"< 0 helps, > 0 harms"``."""
        return "< 0 helps, > 0 harms" if self.helps < 0 else "> 0 helps, < 0 harms"

    @property
    def colorbar_label(self) -> str:
        """Blue always marks helping, red harming."""
        helps, harms = ("< 0", "> 0")[:: -self.helps]
        return f"{self.name}   blue {helps}: helps  ·  red {harms}: harms"


QUANTITIES = {
    "influence": Quantity("influence", "stderr", "BIF", -1),
    # The log's correlation is Corr(ℓ_train, φ_probe): the opposite sign of BIF = -Cov.
    "correlation": Quantity("correlation", None, "correlation", +1),
}


def quantity_of(name: str) -> Quantity:
    """The :class:`Quantity` called ``name``; per-token and unknown names are refused with what to use instead.

    Raises:
        ValueError: ``name`` is a per-token quantity or unknown.
    """
    if name.startswith("token_"):
        raise ValueError(f"{name!r} is per-token; the figures show probe-level quantities "
                         f"({', '.join(QUANTITIES)}; in a per-token log, influence is the token mean). Read "
                         "per-token values with log.token_trajectory(...) or `lightning-bif export --tokens`.")
    if name not in QUANTITIES:
        raise ValueError(f"Unknown quantity {name!r}; choose one of {', '.join(QUANTITIES)}.")
    return QUANTITIES[name]


@dataclass
class _Groups:
    """Group labels, display names and each example's group index, for one side (probes or train)."""

    labels: np.ndarray
    names: list[str]
    members: np.ndarray


def _groups(log: InfluenceLog, side: str) -> _Groups:
    ids = log.train_ids if side == "train" else log.probe_ids
    labels, members = group_labels(getattr(log, f"{side}_groups"), len(ids))
    # Logs of format 2 may store display names; older logs (and runs without names) show the labels.
    mapping = getattr(log, f"{side}_group_names", None) or {}
    names = [str(mapping.get(label, mapping.get(str(label), label))) for label in labels.tolist()]
    return _Groups(labels, names, members)


def _example_label(log: InfluenceLog, side: str, position: int) -> str:
    ids = log.train_ids if side == "train" else log.probe_ids
    groups = _groups(log, side)
    group = "" if getattr(log, f"{side}_groups") is None else f" ({groups.names[groups.members[position]]})"
    return f"{side} {ids[position]}{group}"


def parse_id(log: InfluenceLog, side: str, text: str) -> Any:
    """An id typed on the command line as the log stores it (int for integer ids, else the text).

    Raises:
        ValueError: The log's ids are integers and ``text`` is not one.
    """
    ids = log.train_ids if side == "train" else log.probe_ids
    if np.issubdtype(ids.dtype, np.integer):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{side} id {text!r} is not an integer; the log's {side} ids are dataset indices "
                             f"such as {', '.join(map(str, ids[:3]))}.") from None
    return text


def _position(log: InfluenceLog, side: str, example_id: Any) -> int:
    try:
        return log.position(**{side: example_id})
    except KeyError:
        ids = log.train_ids if side == "train" else log.probe_ids
        shown = ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
        raise ValueError(f"Unknown {side} id {example_id!r}: the log {log.path} tracks {len(ids)} {side} "
                         f"example(s) with ids {shown} (ids are dataset indices or keys, not positions).") from None


def _rows_at(log: InfluenceLog, steps: Sequence[int]) -> list[int]:
    """Snapshot rows nearest each requested step; steps outside the logged range and failed snapshots are refused."""
    first, last = int(log.steps.min()), int(log.steps.max())
    rows = []
    for step in steps:
        if not first <= step <= last:
            raise ValueError(f"Step {step} is outside the log's snapshots (steps {first}..{last}); "
                             f"choose steps in that range.")
        row = log.nearest(step)
        if log.status[row] == "failed":
            raise ValueError(f"The snapshot at step {log.steps[row]} (nearest {step}) failed: "
                             f"{log.message[row][:200] or 'no estimate'}; choose another step.")
        rows.append(row)
    return rows


def _spread_rows(rows: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` rows spread evenly over ``rows``, first and last included."""
    picks = np.unique(np.rint(np.linspace(0, len(rows) - 1, min(count, len(rows)))).astype(int))
    return [int(rows[i]) for i in picks]


def log_spaced(steps: np.ndarray) -> bool:
    """Whether snapshot steps grow geometrically (the late gaps far wider than the early ones)."""
    positive = np.unique(np.asarray(steps)[np.asarray(steps) > 0]).astype(np.float64)
    if len(positive) < 4 or positive[-1] / positive[0] < 20:
        return False
    gaps = np.diff(positive)
    third = max(1, len(gaps) // 3)
    return bool(np.median(gaps[-third:]) > 4 * np.median(gaps[:third]))


def _time_axis(axis: Axes, steps: np.ndarray, label: bool = True) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter

    if log_spaced(steps):
        # Symlog keeps step 0 (a snapshot at fit start) on a log axis; ticks at 0 and powers of ten
        # past the linear stretch, where symlog's own ticks would crowd 0 and 1 together.
        threshold = float(steps[steps > 0].min())
        axis.set_xscale("symlog", linthresh=threshold, linscale=0.4)
        decades = np.arange(np.ceil(np.log10(threshold)), np.floor(np.log10(steps.max())) + 1)
        axis.xaxis.set_major_locator(FixedLocator([*([0.0] if steps.min() <= 0 else []), *10.0 ** decades]))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    low, high = float(steps.min()), float(steps.max())
    if axis.get_xscale() == "linear":
        pad = 0.03 * (high - low) or 1.0
        axis.set_xlim(low - pad, high + pad)
    else:
        axis.set_xlim(low, high * 1.08)
    if label:
        axis.set_xlabel("training step" + ("  (log scale)" if axis.get_xscale() != "linear" else ""))


def _mark_non_ok(axis: Axes, log: InfluenceLog) -> None:
    for row in np.flatnonzero(log.status != "ok"):
        colour = _SUSPECT if log.status[row] == "suspect" else _NON_OK
        axis.axvline(log.steps[row], color=colour, lw=3, alpha=0.35, zorder=0)


def _header(figure: Figure | SubFigure, log: InfluenceLog) -> tuple[Axes, Axes]:
    """Training loss (at w* and along the draws) above a split-half strip, with non-ok snapshots marked."""
    loss_axis, strip = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    rows = np.flatnonzero(log.status != "failed")
    steps = log.steps
    at_w = np.array([np.nanmean(np.asarray(log.train_loss[row], dtype=np.float64)) for row in rows])
    loss_axis.plot(steps[rows], at_w, "o-", color="black", ms=3, lw=1.5, label="at w* (mean over tracked examples)")
    loss_axis.plot(steps[rows], at_w + log.loss_rise[rows], "--", color="0.5", lw=1.2,
                   label="along the SGLD draws (gap = loss rise)")
    positive = np.concatenate([at_w, at_w + log.loss_rise[rows]])
    positive = positive[np.isfinite(positive) & (positive > 0)]
    if len(positive) and positive.max() > 10 * positive.min():
        loss_axis.set_yscale("log")
    loss_axis.set_ylabel("training loss")
    loss_axis.legend(loc="best", fontsize="small", frameon=False)
    strip.plot(steps[rows], log.split_half[rows], "o-", color="tab:green", ms=3, lw=1.2)
    strip.axhline(SPLIT_HALF_WARN, color="tab:red", lw=0.8, ls=":")
    if log.below_target is not None:  # format 3: snapshots whose budget ran out below the target
        short = rows[np.asarray(log.below_target, bool)[rows]]
        strip.plot(steps[short], log.split_half[short], "x", color="tab:red", ms=6,
                   label="below target (budget ran out)")
        if len(short):
            strip.legend(loc="lower right", fontsize="x-small", frameon=False)
    strip.set_ylim(min(0.0, float(np.nanmin(log.split_half[rows], initial=0.0))) - 0.05, 1.05)
    strip.set_ylabel("split-\nhalf", rotation=0, ha="right", va="center", fontsize="small")
    strip.tick_params(labelsize="small")
    for row in np.flatnonzero(log.status != "ok"):
        strip.annotate(log.status[row], (steps[row], 0.5), xycoords=("data", "axes fraction"), rotation=90,
                       ha="center", va="center", fontsize="x-small", color="0.3")
    for axis in (loss_axis, strip):
        _mark_non_ok(axis, log)
        _time_axis(axis, steps, label=axis is strip)
    return loss_axis, strip


def _styles(count: int) -> list[tuple[Any, str]]:
    """A colour and line style per series: a qualitative palette, then line styles once it runs out."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return [(palette[i % len(palette)], _LINE_STYLES[(i // len(palette)) % len(_LINE_STYLES)]) for i in range(count)]


def _curves(log: InfluenceLog, rows: np.ndarray, quantity: Quantity, probe: int,
            train: int) -> tuple[np.ndarray, np.ndarray]:
    """Values ``[R]`` of one (probe, train) entry at snapshot ``rows`` and their standard errors (NaN without)."""
    picked = np.asarray(getattr(log, quantity.field)[rows, probe, train], dtype=np.float64)
    if quantity.error is None:
        return picked, np.full_like(picked, np.nan)
    return picked, np.asarray(getattr(log, quantity.error)[rows, probe, train], dtype=np.float64)


def _draw(axis: Axes, steps: np.ndarray, value: np.ndarray, se: np.ndarray, color: Any, style: str,
          label: str, width: float = 1.4, bars: bool = False) -> None:
    if bars:
        axis.errorbar(steps, value, yerr=2 * se, color=color, ls=style, lw=width, marker="o", ms=3, capsize=2,
                      label=label)
        return
    axis.plot(steps, value, color=color, ls=style, lw=width, marker="o", ms=2.5, label=label)
    if np.isfinite(se).any():
        axis.fill_between(steps, value - 2 * se, value + 2 * se, color=color, alpha=0.12, lw=0)


def _value_axis(axis: Axes, label: str) -> None:
    axis.axhline(0, color="black", lw=0.6)
    axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axis.set_ylabel(label)


def plot_groups(log: InfluenceLog | PathLike, quantity: str = "influence") -> Figure:
    """(a) Mean influence of every train group on every probe group over training.

    One panel per probe group, one line per train group (thicker where the train group has the
    probe group's label), ±2 standard-error bands, the training loss and split-half strip above.
    The band of a group mean is ±2× the mean of its entries' standard errors: the entries share
    chains, and the mean of their standard errors bounds the standard error of their mean from above.

    Args:
        log: An open log or the path of one.
        quantity: ``"influence"`` (BIF) or ``"correlation"`` (posterior correlation, no bands).

    Returns:
        The figure.

    Raises:
        ValueError: The log has no ok snapshot, or ``quantity`` is per-token or unknown.
    """
    with _opened(log) as log:
        _check_plottable(log)
        shown = quantity_of(quantity)
        probe_groups, train_groups = _groups(log, "probe"), _groups(log, "train")
        rows = np.flatnonzero(log.status != "failed")
        steps = log.steps[rows]
        means, errors = [], []
        for row in rows:
            means.append(group_means(getattr(log, shown.field)[row], log.probe_groups, log.train_groups).means)
            errors.append(group_means(getattr(log, shown.error)[row], log.probe_groups, log.train_groups).means
                          if shown.error else np.full_like(means[-1], np.nan))
        means_array, errors_array = np.array(means), np.array(errors)  # [R, Gp, Gt]

        panels = len(probe_groups.labels)
        columns = min(panels, 5)
        grid_rows = -(-panels // columns)
        figure = _pyplot_free_figure(figsize=(2.6 * columns + 1.4, 2.2 + 2.1 * grid_rows))
        top, bottom = figure.subfigures(2, 1, height_ratios=[2.2, 2.1 * grid_rows])
        _header(top, log)
        top.suptitle(f"Mean {shown.name} of each train group on each probe group ({shown.sense}"
                     f"{'; bands ±2 SE' if shown.error else ''})", fontsize="medium")
        axes = np.atleast_1d(bottom.subplots(grid_rows, columns, sharex=True, squeeze=False)).ravel()
        styles = _styles(len(train_groups.labels))
        for index, axis in enumerate(axes):
            if index >= panels:
                axis.set_visible(False)
                continue
            for column, (color, style) in enumerate(styles):
                same = train_groups.labels[column] == probe_groups.labels[index]
                _draw(axis, steps, means_array[:, index, column], errors_array[:, index, column], color, style,
                      train_groups.names[column], width=2.6 if same else 1.2)
            axis.set_title(f"probe group {probe_groups.names[index]}", fontsize="medium")
            _value_axis(axis, f"mean {shown.name}" if index % columns == 0 else "")
            _mark_non_ok(axis, log)
            _time_axis(axis, log.steps, label=index >= panels - columns)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=color, ls=style, lw=1.6) for color, style in styles]
        bottom.legend(handles, train_groups.names, title="train group", loc="outside right center",
                      fontsize="small")
        return figure


def default_pairs(log: InfluenceLog, count: int = 4, z: float = 3.0) -> list[tuple[Any, Any]]:
    """``(probe id, train id)`` pairs worth a look: those that change sign most clearly, else the strongest.

    Sign-changing pairs rank by the smaller ``|z|`` of their change; without any, the pairs of
    largest ``|BIF|`` in the last ok snapshot are taken.
    """
    ranked: dict[tuple[int, int], float] = {}
    for change in log.sign_changes(z=z):
        strength = min(abs(change.z_before), abs(change.z_after))
        ranked[(change.probe, change.train)] = max(strength, ranked.get((change.probe, change.train), 0.0))
    positions = sorted(ranked, key=lambda pair: -ranked[pair])[:count]
    if not positions:
        last = int(np.flatnonzero(log.status == "ok")[-1])
        magnitude = np.nan_to_num(np.abs(np.asarray(log.influence[last], dtype=np.float64)), nan=-1.0)
        flat = np.argsort(magnitude, axis=None)[::-1][:count]
        positions = [tuple(int(i) for i in np.unravel_index(f, magnitude.shape)) for f in flat]
    return [(log.probe_ids[p].item(), log.train_ids[t].item()) for p, t in positions]


def plot_pairs(log: InfluenceLog | PathLike, pairs: Sequence[tuple[Any, Any]] | None = None,
               quantity: str = "influence") -> Figure:
    """(b) Chosen (probe, train) pairs over training with ±2 standard-error bars, the training loss above.

    Args:
        log: An open log or the path of one.
        pairs: ``(probe id, train id)`` pairs by dataset id (as the CLI prints them, not positions);
            default :func:`default_pairs`.
        quantity: ``"influence"`` or ``"correlation"``.

    Returns:
        The figure.

    Raises:
        ValueError: No ok snapshot, an unknown id, or a per-token/unknown ``quantity``.
    """
    with _opened(log) as log:
        _check_plottable(log)
        shown = quantity_of(quantity)
        chosen = list(pairs) if pairs is not None else default_pairs(log)
        if not chosen:
            raise ValueError("No pairs to plot: pass (probe id, train id) pairs.")
        positions = [(_position(log, "probe", probe), _position(log, "train", train)) for probe, train in chosen]
        rows = np.flatnonzero(log.status != "failed")
        figure = _pyplot_free_figure(figsize=(8.5, 6.8))
        top, bottom = figure.subfigures(2, 1, height_ratios=[2.3, 3.2])
        _header(top, log)
        why = "" if pairs is not None else "  (chosen: the clearest sign changes)"
        top.suptitle(f"Influence of chosen training examples on chosen probes{why}", fontsize="medium")
        axis = bottom.subplots()
        for (probe, train), (color, style) in zip(positions, _styles(len(positions)), strict=True):
            value, se = _curves(log, rows, shown, probe, train)
            _draw(axis, log.steps[rows], value, se, color, style,
                  f"{_example_label(log, 'probe', probe)} ← {_example_label(log, 'train', train)}", bars=True)
        _value_axis(axis, f"{shown.name}  ({shown.sense}{'; ±2 SE' if shown.error else ''})")
        _mark_non_ok(axis, log)
        _time_axis(axis, log.steps)
        axis.legend(fontsize="small", loc="best")
        return figure


def matrix_figure(matrices: Sequence[np.ndarray], titles: Sequence[str], probe_groups: Any = None,
                  train_groups: Any = None, probe_group_names: Sequence[str] | None = None,
                  train_group_names: Sequence[str] | None = None, quantity: str = "influence") -> Figure:
    """``[probe, train]`` matrices as small multiples, rows and columns sorted by group, on one colour scale.

    The scale is symmetric around 0 and saturates at the 99th percentile of ``|value|`` over all
    panels (arrows on the colour bar when values go beyond); NaN is grey. Group borders are lines,
    group names label the axes.

    Args:
        matrices: ``[P, N]`` arrays, one per panel.
        titles: A title per panel.
        probe_groups: Group label per probe ``[P]`` (``None``: one group).
        train_groups: Group label per training example ``[N]``.
        probe_group_names: Display name of each distinct probe label, in sorted label order.
        train_group_names: Display name of each distinct train label.
        quantity: ``"influence"`` or ``"correlation"`` (names the colour bar).

    Returns:
        The figure.
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    probe_labels, probe_members = group_labels(probe_groups, matrices[0].shape[0])
    train_labels, train_members = group_labels(train_groups, matrices[0].shape[1])
    probe_order = np.argsort(probe_members, kind="stable")
    train_order = np.argsort(train_members, kind="stable")
    sorted_matrices = [np.asarray(m, dtype=np.float64)[np.ix_(probe_order, train_order)] for m in matrices]
    finite = np.abs(np.concatenate([m[np.isfinite(m)] for m in sorted_matrices]))
    limit = float(np.percentile(finite, 99)) if finite.size else 1.0
    limit = limit if limit > 0 else 1.0
    columns = 1 if len(matrices) == 1 else 2
    grid_rows = -(-len(matrices) // columns)
    figure = _pyplot_free_figure(figsize=(5.4 * columns + 1.2, 0.6 + 2.7 * grid_rows))
    axes = np.atleast_1d(figure.subplots(grid_rows, columns, squeeze=False)).ravel()
    shown = quantity_of(quantity)
    cmap = colormaps["RdBu_r" if shown.helps < 0 else "RdBu"].with_extremes(bad="0.6")
    norm = Normalize(-limit, limit)

    def borders(members: np.ndarray, names: Sequence[str] | None, labels: np.ndarray):
        counts = np.bincount(members, minlength=len(labels))
        edges = np.cumsum(counts)[:-1] - 0.5
        centres = np.cumsum(counts) - counts / 2 - 0.5
        return edges, centres, list(names) if names is not None else [str(label) for label in labels.tolist()]

    probe_edges, probe_centres, probe_names = borders(probe_members, probe_group_names, probe_labels)
    train_edges, train_centres, train_names = borders(train_members, train_group_names, train_labels)
    image = None
    for index, axis in enumerate(axes):
        if index >= len(matrices):
            axis.set_visible(False)
            continue
        image = axis.imshow(sorted_matrices[index], cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        for edge in probe_edges:
            axis.axhline(edge, color="black", lw=0.6)
        for edge in train_edges:
            axis.axvline(edge, color="black", lw=0.6)
        axis.set_yticks(probe_centres, probe_names, fontsize="small")
        axis.set_xticks(train_centres, train_names, fontsize="small",
                        rotation=45 if max(map(len, train_names)) > 3 else 0, ha="right" if
                        max(map(len, train_names)) > 3 else "center")
        axis.tick_params(length=0)
        axis.set_title(titles[index], fontsize="medium")
        axis.set_xlabel(f"training examples ({len(train_members)}) by group", fontsize="small")
        axis.set_ylabel(f"probes ({len(probe_members)}) by group", fontsize="small")
    extend = "both" if finite.size and finite.max() > limit else "neither"
    if len(matrices) > 1:
        figure.suptitle(f"{shown.name[:1].upper()}{shown.name[1:]} of each training example (columns) "
                        "on each probe (rows), sorted by group; one colour scale for all panels", fontsize="medium")
    colorbar = figure.colorbar(image, ax=axes.tolist(), extend=extend, shrink=1.0 if grid_rows == 1 else 0.8,
                               aspect=25 if grid_rows == 1 else 35)
    colorbar.set_label(shown.colorbar_label)
    colorbar.formatter.set_powerlimits((-2, 3))
    return figure


def plot_matrix(log: InfluenceLog | PathLike, steps: Sequence[int] | None = None, panels: int = 4,
                quantity: str = "influence") -> Figure:
    """(c) The ``[probe, train]`` matrix at a few steps, sorted by group, on one symmetric colour scale.

    Args:
        log: An open log or the path of one.
        steps: Training steps (each shows the nearest snapshot); default ``panels`` usable snapshots
            spread from the first to the last.
        panels: How many snapshots when ``steps`` is not given.
        quantity: ``"influence"`` or ``"correlation"``.

    Returns:
        The figure (see :func:`matrix_figure`).

    Raises:
        ValueError: No ok snapshot, a step outside the logged range, a failed snapshot, or a bad ``quantity``.
    """
    with _opened(log) as log:
        _check_plottable(log)
        shown = quantity_of(quantity)
        rows = _rows_at(log, steps) if steps else _spread_rows(np.flatnonzero(log.status != "failed"), panels)
        values = getattr(log, shown.field)
        probe_groups, train_groups = _groups(log, "probe"), _groups(log, "train")
        titles = [f"step {log.steps[row]}" + ("" if log.status[row] == "ok" else f"  ({log.status[row]})")
                  for row in rows]
        return matrix_figure([values[row] for row in rows], titles, log.probe_groups, log.train_groups,
                             probe_groups.names, train_groups.names, quantity)


def plot_sign_changes(log: InfluenceLog | PathLike, z: float = 3.0, top: int = 25) -> Figure:
    """(d) Sign changes on a timeline: how many pairs flip between snapshots, and the clearest flips.

    Above, the number of pairs turning harmful (up, red) and helpful (down, blue) between consecutive
    ok snapshots, at their zero crossing; below, up to ``top`` individual changes (ranked by the
    smaller ``|z|`` of the change) as a bar from the last snapshot significant with the old sign to
    the first significant with the new, a dot at the interpolated zero crossing.

    Args:
        log: An open log or the path of one.
        z: Standard errors from zero that count as significant (see :meth:`InfluenceLog.sign_changes`).
        top: How many individual changes to list.

    Returns:
        The figure.

    Raises:
        ValueError: The log has no ok snapshot.
    """
    with _opened(log) as log:
        _check_plottable(log)
        changes = log.sign_changes(z=z)
        ok = np.flatnonzero(log.status == "ok")
        steps = log.steps
        shown = sorted(changes, key=lambda c: -min(abs(c.z_before), abs(c.z_after)))[:top]
        shown.sort(key=lambda c: c.crossing)
        figure = _pyplot_free_figure(figsize=(8.5, 2.6 + 0.22 * max(len(shown), 4)))
        counts_axis, list_axis = figure.subplots(2, 1, sharex=True, height_ratios=[2, max(len(shown), 4) * 0.22])
        edges = steps[ok].astype(np.float64)
        for turns, sign, color in (("harmful", 1, "tab:red"), ("helpful", -1, "tab:blue")):
            crossings = np.array([c.crossing for c in changes if c.turns == turns])
            counts, _ = np.histogram(crossings, bins=edges) if len(edges) > 1 else (np.zeros(0), None)
            if len(counts):
                counts_axis.bar(edges[:-1], sign * counts, width=np.diff(edges), align="edge", color=color,
                                alpha=0.7, label=f"turn {turns} ({len(crossings)})", edgecolor="white")
        counts_axis.axhline(0, color="black", lw=0.6)
        counts_axis.set_ylabel("pairs flipping\n(↑ harmful, ↓ helpful)", fontsize="small")
        pairs = len(log.probe_ids) * len(log.train_ids)
        figure.suptitle(f"{len(changes)} sign change(s) among {pairs} (probe, train) pairs over {len(ok)} ok "
                        f"snapshots, |BIF| > {z:g} SE", fontsize="medium")
        counts_axis.legend(fontsize="small", loc="best")
        for position, change in enumerate(shown):
            color = "tab:red" if change.turns == "harmful" else "tab:blue"
            list_axis.plot([change.before_step, change.after_step], [position, position], color=color, lw=4,
                           alpha=0.35, solid_capstyle="butt")
            list_axis.plot(change.crossing, position, "o", color=color, ms=4)
        list_axis.set_yticks(range(len(shown)), [
            f"{_example_label(log, 'probe', c.probe)} ← {_example_label(log, 'train', c.train)}" for c in shown],
            fontsize="x-small")
        list_axis.set_ylim(max(len(shown), 1) - 0.5, -0.5)
        list_axis.set_title(f"the {len(shown)} clearest: bar from the last step significant with the old sign to "
                            "the first with the new; dot = zero crossing" if shown else
                            f"no pair changes sign at z = {z:g}", fontsize="small")
        for axis in (counts_axis, list_axis):
            _mark_non_ok(axis, log)
            _time_axis(axis, steps, label=axis is list_axis)
        return figure


def plot_top_examples(log: InfluenceLog | PathLike, probe: Any | None = None, k: int = 5,
                      quantity: str = "influence") -> Figure:
    """(e) The ``k`` most helpful and ``k`` most harmful training examples of one probe over training.

    Examples rank by their mean value over the ok snapshots (most negative: most helpful).

    Args:
        log: An open log or the path of one.
        probe: The probe's id (dataset index or key); default the probe of the largest ``|BIF|`` in
            the last ok snapshot.
        k: Examples per panel.
        quantity: ``"influence"`` or ``"correlation"``.

    Returns:
        The figure: the training loss header, then a helpful and a harmful panel.

    Raises:
        ValueError: No ok snapshot, an unknown probe id, ``k < 1`` or a bad ``quantity``.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    with _opened(log) as log:
        _check_plottable(log)
        shown = quantity_of(quantity)
        ok = np.flatnonzero(log.status == "ok")
        if probe is None:
            last = np.nan_to_num(np.abs(np.asarray(log.influence[ok[-1]], dtype=np.float64)), nan=-1.0)
            position = int(np.unravel_index(np.argmax(last), last.shape)[0])
        else:
            position = _position(log, "probe", probe)
        values = getattr(log, shown.field)
        mean = np.nanmean([np.asarray(values[row, position], dtype=np.float64) for row in ok], axis=0)  # [N]
        ranked = np.argsort(np.nan_to_num(-shown.helps * mean, nan=0.0), kind="stable")  # most helpful first
        helpful, harmful = ("most negative", "most positive")[:: -shown.helps]
        picks = {f"most helpful ({helpful})": ranked[:k], f"most harmful ({harmful})": ranked[::-1][:k]}
        rows = np.flatnonzero(log.status != "failed")
        figure = _pyplot_free_figure(figsize=(11, 6.4))
        top, bottom = figure.subfigures(2, 1, height_ratios=[2.3, 3.2])
        _header(top, log)
        top.suptitle(f"Top {k} training examples of {_example_label(log, 'probe', position)} "
                     f"(ranked by mean {shown.name} over ok snapshots{'; bands ±2 SE' if shown.error else ''})",
                     fontsize="medium")
        axes = bottom.subplots(1, 2, sharex=True, sharey=True)
        for axis, (title, chosen) in zip(axes, picks.items(), strict=True):
            for train, (color, style) in zip(chosen, _styles(len(chosen)), strict=True):
                value, se = _curves(log, rows, shown, position, int(train))
                _draw(axis, log.steps[rows], value, se, color, style, _example_label(log, "train", int(train)))
            axis.set_title(title, fontsize="medium")
            _value_axis(axis, f"{shown.name} ({shown.sense})" if axis is axes[0] else "")
            _mark_non_ok(axis, log)
            _time_axis(axis, log.steps)
            axis.legend(fontsize="x-small", loc="best")
        return figure


def draw_figures(log: InfluenceLog, *, pairs: Sequence[tuple[Any, Any]] | None = None,
                 steps: Sequence[int] | None = None, probe: Any | None = None, top_k: int = 5,
                 figures: Sequence[str] = FIGURES, quantity: str = "influence") -> dict[str, Figure]:
    """The figures of :func:`write_figures` by name, drawn after every argument is checked.

    Raises:
        ValueError: A bad figure name, id or step, a log without an ok snapshot, or any error of the figure
            functions.
    """
    unknown = sorted(set(figures) - set(FIGURES))
    if unknown:
        raise ValueError(f"Unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}.")
    _check_plottable(log)
    quantity_of(quantity)
    # Bad ids and steps are refused before any figure is drawn.
    for probe_id, train_id in pairs or ():
        _position(log, "probe", probe_id), _position(log, "train", train_id)
    if probe is not None:
        _position(log, "probe", probe)
    if steps:
        _rows_at(log, steps)
    makers = {
        "groups": lambda: plot_groups(log, quantity),
        "pairs": lambda: plot_pairs(log, pairs, quantity),
        "matrix": lambda: plot_matrix(log, steps, quantity=quantity),
        "sign_changes": lambda: plot_sign_changes(log),
        "top_examples": lambda: plot_top_examples(log, probe, top_k, quantity),
    }
    return {name: makers[name]() for name in FIGURES if name in figures}


def write_figures(log: InfluenceLog | PathLike, out: PathLike, format: str = "png", *,
                  pairs: Sequence[tuple[Any, Any]] | None = None, steps: Sequence[int] | None = None,
                  probe: Any | None = None, top_k: int = 5, prefix: str = "", dpi: int = 110,
                  figures: Sequence[str] = FIGURES, quantity: str = "influence") -> list[Path]:
    """Save the figures of a log as ``<out>/<prefix><name>.<format>``.

    Names: ``groups`` (:func:`plot_groups`), ``pairs`` (:func:`plot_pairs`), ``matrix``
    (:func:`plot_matrix`), ``sign_changes`` (:func:`plot_sign_changes`), ``top_examples``
    (:func:`plot_top_examples`).

    Args:
        log: An open log or the path of one.
        out: Output directory (created).
        format: ``"png"``, ``"pdf"`` or ``"svg"``.
        pairs: ``(probe id, train id)`` pairs for the pairs figure (default: :func:`default_pairs`).
        steps: Steps of the matrix panels.
        probe: Probe id of the top-examples figure.
        top_k: Examples per panel of the top-examples figure.
        prefix: Prepended to every file name.
        dpi: Resolution of PNGs.
        figures: Which figures to write.
        quantity: ``"influence"`` or ``"correlation"`` (sign changes always use influence).

    Returns:
        The files written.

    Raises:
        ValueError: A bad format or figure name, or any error of the figure functions.
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown figure format {format!r}; choose one of {', '.join(FORMATS)}.")
    out = Path(out)
    with _opened(log) as log:
        drawn = draw_figures(log, pairs=pairs, steps=steps, probe=probe, top_k=top_k, figures=figures,
                             quantity=quantity)  # all checks pass before any file
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, figure in drawn.items():
            path = out / f"{prefix}{name}.{format}"
            figure.savefig(path, dpi=dpi)
            written.append(path)
        return written


def plot_diagnostics(log: InfluenceLog | PathLike) -> Figure:
    """The diagnostics of every snapshot over training: split-half, loss rise, diverged chains and duration.

    Snapshots that are not ``ok`` are marked by grey lines and named in each panel; failed ones have no
    estimate, so only their duration is drawn.
    """
    with _opened(log) as log:
        if not len(log):
            raise ValueError(f"The influence log {log.path} has no snapshots yet.")
        figure = _pyplot_free_figure(figsize=(9, 7))
        axes = figure.subplots(4, 1, sharex=True)
        diverged = np.array([np.asarray(d).sum() if s != "failed" else np.nan
                             for d, s in zip(log.diverged, log.status, strict=True)], dtype=np.float64)
        panels = (("split-half", log.split_half, SPLIT_HALF_WARN), ("loss rise", log.loss_rise, None),
                  ("diverged chains", diverged, None), ("seconds", log.duration_s, None))
        for axis, (label, values, warn) in zip(axes, panels, strict=True):
            axis.plot(log.steps, np.asarray(values, dtype=np.float64), "o-", color="black", ms=3, lw=1.2)
            if warn is not None:
                axis.axhline(warn, color="tab:red", lw=0.8, ls=":")
            axis.set_ylabel(label, fontsize="small")
            for row in np.flatnonzero(log.status != "ok"):
                axis.annotate(log.status[row], (log.steps[row], 0.5), xycoords=("data", "axes fraction"),
                              rotation=90, ha="center", va="center", fontsize="x-small", color="0.3")
            _mark_non_ok(axis, log)
            _time_axis(axis, log.steps, label=axis is axes[-1])
        figure.suptitle("Diagnostics of every snapshot (grey: not ok)", fontsize="medium")
        return figure
