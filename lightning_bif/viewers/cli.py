"""``lightning-bif``: look at an influence log from the shell.

    lightning-bif summary runs/exp/influence.h5             # config, snapshots, one line per snapshot
    lightning-bif export runs/exp/influence.h5 --step 500 --csv bif.csv   # one snapshot as a long table
    lightning-bif sign-changes runs/exp/influence.h5 --z 3  # pairs that turn from helpful to harmful or back
    lightning-bif plot runs/exp/influence.h5 --out figures  # group curves, pairs, matrices, sign changes, top-k
    lightning-bif tokens runs/exp/influence.h5 --probe 0 --html tokens.html   # per-token influence on a probe
    lightning-bif report runs/exp/influence.h5 --out report.html   # one self-contained HTML page of the run
    lightning-bif repair runs/exp/influence.h5              # copy the intact snapshots of a damaged log

Examples are printed by id (their dataset index or key, as in ``log.train_ids`` / ``log.probe_ids``):
in Python pass them as ``log.trajectory(probe_id=..., train_id=...)``; ``probe=`` / ``train=`` are positions.
Groups are shown by the names stored in the log (``train_group_names`` / ``probe_group_names``) where it has them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import TextIO

import numpy as np

from ..log import InfluenceLog, open_log, repair
from ..log.columns import BY_NAME
from ..log.summaries import extremes, flatten_config, group_means

_IDS_NOTE = "probes and train examples by id: log.trajectory(probe_id=..., train_id=...) in Python"


def _pair(log: InfluenceLog, probe: int, train: int, value: float) -> str:
    return f"probe id {log.probe_ids[probe]} <- train id {log.train_ids[train]}: {value:+.3g}"


def _group_name(names: dict | None, label: object) -> str:
    """A group's stored name, else its label."""
    return str(label) if names is None else str(names.get(label, label))


def _group_names(log: InfluenceLog, kind: str, labels: np.ndarray) -> list[str]:
    names = log.train_group_names if kind == "train" else log.probe_group_names
    return [_group_name(names, label) for label in labels.tolist()]


def summary(log: InfluenceLog, out: TextIO, last: int | None = None) -> None:
    """Print what a log holds: run config, snapshot counts, one line per snapshot, last group means."""
    groups = lambda labels: "" if labels is None else f" in {len(np.unique(labels))} groups"  # noqa: E731
    print(f"influence log {log.path}  (format {log.format_version}, lightning-bif {log.package_version}, "
          f"created {log.created})", file=out)
    print(f"probes: {len(log.probe_ids)}{groups(log.probe_groups)}   train examples: {len(log.train_ids)}"
          f"{groups(log.train_groups)}   chains: {log.chains}   draws: {log.draws}"
          f"{'' if log.tokens is None else f'   tokens per probe: {log.tokens} (per-token influence)'}", file=out)
    print("config:", file=out)
    for key, value in flatten_config(log.config).items():
        print(f"  {key} = {value}", file=out)
    counts = Counter(log.status.tolist())
    steps = f", steps {log.steps[0]}..{log.steps[-1]}" if len(log) else ""
    print(f"snapshots: {len(log)}{steps}; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), file=out)
    if not len(log):
        return
    print(f"\n{'step':>8} {'epoch':>5}  {'status':<8} {'duration':>8} {'split-half':>10} {'loss rise':>10} "
          f"{'step size':>9}  most helpful | most harmful (BIF: negative = helpful; {_IDS_NOTE})", file=out)
    rows = range(len(log)) if last is None else range(max(0, len(log) - last), len(log))
    below = np.zeros(len(log), bool) if log.below_target is None else np.asarray(log.below_target, bool)
    for row in rows:
        short = "!" if below[row] else " "  # stopped below its split-half target
        line = (f"{log.steps[row]:>8} {log.epochs[row]:>5}  {log.status[row]:<8} {log.duration_s[row]:>7.2f}s "
                f"{log.split_half[row]:>9.3f}{short} {log.loss_rise[row]:>10.3g} {log.step_size[row]:>9.3g}  ")
        pairs = extremes(log.influence[row])
        if pairs is None:
            line += log.message[row][:80] or "no estimate"
        else:
            helpful, harmful = pairs
            line += f"{_pair(log, helpful.probe, helpful.train, helpful.influence)} | " \
                    f"{_pair(log, harmful.probe, harmful.train, harmful.influence)}"
        print(line, file=out)
    print(f"split-half: {BY_NAME['split_half'].description}; near 1: reproducible, near 0: mostly noise "
          "(BIFCallback warns below its min_split_half).\n"
          f"loss rise: {BY_NAME['loss_rise'].description}; large means drift or too large a step size.", file=out)
    _print_not_ok(log, rows, out)
    _print_below_target(log, below, out)
    _print_tuning(log, out)
    usable = np.flatnonzero(log.status != "failed")
    if (log.train_groups is not None or log.probe_groups is not None) and len(usable):
        row = int(usable[-1])
        means = group_means(log.influence[row], log.probe_groups, log.train_groups)
        state = "" if log.status[row] == "ok" else f" ({log.status[row]})"
        print(f"\nmean BIF per probe group (rows) and train group (columns) at step {log.steps[row]}{state}:", file=out)
        train_names = _group_names(log, "train", means.train_groups)
        width = max(10, *(len(name) + 1 for name in train_names))
        print(" " * 12 + "".join(f"{name:>{width}}" for name in train_names), file=out)
        for name, values in zip(_group_names(log, "probe", means.probe_groups), means.means, strict=True):
            print(f"{name[:12]:<12}" + "".join(f"{value:>{width}.3g}" for value in values), file=out)


_NOT_OK = {
    "suspect": "chains rose beyond what chains near w* rise: the BIF is likely inflated (left out of sign changes)",
    "diverged": "chains left the neighbourhood of w*: the BIF is not an estimate (left out of sign changes)",
}


def _print_not_ok(log: InfluenceLog, rows: range, out: TextIO) -> None:
    """One line per suspect or diverged status among ``rows``: what it means, and the latest reason."""
    for status, meaning in _NOT_OK.items():
        found = [row for row in rows if log.status[row] == status]
        if found:
            print(f"{status} ({len(found)}, last at step {log.steps[found[-1]]}): {meaning}. "
                  f"{log.message[found[-1]][:200]}", file=out)


def _print_below_target(log: InfluenceLog, below: np.ndarray, out: TextIO) -> None:
    """The snapshots whose rounds of chains stopped below the split-half target (format 3), and why."""
    rows = np.flatnonzero(below)
    if not len(rows):
        return
    print(f"\n! {len(rows)} snapshot(s) stopped below their split-half target (their entries are noisier than "
          f"asked); the last, at step {log.steps[rows[-1]]}: {log.message[rows[-1]]}", file=out)


def _print_tuning(log: InfluenceLog, out: TextIO) -> None:
    """The automatic sampler settings of the last snapshot that has them, with their evidence (format 2)."""
    rows = [row for row in range(len(log)) if log.tuning[row] is not None]
    if not rows:
        return
    tuning = log.tuning[rows[-1]]
    reused = sum(bool(log.tuning[row].get("curvature_reused")) for row in rows)
    print(f"\nautomatic settings at step {log.steps[rows[-1]]} (set by the user: "
          f"{', '.join(tuning.get('given', [])) or 'none'}):", file=out)
    for name, value in tuning.get("chosen", {}).items():
        shown = f"{value:.3g}" if isinstance(value, float) else value
        print(f"  {name} = {shown}  ({tuning.get('reasons', {}).get(name, '')})", file=out)
    evidence = {"λ_min": tuning.get("lambda_min"), "λ_max": tuning.get("lambda_max"),
                "mean eigenvalue": tuning.get("mean_eigenvalue"), "γ floor": tuning.get("localization_floor"),
                "nonlinearity Q": tuning.get("nonlinearity"), "minibatch noise r": tuning.get("gradient_noise_ratio"),
                "tuning s": tuning.get("seconds")}
    print("  evidence: " + ", ".join(f"{k} {v:.3g}" for k, v in evidence.items() if v is not None)
          + f"; curvature {tuning.get('curvature_reason') or 'measured'}; reused in {reused} of {len(rows)} "
          "snapshots", file=out)


def export(log: InfluenceLog, out: TextIO, step: int | None = None, tokens: bool = False) -> int:
    """Write the snapshot nearest ``step`` (default: the last) as CSV, one row per (probe, train) pair.

    With ``tokens``, one row per (probe, token, train) triple of the per-token influence instead.
    Logs that store group names get ``probe_group_name`` and ``train_group_name`` columns at the end.

    Returns:
        The step of the exported snapshot.

    Raises:
        ValueError: The log has no snapshots, or ``step`` is outside its logged steps.
    """
    snapshot = log.snapshot(_export_row(log, step, tokens))
    writer = csv.writer(out)
    no_groups = lambda size: np.full(size, "")  # noqa: E731
    probe_groups = log.probe_groups if log.probe_groups is not None else no_groups(len(log.probe_ids))
    train_groups = log.train_groups if log.train_groups is not None else no_groups(len(log.train_ids))
    names: dict[str, list[str]] = {}
    for kind, labels in (("probe", probe_groups), ("train", train_groups)):
        if getattr(log, f"{kind}_group_names") is not None:
            names[f"{kind}_group_name"] = _group_names(log, kind, labels)
    if tokens:
        writer.writerow(["step", "probe_id", "probe_group", "token", "train_id", "train_group", "influence",
                         "stderr"])
        for (probe, token, train), value in np.ndenumerate(snapshot.token_influence):
            writer.writerow([snapshot.step, log.probe_ids[probe], probe_groups[probe], token, log.train_ids[train],
                             train_groups[train], repr(float(value)),
                             repr(float(snapshot.token_stderr[probe, token, train]))])
        return snapshot.step
    writer.writerow(["step", "probe_id", "probe_group", "train_id", "train_group", "influence", "stderr",
                     "correlation", *names])
    probe_name = names.get("probe_group_name")
    train_name = names.get("train_group_name")
    for probe in range(len(log.probe_ids)):
        for train in range(len(log.train_ids)):
            writer.writerow([snapshot.step, log.probe_ids[probe], probe_groups[probe], log.train_ids[train],
                             train_groups[train], repr(float(snapshot.influence[probe, train])),
                             repr(float(snapshot.stderr[probe, train])),
                             repr(float(snapshot.correlation[probe, train])),
                             *([] if probe_name is None else [probe_name[probe]]),
                             *([] if train_name is None else [train_name[train]])])
    return snapshot.step


def _export_row(log: InfluenceLog, step: int | None, tokens: bool) -> int:
    """The snapshot ``export`` writes; raises before any output is opened when there is none."""
    row = len(log) - 1 if step is None else log.nearest(step)
    if row < 0:
        raise ValueError(f"The influence log {log.path} has no snapshots yet.")
    if tokens and log.tokens is None:
        raise ValueError(f"The influence log {log.path} has no per-token influence (it was written without "
                         "SGLDConfig(per_token=True)); export it without --tokens.")
    return row


def print_sign_changes(log: InfluenceLog, out: TextIO, z: float = 3.0, top: int | None = 20) -> int:
    """Print the pairs whose influence changes sign beyond ``z`` standard errors, earliest first.

    Returns:
        The number of changes found.
    """
    changes = log.sign_changes(z=z)
    pairs = len(log.probe_ids) * len(log.train_ids)
    flipped = len({(c.probe, c.train) for c in changes})
    usable = int((log.status == "ok").sum())
    print(f"{len(changes)} sign change(s) in {flipped} of {pairs} (probe, train) pairs over {usable} ok snapshots, "
          f"at |BIF| > {z:g} standard errors (negative = helpful, positive = harmful)", file=out)
    if not changes:
        return 0
    shown = changes if top is None else changes[:top]

    def label(kind: str, position: int) -> str:
        ids, groups = (log.probe_ids, log.probe_groups) if kind == "probe" else (log.train_ids, log.train_groups)
        names = log.probe_group_names if kind == "probe" else log.train_group_names
        return f"{ids[position]}" + ("" if groups is None else f" ({_group_name(names, groups[position].item())})")

    group = "" if log.probe_groups is None and log.train_groups is None else " (group)"
    print(f"{_IDS_NOTE}\n\n{'crossing':>9} {'turns':>8}  {'probe id' + group:<18} {'train id' + group:<18} "
          f"{'between steps':>14} {'z before':>9} {'z after':>8}", file=out)
    for c in shown:
        print(f"{c.crossing:>9.1f} {c.turns:>8}  {label('probe', c.probe):<18} {label('train', c.train):<18} "
              f"{f'{c.before_step}-{c.after_step}':>14} {c.z_before:>+9.1f} {c.z_after:>+8.1f}", file=out)
    if len(shown) < len(changes):
        print(f"... {len(changes) - len(shown)} more (--top 0 shows all)", file=out)
    return len(changes)


def plot(log: InfluenceLog, out: TextIO, args: argparse.Namespace) -> None:
    """Write the figures of ``lightning-bif plot`` (matplotlib is imported only here) and list them."""
    from . import plot as figures

    pairs = None
    for text in args.pair or ():
        probe, separator, train = text.partition(":")
        if not separator:
            raise ValueError(f"--pair {text!r}: write PROBE_ID:TRAIN_ID (dataset ids, as `summary` prints them).")
        pairs = [*(pairs or []), (figures.parse_id(log, "probe", probe), figures.parse_id(log, "train", train))]
    probe = None if args.probe is None else figures.parse_id(log, "probe", args.probe)
    written = figures.write_figures(log, args.out, args.format, pairs=pairs, steps=args.steps, probe=probe,
                                    top_k=args.top_k, prefix=args.prefix, figures=args.figures or figures.FIGURES,
                                    quantity=args.quantity)
    for path in written:
        print(f"wrote {path}", file=out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-bif", description="Inspect a lightning-bif influence log.")
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("summary", help="run config, snapshot counts and one line per snapshot")
    show.add_argument("log", help="the .h5 influence log")
    show.add_argument("--last", type=int, default=None, metavar="K", help="only the last K snapshot lines")
    table = commands.add_parser("export", help="one snapshot as CSV: a row per (probe, train) pair")
    table.add_argument("log", help="the .h5 influence log")
    table.add_argument("--step", type=int, default=None,
                       help="training step within the logged range (nearest snapshot; default: the last)")
    table.add_argument("--csv", required=True, metavar="PATH", help="output file, '-' for stdout")
    table.add_argument("--tokens", action="store_true",
                       help="per-token influence: a row per (probe, token, train) triple (per_token logs)")
    flips = commands.add_parser("sign-changes", help="pairs whose influence turns from helpful to harmful or back")
    flips.add_argument("log", help="the .h5 influence log")
    flips.add_argument("--z", type=float, default=3.0, help="standard errors from zero that count (default 3)")
    flips.add_argument("--top", type=int, default=20, metavar="K", help="show the first K changes (0: all)")
    draw = commands.add_parser("plot", help="figures: group curves, chosen pairs, matrices, sign changes, top-k",
                               description="Write the figures of docs/figures.md (BIF < 0 helps, > 0 harms).")
    draw.add_argument("log", help="the .h5 influence log")
    draw.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    draw.add_argument("--format", choices=["png", "pdf", "svg"], default="png", help="file format (default png)")
    draw.add_argument("--pair", action="extend", nargs="+", metavar="PROBE_ID:TRAIN_ID",
                      help="pairs for pairs.<format>, by dataset id (default: the clearest sign changes)")
    draw.add_argument("--steps", action="extend", nargs="+", type=int, metavar="STEP",
                      help="training steps of the matrix panels (nearest snapshot; default: 4 spread over the run)")
    draw.add_argument("--probe", metavar="ID", help="probe id of top_examples.<format> (default: the probe of the "
                      "largest |BIF| in the last ok snapshot)")
    draw.add_argument("--top-k", type=int, default=5, metavar="K", help="examples per panel of top_examples (5)")
    draw.add_argument("--figures", action="extend", nargs="+", metavar="NAME",
                      choices=["groups", "pairs", "matrix", "sign_changes", "top_examples"],
                      help="only these figures (default: all five)")
    draw.add_argument("--prefix", default="", help="prepended to each file name, e.g. 'digits_'")
    draw.add_argument("--quantity", default="influence", metavar="NAME",
                      help="'influence' (BIF, default) or 'correlation' (posterior correlation: > 0 helps)")
    tokens = commands.add_parser("tokens", help="a probe's tokens coloured by per-token influence (per_token logs)")
    tokens.add_argument("log", help="the .h5 influence log")
    tokens.add_argument("--probe", default=None, metavar="ID", help="probe id (default: the first probe)")
    chosen = tokens.add_mutually_exclusive_group()
    chosen.add_argument("--train", default=None, metavar="ID", help="one tracked training example (default: the "
                        "sum over all tracked examples)")
    chosen.add_argument("--group", default=None, metavar="G", help="the sum over one training group")
    tokens.add_argument("--step", type=int, default=None,
                        help="training step (nearest snapshot that did not fail; default: the last such)")
    tokens.add_argument("--top", type=int, default=3, metavar="K", help="most helpful/harmful examples to list")
    tokens.add_argument("--html", default=None, metavar="PATH", help="also write the interactive HTML token view")
    tokens.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                        help="ANSI colours (auto: when writing to a terminal); without, markers [-helps-] {+harms+}")
    page = commands.add_parser("report", help="one self-contained HTML page: run, settings, snapshots, figures, "
                               "diagnostics, token view", description="Write one HTML page of the log that loads "
                               "nothing from the network: open it in a browser or send it (docs/report.md).")
    page.add_argument("log", help="the .h5 influence log")
    page.add_argument("--out", required=True, metavar="PATH", help="the HTML file to write (its folder must exist)")
    fix = commands.add_parser("repair", help="copy every intact snapshot of a damaged log into a new file")
    fix.add_argument("log", help="the damaged .h5 influence log (left as it is unless --in-place)")
    where = fix.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, metavar="PATH", help="the new log (default: LOG's <stem>.repaired.h5)")
    where.add_argument("--in-place", action="store_true",
                       help="replace LOG with the repaired copy (the damaged file is kept as <stem>.damaged.h5), "
                            "so that a training run can resume it")
    return parser


def _tokens(log: InfluenceLog, args: argparse.Namespace, out: TextIO) -> None:
    """The ``tokens`` command (imported on use: the other commands do not need it)."""
    from .tokens import format_view, resolve_group, resolve_id, token_view, write_html

    probe = 0 if args.probe is None else resolve_id(log, "probe", args.probe)
    train = None if args.train is None else resolve_id(log, "train", args.train)
    group = None if args.group is None else resolve_group(log, args.group)
    view = token_view(log, probe, train=train, group=group, step=args.step, top=args.top)
    color = args.color == "always" or (args.color == "auto" and out.isatty())
    out.write(format_view(view, color))
    if args.html:
        path = write_html(args.html, log, probe=probe, train=train, group=group, step=args.step, top=max(args.top, 5))
        print(f"\nwrote the HTML token view to {path}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-bif`` console script.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when the log cannot be read or written out.
    """
    args = _parser().parse_args(argv)
    try:
        if args.command == "repair":
            print(repair(args.log, args.out, in_place=args.in_place))
            return 0
        if args.command == "report":
            from .report import check_out, write_report

            check_out(args.out)  # before the log is read and the figures drawn
            print(f"wrote {write_report(args.log, args.out)}")
            return 0
        with open_log(args.log) as log:
            _check_steps(log, args)
            if args.command == "summary":
                summary(log, sys.stdout, args.last)
            elif args.command == "sign-changes":
                print_sign_changes(log, sys.stdout, args.z, args.top or None)
            elif args.command == "plot":
                plot(log, sys.stdout, args)
            elif args.command == "tokens":
                _tokens(log, args, sys.stdout)
            elif args.csv == "-":
                export(log, sys.stdout, args.step, args.tokens)
            else:
                _export_row(log, args.step, args.tokens)  # an error leaves no empty CSV behind
                with open(args.csv, "w", newline="") as out:
                    step = export(log, out, args.step, args.tokens)
                shape = f"{len(log.probe_ids)} x {log.tokens} x {len(log.train_ids)} triples" if args.tokens else \
                    f"{len(log.probe_ids)} x {len(log.train_ids)} pairs"
                nearest = "" if args.step is None or args.step == step else f", the snapshot nearest --step {args.step}"
                print(f"wrote step {step}{nearest} ({shape}) to {args.csv}")
    except BrokenPipeError:
        return _reader_left()
    except (OSError, ValueError) as error:
        print(f"lightning-bif: error: {error}", file=sys.stderr)
        return 1
    return 0


def _check_steps(log: InfluenceLog, args: argparse.Namespace) -> None:
    """Refuse a ``--step`` / ``--steps`` outside the logged range, with the CLI's way out."""
    flag, steps = ("--steps", args.steps or []) if args.command == "plot" else ("--step", [getattr(args, "step", None)])
    first, last = (int(log.steps[0]), int(log.steps[-1])) if len(log) else (None, None)
    for step in steps:
        if step is not None and first is not None and not first <= step <= last:
            if first == last:
                raise ValueError(f"{flag} {step} is outside {log.path}, whose only snapshot is at step {first}: "
                                 f"pass {flag} {first}.")
            raise ValueError(f"{flag} {step} is outside {log.path}, which covers steps {first}..{last}: pass a step "
                             f"in that range, {last} for the last snapshot or {first} for the first.")


def _reader_left() -> int:
    """Exit quietly when the reader of stdout went away (``... --csv - | head``), as Unix tools do.

    Python would otherwise report the broken pipe again when it flushes stdout at exit.
    """
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141  # 128 + SIGPIPE: what a shell reports for a tool that the pipe's reader left


if __name__ == "__main__":
    sys.exit(main())
