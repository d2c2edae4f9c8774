"""How LDS falls with split-half: the same snapshot with more or fewer chains (issue 24, item 3).

For every checkpoint of the chosen LDS-suite set-ups (``lds_suite.py``'s problems, the callback's default
config), one estimate runs ``--chains`` chains. Chain c's draws depend only on (seed, c), so the first k
chains, or any k of them, are what a snapshot with ``chains=k`` would have drawn: every k in ``--counts`` is
scored on each of the ``--chains // k`` disjoint groups of k chains (independent snapshots at no extra cost),
with the group's LDS, split-half reliability and CPU seconds (tuning once, plus k chains' share of sampling).

Rounds of more chains or of more draws per chain (item 1): ``--draws-factor F`` also runs ``chains / F``
chains with F times the draws each (the same number of draws as ``chains`` chains) and reports its LDS and
CPU s beside the group of the same total draws.

    python benchmarks/split_half_curve.py --setups midtrain --out benchmarks/results/split_half_midtrain.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lds_suite  # noqa: E402
from lds_digits import lds  # noqa: E402

from lightning_bif.estimation.estimator import BIFEstimator  # noqa: E402
from lightning_bif.estimation.sampling import forget_chains  # noqa: E402
from lightning_bif.functional import preserved_state  # noqa: E402


def group_scores(estimator: BIFEstimator, accumulator, group: list[int], chains: int, masks, truth) -> dict:
    """LDS and split-half of the snapshot made of the chains ``group`` alone."""
    part = copy.deepcopy(accumulator)
    forget_chains(part, [c for c in range(chains) if c not in set(group)])
    result = estimator.summarize(part, 0.0)
    value, _ = lds(result.influence.double(), masks, truth)
    return {"lds": value, "split_half": result.diagnostics.split_half}


def problem_curve(problem: lds_suite.Problem, chains: int, counts: list[int], draws_factor: int) -> dict:
    truth = problem.losses.mean(1)
    config = lds_suite.callback_config(problem).replace(chains=chains)
    estimator = BIFEstimator(problem.model, problem.loss_fn, problem.train, problem.probes, config=config)
    with preserved_state(problem.model, [torch.device("cpu")]):
        start = time.process_time()
        estimator.prepare()
        prepare_cpu = time.process_time() - start
        start = time.process_time()
        accumulator = estimator.sample_checked(range(chains))
        sample_cpu = time.process_time() - start
    draws = estimator.config.draws
    rows = []
    for k in counts:
        groups = [list(range(g * k, (g + 1) * k)) for g in range(chains // k)]
        scored = [group_scores(estimator, accumulator, group, chains, problem.masks, truth) for group in groups]
        rows.append({"chains": k, "draws": draws, "groups": scored,
                     "lds": sum(s["lds"] for s in scored) / len(scored),
                     "split_half": sum(s["split_half"] for s in scored) / len(scored),
                     "cpu_s": prepare_cpu + sample_cpu * k / chains})
    out = {"setup": problem.setup, "checkpoint": problem.checkpoint, "prepare_cpu_s": prepare_cpu,
           "sample_cpu_s_per_chain": sample_cpu / chains, "draws": draws, "rows": rows}
    if draws_factor > 1:
        longer = config.replace(chains=chains // draws_factor, draws=draws * draws_factor)
        estimator = BIFEstimator(problem.model, problem.loss_fn, problem.train, problem.probes, config=longer)
        with preserved_state(problem.model, [torch.device("cpu")]):
            start = time.process_time()
            estimator.prepare()
            accumulator = estimator.sample_checked(range(longer.chains))
            cpu = time.process_time() - start
        result = estimator.summarize(accumulator, 0.0)
        out["longer_chains"] = {"chains": longer.chains, "draws": longer.draws, "cpu_s": cpu,
                                "lds": lds(result.influence.double(), problem.masks, truth)[0],
                                "split_half": result.diagnostics.split_half}
    return out


def predicted_ratio(split_half: float) -> float:
    """LDS over the noise-free snapshot's LDS that split-half ``r`` predicts: the correlation of the estimate with
    its noise-free value, √ρ, where ρ = 2r/(1 + r) is the whole snapshot's reliability (Spearman–Brown)."""
    return math.sqrt(max(2 * split_half / (1 + split_half), 0.0))


def print_report(paths: list[Path]) -> None:
    """Markdown tables of saved runs: per set-up and chain count, split-half and LDS as a share of the most chains'."""
    print("| set-up | checkpoint | " + " | ".join(f"{k} chains" for k in (2, 4, 8, 16, 32, 64)) + " |")
    print("|---|---|" + "---|" * 6)
    pairs = []
    for path in paths:
        for curve in json.loads(path.read_text()):
            top = curve["rows"][-1]["lds"]
            cells = []
            for row in curve["rows"]:
                for group in row["groups"]:
                    pairs.append((group["split_half"], group["lds"] / top, curve["setup"]))
                cells.append(f"{row['split_half']:.2f} / {row['lds']:.3f} ({row['lds'] / top:.0%})")
            print(f"| {curve['setup']} | {curve['checkpoint']} | " + " | ".join(cells) + " |")
    print("\n| split-half r | `midtrain` (dev): groups, mean r, LDS share | held out: groups, mean r, LDS share "
          "| √(2r/(1 + r)) at dev / held-out mean r |")
    print("|---|---|---|---|")
    for low, high in ((-1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (0.6, 0.7), (0.7, 0.8),
                      (0.8, 0.9), (0.9, 1.01)):
        cells, predicted = [], []
        for dev in (True, False):
            inside = [(r, q) for r, q, name in pairs if low <= r < high and (name == "midtrain") == dev]
            if not inside:
                cells.append("—")
                predicted.append("—")
                continue
            r = sum(p[0] for p in inside) / len(inside)
            q = sum(p[1] for p in inside) / len(inside)
            cells.append(f"{len(inside)}, {r:.2f}, {q:.3f}")
            predicted.append(f"{predicted_ratio(r):.3f}")
        label = f"< {high:.1f}" if low < 0 else (f"≥ {low:.1f}" if high > 1 else f"[{low:.1f}, {high:.1f})")
        print(f"| {label} | {cells[0]} | {cells[1]} | {' / '.join(predicted)} |")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default="midtrain", help="comma-separated set-ups of lds_suite.py")
    parser.add_argument("--chains", type=int, default=64, help="chains of the one estimate per checkpoint")
    parser.add_argument("--counts", default="2,4,8,16,32,64", help="chain counts to score (divisors of --chains)")
    parser.add_argument("--draws-factor", type=int, default=0,
                        help="also run chains/F chains with F times the draws (rounds of draws vs chains)")
    parser.add_argument("--checkpoints", default="", help="comma-separated checkpoints to keep (default all)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (smoke test)")
    parser.add_argument("--out", type=Path, help="JSON file")
    parser.add_argument("--report", type=Path, nargs="+", help="print the tables of saved JSON files instead")
    args = parser.parse_args(argv)
    if args.report:
        print_report(args.report)
        return []
    if args.out is None:
        parser.error("--out is required to run")
    torch.set_num_threads(1)
    counts = [int(k) for k in args.counts.split(",")]
    keep = {int(c) for c in args.checkpoints.split(",") if c}
    report = []
    for _, problems in lds_suite.build(args.setups.split(","), args.tiny):
        for problem in problems:
            if keep and problem.checkpoint not in keep:
                continue
            curve = problem_curve(problem, args.chains, counts, args.draws_factor)
            report.append(curve)
            line = ", ".join(f"{r['chains']}: LDS {r['lds']:.3f} sh {r['split_half']:.3f} cpu {r['cpu_s']:.2f}"
                             for r in curve["rows"])
            print(f"{curve['setup']} step {curve['checkpoint']}: {line}", flush=True)
            if "longer_chains" in curve:
                lc = curve["longer_chains"]
                print(f"  {lc['chains']} x {lc['draws']} draws: LDS {lc['lds']:.3f} sh {lc['split_half']:.3f} "
                      f"cpu {lc['cpu_s']:.2f}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1, default=lambda x: None if math.isnan(x) else x))
    return report


if __name__ == "__main__":
    main()
