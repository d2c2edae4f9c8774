"""Loss rise of real snapshots against the equilibrium expectation D/(2nβ): evidence for the ``suspect`` margin.

Every estimate made while a scenario runs is recorded (the estimator's ``summarize`` is wrapped):
the mean loss rise over the draws, D (sampled parameters), nβ, γ, the loss at w* and the ratio
rise / (D/(2nβ)). Scenarios: the two cases of issue 22 (a 10-32-4 tanh MLP at initialisation,
2 x 20 draws, step size 0.3, nβ 1000, γ 1; the test toy's step-size sweep of
benchmarks/fault_campaign.py), the tests' healthy toys, examples/digits.py with short settings and
benchmarks/lds_suite.py --tiny. ``python benchmarks/suspect_evidence.py [--skip digits,lds]``.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "scripts"), str(ROOT / "benchmarks")]
from helpers import classification_data, cross_entropy, mlp, train_briefly  # noqa: E402
from toy import FAST, ToyClassifier, toy_dataset, tracked_sets  # noqa: E402

from lightning_bif import SGLDConfig, estimate_bif  # noqa: E402
from lightning_bif.estimation import estimator  # noqa: E402

ROWS: list[dict] = []
SCENARIO = ["?"]


def record_every_estimate() -> None:
    summarize = estimator.BIFEstimator.summarize

    def recorded(self, accumulator, duration_s):
        result = summarize(self, accumulator, duration_s)
        d = result.diagnostics
        equipartition = self.fmodel.dim / (2.0 * self.nbeta)
        ROWS.append({"scenario": SCENARIO[0], "D": self.fmodel.dim, "nbeta": self.nbeta,
                     "gamma": result.config.localization, "step_size": result.config.step_size,
                     "loss": float(result.train_loss.double().mean()), "rise": d.loss_rise,
                     "max_chain_rise": float((d.draw_loss.double().mean(1) - result.train_loss.double().mean()).max()),
                     "equipartition": equipartition, "ratio": d.loss_rise / equipartition,
                     "suspect_bound": d.suspect_rise_bound, "diverged_bound": d.loss_rise_bound,
                     "status": result.status,
                     "max_abs_bif": float(result.influence.abs().max())})
        return result

    estimator.BIFEstimator.summarize = recorded


def issue_mlp() -> None:
    """Issue 22's first case: a 10-32-4 tanh MLP at initialisation."""
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = torch.randint(4, (256,))
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    for step_size in (1e-4, 1e-3, 1e-2, 0.3):
        estimate_bif(model, cross_entropy, (x[:32], y[:32]), (x[32:40], y[32:40]), data=(x, y),
                     config=SGLDConfig(chains=2, draws=20, step_size=step_size, nbeta=1000.0, localization=1.0))


def toy_sweep() -> None:
    """docs/reliability.md's step-size sweep (benchmarks/fault_campaign.py)."""
    torch.manual_seed(0)
    data = toy_dataset()
    train, probes = tracked_sets(data)
    for step_size in (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0):
        estimate_bif(ToyClassifier(), lambda model, batch: model.per_example_loss(batch), train, probes,
                     data=data, config=FAST.replace(step_size=step_size))


def test_toys() -> None:
    """The tests' trained toy (tests/test_faults.py) at the default and automatic settings."""
    x, y = classification_data(96)
    model = train_briefly(mlp(), cross_entropy, x, y, steps=100)
    for config in (SGLDConfig(chains=2, draws=10, burn_in=5, thin=1, step_size=1e-4), SGLDConfig(chains=4, draws=50)):
        estimate_bif(model, cross_entropy, (x[:12], y[:12]), (x[12:16], y[12:16]), data=(x, y), config=config)
    data = toy_dataset()
    train, probes = tracked_sets(data)
    estimate_bif(ToyClassifier(), lambda model, batch: model.per_example_loss(batch), train, probes, data=data,
                 config=SGLDConfig(chains=4, draws=40))


def digits(directory: str) -> None:
    sys.argv = ["digits.py", "--epochs", "3", "--snapshots", "4", "--root", directory]
    runpy.run_path(str(ROOT / "examples" / "digits.py"), run_name="__main__")


def lds(directory: str) -> None:
    sys.argv = ["lds_suite.py", "--tiny", "--no-kronfluence", "--out", str(Path(directory) / "lds.json")]
    runpy.run_path(str(ROOT / "benchmarks" / "lds_suite.py"), run_name="__main__")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default="", help="comma-separated scenarios to skip")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "suspect_evidence.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    record_every_estimate()
    with tempfile.TemporaryDirectory() as directory:
        for name, run in (("issue_mlp", issue_mlp), ("toy_sweep", toy_sweep), ("test_toys", test_toys),
                          ("digits", lambda: digits(directory)), ("lds", lambda: lds(directory))):
            if name in args.skip.split(","):
                continue
            SCENARIO[0] = name
            run()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(ROWS, indent=1))
    for row in ROWS:
        print(f"{row['scenario']:10} D={row['D']:6} nβ={row['nbeta']:9.4g} γ={row['gamma']:8.3g} "
              f"ε={row['step_size']:8.2g} loss={row['loss']:7.3g} rise={row['rise']:9.3g} "
              f"max chain rise={row['max_chain_rise']:9.3g} D/2nβ={row['equipartition']:8.3g} "
              f"ratio={row['ratio']:9.3g} suspect bound={row['suspect_bound']:8.3g} {row['status']:8} "
              f"|BIF|={row['max_abs_bif']:.3g}")


if __name__ == "__main__":
    main()
