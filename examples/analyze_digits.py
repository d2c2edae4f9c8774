"""Offline analysis of the influence log that examples/digits.py writes: what a researcher does next.

Loads the log, finds the (probe, train) pairs whose influence changes sign and plots them with
:mod:`lightning_bif.viewers.plot`, ranks the tracked training digits by their total influence on one probe
class, and shows the images of the most helpful and most harmful ones. Needs matplotlib and pandas (``pip install
'lightning-bif[examples]'``); the figures go to ``--out``.

    python examples/digits.py                          # writes runs/digits/version_N/influence.h5
    python examples/analyze_digits.py                  # analyzes the newest of those logs
    python examples/analyze_digits.py runs/digits/version_0/influence.h5 --probe-class 8 --top 6
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from digits import digits  # the example's own data split: the log's ids index into it
from matplotlib.figure import Figure

from lightning_bif import open_log
from lightning_bif.log import InfluenceLog
from lightning_bif.viewers import plot


def newest_log(root: Path) -> Path:
    """The influence log of the newest ``digits/version_N`` run under ``root``."""
    runs = sorted(root.glob("digits/version_*/influence.h5"), key=lambda p: int(p.parent.name.split("_")[-1]))
    if not runs:
        raise SystemExit(f"No digits influence log under {root}/digits/; run examples/digits.py first "
                         "or pass the log's path.")
    return runs[-1]


def group_name(log: InfluenceLog, kind: str, label: object) -> str:
    """The stored name of a group label (``digit_3``), else the label itself."""
    names = log.train_group_names if kind == "train" else log.probe_group_names
    return str(label) if names is None else names.get(label, str(label))


def rank_training_examples(log: InfluenceLog, probe_class: int, step: int) -> tuple[object, int]:
    """Training examples by their influence on the probes of ``probe_class`` at ``step``, summed over those probes.

    Returns:
        A pandas DataFrame indexed by train id (columns ``train_group``, ``total``), most helpful (most
        negative total) first, and the number of probes in the class.
    """
    table = log.to_dataframe(steps=step, probe_groups=[probe_class])  # reads that snapshot's rows of the class
    totals = table.groupby(["train_id", "train_group"], observed=True)["influence"].sum().rename("total")
    return totals.reset_index("train_group").sort_values("total"), int(table.probe_id.nunique())


def plot_examples(
    log: InfluenceLog, ranking: object, probe_class: int, top: int, step: int, path: Path
) -> Figure:
    """The probe class's held-out digits above the ``top`` most helpful and most harmful training digits."""
    train, held_out = digits()
    train_images, probe_images = train.tensors[0].numpy(), held_out.tensors[0].numpy()
    probe_ids = log.probe_ids[log.probe_groups == probe_class]
    helpful, harmful = ranking.head(top), ranking.tail(top).iloc[::-1]
    columns = max(top, len(probe_ids))
    figure = Figure(figsize=(1.3 * columns, 5.0), layout="constrained")
    axes = figure.subplots(3, columns, squeeze=False)
    rows = [(f"probes: {group_name(log, 'probe', probe_class)}", [(i, "") for i in probe_ids], probe_images),
            ("most helpful", [(i, f"{r.total:+.2e}") for i, r in helpful.iterrows()], train_images),
            ("most harmful", [(i, f"{r.total:+.2e}") for i, r in harmful.iterrows()], train_images)]
    for ax_row, (label, entries, images) in zip(axes, rows, strict=True):
        ax_row[0].set_ylabel(label, fontsize=9)
        for column, ax in enumerate(ax_row):
            ax.set_xticks([])
            ax.set_yticks([])
            if column >= len(entries):
                ax.set_frame_on(False)
                continue
            example_id, value = entries[column]
            ax.imshow(images[int(example_id)].reshape(8, 8), cmap="gray_r")
            group = "" if not value else f"{group_name(log, 'train', ranking.loc[example_id, 'train_group'])}\n"
            ax.set_title(f"id {example_id}\n{group}{value}", fontsize=7)
    figure.suptitle(f"Training digits with the largest total influence\non the "
                    f"{group_name(log, 'probe', probe_class)} probes at step {step} (− helps, + harms)", fontsize=10)
    figure.savefig(path, dpi=110)
    return figure


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", nargs="?", type=Path, help="influence log (default: the newest under --root)")
    parser.add_argument("--root", type=Path, default=Path("runs"), help="where examples/digits.py wrote its runs")
    parser.add_argument("--out", type=Path, default=None, help="figure directory (default: LOG's dir/analysis)")
    parser.add_argument("--z", type=float, default=3.0, help="standard errors from zero for a sign to count")
    parser.add_argument("--pairs", type=int, default=6, help="sign-changing pairs to plot")
    parser.add_argument("--probe-class", type=int, default=3, help="digit whose probes the ranking is about")
    parser.add_argument("--top", type=int, default=5, help="most helpful / harmful training digits to show")
    parser.add_argument("--step", type=int, default=None, help="logged step to rank at (default: last ok one)")
    args = parser.parse_args(argv)
    path = args.log or newest_log(args.root)
    out = args.out or path.parent / "analysis"
    out.mkdir(parents=True, exist_ok=True)

    with open_log(path) as log:
        ok = log.steps[log.status == "ok"]
        if not len(ok):
            raise SystemExit(f"{path} has no ok snapshot to analyze (statuses: {sorted(set(log.status.tolist()))}).")
        print(f"{path}: {len(log)} snapshots at steps {log.steps.tolist()}, {len(ok)} ok; "
              f"{len(log.probe_ids)} probes, {len(log.train_ids)} tracked training digits (ids index the digits "
              "example's train / held-out splits)")

        changes = log.sign_changes(z=args.z)
        pairs = len(log.probe_ids) * len(log.train_ids)
        print(f"\n{len(changes)} sign change(s) at |BIF| > {args.z:g} standard errors among {pairs} pairs")
        for change in changes[:args.pairs]:
            print(f"  step ~{change.crossing:6.1f}: probe id {change.probe_id} "
                  f"({group_name(log, 'probe', log.probe_groups[change.probe].item())}) <- train id "
                  f"{change.train_id} ({group_name(log, 'train', log.train_groups[change.train].item())}) "
                  f"turns {change.turns}")
        if changes:
            # The timeline of all changes, then the curves of the first ones with ±2 standard-error bars.
            plot.plot_sign_changes(log, z=args.z, top=args.pairs).savefig(out / "sign_changes.png", dpi=110)
            pairs = [(change.probe_id, change.train_id) for change in changes[:args.pairs]]
            plot.plot_pairs(log, pairs).savefig(out / "sign_change_pairs.png", dpi=110)
            print(f"  timeline: {out / 'sign_changes.png'}; curves: {out / 'sign_change_pairs.png'}")
        else:
            print("  none; a lower --z (e.g. 2) shows weaker changes, at a higher risk of noise")

        step = int(ok[-1]) if args.step is None else args.step
        ranking, probes = rank_training_examples(log, args.probe_class, step)
        name = group_name(log, "probe", args.probe_class)
        print(f"\nTraining digits by total influence on the {probes} {name} probes at step {step} "
              "(sum over those probes; negative = helpful):")
        for label, rows in (("most helpful", ranking.head(args.top)), ("most harmful", ranking.tail(args.top)[::-1])):
            shown = ", ".join(f"id {i} ({group_name(log, 'train', r.train_group)}) {r.total:+.2e}"
                              for i, r in rows.iterrows())
            print(f"  {label}: {shown}")
        same = ranking.train_group == args.probe_class
        print(f"  mean total of the {int(same.sum())} {name} training digits {ranking.total[same].mean():+.2e}, "
              f"of the other {int((~same).sum())} {ranking.total[~same].mean():+.2e}")
        plot_examples(log, ranking, args.probe_class, args.top, step, out / f"top_examples_{args.probe_class}.png")
        print(f"  images: {out / f'top_examples_{args.probe_class}.png'}")


if __name__ == "__main__":
    main()
