"""Variants of the BIF's sampler on the time-resolved LDS of ``lds_midtrain.py`` (issue 11's development setup).

Each variant is an ``SGLDConfig`` override set applied on top of what the callback runs at every
checkpoint (defaults, the training weight decay, the horizon "interval" read from the optimizer).
Per checkpoint it prints LDS (against continued training to the next checkpoint), split-half
reliability and CPU seconds (``time.process_time``, one thread), and the gradient dot product as
the floor. ``--data-seed 1 --lr 0.1 --momentum 0.5 --hidden 48`` is the held-out setup.

    python benchmarks/lds_tuning.py --variants "old:control_variates=0,preconditioner=none;cv:control_variates=1"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lds_digits import lds
from lds_midtrain import RESULTS, Setup, as_module, bif_scores, example_grads, load_data, run_and_truth

from lightning_bif import SGLDConfig
from lightning_bif.tuning.horizon import optimizer_step


def parse_variants(text: str) -> dict[str, dict]:
    """``name:key=value,...;name:...`` into ``{name: overrides}`` (ints, floats, bools 0/1, strings, none)."""
    variants = {}
    for part in filter(None, text.split(";")):
        name, _, body = part.partition(":")
        overrides: dict = {}
        for item in filter(None, body.split(",")):
            key, value = item.split("=")
            if key == "control_variates":
                overrides[key] = None if value == "none" else bool(int(value))
            elif key in ("chains", "draws", "burn_in", "thin", "seed", "preconditioner_rank"):
                overrides[key] = int(value)
            elif key == "preconditioner":
                overrides[key] = value
            else:
                overrides[key] = None if value == "none" else float(value)
        variants[name] = overrides
    return variants


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", required=True)
    parser.add_argument("--hidden", type=int, default=Setup.hidden)
    parser.add_argument("--lr", type=float, default=Setup.lr)
    parser.add_argument("--momentum", type=float, default=Setup.momentum)
    parser.add_argument("--data-seed", type=int, default=Setup.data_seed)
    parser.add_argument("--checkpoints", default=",".join(map(str, Setup.checkpoints)))
    parser.add_argument("--seeds", type=int, default=1, help="sampler seeds per variant (LDS averaged)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setup = Setup(hidden=args.hidden, lr=args.lr, momentum=args.momentum, data_seed=args.data_seed)
    steps = [int(c) for c in args.checkpoints.split(",")]
    data = load_data(setup)
    run = run_and_truth(setup, data)
    variants = parse_variants(args.variants)
    table: dict[str, dict[int, dict]] = {name: {} for name in ["gradient dot product", *variants]}
    for step in steps:
        model = as_module(setup, run["checkpoints"][step][0])
        found = optimizer_step(torch.optim.SGD(model.parameters(), lr=setup.lr, momentum=setup.momentum))
        truth = run["truth"]["interval"][step].mean(1)
        start = time.process_time()
        dot = -(example_grads(model, data.x_probe, data.y_probe) @ example_grads(model, data.x_train, data.y_train).T)
        table["gradient dot product"][step] = {"lds": lds(dot, data.masks, truth)[0],
                                               "cpu_s": time.process_time() - start, "split_half": float("nan")}
        for name, overrides in variants.items():
            rows = []
            for seed in range(args.seeds):
                config = SGLDConfig(weight_decay=setup.weight_decay, horizon_steps=setup.horizon(step, "interval"),
                                    learning_rate=found.learning_rate, momentum=found.momentum, seed=seed,
                                    **overrides)
                scores = bif_scores(setup, model, data, config, name)
                rows.append((lds(scores.scores, data.masks, truth)[0], scores.cpu_s, scores.details["split_half"]))
            mean = torch.tensor(rows).mean(0).tolist()
            table[name][step] = {"lds": mean[0], "cpu_s": mean[1], "split_half": mean[2]}
        print(f"step {step}: " + ", ".join(f"{n} {table[n][step]['lds']:.3f}" for n in table), flush=True)
    print(f"\n{'method':<28}" + "".join(f"{s:>7}" for s in steps) + "   mean  split  CPU s")
    for name, entry in table.items():
        values = [entry[s]["lds"] for s in steps]
        split = sum(entry[s]["split_half"] for s in steps) / len(steps)
        cpu = sum(entry[s]["cpu_s"] for s in steps) / len(steps)
        print(f"{name:<28}" + "".join(f"{v:7.3f}" for v in values) + f"{sum(values) / len(values):7.3f}"
              f"{split:7.3f}{cpu:7.2f}")
    report = {"setup": vars(args), "table": table}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"lds_tuning_{time.strftime('%Y%m%d_%H%M%S')}.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
