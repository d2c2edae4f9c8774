"""Share of a snapshot spent on self-tuning (curvature, projections), with and without the curvature cache.

Runs the callback's configuration (new defaults, horizon "interval") at every checkpoint of
``lds_midtrain.py`` in order, once with a fresh measurement per checkpoint and once sharing one
:class:`~lightning_bif.curvature_cache.CurvatureCache` across them, as the callback does.
Prints wall seconds of the tuning and of the whole estimate (``Diagnostics.duration_s``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lds_midtrain import Setup, as_module, load_data, per_example_loss, run_and_truth

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.curvature_cache import CurvatureCache
from lightning_bif.horizon import optimizer_step


def main() -> None:
    torch.set_num_threads(1)
    setup = Setup()
    data = load_data(setup)
    run = run_and_truth(setup, data)
    for label, cache in (("fresh", None), ("cached", CurvatureCache())):
        tuning_s = total_s = 0.0
        for step in setup.checkpoints:
            model = as_module(setup, run["checkpoints"][step][0])
            found = optimizer_step(torch.optim.SGD(model.parameters(), lr=setup.lr, momentum=setup.momentum))
            config = SGLDConfig(weight_decay=setup.weight_decay, horizon_steps=setup.horizon(step, "interval"),
                                learning_rate=found.learning_rate, momentum=found.momentum)
            result = estimate_bif(model, per_example_loss, (data.x_train, data.y_train),
                                  (data.x_probe, data.y_probe), config=config, cache=cache)
            t = result.diagnostics.tuning
            tuning_s += t.seconds
            total_s += result.diagnostics.duration_s
            print(f"{label} step {step}: tuning {t.seconds:.3f} s of {result.diagnostics.duration_s:.3f} s "
                  f"({t.seconds / result.diagnostics.duration_s:.0%}); curvature {t.curvature_reason or 'measured'}"
                  f" (drift {t.curvature_drift:.3f})")
        print(f"{label}: tuning {tuning_s:.2f} s of {total_s:.2f} s ({tuning_s / total_s:.0%})")


if __name__ == "__main__":
    main()
