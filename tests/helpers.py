"""Shared test helpers: small models, per-example losses, the closed-form Gaussian BIF and log fixtures.

Other test modules import these; keep the signatures stable.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from lightning_bif import BIFResult, Diagnostics, SGLDConfig
from lightning_bif.log import LogWriter, RunIdentity, SnapshotRecord


def mlp(inputs: int = 4, hidden: int = 16, outputs: int = 3, seed: int = 0) -> nn.Sequential:
    """A small tanh MLP with deterministic initial weights."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs))


def cross_entropy(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """Per-example cross-entropy of a ``[x, y]`` batch."""
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def half_squared_error(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """Per-example ``½ (f(x) - y)²`` of a ``[x, y]`` batch for a model with one output."""
    return 0.5 * (model(batch[0]).squeeze(-1) - batch[1]).square()


def classification_data(
    n: int, inputs: int = 4, classes: int = 3, seed: int = 0, label_noise: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs with labels from a fixed random linear rule (learnable, slightly noisy)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=g)
    rule = torch.randn(inputs, classes, generator=torch.Generator().manual_seed(1234))
    logits = 2.0 * x @ rule + label_noise * torch.randn(n, classes, generator=g)
    return x, logits.argmax(dim=1)


def train_briefly(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, steps: int = 200,
                  lr: float = 0.05, weight_decay: float = 0.0) -> nn.Module:
    """Full-batch Adam for a few steps, so w* is near a minimum (restores the global RNG)."""
    state = torch.get_rng_state()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, [x, y]).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    torch.set_rng_state(state)
    return model


@dataclass
class LinearProblem:
    """A linear regression ``y = xᵀθ + b + noise`` fitted by ``nn.Linear(d, 1)`` (bias included).

    Attributes:
        model: ``nn.Linear(d, 1)`` in float64 at w* (the least-squares fit, perturbed a little so
            that w* is not the posterior mean).
        x, y: Training inputs ``[n, d]`` and targets ``[n]``.
        xp, yp: Probe inputs ``[p, d]`` and targets ``[p]``.
    """

    model: nn.Linear
    x: torch.Tensor
    y: torch.Tensor
    xp: torch.Tensor
    yp: torch.Tensor

    @property
    def w_star(self) -> torch.Tensor:
        """Flat parameters at w*, in the order the sampler uses (weight then bias)."""
        return torch.cat([self.model.weight.detach().reshape(-1), self.model.bias.detach()])


def with_bias(x: torch.Tensor) -> torch.Tensor:
    """Design matrix ``[x, 1]`` matching ``nn.Linear``'s (weight, bias) parameter order."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def linear_problem(
    n: int = 40, d: int = 3, probes: int = 8, seed: int = 0, smallest_scale: float = 0.8
) -> LinearProblem:
    """A small regression whose input columns have scales from 1 down to ``smallest_scale``.

    Scales near 1 give a nearly isotropic posterior (plain SGLD mixes fast); small ones make it
    anisotropic (where a preconditioner helps).
    """
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(1.0, smallest_scale, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    xp = torch.randn(probes, d, generator=g, dtype=torch.float64) * scales
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ theta + 0.3 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    yp = xp @ theta + 0.3 + 0.5 * torch.randn(probes, generator=g, dtype=torch.float64)
    fit = torch.linalg.lstsq(with_bias(x), y[:, None]).solution.squeeze(1)
    fit = fit + 0.05 * torch.randn(d + 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(fit[:d][None])
        model.bias.copy_(fit[d:])
    return LinearProblem(model, x, y, xp, yp)


def gaussian_posterior(
    x: torch.Tensor, y: torch.Tensor, w_star: torch.Tensor, nbeta: float, localization: float,
    weight_decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the localized posterior of linear regression with ``ℓ = ½ (y - xᵀw)²``.

    The log density is ``-nβ·mean_i ℓ_i(w) - nβλ/2·||w||² - γ/2·||w - w*||²``, a Gaussian with
    precision ``A = (nβ/n)·XᵀX + (nβλ + γ)·I`` and mean ``A⁻¹ ((nβ/n)·Xᵀy + γ·w*)``; ``x``
    already holds the bias column.
    """
    n, dim = x.shape
    eye = torch.eye(dim, dtype=x.dtype)
    precision = (nbeta / n) * x.T @ x + (nbeta * weight_decay + localization) * eye
    mean = torch.linalg.solve(precision, (nbeta / n) * x.T @ y + localization * w_star)
    return mean, torch.linalg.inv(precision)


def exact_influence(
    x_train: torch.Tensor, y_train: torch.Tensor, x_probe: torch.Tensor, y_probe: torch.Tensor,
    mean: torch.Tensor, cov: torch.Tensor,
) -> torch.Tensor:
    """Exact ``BIF = -Cov(ℓ_train, ℓ_probe)`` ``[P, N]`` under ``w ~ N(mean, cov)``, ℓ = ½ squared error.

    With residuals ``r = y - xᵀμ`` and ``S_ij = x_jᵀ Σ x_i``: ``Cov(ℓ_i, ℓ_j) = r_i r_j S_ij + ½ S_ij²``.
    """
    r_train = y_train - x_train @ mean
    r_probe = y_probe - x_probe @ mean
    s = x_probe @ cov @ x_train.T
    return -(r_probe[:, None] * r_train[None, :] * s + 0.5 * s.square())


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors' entries."""
    a = a.flatten().double() - a.double().mean()
    b = b.flatten().double() - b.double().mean()
    return float((a * b).sum() / (a.square().sum() * b.square().sum()).sqrt())


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative Frobenius error ``||estimate - exact|| / ||exact||``."""
    return float((estimate.double() - exact.double()).norm() / exact.double().norm())



@contextmanager
def every_warning() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning raised in the block, repeats included (for tests that count them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught

# --- log fixtures: random results and records of a small run ---------------------------------------

P, N, C, D = 3, 8, 2, 5  # probes, train examples, chains, draws of the log fixtures


def make_result(seed: int, probes: int = P, train: int = N, chains: int = C, draws: int = D) -> BIFResult:
    """A BIFResult of random tensors (the log stores whatever the estimator produced)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    diagnostics = Diagnostics(
        sampling_loss=randn(chains, draws), draw_loss=randn(chains, draws),
        diverged=torch.arange(chains) == seed % chains, loss_rise=0.1 * seed, split_half=0.9 - 0.01 * seed,
        ess=10.0 + seed, vectorized=True, nbeta=100.0, duration_s=1.0,
    )
    return BIFResult(
        influence=randn(probes, train), correlation=randn(probes, train).tanh(), stderr=randn(probes, train).abs(),
        train_loss=randn(train).abs(), probe_loss=randn(probes).abs(), diagnostics=diagnostics,
        config=SGLDConfig(chains=chains, draws=draws, step_size=1e-4),
    )


def make_identity(**changes: object) -> RunIdentity:
    """The run identity of the log fixtures: ``N`` train and ``P`` probe examples, ``C`` chains of ``D`` draws."""
    values = dict(
        config={"sgld": SGLDConfig(chains=C, draws=D, step_size=1e-4).to_dict(), "callback": {"every_n_steps": 10}},
        train_ids=np.arange(N) * 7, probe_ids=np.arange(P), train_groups=np.arange(N) % 3,
        probe_groups=np.array([0, 1, 1]), chains=C, draws=D,
    )
    values.update(changes)
    return RunIdentity(**values)


def record(step: int, status: str = "ok", result: BIFResult | None = None, message: str = "") -> SnapshotRecord:
    """A snapshot record at ``step`` (a random result unless it failed or ``result`` is given)."""
    if result is None and status != "failed":
        result = make_result(step)
    return SnapshotRecord(step=step, epoch=step // 100, wall_time=1.7e9 + step, duration_s=0.5 + step / 1000,
                          status=status, result=result, message=message)



def resume_until_killed(path: Path, seconds: float) -> list[str]:
    """Fork a writer that resumes the log at ``path`` and appends ``record(step)`` rows until it is SIGKILLed
    ``seconds`` later; return what it reported: ``"R1"`` (``"R0"``) when its resume recovered (did not recover) a
    killed log, then each step whose append returned (is committed)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: resume (recovering the killed log), then append until killed
        os.close(read)
        try:
            writer = LogWriter(path, make_identity(), if_exists="resume")
            os.write(write, f"R{int(writer.recovered is not None)}\n".encode())
            step = int(writer.steps[-1]) + 1 if len(writer) else 1
            while True:
                writer.append(record(step))
                os.write(write, f"{step}\n".encode())
                step += 1
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.close(write)
    time.sleep(seconds)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with os.fdopen(read) as lines:
        return lines.read().split()

# --- benchmarks -----------------------------------------------------------------------------------------

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as the module ``name`` (registered first: dataclasses look it up there)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def sgld_gaussian_influence(problem, x: torch.Tensor, gamma: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior mean and the exact BIF of full-batch SGLD's stationary law on ``linear_problem`` (nβ = n).

    Full-batch SGLD on a Gaussian is a linear recursion: per eigenvalue a of the precision XᵀX + γ its
    stationary variance is 1/(a·(1 - ε·a/4)) and its mean is the posterior mean.
    """
    mean, _ = gaussian_posterior(x, problem.y, problem.w_star, nbeta=len(x), localization=gamma)
    values, vectors = torch.linalg.eigh(x.T @ x + gamma * torch.eye(x.shape[1], dtype=torch.float64))
    cov = vectors @ torch.diag(1 / (values * (1 - eps * values / 4))) @ vectors.T
    return mean, exact_influence(x, problem.y, with_bias(problem.xp), problem.yp, mean, cov)


class TanhOnceDifferentiable(torch.autograd.Function):
    """tanh with a once-differentiable backward and no forward-mode rule, like fused kernels on a CPU.

    Double backward through it silently drops its second derivative and ``torch.func.jvp`` fails on it.
    """

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        return grad_output * (1 - y.square())


class NoForwardMode(torch.autograd.Function):
    """tanh as an autograd.Function without functorch support: jvp and vmap refuse it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad * (1 - out.square())
