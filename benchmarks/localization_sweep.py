"""The localization floor's factor c (γ ≥ nβ·(c·λ̄ + max(0, -λ_min))), swept on one set-up of the LDS suite.

c was chosen with this script on the development set-up ``midtrain`` only; the other set-ups of
``lds_suite.py`` are held out (docs/self-tuning.md, "The localization floor"). c = 0 is the rule
before the floor existed (the horizon's γ, or 100 without a horizon). Every row is the default BIF
of ``lds_suite.py`` (the callback's config) with the module constant
``lightning_bif.tuning.localization.LOCALIZATION_FACTOR`` set to c; LDS is the mean over checkpoints, each
checkpoint's the mean over ``--seeds`` sampler seeds.

    python benchmarks/localization_sweep.py --setup midtrain --factors 0,1,3,10 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lds_suite

from lightning_bif.tuning import localization


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", default="midtrain", help=f"one of {', '.join(lds_suite.SETUPS)}")
    parser.add_argument("--factors", default="0,1,3,10", help="comma-separated values of c")
    parser.add_argument("--seeds", type=int, default=2, help="sampler seeds per checkpoint")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    factors = [float(f) for f in args.factors.split(",")]
    (_, problems), = lds_suite.build([args.setup], args.tiny)
    rows: dict[str, dict] = {}
    saved = localization.LOCALIZATION_FACTOR
    try:
        for factor in factors:
            localization.LOCALIZATION_FACTOR = factor
            per_checkpoint = {}
            for problem in problems:
                row = lds_suite.bif_rows(problem, f"c={factor:g}", lds_suite.callback_config(problem), args.seeds)
                per_checkpoint[problem.checkpoint] = {"lds": row["lds"], "se": row["se"], "cpu_s": row["cpu_s"],
                                                      "split_half": row["details"]["split_half_per_seed"],
                                                      "localization": row["details"]["config"]["localization"]}
            mean = sum(r["lds"] for r in per_checkpoint.values()) / len(per_checkpoint)
            rows[f"{factor:g}"] = {"mean_lds": mean, "checkpoints": per_checkpoint}
            print(f"c = {factor:g}: mean LDS {mean:.3f}; " + ", ".join(
                f"step {k}: {r['lds']:.3f} (γ {r['localization']:.3g})" for k, r in per_checkpoint.items()),
                flush=True)
    finally:
        localization.LOCALIZATION_FACTOR = saved
    report = {"setup": args.setup, "seeds": args.seeds, "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1, default=float))
    return report


if __name__ == "__main__":
    main()
