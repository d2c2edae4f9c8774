"""LDS set-up ``regression``: an MLP regression with squared error, attributed at the end of training.

The protocol (issue 24, item 4: a kind the suite lacked — a regression with MSE, trained to the end
of a cosine schedule, so that an end-of-training snapshot has no horizon):

* Friedman's #1 regression problem (``sklearn.datasets.make_friedman1``, 10 features, noise 1.0,
  targets standardized): 400 training examples, 50 held-out probes;
* a tanh MLP 10-32-1 (385 parameters) trained full-batch with Adam (lr 1e-2, L2 weight decay
  λ = 1e-3 coupled as in ``torch.optim.Adam``) and a cosine schedule to 0 over 500 steps;
  ℓ_i and φ_j are the per-example squared error (f(x) - y)²;
* ground truth: retraining from scratch on M = 100 random half-subsets with 3 initialisation
  seeds (every subset shares a seed's initialisation), probe losses averaged over seeds;
  the noise ceiling is one seed predicting another;
* the attributed model is the full-data run with seed 0; its optimizer steps are what a
  ``BIFCallback`` would have watched (:class:`lightning_bif.tuning.run_damping.RunLength`).

Its ground truth costs a few CPU seconds and is cached under ``benchmarks/cache/``.
``lds_suite.py --setups regression`` scores it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lds_common import CacheKey, subset_masks

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"


@dataclass(frozen=True)
class Setup(CacheKey):
    """Everything that determines the training run and the ground truth (its hash names the cache file)."""

    n_train: int = 400
    n_probes: int = 50
    features: int = 10
    hidden: int = 32
    train_steps: int = 500
    lr: float = 1e-2
    weight_decay: float = 1e-3
    subsets: int = 100
    alpha: float = 0.5
    seeds: int = 3
    data_seed: int = 0


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_probe: torch.Tensor
    y_probe: torch.Tensor
    masks: torch.Tensor  # [M, N] bool


def load_data(setup: Setup) -> Data:
    """Friedman #1, inputs in [0, 1], targets standardized; disjoint train and probe examples; the half-subsets."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=setup.n_train + setup.n_probes, n_features=setup.features, noise=1.0,
                          random_state=setup.data_seed)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32)
    y = (y - y.mean()) / y.std()
    masks = subset_masks(setup.subsets, setup.n_train, setup.alpha, torch.Generator().manual_seed(setup.data_seed))
    n = setup.n_train
    return Data(x[:n], y[:n], x[n:], y[n:], masks)


def init_params(setup: Setup, seed: int, copies: int) -> list[torch.Tensor]:
    """nn.Linear's default initialisation from ``seed``, repeated ``copies`` times (common random numbers)."""
    gen = torch.Generator().manual_seed(20_000 + seed)
    f, h = setup.features, setup.hidden
    a, b = 1 / math.sqrt(f), 1 / math.sqrt(h)
    shapes = [((f, h), a), ((h,), a), ((h, 1), b), ((1,), b)]
    return [((torch.rand(shape, generator=gen) * 2 - 1) * b).expand(copies, *shape).clone() for shape, b in shapes]


def stacked_outputs(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Predictions ``[S, B]`` of S stacked MLPs on inputs ``[S, B, F]``."""
    w1, b1, w2, b2 = params
    return torch.baddbmm(b2[:, None], torch.tanh(torch.baddbmm(b1[:, None], x, w1)), w2).squeeze(-1)


def train_stacked(setup: Setup, x: torch.Tensor, y: torch.Tensor, seed: int,
                  observe: Callable[[torch.optim.Optimizer], None] | None = None) -> list[torch.Tensor]:
    """Train S independent MLPs (rows of ``x [S, n, F]``, ``y [S, n]``); ``observe(optimizer)`` after every step."""
    params = [p.requires_grad_() for p in init_params(setup, seed, x.shape[0])]
    optimizer = torch.optim.Adam(params, lr=setup.lr, weight_decay=setup.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, setup.train_steps)
    for _ in range(setup.train_steps):
        optimizer.zero_grad(set_to_none=True)
        (stacked_outputs(params, x) - y).square().mean(1).sum().backward()
        optimizer.step()
        if observe is not None:
            observe(optimizer)
        schedule.step()
    return [p.detach() for p in params]


def probe_losses(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (stacked_outputs(params, x.expand(params[0].shape[0], *x.shape)) - y).square()


def ground_truth(setup: Setup, data: Data, log: Callable[[str], None] = print) -> dict:
    """Probe losses ``[M, seeds, P]`` of models retrained on every subset, cached on disk."""
    path = CACHE / f"lds_regression_{setup.key()}.pt"
    if path.exists():
        return torch.load(path)
    start = time.process_time()
    index = torch.stack([m.nonzero().flatten() for m in data.masks])
    losses = torch.empty(setup.subsets, setup.seeds, setup.n_probes)
    for seed in range(setup.seeds):
        params = train_stacked(setup, data.x_train[index], data.y_train[index], seed)
        losses[:, seed] = probe_losses(params, data.x_probe, data.y_probe)
        log(f"  regression ground truth: seed {seed} ({time.process_time() - start:.0f} CPU s)")
    truth = {"losses": losses, "cpu_s": time.process_time() - start, "setup": dataclasses.asdict(setup)}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(truth, path)
    return truth


def model_from_params(setup: Setup, params: list[torch.Tensor]) -> nn.Module:
    w1, b1, w2, b2 = params
    model = nn.Sequential(nn.Linear(setup.features, setup.hidden), nn.Tanh(), nn.Linear(setup.hidden, 1))
    with torch.no_grad():
        model[0].weight.copy_(w1.T)
        model[0].bias.copy_(b1)
        model[2].weight.copy_(w2.T)
        model[2].bias.copy_(b2)
    return model


def full_model(setup: Setup, data: Data,
               observe: Callable[[torch.optim.Optimizer], None] | None = None) -> nn.Module:
    """The attributed model: trained on every training example with seed 0 (``observe`` sees each step)."""
    params = train_stacked(setup, data.x_train[None], data.y_train[None], seed=0, observe=observe)
    return model_from_params(setup, [p[0] for p in params])


def per_example_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """Squared error per example: the training loss ℓ_i and the probe observable φ_j."""
    x, y = batch
    return (model(x).squeeze(-1) - y).square()


def kronfluence_task():
    """kronfluence's ``Task`` for squared error: summed (f - y)²; ``sample`` draws y ~ N(f, 1/2), the true Fisher's."""
    from kronfluence.task import Task

    class RegressionTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            out = model(x).squeeze(-1)
            if sample:
                with torch.no_grad():
                    y = out.detach() + torch.randn_like(out) * math.sqrt(0.5)
            return (out - y).square().sum()

        def compute_measurement(self, batch, model):
            x, y = batch
            return (model(x).squeeze(-1) - y).square().sum()

    return RegressionTask()
