"""Fault campaign behind docs/reliability.md: damage logs in many ways and count what survives.

Usage: python benchmarks/fault_campaign.py [--kills 50] [--out benchmarks/results/faults.json]
       python benchmarks/fault_campaign.py --smoke --out /tmp/faults.json   # a few of each: what the tests run

1. truncation at 40 points (1 % .. 99 %) plus 100 bytes and 0 bytes;
2. random 512-byte overwrites (zeros or random bytes) at 100 random offsets;
3. a kill-and-resume storm of ``--kills`` SIGKILLs (appends and recoveries; fork, POSIX only);
4. the step-size sweep of the toy model behind the ``diverged`` bound.

For each damaged file: does ``open_log`` (and reading every array) raise ``DamagedLogError`` in
bounded time or return data identical to the original, and what does ``salvage`` keep.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "scripts")]
from helpers import make_identity, record, resume_until_killed  # noqa: E402
from toy import FAST, ToyClassifier, toy_dataset, tracked_sets  # noqa: E402

from lightning_bif import DamagedLogError, estimate_bif, open_log  # noqa: E402
from lightning_bif.log import LogWriter, salvage  # noqa: E402

ROWS = 50


def original(directory: Path) -> Path:
    path = directory / "original.h5"
    with LogWriter(path, make_identity()) as writer:
        for step in range(1, ROWS + 1):
            writer.append(record(step))
    return path


def read_everything(path: Path) -> dict[str, np.ndarray]:
    with open_log(path) as log:
        return {"steps": log.steps, "status": log.status, "influence": log.influence[:],
                "draw_loss": log.draw_loss[:], "stderr": log.stderr[:]}


def outcome(damaged: Path, reference: dict[str, np.ndarray]) -> tuple[str, float]:
    start = time.monotonic()
    try:
        values = read_everything(damaged)
    except DamagedLogError:
        return "DamagedLogError", time.monotonic() - start
    seconds = time.monotonic() - start
    same = all(np.array_equal(values[k], reference[k], equal_nan=k != "status") for k in reference)
    return ("identical" if same else "different data"), seconds


def salvaged(damaged: Path, reference: dict[str, np.ndarray], directory: Path) -> tuple[int, bool]:
    """Rows kept by salvage and whether each kept row equals the original row of its step."""
    try:
        report = salvage(damaged, directory / "repaired.h5")
    except DamagedLogError:
        return 0, True
    values = read_everything(report.target)
    rows = [int(np.flatnonzero(reference["steps"] == s)[0]) for s in values["steps"]]
    exact = all(np.array_equal(values[k], reference[k][rows], equal_nan=k != "status") for k in values)
    return report.kept, exact


def damage_campaign(directory: Path, truncations: int = 40, overwrites: int = 100) -> dict:
    source = original(directory)
    reference = read_everything(source)
    size = source.stat().st_size
    results: dict[str, list] = {"truncation": [], "overwrite": []}
    cuts = [int(size * f) for f in np.linspace(0.01, 0.99, truncations)] + [100, 0]
    for cut in cuts:
        damaged = directory / "damaged.h5"
        shutil.copy(source, damaged)
        os.truncate(damaged, cut)
        kind, seconds = outcome(damaged, reference)
        kept, exact = salvaged(damaged, reference, directory)
        results["truncation"].append({"bytes": cut, "outcome": kind, "seconds": seconds, "salvaged": kept,
                                      "salvaged_exact": exact})
    rng = random.Random(0)
    for _ in range(overwrites):
        damaged = directory / "damaged.h5"
        shutil.copy(source, damaged)
        offset = rng.randrange(0, size - 512)
        junk = bytes(512) if rng.random() < 0.5 else rng.randbytes(512)
        with open(damaged, "r+b") as file:
            file.seek(offset)
            file.write(junk)
        kind, seconds = outcome(damaged, reference)
        kept, exact = salvaged(damaged, reference, directory)
        results["overwrite"].append({"offset": offset, "zeros": not any(junk), "outcome": kind, "seconds": seconds,
                                     "salvaged": kept, "salvaged_exact": exact})
    results["file_bytes"] = size
    return results


def storm(directory: Path, kills: int) -> dict:
    path = directory / "storm.h5"
    rng = random.Random(1)
    committed: list[int] = []
    recoveries = interrupted = lost = 0
    for kill in range(kills):
        told = resume_until_killed(path, rng.uniform(0.0, 0.02) if kill % 3 == 0 else rng.uniform(0.1, 0.6))
        recoveries += "R1" in told
        interrupted += kill > 0 and not told
        committed += [int(t) for t in told if not t.startswith("R")]
        if not path.exists():
            continue
        with open_log(path) as log:
            steps = log.steps.tolist()
        lost += len(set(committed) - set(steps))
        committed = steps
    return {"kills": kills, "completed_recoveries": recoveries, "killed_before_resume_finished": interrupted,
            "snapshots_committed": len(committed), "committed_snapshots_lost": lost}


def step_sizes(values: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)) -> list[dict]:
    torch.manual_seed(0)
    data = toy_dataset()
    train, probes = tracked_sets(data)
    rows = []
    for step_size in values:
        result = estimate_bif(ToyClassifier(), lambda model, batch: model.per_example_loss(batch), train, probes,
                              data=data, config=FAST.replace(step_size=step_size))
        d = result.diagnostics
        rows.append({"step_size": step_size, "status": result.status,
                     "loss_rise": d.loss_rise, "bound": d.loss_rise_bound,
                     "max_abs_influence": float(result.influence.abs().max()), "reason": result.divergence})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faults.json"))
    parser.add_argument("--smoke", action="store_true", help="3 truncations, 3 overwrites, 2 kills, 2 step sizes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    damage, kills, sizes = ((3, 3), 2, (1e-4, 1.0)) if args.smoke else ((40, 100), args.kills, None)
    with tempfile.TemporaryDirectory() as directory:
        results = {"damage": damage_campaign(Path(directory), *damage), "storm": storm(Path(directory), kills),
                   "step_sizes": step_sizes(*([sizes] if sizes else []))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    for kind in ("truncation", "overwrite"):
        rows = results["damage"][kind]
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
        print(f"{kind}: {len(rows)} files: {counts}; slowest read {max(r['seconds'] for r in rows):.2f} s; "
              f"salvage kept {sum(r['salvaged'] for r in rows)} rows, all equal to the original: "
              f"{all(r['salvaged_exact'] for r in rows)}")
    print("storm:", results["storm"])
    for row in results["step_sizes"]:
        print(f"step size {row['step_size']:g}: {row['status']}, loss rise {row['loss_rise']:.3g} "
              f"(bound {row['bound']:.3g}), max |BIF| {row['max_abs_influence']:.3g}")
    return results


if __name__ == "__main__":
    main()
