"""Sweeps behind issue 24's two rules: nβ from the tracked losses' nonlinearity, the minibatch from its noise.

Every row is ``estimate_bif`` with the config a ``BIFCallback`` user gets on a suite set-up
(``lds_suite.callback_config``), scored by LDS against the set-up's ground truth (``lds_suite.py`` builds both):

* ``--levers``: the two levers by hand, nβ as multiples of the data size n (``--multiples``) × the minibatch
  64 or the full batch; the rules off (nβ and the minibatch given).
* ``--limits``: ``lightning_bif.tuning.locality.NONLINEARITY_LIMIT`` set to each value (the rule on, the rest default).
* ``--ratios``: ``lightning_bif.tuning.minibatch.GRADIENT_NOISE_RATIO`` set to each value.
* ``--factors``: ``lightning_bif.tuning.localization.LOCALIZATION_FACTOR`` (the floor's c) set to each value.
* ``--before``: the default before issue 24's rules (minibatch 64, nβ = n, c = 3).
* ``--cap M``: every row with the automatic minibatch capped at M examples, as a callback's is where the
  training set exceeds 4·(N + P) (the suite's set-ups sample from their tracked examples, where the full batch
  is allowed): the callback's big-data regime, emulated.

The constants were chosen with ``--setups midtrain`` (the development set-up); docs/self-tuning.md,
"The inverse temperature and the minibatch", has the tables and the criterion. One torch thread;
CPU s are ``time.process_time`` per estimate. ``--tiny`` runs toy sizes (the smoke test).

    python benchmarks/rule_sweep.py --setups midtrain --levers --limits 1e9,1,0.3,0.1,0.03,0.01 --ratios 1,0.3,0.1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lds_suite
from lds_digits import lds

import lightning_bif.estimation.estimator as estimator_module
from lightning_bif.tuning import locality, localization, minibatch


def _row(problem: lds_suite.Problem, config, **label: object) -> dict:
    score = lds_suite.bif_score(problem, "sweep", config)
    value, _ = lds(score.scores, problem.masks, problem.losses.mean(1))
    details, tuning = score.details, score.details.get("tuning", {})
    return {"setup": problem.setup, "step": problem.checkpoint, **label, "lds": value,
            "split_half": details["split_half"], "cpu_s": score.cpu_s, "nbeta": details["nbeta"],
            "n": len(problem.train[0]), "batch_size": details["config"]["batch_size"],
            "chains": details["config"]["chains"], "nonlinearity": tuning.get("nonlinearity"),
            "noise_ratio": tuning.get("gradient_noise_ratio")}


def sweep(problems: list[lds_suite.Problem], levers: bool, multiples: list[float], limits: list[float],
          ratios: list[float], factors: list[float] = (), before: bool = False) -> Iterator[dict]:
    """The rows of every requested sweep on every problem (module constants restored after each)."""
    limit0, ratio0 = locality.NONLINEARITY_LIMIT, minibatch.GRADIENT_NOISE_RATIO
    factor0 = localization.LOCALIZATION_FACTOR
    for problem in problems:
        base, n = lds_suite.callback_config(problem), len(problem.train[0])
        if before:
            try:
                localization.LOCALIZATION_FACTOR = 3.0
                yield _row(problem, base.replace(batch_size=64, nbeta=n), sweep="before")
            finally:
                localization.LOCALIZATION_FACTOR = factor0
        if levers:
            for batch in (64, None):
                for multiple in multiples:
                    yield _row(problem, base.replace(nbeta=multiple * n, batch_size=batch), sweep="levers",
                               multiple=multiple, batch=batch)
        try:
            for limit in limits:
                locality.NONLINEARITY_LIMIT = limit
                yield _row(problem, base, sweep="limit", limit=limit)
            locality.NONLINEARITY_LIMIT = limit0
            for ratio in ratios:
                minibatch.GRADIENT_NOISE_RATIO = ratio
                yield _row(problem, base, sweep="ratio", ratio=ratio)
            minibatch.GRADIENT_NOISE_RATIO = ratio0
            for factor in factors:
                localization.LOCALIZATION_FACTOR = factor
                yield _row(problem, base, sweep="factor", factor=factor)
        finally:
            locality.NONLINEARITY_LIMIT, minibatch.GRADIENT_NOISE_RATIO = limit0, ratio0
            localization.LOCALIZATION_FACTOR = factor0


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")] if text else []


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="midtrain", help="comma-separated suite set-ups")
    parser.add_argument("--levers", action="store_true", help="nβ multiples × minibatch 64 / full, rules off")
    parser.add_argument("--multiples", default="1,10,100", help="nβ/n for --levers")
    parser.add_argument("--limits", default="", help="NONLINEARITY_LIMIT values, e.g. 1e9,0.1,0.03")
    parser.add_argument("--ratios", default="", help="GRADIENT_NOISE_RATIO values, e.g. 1,0.3,0.1")
    parser.add_argument("--factors", default="", help="LOCALIZATION_FACTOR values (the floor's c), e.g. 1,3")
    parser.add_argument("--before", action="store_true", help="the default before issue 24 (m 64, nβ = n, c = 3)")
    parser.add_argument("--cap", type=int, default=None, help="cap the automatic minibatch at M examples")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the smoke test)")
    parser.add_argument("--out", type=Path, help="JSON file for the rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    largest0 = estimator_module.largest_minibatch
    if args.cap is not None:
        estimator_module.largest_minibatch = lambda tracked, examples: min(args.cap, examples)
    try:
        for _, problems in lds_suite.build(args.setups.split(","), tiny=args.tiny):
            for row in sweep(problems, args.levers, _floats(args.multiples), _floats(args.limits),
                             _floats(args.ratios), _floats(args.factors), args.before):
                rows.append({**row, "cap": args.cap})
                _print(rows[-1])
    finally:
        estimator_module.largest_minibatch = largest0
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


def _print(row: dict) -> None:
    knob = {"levers": "nβ = {multiple:g}·n, m = {batch}", "limit": "Q limit {limit:g}",
            "ratio": "noise ratio {ratio:g}", "factor": "floor c = {factor:g}",
            "before": "before issue 24"}[row["sweep"]].format(**row)
    print(f"{row['setup']:>16} {row['step']:>5}  {knob:<22} LDS {row['lds']:.3f}  split-half "
          f"{row['split_half']:.2f}  nβ {row['nbeta']:.4g}  m {row['batch_size']}  {row['cpu_s']:.2f} CPU s",
          flush=True)


if __name__ == "__main__":
    main()
