"""Where vmap stops paying off on a CPU: one SGLD gradient step of C chains, batched under vmap and one by one.

``vectorize="auto"`` decides from the counted work of one chain's step
(:func:`lightning_bif.estimation.vectorization.step_flops`, the FLOPs ``FlopCounterMode`` counts), never from a
clock. This script times both ways over MLPs and minibatch sizes and prints each step's FLOPs and the ratio
vmap / one-by-one; ``CPU_VMAP_MAX_STEP_FLOPS`` is set near the FLOPs where the ratio crosses 1. Timings move
with machine load, so run it on a quiet machine and read the crossover, not single rows (docs/benchmarks.md)::

    python benchmarks/vmap_threshold.py --threads 1
    python benchmarks/vmap_threshold.py --smoke
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from lightning_bif import SGLDConfig
from lightning_bif.estimation.estimator import BIFEstimator
from lightning_bif.estimation.vectorization import CPU_VMAP_MAX_STEP_FLOPS, step_flops


def cross_entropy(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def best_seconds(run: Callable[[], None], repeats: int) -> float:
    """The fastest of ``repeats`` runs, after one warm-up: the least disturbed by other processes."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(width: int, batch_size: int, chains: int, repeats: int) -> tuple[int, float, float]:
    """(FLOPs of one chain's step, seconds batched under vmap, seconds one chain after another)."""
    torch.manual_seed(0)
    x, y = torch.randn(2048, 32), torch.randint(10, (2048,))
    model = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    config = SGLDConfig(chains=chains, draws=2, batch_size=batch_size, step_size=1e-4, localization=1.0)
    estimator = BIFEstimator(model, cross_entropy, (x[:64], y[:64]), (x[:4], y[:4]), data=(x, y), config=config)
    estimator.check_losses()
    fmodel, sampler, buffers = estimator.fmodel, estimator.sampler, estimator.buffers
    flops = step_flops(estimator.losses, sampler)
    together, shared = sampler.example_minibatch(chains=chains, vectorized=True)
    apart, _ = sampler.example_minibatch(chains=chains, vectorized=False)
    centers = fmodel.center.expand(chains, -1)

    def vmapped() -> None:
        fmodel.batched_grads(centers, together, sampler.minibatch, cross_entropy, buffers, vectorized=True,
                             shared_batch=shared)

    def one_by_one() -> None:
        for chain in range(chains):
            fmodel.batched_grads(centers[chain:chain + 1], [apart[chain]], sampler.minibatch, cross_entropy,
                                 buffers, vectorized=False, shared_batch=shared)

    return flops, best_seconds(vmapped, repeats), best_seconds(one_by_one, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a snapshot's num_threads)")
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="two sizes, one repeat: checks the script runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    widths, batches, repeats = ((16, 256), (32,), 1) if args.smoke else (
        (16, 32, 64, 128, 256, 512), (16, 64, 256), args.repeats)
    print(f"threads={args.threads} chains={args.chains}; "
          f"threshold CPU_VMAP_MAX_STEP_FLOPS={CPU_VMAP_MAX_STEP_FLOPS:.3g}")
    print(f"{'width':>6} {'batch':>6} {'step MFLOP':>11} {'vmap ms':>9} {'1-by-1 ms':>10} {'vmap/1-by-1':>12}")
    rows = sorted((measure(width, batch, args.chains, repeats), width, batch) for width in widths for batch in batches)
    for (flops, vmapped, one_by_one), width, batch in rows:
        print(f"{width:>6} {batch:>6} {flops / 1e6:>11.2f} {vmapped * 1e3:>9.2f} {one_by_one * 1e3:>10.2f} "
              f"{vmapped / one_by_one:>12.2f}")


if __name__ == "__main__":
    main()
