"""Share of a snapshot spent on self-tuning (curvature, stiffness, projections), with and without the curvature cache.

Two setups (``--setups``, default both):

* ``midtrain``: the callback's configuration (new defaults, horizon "interval") at every checkpoint of
  ``lds_midtrain.py`` in order (tanh MLP 16-32-4, 676 parameters);
* ``digits``: ``SGLDConfig()`` defaults with the training weight decay on the trained digits MLP of
  ``lds_digits.py`` (ReLU MLP 64-64-10, 4,810 parameters), three estimates of the same weights.

Each runs once with a fresh measurement per estimate and once sharing one
:class:`~lightning_bif.curvature.cache.CurvatureCache` across them, as the callback does.
Prints wall seconds of the tuning (``Tuning.seconds``) and of the whole estimate (``Diagnostics.duration_s``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.curvature.cache import CurvatureCache
from lightning_bif.tuning.horizon import optimizer_step

Estimate = tuple[str, torch.nn.Module, Callable, tuple, tuple, SGLDConfig]


def midtrain() -> Iterator[Estimate]:
    """One estimate per checkpoint of lds_midtrain.py, as the callback would take it."""
    from lds_midtrain import Setup, as_module, load_data, per_example_loss, run_and_truth

    setup = Setup()
    data = load_data(setup)
    run = run_and_truth(setup, data)
    for step in setup.checkpoints:
        model = as_module(setup, run["checkpoints"][step][0])
        found = optimizer_step(torch.optim.SGD(model.parameters(), lr=setup.lr, momentum=setup.momentum))
        config = SGLDConfig(weight_decay=setup.weight_decay, horizon_steps=setup.horizon(step, "interval"),
                            learning_rate=found.learning_rate, momentum=found.momentum)
        yield (f"step {step}", model, per_example_loss, (data.x_train, data.y_train), (data.x_probe, data.y_probe),
               config)


def digits() -> Iterator[Estimate]:
    """Three estimates of the trained digits MLP with the default settings."""
    from lds_digits import Setup, full_model, load_split, per_example_loss

    setup = Setup()
    data = load_split(setup)
    model = full_model(setup, data)
    for k in range(3):
        yield (f"estimate {k}", model, per_example_loss, (data.x_train, data.y_train), (data.x_probe, data.y_probe),
               SGLDConfig(weight_decay=setup.weight_decay))


SETUPS = {"midtrain": midtrain, "digits": digits}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {sorted(SETUPS)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.setups.split(","):
        estimates = list(SETUPS[name]())
        for label, cache in (("fresh", None), ("cached", CurvatureCache())):
            tuning_s = total_s = 0.0
            for what, model, loss_fn, train, probes, config in estimates:
                result = estimate_bif(model, loss_fn, train, probes, config=config, cache=cache)
                t = result.diagnostics.tuning
                tuning_s += t.seconds
                total_s += result.diagnostics.duration_s
                print(f"{name} {label} {what}: tuning {t.seconds:.3f} s of {result.diagnostics.duration_s:.3f} s "
                      f"({t.seconds / result.diagnostics.duration_s:.0%}); curvature "
                      f"{t.curvature_reason or 'measured'} (drift {t.curvature_drift:.3f})")
            print(f"{name} {label}: tuning {tuning_s:.2f} s of {total_s:.2f} s ({tuning_s / total_s:.0%})")


if __name__ == "__main__":
    main()
