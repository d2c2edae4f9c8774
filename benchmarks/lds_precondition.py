"""Curvature-preconditioned SGLD for the BIF on digits LDS (an experiment, not in the package).

Why: SGLD chains started at w* and run for t steps have covariance (I − exp(−ε t A)) A⁻¹ with
A = nβ(H + λ) + γ. The step size ε is capped by the stiffest direction (ε·nβ·λ_max < 4), so in
the flat directions — which dominate an influence function — a short chain barely moves and the
BIF is damped there. A constant preconditioner P keeps the stationary distribution,

    w ← w − ½ P ∇U(w) + P^{1/2} ξ,    U = nβ(L_n(w) + λ/2‖w‖²) + γ/2‖w − w*‖²,

and lets every direction mix at a rate set by the eigenvalues of P A instead of A.

Preconditioners compared (the step size is folded into P, scaled so that the largest eigenvalue
of P A equals ``step``):

* ``none``: P = ε I, the sampler of the package (ε·nβ = ``step``);
* ``lowrankK``: P ∝ U_K diag(λ_k + δ)⁻¹ U_Kᵀ + (λ_{K+1} + δ)⁻¹ (I − U_K U_Kᵀ), with the top-K
  eigenpairs of the objective's Hessian from a randomized range finder (3 blocks of K + 20
  Hessian-vector products, one power iteration). Cost per step: two [C, D] × [D, K] products;
* ``dense``: P ∝ (H₊ + δ)⁻¹ from the exact Hessian (eigendecomposition; ~55 CPU s), the upper
  bound a KFAC/EK-FAC preconditioner would approach; two [C, D] × [D, D] products per step;
* ``diag``: P ∝ diag(H + δ)⁻¹ from the exact Hessian's diagonal (what a diagonal Fisher or
  Hessian preconditioner gives).

Everything else as ``bif-fast`` in ``lds_digits.py``: full batch, nβ = 1e5, λ = 1e-3, no burn-in,
draws accumulated with :class:`lightning_bif.estimation.accumulator.CovarianceAccumulator`. The chains are
vectorized with batched matmuls (not through ``estimate_bif``); ``none`` is the same code without
preconditioning, so it is the fair comparison, and ``--product`` reruns ``bif-fast`` itself.

Result (2-core shared CPU, 1 thread; benchmarks/README.md "Curvature preconditioning"):
``lowrank50`` (γ = 735, δ = 0.0245, step 1) reaches LDS 0.68 at the CPU of ``bif-fast`` (0.525),
and 0.73 at 4× that (unpreconditioned: 0.58) — above the 128 × 500-draw BIF (0.704 at 395 s).
Full preconditioning (δ = γ/nβ, step 1; dense or K = 100) is worse (0.61–0.64) and at the edge of
stability (step 1.5 diverges); the dense P with the same δ scores as K = 50 (0.678) at 4× the CPU;
the diagonal preconditioner does not help.

Run ``python benchmarks/lds_precondition.py --help``.
"""

from __future__ import annotations

import argparse
import math
import time

import lds_digits as lds_mod
import torch
from torch.func import grad, jvp, vmap

from lightning_bif import SGLDConfig
from lightning_bif.estimation.accumulator import CovarianceAccumulator

NBETA = 1e5
WEIGHT_DECAY = 1e-3
DEFAULT_RUNS = ("none:32:50:4:1500:0:2", "lowrank50:32:50:4:735:0.0245:1", "lowrank50:32:200:4:735:0.0245:1",
                "none:32:200:4:1500:0:2")


def stacked_losses(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, hidden: int = 64) -> torch.Tensor:
    """Per-example cross-entropy ``[C, B]`` of C MLPs with flat parameters ``w [C, D]`` (nn.Sequential order)."""
    c = w.shape[0]
    n1, n3 = hidden * 64, 10 * hidden
    w1 = w[:, :n1].view(c, hidden, 64)
    b1 = w[:, n1:n1 + hidden]
    w2 = w[:, n1 + hidden:n1 + hidden + n3].view(c, 10, hidden)
    b2 = w[:, n1 + hidden + n3:]
    h = torch.relu(torch.matmul(x, w1.transpose(1, 2)) + b1[:, None])
    logits = torch.matmul(h, w2.transpose(1, 2)) + b2[:, None]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(c), reduction="none").view(c, -1)


def randomized_top_eigenpairs(model: torch.nn.Module, data: lds_mod.Digits, k: int, power: int = 1,
                              oversample: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k + 1`` eigenvalues (descending) and top ``k`` eigenvectors ``[D, k]`` of the objective's Hessian.

    Randomized range finder with ``power`` power iterations: (2 + power) blocks of k + oversample
    Hessian-vector products; the spectrum decays fast, so one iteration is enough here.
    """
    flat, losses = lds_mod.flat_params(model)
    flat = flat.detach()
    batch = [data.x_train, data.y_train]
    objective_grad = grad(lambda w: losses(w, batch).mean() + WEIGHT_DECAY / 2 * w.square().sum())

    def hvp_block(vectors: torch.Tensor) -> torch.Tensor:  # [D, b] -> H [D, b]
        return vmap(lambda v: jvp(objective_grad, (flat,), (v,))[1])(vectors.T.contiguous()).T

    gen = torch.Generator().manual_seed(seed)
    block = hvp_block(torch.randn(flat.numel(), k + oversample, generator=gen))
    for _ in range(power):
        block = hvp_block(torch.linalg.qr(block)[0])
    basis = torch.linalg.qr(block)[0]
    small = basis.T @ hvp_block(basis)
    values, vectors = torch.linalg.eigh((small + small.T) / 2)
    values, vectors = values.flip(0), vectors.flip(1)
    return values[:k + 1].double(), (basis @ vectors[:, :k]).double()


class Preconditioner:
    """One SGLD step ``w − ½ P drift + P^{1/2} ξ`` for a fixed P (step size included).

    Args:
        kind: ``none``, ``lowrank``, ``dense`` or ``diag``.
        step: Largest eigenvalue of P A (for ``none``: ε·nβ).
        localization: γ.
        delta: δ added to the Hessian's eigenvalues (or diagonal) before inverting.
        values: Eigenvalues, descending (``lowrank``: K + 1 of them; ``dense``: all).
        vectors: Eigenvectors ``[D, K]`` matching ``values``.
        hessian: The dense Hessian (``diag`` only: its diagonal, and the scale of P A).
    """

    def __init__(self, kind: str, step: float, localization: float, delta: float = 0.0,
                 values: torch.Tensor | None = None, vectors: torch.Tensor | None = None,
                 hessian: torch.Tensor | None = None) -> None:
        self.kind = kind
        self.eps = step / NBETA
        if kind == "lowrank" or kind == "dense":
            assert values is not None and vectors is not None
            k = vectors.shape[1]
            top = 1.0 / (values[:k].clamp_min(0) + delta)
            rest = 1.0 / (float(values[k].clamp_min(0)) + delta) if kind == "lowrank" else 0.0
            # The rest of the spectrum lies below λ_{K+1}, so the top of P A is among these.
            curvature = NBETA * values + localization
            largest = float((top * curvature[:k]).max())
            if kind == "lowrank":
                largest = max(largest, rest * float(curvature[k]))
            scale = step / largest
            self.rest = rest * scale
            # P = c I + U diag(p − c) Uᵀ and P^{1/2} = √c I + U diag(√p − √c) Uᵀ (c = 0 for dense).
            self.drift_top = (top * scale - self.rest).float()
            self.noise_top = ((top * scale).sqrt() - math.sqrt(self.rest)).float()
            self.basis = vectors.float().contiguous()
            self.basis_t = self.basis.T.contiguous()
        elif kind == "diag":
            assert hessian is not None
            p = 1.0 / (torch.diagonal(hessian).clamp_min(0) + delta)
            curvature = NBETA * hessian + localization * torch.eye(len(p), dtype=hessian.dtype)
            largest = float(torch.linalg.eigvalsh(p.sqrt()[:, None] * curvature * p.sqrt()[None, :]).max())
            self.diag = (p * step / largest).float()
        elif kind != "none":
            raise ValueError(f"unknown preconditioner {kind!r}")

    def step(self, w: torch.Tensor, drift: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The next state of the chains ``w [C, D]``."""
        if self.kind == "none":
            return w - self.eps / 2 * drift + math.sqrt(self.eps) * noise
        if self.kind == "diag":
            return w - self.diag / 2 * drift + self.diag.sqrt() * noise
        move = -self.rest / 2 * drift + math.sqrt(self.rest) * noise
        return w + move + (-self.drift_top / 2 * (drift @ self.basis) + self.noise_top * (noise @ self.basis)) \
            @ self.basis_t


def run_chains(pre: Preconditioner, center: torch.Tensor, data: lds_mod.Digits, chains: int, draws: int, thin: int,
               localization: float, seed: int) -> tuple[CovarianceAccumulator, float]:
    """Full-batch SGLD from w* for every chain at once; returns the accumulated draws and CPU seconds."""
    x, y = data.x_train, data.y_train
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        accumulator = CovarianceAccumulator(chains, stacked_losses(center[None], x, y)[0],
                                            stacked_losses(center[None], data.x_probe, data.y_probe)[0], draws)
    index = torch.arange(chains)
    w = center.expand(chains, -1).clone()
    start = time.process_time()
    for step in range(draws * thin):
        w.requires_grad_(True)
        loss = stacked_losses(w, x, y).mean(1)
        (g,) = torch.autograd.grad(loss.sum(), w)
        with torch.no_grad():
            w = w.detach()
            drift = NBETA * (g + WEIGHT_DECAY * w) + localization * (w - center)
            w = pre.step(w, drift, torch.randn(w.shape, generator=gen))
            if (step + 1) % thin == 0:
                accumulator.add(index, (step + 1) // thin - 1, stacked_losses(w, x, y),
                                stacked_losses(w, data.x_probe, data.y_probe), loss)
    return accumulator, time.process_time() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=None,
                        help="KIND:chains:draws:thin:localization:delta:step[:seed], KIND in none, lowrankK, dense, "
                             f"diag (repeatable; default: {' '.join(DEFAULT_RUNS)})")
    parser.add_argument("--product", action="store_true", help="also rerun bif-fast through estimate_bif")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    setup = lds_mod.Setup()
    data = lds_mod.load_split(setup)
    truth = lds_mod.ground_truth(setup, data)["losses"].mean(dim=1)
    model = lds_mod.full_model(setup, data)
    center = lds_mod.flat_params(model)[0].detach().clone()
    if args.product:
        row = lds_mod.score_bif("bif-fast (estimate_bif)", model, data, truth,
                                SGLDConfig(**lds_mod.BIF_SETTINGS["bif-fast"]))
        print(row.text(), f" split-half {row.details['split_half']:.2f}", flush=True)
    hessian: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for spec in args.run or DEFAULT_RUNS:
        kind, chains, draws, thin, localization, delta, step, *rest = spec.split(":")
        start = time.process_time()
        values = vectors = dense = None
        if kind.startswith("lowrank"):
            values, vectors = randomized_top_eigenpairs(model, data, int(kind.removeprefix("lowrank")))
            kind = "lowrank"
        elif kind in ("dense", "diag"):
            if hessian is None:
                dense = lds_mod.objective_hessian(model, data, WEIGHT_DECAY)
                hessian = (dense, *torch.linalg.eigh(dense))
                print(f"exact Hessian + eigh: {time.process_time() - start:.1f} CPU s (not counted below)")
                start = time.process_time()
            dense, ascending, eigenvectors = hessian
            values, vectors = ascending.flip(0), eigenvectors.flip(1)
        pre = Preconditioner(kind, float(step), float(localization), float(delta), values, vectors, dense)
        setup_s = time.process_time() - start
        accumulator, cpu_s = run_chains(pre, center, data, int(chains), int(draws), int(thin), float(localization),
                                        int(rest[0]) if rest else 0)
        stats = accumulator.statistics()
        score, se = lds_mod.lds(stats.influence, data.masks, truth)
        print(f"{spec:<44} {score:6.3f} ± {se:5.3f} {cpu_s:8.2f}  (+{setup_s:.1f} s preconditioner) "
              f"split-half {stats.split_half:.2f} diverged {int(accumulator.diverged_chains().sum())}", flush=True)


if __name__ == "__main__":
    main()
