"""``lightning-bif report``: one self-contained HTML page of an influence log, to open or send as it is.

The page holds the run's identity and settings, the summary table (a row per snapshot, what each column
means), the figures of ``lightning-bif plot``, the diagnostics over time with every snapshot that is not
``ok`` marked, and for a per-token log the token view. Images (PNG), styles and the token view's script
are inline: the page loads nothing from anywhere.

    >>> from lightning_bif.viewers.report import write_report      # doctest: +SKIP
    >>> write_report("runs/exp/influence.h5", "report.html")        # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..log import InfluenceLog, PathLike, open_log
from ..log.columns import COLUMNS
from ..log.summaries import extremes, flatten_config

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The log columns of the summary table, in order; their descriptions explain them on the page.
SUMMARY_COLUMNS = ("step", "epoch", "status", "duration_s", "split_half", "loss_rise", "step_size")
#: The sections of the page, by ``id``.
SECTIONS = ("run", "settings", "summary", "figures", "diagnostics", "tokens")
_COLUMNS = {column.name: column for column in COLUMNS}
_FIGURE_TEXT = {
    "groups": "Mean BIF of each train group on each probe group over training (±2 SE bands), under the training "
              "loss and the split-half strip.",
    "pairs": "The clearest (probe, train) pairs over training, ±2 SE.",
    "matrix": "The [probe, train] matrix at a few snapshots, sorted by group: blue = helps, red = harms.",
    "sign_changes": "Pairs whose influence turns from helpful to harmful or back (beyond 3 SE), by when.",
    "top_examples": "The most helpful and most harmful training examples of one probe at a few snapshots.",
}


def check_out(path: PathLike) -> Path:
    """The report's path, refused before anything is drawn or written when it cannot be written.

    Raises:
        ValueError: ``path`` is a directory, its folder does not exist, or either is not writable.
    """
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise ValueError(f"--out {path} is a directory; name the HTML file, e.g. {path / 'report.html'}.")
    if not folder.is_dir():
        raise ValueError(f"--out {path}: the folder {folder} does not exist; create it first.")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--out {path}: cannot write there (permission denied).")
    return path


def write_report(log: InfluenceLog | PathLike, out: PathLike) -> Path:
    """Write :func:`render_report`'s page to ``out`` (checked first, see :func:`check_out`); returns the path."""
    out = check_out(out)
    if isinstance(log, InfluenceLog):
        page = render_report(log)
    else:
        with open_log(log) as opened:
            page = render_report(opened)
    out.write_text(page, encoding="utf-8")
    return out


def render_report(log: InfluenceLog) -> str:
    """The report of ``log`` as one HTML document (sections :data:`SECTIONS`; no external reference)."""
    parts = [_run(log), _settings(log), _summary(log), _figures(log), _diagnostics(log)]
    if log.tokens is not None:
        parts.append(_tokens(log))
    title = html.escape(f"Influence report: {log.path.name}")
    return _PAGE.replace("__TITLE__", title).replace("__BODY__", "\n".join(parts))


def _png(figure: Figure, dpi: int = 90) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="" src="data:image/png;base64,{encoded}">'


def _table(header: list[str] | None, rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header or ())
    body = "".join(
        f'<tr class="{css}">' + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row, css in zip(rows, classes or [""] * len(rows), strict=True))
    return f"<table>{f'<thead><tr>{head}</tr></thead>' if head else ''}<tbody>{body}</tbody></table>"


def _groups(labels: np.ndarray | None, names: dict | None) -> str:
    if labels is None:
        return "none"
    unique = np.unique(labels).tolist()
    shown = [str((names or {}).get(label, label)) for label in unique]
    return f"{len(unique)}: " + ", ".join(shown[:20]) + (", …" if len(shown) > 20 else "")


def _run(log: InfluenceLog) -> str:
    counts = Counter(log.status.tolist())
    steps = f"steps {log.steps[0]}–{log.steps[-1]}" if len(log) else "no snapshots yet"
    rows = [
        ["log", str(log.path)],
        ["written by", f"lightning-bif {log.package_version}, log format {log.format_version}, created {log.created}"],
        ["snapshots", f"{len(log)} ({steps}): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))],
        ["probes", f"{len(log.probe_ids)}; groups {_groups(log.probe_groups, log.probe_group_names)}"],
        ["tracked training examples",
         f"{len(log.train_ids)}; groups {_groups(log.train_groups, log.train_group_names)}"],
        ["chains × draws", f"{log.chains} × {log.draws}"],
        ["per-token influence", "no" if log.tokens is None else f"yes, {log.tokens} tokens per probe"],
    ]
    return ('<section id="run"><h2>Run</h2>' + _table(None, rows)
            + "<p>BIF = −Cov(loss of a training example, probe) under a posterior localized at the weights of the "
              "snapshot: <b>negative = the example helps the probe, positive = it harms it</b>.</p></section>")


def _settings(log: InfluenceLog) -> str:
    rows = [[key, str(value)] for key, value in flatten_config(log.config).items()]
    return ('<section id="settings"><h2>Settings</h2><details><summary>The stored configuration '
            f"({len(rows)} entries)</summary>" + _table(["setting", "value"], rows) + "</details></section>")


def _summary(log: InfluenceLog) -> str:
    def cell(name: str, row: int) -> str:
        value = getattr(log, _COLUMNS[name].accessor)[row]
        return f"{value:.3g}" if isinstance(value, (float, np.floating)) else str(value)

    def pair(row: int) -> list[str]:
        found = extremes(log.influence[row])
        if found is None:
            return [log.message[row][:120] or "no estimate", ""]
        return [f"probe {log.probe_ids[p.probe]} ← train {log.train_ids[p.train]}: {p.influence:+.3g}" for p in found]

    rows = [[cell(name, row) for name in SUMMARY_COLUMNS] + pair(row) for row in range(len(log))]
    classes = ["" if status == "ok" else f"not-ok {status}" for status in log.status.tolist()]
    meaning = "".join(f"<dt>{name}</dt><dd>{html.escape(_COLUMNS[name].description)}</dd>" for name in SUMMARY_COLUMNS)
    meaning += ("<dt>most helpful, most harmful</dt><dd>the (probe id, training example id) pair with the most "
                "negative and the most positive BIF of the snapshot</dd>")
    return ('<section id="summary"><h2>Snapshots</h2>'
            + _table([*SUMMARY_COLUMNS, "most helpful", "most harmful"], rows, classes)
            + f'<h3>What each column means</h3><dl class="columns">{meaning}</dl>'
            + "<p>Rows shaded red are snapshots that are not <code>ok</code>.</p></section>")


def _figures(log: InfluenceLog) -> str:
    from .plot import FIGURES, draw_figures

    try:
        drawn = draw_figures(log)
    except ValueError as error:
        return (f'<section id="figures"><h2>Figures</h2><p class="note">No figures: {html.escape(str(error))}</p>'
                "</section>")
    body = "".join(f'<figure id="figure-{name}">{_png(drawn[name])}<figcaption><b>{name}</b>: '
                   f"{html.escape(_FIGURE_TEXT[name])}</figcaption></figure>" for name in FIGURES if name in drawn)
    return ('<section id="figures"><h2>Figures</h2><p>The figures of <code>lightning-bif plot</code> '
            "(docs/figures.md). Grey lines mark snapshots that are not ok.</p>" + body + "</section>")


def _diagnostics(log: InfluenceLog) -> str:
    from .plot import SPLIT_HALF_WARN, plot_diagnostics

    if not len(log):
        return '<section id="diagnostics"><h2>Diagnostics</h2><p class="note">No snapshots yet.</p></section>'
    not_ok = [f"<li>step {log.steps[row]}: <b>{html.escape(str(log.status[row]))}</b>"
              + (f" — {html.escape(log.message[row])}" if log.message[row] else "") + "</li>"
              for row in np.flatnonzero(log.status != "ok")]
    listed = f'<ul class="not-ok-list">{"".join(not_ok)}</ul>' if not_ok else "<p>Every snapshot is ok.</p>"
    return ('<section id="diagnostics"><h2>Diagnostics over time</h2>'
            f"{_png(plot_diagnostics(log))}<h3>Snapshots that are not ok</h3>{listed}"
            f"<p>Split-half below {SPLIT_HALF_WARN:g} (dotted line): single entries are mostly noise; more chains "
            "help. A loss rise that is large or grows: the chains drift (lower the step size, raise the "
            "localization).</p>"
            "</section>")


def _tokens(log: InfluenceLog) -> str:
    from .tokens import render_html

    try:
        page = render_html(log)
    except ValueError as error:
        return f'<section id="tokens"><h2>Token view</h2><p class="note">{html.escape(str(error))}</p></section>'
    return ('<section id="tokens"><h2>Token view</h2><p>The interactive view of <code>lightning-bif tokens '
            '--html</code>, embedded: pick a probe, a snapshot and training data.</p>'
            f'<iframe title="token view" srcdoc="{html.escape(page, quote=True)}"></iframe></section>')


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em auto; color: #222; max-width: 75em; padding: 0 1em; }
h1 { font-size: 1.4em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; margin-top: 1.6em; }
h3 { font-size: 1em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
td, th { border: 1px solid #ddd; padding: .2em .5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
tr.not-ok td { background: #fde2e2; }
dl.columns { font-size: .9em; } dl.columns dt { font-weight: bold; font-family: monospace; }
dl.columns dd { margin: 0 0 .4em 1.5em; }
figure { margin: 1em 0; } figure img, section > img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #444; }
iframe { width: 100%; height: 48em; border: 1px solid #ddd; }
.note { color: #a33; }
</style></head>
<body><h1>__TITLE__</h1>
__BODY__
</body></html>
"""
