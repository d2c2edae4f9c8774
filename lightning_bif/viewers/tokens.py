"""The token view: a probe's tokens coloured by per-token influence, in the terminal and as an HTML page.

Reads a per-token log (``SGLDConfig(per_token=True)``); the token strings come from the log when the
run stored them (``BIFCallback(probe_tokens=..., train_text=...)``), else tokens show as their
positions. Blue = helpful (up-weighting the selected training data lowers that token's loss), red =
harmful. ``lightning-bif tokens LOG`` prints :func:`format_view`; :func:`write_html` writes a
self-contained page with a probe, snapshot and training-data picker.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..log import InfluenceLog

# The HTML page embeds the per-token arrays of every probe and usable snapshot up to this many entries
# (two numbers each), then only the chosen probe, then only the chosen probe at the chosen snapshot.
MAX_HTML_ENTRIES = 400_000
# Background colours (xterm-256) from faint to strong: helpful blues and harmful reds.
_BLUES = (195, 153, 111, 69, 27)
_REDS = (224, 217, 210, 203, 196)
_SIGNIFICANT_Z = 2.0


@dataclass
class RankedExample:
    """A tracked training example ranked by its influence on a probe (its mean token loss).

    Attributes:
        position: Position in the log's ``train_ids``.
        id: Its id (dataset index or key).
        group: Its group label, or ``None``.
        influence: BIF on the probe (negative = helpful).
        stderr: Standard error of ``influence``.
        text: Its stored text, or ``None``.
    """

    position: int
    id: Any
    group: Any
    influence: float
    stderr: float
    text: str | None


@dataclass
class TokenView:
    """Per-token influence of a selection of tracked training examples on one probe at one snapshot.

    Attributes:
        step: Training step of the snapshot.
        status: The snapshot's status (``"ok"`` or ``"diverged"``).
        probe: Position of the probe in the log's ``probe_ids``.
        probe_id: Its id.
        selection: What was selected, in words.
        tokens: Display string of every token, ``[T]``.
        influence: BIF on each token's loss, summed over the selected examples, ``[T]``.
        stderr: Standard error of each value, ``[T]``. For a sum over several examples it is the sum
            of their standard errors, an upper bound (the entries come from the same draws).
        helpful: The most helpful tracked examples on the probe's mean token loss, most helpful first.
        harmful: The most harmful ones, most harmful first.
    """

    step: int
    status: str
    probe: int
    probe_id: Any
    selection: str
    tokens: list[str]
    influence: np.ndarray
    stderr: np.ndarray
    helpful: list[RankedExample]
    harmful: list[RankedExample]


def _require_tokens(log: InfluenceLog) -> None:
    if log.token_influence is None:
        raise ValueError(f"The influence log {log.path} has no per-token influence: the run did not use "
                         "SGLDConfig(per_token=True), so there is no token view.")


def _usable_rows(log: InfluenceLog) -> np.ndarray:
    rows = np.flatnonzero(log.status != "failed")
    if not len(rows):
        raise ValueError(f"The influence log {log.path} has no usable snapshot yet (none, or all failed).")
    return rows


def _check_positions(log: InfluenceLog, probe: int, train: int | None) -> None:
    for name, position, size in (("probe", probe, len(log.probe_ids)), ("train", train, len(log.train_ids))):
        if position is not None and not -size <= position < size:
            raise IndexError(f"{name} position {position} out of range for {size} {name} examples.")


def _row(log: InfluenceLog, step: int | None) -> int:
    """The usable snapshot nearest ``step`` (default: the last usable one)."""
    rows = _usable_rows(log)
    if step is None:
        return int(rows[-1])
    log.nearest(step)  # refuses a step outside the logged range instead of moving it to an end
    return int(rows[np.argmin(np.abs(log.steps[rows] - step))])


def token_strings(log: InfluenceLog, probe: int) -> list[str]:
    """The stored token strings of a probe, or ``"<t>"`` placeholders when the run stored none."""
    if log.probe_tokens is not None:
        return list(log.probe_tokens[probe])
    return [f"<{t}>" for t in range(log.tokens or 0)]


def resolve_id(log: InfluenceLog, kind: str, text: str) -> int:
    """Position of the probe or training example whose id reads ``text`` (as typed on a command line).

    Raises:
        ValueError: No example of that kind has this id.
    """
    ids = log.probe_ids if kind == "probe" else log.train_ids
    hits = np.flatnonzero(ids.astype(str) == text)
    if not len(hits):
        shown = ", ".join(map(str, ids[:8].tolist())) + (", ..." if len(ids) > 8 else "")
        raise ValueError(f"No {kind} with id {text!r} in {log.path}; its {kind} ids are {shown}.")
    return int(hits[0])


def resolve_group(log: InfluenceLog, text: str) -> Any:
    """The training group label that reads ``text``.

    Raises:
        ValueError: The log has no training groups, or none with this label.
    """
    if log.train_groups is None:
        raise ValueError(f"The influence log {log.path} has no training groups (BIFCallback(train_groups=...)).")
    labels = np.unique(log.train_groups)
    hits = [label for label in labels.tolist() if str(label) == text]
    if not hits:
        raise ValueError(f"No training group {text!r} in {log.path}; its groups are "
                         f"{', '.join(map(str, labels.tolist()))}.")
    return hits[0]


def token_view(
    log: InfluenceLog,
    probe: int = 0,
    *,
    train: int | None = None,
    group: Any = None,
    step: int | None = None,
    top: int = 3,
) -> TokenView:
    """The per-token influence of one training example, one group, or all tracked examples on a probe.

    Args:
        log: A per-token influence log.
        probe: Position of the probe (see ``log.probe_ids``).
        train: Position of one training example; with neither ``train`` nor ``group``, the sum over
            all tracked examples.
        group: A training group label: the sum over that group's examples.
        step: Training step (the nearest usable snapshot; default: the last usable one).
        top: How many of the most helpful and most harmful training examples to list.

    Returns:
        A :class:`TokenView`.

    Raises:
        ValueError: The log has no per-token influence or no usable snapshot, or both ``train`` and
            ``group`` were given.
        IndexError: ``probe`` or ``train`` is out of range.
    """
    _require_tokens(log)
    if train is not None and group is not None:
        raise ValueError("Pass train= or group=, not both.")
    _check_positions(log, probe, train)
    row = _row(log, step)
    if train is not None:
        columns = np.array([train % len(log.train_ids)])
        selection = f"train {log.train_ids[columns[0]]}" + _group_suffix(log, int(columns[0]))
    elif group is not None:
        if log.train_groups is None:
            raise ValueError(f"The influence log {log.path} has no training groups.")
        columns = np.flatnonzero(log.train_groups == group)
        if not len(columns):
            raise ValueError(f"No training group {group!r} in {log.path}.")
        selection = f"sum over group {group} ({len(columns)} examples)"
    else:
        columns = np.arange(len(log.train_ids))
        selection = f"sum over all {len(columns)} tracked examples"
    token = log.token_influence[row, probe][:, columns]
    token_se = log.token_stderr[row, probe][:, columns]
    mean, mean_se = log.influence[row, probe], log.stderr[row, probe]
    order = np.argsort(mean, kind="stable")
    ranked = lambda positions: [_ranked(log, int(i), mean, mean_se) for i in positions]  # noqa: E731
    return TokenView(
        step=int(log.steps[row]), status=str(log.status[row]), probe=probe % len(log.probe_ids),
        probe_id=log.probe_ids[probe].item(), selection=selection, tokens=token_strings(log, probe),
        influence=token.sum(axis=1), stderr=token_se.sum(axis=1),
        helpful=ranked([i for i in order[:top] if mean[i] < 0]),
        harmful=ranked([i for i in order[::-1][:top] if mean[i] > 0]),
    )


def _group_suffix(log: InfluenceLog, position: int) -> str:
    return "" if log.train_groups is None else f" ({log.train_groups[position]})"


def _ranked(log: InfluenceLog, position: int, mean: np.ndarray, se: np.ndarray) -> RankedExample:
    return RankedExample(
        position=position, id=log.train_ids[position].item(),
        group=None if log.train_groups is None else log.train_groups[position].item(),
        influence=float(mean[position]), stderr=float(se[position]),
        text=None if log.train_text is None else log.train_text[position],
    )


def _visible(token: str) -> str:
    """A token as it should print on one line: control characters escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in token)


def _scale(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if len(finite) and finite.max() > 0 else 1.0


def format_view(view: TokenView, color: bool, width: int = 100) -> str:
    """The token view as terminal text.

    Args:
        view: What to show (from :func:`token_view`).
        color: ANSI background colours by sign and size (for a terminal); without, tokens beyond
            two standard errors are marked ``[-helpful-]`` and ``{+harmful+}``.
        width: Wrap the probe's text at this many characters.

    Returns:
        The text, ending in a newline.
    """
    scale = _scale(view.influence)
    z = np.divide(view.influence, view.stderr, out=np.zeros_like(view.influence), where=view.stderr > 0)
    significant = np.abs(z) >= _SIGNIFICANT_Z
    lines = [
        f"probe {view.probe_id} at step {view.step} ({view.status}): per-token BIF of the {view.selection}",
        (f"colour: blue helps (lowers the token's loss), red harms; full colour at |BIF| = {scale:.3g}"
         if color else f"[-...-] helps, {{+...+}} harms (tokens beyond {_SIGNIFICANT_Z:g} standard errors); "
         f"largest |BIF| = {scale:.3g}"),
        f"{int(significant.sum())} of {len(view.tokens)} tokens beyond {_SIGNIFICANT_Z:g} standard errors",
        "",
    ]
    pieces = []
    for t, token in enumerate(view.tokens):
        text, value = _visible(token), float(view.influence[t])
        if color:
            level = min(len(_BLUES) - 1, int(abs(value) / scale * len(_BLUES))) if np.isfinite(value) else 0
            background = (_BLUES if value < 0 else _REDS)[level]
            foreground = 97 if level >= 3 else 30
            pieces.append((len(text), f"\x1b[{foreground};48;5;{background}m{text}\x1b[0m"))
        else:
            pieces.append((len(text), text))
    if not color:
        pieces = _marked(pieces, view.influence, significant)
    lines.extend(_wrapped(pieces, width))
    strongest = np.argsort(-np.nan_to_num(np.abs(view.influence)), kind="stable")[:8]
    lines += ["", "strongest tokens (position, token, BIF ± standard error):"]
    lines += [f"  {t:>4}  {_visible(view.tokens[t])!r:<12} {view.influence[t]:+.3g} ± {view.stderr[t]:.2g}"
              f"{'' if significant[t] else '  (within noise)'}" for t in strongest.tolist()]
    for title, examples in (("most helpful", view.helpful), ("most harmful", view.harmful)):
        lines += ["", f"{title} tracked examples for this probe (BIF on its mean token loss):"]
        lines += [f"  {e.influence:+.3g} ± {e.stderr:.2g}  train {e.id}" + ("" if e.group is None else f" ({e.group})")
                  + ("" if e.text is None else f": {_visible(e.text)[:width]!r}") for e in examples] or ["  none"]
    return "\n".join(lines) + "\n"


def _marked(pieces: list[tuple[int, str]], values: np.ndarray, significant: np.ndarray) -> list[tuple[int, str]]:
    """Wrap runs of significant same-sign tokens in ``[-...-]`` (helpful) or ``{+...+}`` (harmful)."""
    sign = np.where(significant, np.sign(values), 0)
    marked = []
    for t, (size, text) in enumerate(pieces):
        opens = sign[t] != 0 and (t == 0 or sign[t - 1] != sign[t])
        closes = sign[t] != 0 and (t == len(pieces) - 1 or sign[t + 1] != sign[t])
        before, after = ("[-", "-]") if sign[t] < 0 else ("{+", "+}")
        text = (before if opens else "") + text + (after if closes else "")
        marked.append((size + 2 * opens + 2 * closes, text))
    return marked


def _wrapped(pieces: list[tuple[int, str]], width: int) -> list[str]:
    lines, line, used = [], "", 0
    for size, text in pieces:
        if used and used + size > width:
            lines.append(line)
            line, used = "", 0
        line, used = line + text, used + size
    return [*lines, line]


def _rounded(array: np.ndarray) -> Any:
    """Nested lists of 4-significant-digit floats, ``None`` for non-finite values (JSON has no NaN)."""
    flat = [float(f"{v:.4g}") if np.isfinite(v) else None for v in np.asarray(array, dtype=np.float64).ravel()]
    return np.array(flat, dtype=object).reshape(np.shape(array)).tolist()


def _label(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def render_html(
    log: InfluenceLog,
    probe: int = 0,
    *,
    train: int | None = None,
    group: Any = None,
    step: int | None = None,
    top: int = 5,
) -> str:
    """A self-contained HTML page of the token view (no network access needed to show it).

    The page has a probe picker, a snapshot slider and a training-data picker (all tracked
    examples, a group, or one example); tokens are coloured blue (helpful) to red (harmful) and
    their tooltips give the value ± standard error. The most helpful and harmful training examples
    for the probe are listed with their text; clicking one selects it. Per-token arrays of every
    probe and usable snapshot are embedded up to :data:`MAX_HTML_ENTRIES` entries, beyond that only
    those of the chosen probe (and then only of the chosen snapshot).

    Args:
        log: A per-token influence log.
        probe: Position of the probe shown first.
        train: Position of the training example selected first (default: all tracked examples).
        group: Training group selected first.
        step: Training step shown first (nearest usable snapshot; default: the last usable one).
        top: How many helpful and harmful examples to list.

    Returns:
        The HTML text.

    Raises:
        ValueError: The log has no per-token influence or no usable snapshot.
    """
    _require_tokens(log)
    _check_positions(log, probe, train)
    row = _row(log, step)
    rows, probes = _usable_rows(log), np.arange(len(log.probe_ids))
    per_entry = log.tokens * len(log.train_ids)
    if len(rows) * len(probes) * per_entry > MAX_HTML_ENTRIES:
        probes = np.array([probe % len(log.probe_ids)])
    if len(rows) * len(probes) * per_entry > MAX_HTML_ENTRIES:
        rows = np.array([row])
    if group is not None:
        selection = f"group:{[str(g) for g in np.unique(log.train_groups)].index(str(group))}"
    else:
        selection = "all" if train is None else f"train:{train % len(log.train_ids)}"
    groups = [] if log.train_groups is None else np.unique(log.train_groups).tolist()
    data = {
        "file": log.path.name,
        "steps": log.steps[rows].tolist(),
        "status": log.status[rows].tolist(),
        "probes": [{"id": _label(log.probe_ids[p]), "tokens": token_strings(log, int(p)),
                    "group": None if log.probe_groups is None else _label(log.probe_groups[p])} for p in probes],
        "train": [{"id": _label(log.train_ids[i]),
                   "group": None if log.train_groups is None else _label(log.train_groups[i]),
                   "text": None if log.train_text is None else log.train_text[i]} for i in range(len(log.train_ids))],
        "groups": groups,
        "members": [np.flatnonzero(log.train_groups == g).tolist() for g in groups],
        "token": _rounded(np.stack([log.token_influence[int(r)][probes] for r in rows])),
        "token_se": _rounded(np.stack([log.token_stderr[int(r)][probes] for r in rows])),
        "influence": _rounded(np.stack([log.influence[int(r)][probes] for r in rows])),
        "stderr": _rounded(np.stack([log.stderr[int(r)][probes] for r in rows])),
        "initial": {"probe": int(np.flatnonzero(probes == probe % len(log.probe_ids))[0]),
                    "row": int(np.flatnonzero(rows == row)[0]), "selection": selection},
        "top": top,
        "partial": (f"showing {len(probes)} of {len(log.probe_ids)} probes and {len(rows)} of "
                    f"{len(_usable_rows(log))} usable snapshots (the page embeds at most {MAX_HTML_ENTRIES:,} "
                    "entries)") if len(probes) < len(log.probe_ids) or len(rows) < len(_usable_rows(log)) else "",
    }
    # No "<" inside the script element, so no text ("</script>", "<!--") can end or change it.
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return _PAGE.replace("__TITLE__", html.escape(f"Token influence: {log.path.name}")).replace("__DATA__", payload)


def write_html(path: str | Path, log: InfluenceLog, **kwargs: Any) -> Path:
    """Write :func:`render_html`'s page to ``path`` (parent directories are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(log, **kwargs), encoding="utf-8")
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 70em; }
h1 { font-size: 1.25em; margin-bottom: .2em; }
.controls { display: flex; gap: 1.5em; flex-wrap: wrap; align-items: center; margin: .8em 0; }
.controls label { font-size: .9em; }
select { max-width: 32em; }
.legend { font-size: .85em; color: #555; margin: .3em 0 .8em; }
.swatch { display: inline-block; width: 14em; height: .9em; vertical-align: middle; border: 1px solid #ccc;
  background: linear-gradient(to right, rgb(33,102,172), #fff, rgb(178,24,43)); }
#tokens { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 1.3em; line-height: 1.9;
  white-space: pre-wrap; padding: .6em; border: 1px solid #ddd; border-radius: 4px; }
#tokens span { border-radius: 2px; }
#tokens span:hover { outline: 1px solid #000; }
.lists { display: flex; gap: 2em; flex-wrap: wrap; margin-top: 1em; }
.lists > div { flex: 1 1 28em; }
h2 { font-size: 1em; margin: .5em 0; }
.example { font-size: .85em; padding: .35em .5em; margin: .25em 0; border-left: 4px solid #ccc; cursor: pointer; }
.example:hover { background: #f4f4f4; }
.example code { white-space: pre-wrap; }
.helpful { border-color: rgb(33,102,172); } .harmful { border-color: rgb(178,24,43); }
.note { font-size: .8em; color: #666; margin-top: 1.2em; }
</style></head><body>
<h1>Per-token influence on a probe</h1>
<div class="legend" id="subtitle"></div>
<div class="controls">
 <label>Probe <select id="probe"></select></label>
 <label>Snapshot <input type="range" id="row" min="0" value="0"> <span id="step"></span></label>
 <label>Training data <select id="selection"></select></label>
</div>
<div class="legend"><span class="swatch"></span> &nbsp;blue: helps (lowers the token's loss) &middot; red: harms
 &middot; <span id="scale"></span> &middot; hover a token for its value &plusmn; standard error</div>
<div id="tokens"></div>
<div class="lists"><div><h2>Most helpful training examples for this probe</h2><div id="helpful"></div></div>
<div><h2>Most harmful training examples for this probe</h2><div id="harmful"></div></div></div>
<p class="note">BIF = &minus;Cov(&ell;<sub>train</sub>, &ell;<sub>token</sub>) over the localized posterior at that
snapshot; negative = up-weighting the training example lowers the token's loss. Examples are ranked by their
BIF on the probe's mean token loss. For a sum over several examples the &plusmn; shown is the sum of their
standard errors, an upper bound. <span id="partial"></span></p>
<script id="data" type="application/json">__DATA__</script>
<script>
const D = JSON.parse(document.getElementById("data").textContent);
const $ = id => document.getElementById(id);
const fmt = v => v === null ? "n/a" : (v >= 0 ? "+" : "") + v.toPrecision(3);
const describe = i => {
  const t = D.train[i];
  return "train " + t.id + (t.group === null ? "" : " (" + t.group + ")");
};
function fill(select, options) {
  select.innerHTML = "";
  for (const [value, text] of options) { const o = document.createElement("option"); o.value = value;
    o.textContent = text; select.appendChild(o); }
}
fill($("probe"), D.probes.map((p, i) => [i, "probe " + p.id + (p.group === null ? "" : " (" + p.group + ")") + ": "
  + p.tokens.join("").slice(0, 60)]));
fill($("selection"), [["all", "all " + D.train.length + " tracked examples (sum)"],
  ...D.groups.map((g, i) => ["group:" + i, "group " + g + " (sum of " + D.members[i].length + ")"]),
  ...D.train.map((t, i) => ["train:" + i, describe(i) + (t.text === null ? "" : ": " + t.text.slice(0, 50))])]);
$("row").max = D.steps.length - 1;
$("probe").value = D.initial.probe; $("row").value = D.initial.row; $("selection").value = D.initial.selection;
$("partial").textContent = D.partial;
function columns() {
  const s = $("selection").value;
  if (s === "all") return D.train.map((_, i) => i);
  const [kind, index] = s.split(":");
  return kind === "group" ? D.members[+index] : [+index];
}
function example(i, values, errors, kind) {
  const t = D.train[i], div = document.createElement("div");
  div.className = "example " + kind;
  div.innerHTML = "<b>" + fmt(values[i]) + "</b> &plusmn; " + errors[i].toPrecision(2) + " &nbsp;" + describe(i)
    + (t.text === null ? "" : "<br><code></code>");
  if (t.text !== null) div.querySelector("code").textContent = t.text;
  div.onclick = () => { $("selection").value = "train:" + i; render(); };
  return div;
}
function render() {
  const p = +$("probe").value, r = +$("row").value, cols = columns(), probe = D.probes[p];
  $("step").textContent = "step " + D.steps[r] + (D.status[r] === "ok" ? "" : " (" + D.status[r] + ")");
  $("subtitle").textContent = D.file + " \\u00b7 " + D.steps.length + " snapshot(s) \\u00b7 " + D.probes.length
    + " probe(s) \\u00b7 " + D.train.length + " tracked training examples";
  const token = D.token[r][p], se = D.token_se[r][p];
  const values = token.map(row => cols.reduce((a, i) => a + (row[i] ?? NaN), 0));
  const errors = se.map(row => cols.reduce((a, i) => a + (row[i] ?? NaN), 0));
  const scale = Math.max(...values.map(v => Math.abs(v)).filter(Number.isFinite), 1e-30);
  $("scale").textContent = "full colour at |BIF| = " + scale.toPrecision(3);
  const box = $("tokens"); box.innerHTML = "";
  probe.tokens.forEach((text, t) => {
    const span = document.createElement("span"), v = values[t], a = Math.min(1, Math.abs(v) / scale);
    span.textContent = text;
    span.style.background = v < 0 ? `rgba(33,102,172,${a})` : `rgba(178,24,43,${a})`;
    if (a > 0.55) span.style.color = "#fff";
    const z = errors[t] > 0 ? v / errors[t] : NaN;
    span.title = JSON.stringify(text) + " (token " + t + "): BIF " + fmt(v) + " \\u00b1 " + errors[t].toPrecision(2)
      + (Number.isFinite(z) ? " (z = " + z.toFixed(1) + ")" : "");
    box.appendChild(span);
  });
  const mean = D.influence[r][p], err = D.stderr[r][p];
  const order = mean.map((_, i) => i).filter(i => mean[i] !== null).sort((a, b) => mean[a] - mean[b]);
  $("helpful").innerHTML = ""; $("harmful").innerHTML = "";
  const list = (kind, ids) => {
    ids.slice(0, D.top).forEach(i => $(kind).appendChild(example(i, mean, err, kind)));
    if (!ids.length) $(kind).textContent = "none: no tracked example is " + kind + " at this snapshot";
  };
  list("helpful", order.filter(i => mean[i] < 0));
  list("harmful", order.reverse().filter(i => mean[i] > 0));
}
for (const id of ["probe", "row", "selection"]) $(id).addEventListener("input", render);
render();
</script></body></html>
"""
