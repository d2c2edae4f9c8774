"""Time one small snapshot with torch's default thread count and with one thread, side by side.

Thread oversubscription (docs/lightning.md, "Threads"): a snapshot of a small model is thousands of
tiny kernels, and when other processes (or dataloader workers) keep the cores busy, every extra
intra-op thread waits to be scheduled. Run it on a quiet machine and under load (e.g. with
``--load 2`` busy-looping processes, or with other jobs running) and compare the two columns::

    python benchmarks/threads.py --repeats 3 --load 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import torch
from torch import nn
from torch.nn import functional as F

from lightning_bif import SGLDConfig, estimate_bif


def _busy() -> None:
    while True:
        pass


def _snapshot_seconds(threads: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    def loss(m: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1], reduction="none")

    torch.set_num_threads(threads)
    start = time.perf_counter()
    estimate_bif(model, loss, (x[:64], y[:64]), (x[:8], y[:8]), data=(x, y),
                 config=SGLDConfig(chains=8, draws=25, burn_in=0, thin=2, step_size=1e-4, batch_size=32))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", type=int, default=0, help="busy-looping processes started for the measurement")
    args = parser.parse_args()
    default = torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 16, generator=generator), torch.randint(0, 4, (512,), generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    load = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.load)]
    for process in load:
        process.start()
    try:
        _snapshot_seconds(1, model, x, y)  # warm-up
        times: dict[int, list[float]] = {default: [], 1: []}
        for _ in range(args.repeats):  # alternate, so both see the same load over time
            for threads in times:
                times[threads].append(_snapshot_seconds(threads, model, x, y))
    finally:
        for process in load:
            process.terminate()
    for threads, seconds in times.items():
        print(f"threads={threads}: " + ", ".join(f"{s:.2f}" for s in seconds) + " s")


if __name__ == "__main__":
    main()
