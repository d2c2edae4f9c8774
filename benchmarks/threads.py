"""How a small snapshot and a plain training step each slow down under CPU load, side by side in one run.

Thread oversubscription (docs/lightning.md, "Threads"): a snapshot of a small model is thousands of
tiny kernels; with two intra-op threads every kernel ends only when both threads have been scheduled,
so when other processes keep the cores busy each kernel waits for the scheduler. The run times, with
no extra load and then with ``--load N`` ``yes > /dev/null`` processes that it starts itself:

- a plain training step (Adam, minibatch 32) at torch's default thread count;
- a snapshot with that thread count chosen explicitly (what snapshots ran with before the size rule);
- a snapshot with one thread;
- a snapshot as ``estimate_bif`` / ``BIFCallback`` run it by default (the size rule of
  ``lightning_bif.snapshot.threads``: one thread for a model this small).

The workload is the one of issue 22: an MLP 10-32-4 (484 parameters), 2 chains x 5 draws, 64 tracked
examples and 16 probes. "Idle" is whatever the machine does besides this script: the load average is
printed with each phase::

    python benchmarks/threads.py --repeats 5 --load 3
    python benchmarks/threads.py --smoke            # seconds: what the test suite runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.snapshot.threads import snapshot_threads


def _loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _workload() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 10, generator=generator), torch.randint(0, 4, (512,), generator=generator)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4)), x, y


def _measures(model: nn.Module, x: torch.Tensor, y: torch.Tensor, default: int,
              train_steps: int) -> dict[str, Callable[[], None]]:
    config = SGLDConfig(chains=2, draws=5, burn_in=5, step_size=1e-4, localization=100.0, nbeta=512.0,
                        batch_size=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def snapshot() -> None:
        estimate_bif(model, _loss, (x[:64], y[:64]), (x[64:80], y[64:80]), data=(x, y), config=config)

    def explicit(threads: int) -> Callable[[], None]:
        def run() -> None:
            with snapshot_threads(threads):
                snapshot()
        return run

    def train() -> None:
        for step in range(train_steps):
            rows = slice(32 * step % 480, 32 * step % 480 + 32)
            optimizer.zero_grad()
            _loss(model, [x[rows], y[rows]]).mean().backward()
            optimizer.step()

    return {f"training step (threads={default})": train, f"snapshot, threads={default} chosen": explicit(default),
            "snapshot, threads=1 chosen": explicit(1), "snapshot, default (size rule)": snapshot}


def _phase(measures: dict[str, Callable[[], None]], repeats: int, train_steps: int) -> dict[str, list[float]]:
    """Seconds per call of each measure, alternating, so that all see the same load over time."""
    times: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, run in measures.items():
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            times[name].append(seconds / train_steps if name.startswith("training") else seconds)
    return times


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--load", type=int, default=3, help="`yes > /dev/null` processes started for the loaded phase")
    parser.add_argument("--smoke", action="store_true", help="one repeat, one load process: a check that it runs")
    args = parser.parse_args(argv)
    repeats, load, train_steps = (1, 1, 5) if args.smoke else (args.repeats, args.load, 50)
    default = torch.get_num_threads()
    model, x, y = _workload()
    measures = _measures(model, x, y, default, train_steps)
    _phase(measures, 1, train_steps)  # warm-up: the first torch.func call imports torch._dynamo
    medians: dict[str, dict[str, float]] = {}
    for phase, processes in (("idle", 0), (f"load {load}", load)):
        busy = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(processes)]
        try:
            time.sleep(0.5 * bool(busy))  # let the scheduler spread them
            before = os.getloadavg()[0]
            times = _phase(measures, repeats, train_steps)
        finally:
            for process in busy:
                process.kill()
                process.wait()
        print(f"{phase} (load average {before:.1f} at the start, {len(os.sched_getaffinity(0))} cores):")
        for name, seconds in times.items():
            print(f"  {name:<32} median {statistics.median(seconds):8.4f} s   "
                  + ", ".join(f"{s:.4f}" for s in seconds))
        medians[phase] = {name: statistics.median(seconds) for name, seconds in times.items()}
    idle, loaded = medians.values()
    print("slowdown under load (median loaded / median idle):")
    for name in measures:
        print(f"  {name:<32} {loaded[name] / idle[name]:6.2f}x")
    return medians


if __name__ == "__main__":
    main()
