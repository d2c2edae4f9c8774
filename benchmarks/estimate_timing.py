"""Wall time of one ``estimate_bif`` call on a small MLP, vectorized vs sequential chains (CPU).

Setup: MLP 64-64-10 (tanh), random inputs and labels, 1000 tracked training examples (also the
SGLD data), 100 probes, 4 chains x 200 draws after 100 burn-in steps, minibatch 64.

Usage:
    python benchmarks/estimate_timing.py [--threads 2] [--repeats 3] [--profile]
    python benchmarks/estimate_timing.py --smoke    # toy sizes, seconds: what the test suite runs
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from torch import nn
from torch.nn import functional as F

from lightning_bif import SGLDConfig, estimate_bif


def cross_entropy(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print a cProfile summary of one vectorized run")
    parser.add_argument("--smoke", action="store_true", help="100 examples, 2 chains x 4 draws, one repeat")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    n = 100 if args.smoke else 1000
    x, y = torch.randn(n + n // 10, 64), torch.randint(0, 10, (n + n // 10,))
    train, probes = (x[:n], y[:n]), (x[n:], y[n:])
    base = SGLDConfig(chains=4, draws=200, burn_in=100, thin=1, step_size=1e-4, localization=100.0, batch_size=64,
                      target_split_half=None)  # fixed work: timings of exactly 4 chains
    if args.smoke:
        base, args.repeats = base.replace(chains=2, draws=4, burn_in=2), 1
    # Warm-up: the first torch.func call imports torch._dynamo (seconds), which is not per-estimate cost.
    estimate_bif(model, cross_entropy, train, probes, config=base.replace(draws=2, burn_in=1))
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        estimate_bif(model, cross_entropy, train, probes, config=base.replace(vectorize=True))
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    print(f"threads={args.threads} torch={torch.__version__}")
    for vectorize in (True, False):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = estimate_bif(model, cross_entropy, train, probes, config=base.replace(vectorize=vectorize))
            times.append(time.perf_counter() - start)
        steps = base.chains * (base.burn_in + base.draws)
        print(f"vectorize={vectorize!s:5}  best {min(times):6.2f} s  median {sorted(times)[len(times) // 2]:6.2f} s"
              f"  ({1e3 * min(times) / steps:.2f} ms per chain-step incl. evaluation)  ok={result.ok}")


if __name__ == "__main__":
    main()
