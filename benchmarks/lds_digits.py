"""Linear Datamodeling Score (LDS) of data-attribution methods on scikit-learn's digits.

The protocol (Park et al. 2023, "TRAK"; the setup of issues 5 and 6):

* an MLP 64-64-10 (ReLU, 4,810 parameters) trained full-batch with Adam and L2 weight decay
  λ = 1e-3 (the objective is mean cross-entropy + λ/2·||w||²) on 1000 training examples;
* 100 probes: held-out examples, probe observable φ_j = their per-example cross-entropy;
* M = 100 random subsets of half the training set (α = 0.5); a model is retrained from scratch
  on every subset with ≥ 3 seeds, and the ground truth of subset S is the probe loss averaged
  over seeds (cached under ``benchmarks/cache/`` after the first run);
* a method's attribution matrix ``scores [P, N]`` predicts the probe loss of a model trained on S
  as ``Σ_{i∈S} scores[j, i]``; LDS = mean over probes of the Spearman correlation between that
  prediction and the retrained probe losses, ± the standard error over probes.

Sign convention of ``scores``: *predicted contribution of including example i to probe j's
loss* (positive = harmful, negative = helpful). That is exactly our BIF = -Cov(ℓ_i, φ_j)
(DESIGN.md: d E[φ]/d(weight of z_i) = -Cov), and for the baselines
``-∇φ_j·∇ℓ_i`` (gradient dot product) and ``-∇φ_jᵀ(H + δ)⁻¹∇ℓ_i`` (classical influence
function; removing z_i changes the loss by +(1/n)·∇φᵀH⁻¹∇ℓ_i, so including it changes it by
minus that). A wrong sign shows up as a negative LDS.

Seed-vs-seed LDS (one seed's retrained losses predicting another's) is the noise ceiling.

Run ``python benchmarks/lds_digits.py --help``; every table row is also written as JSON to
``benchmarks/results/``. Timings are CPU seconds (``time.process_time``) with one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.estimation.calibration import calibrate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lds_common import CacheKey, subset_masks

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RESULTS = HERE / "results"

# The BIF settings the table reports, chosen by the sweep recorded in benchmarks/README.md: many
# short full-batch chains started at w* (no burn-in), thinned by 4, L2 prior = the training weight
# decay, γ/nβ a few times the mean Hessian eigenvalue, ε·nβ = 2 (below the stability bound
# 4/λ_max ≈ 2.8 of the objective's Hessian).
_RECIPE: dict[str, object] = dict(thin=4, burn_in=0, step_size=2e-5, nbeta=1e5, localization=1500.0,
                                  weight_decay=1e-3, batch_size=None, preconditioner="none")
BIF_SETTINGS: dict[str, dict[str, object]] = {
    "bif-quick": dict(_RECIPE, chains=32, draws=25),
    "bif-fast": dict(_RECIPE, chains=32, draws=50),
    "bif-long": dict(_RECIPE, chains=64, draws=200, localization=750.0),
    # The low-rank curvature preconditioner (docs/how-it-works.md "Preconditioners"): the stiffest direction keeps
    # its step, so ε is set for it (ε·nβ·λ_max ≈ 0.7), and the flat directions move ~40x faster.
    "bif-lowrank": dict(_RECIPE, chains=32, draws=100, thin=2, step_size=5e-6, localization=735.0,
                        preconditioner="lowrank"),
    # SGLDConfig() as the callback uses it: only the prior set (the callback reads it from the optimizer).
    "defaults": dict(weight_decay=1e-3),
    "defaults-lowrank": dict(weight_decay=1e-3, preconditioner="lowrank"),
}


@dataclass(frozen=True)
class Setup(CacheKey):
    """Everything that determines the ground truth (its hash names the cache file)."""

    n_train: int = 1000
    n_probes: int = 100
    subsets: int = 100
    alpha: float = 0.5
    seeds: int = 3
    train_steps: int = 1500
    lr: float = 1e-2
    weight_decay: float = 1e-3
    hidden: int = 64
    data_seed: int = 0


@dataclass
class Digits:
    """The split: training examples, probes, and the subset masks."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_probe: torch.Tensor
    y_probe: torch.Tensor
    masks: torch.Tensor  # [M, N] bool: which training examples each subset keeps


def load_split(setup: Setup) -> Digits:
    """Digits scaled to [0, 1], shuffled once; disjoint train and probe examples; the random subsets."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(setup.data_seed)
    order = torch.randperm(len(x), generator=gen)
    train, probe = order[:setup.n_train], order[setup.n_train:setup.n_train + setup.n_probes]
    masks = subset_masks(setup.subsets, setup.n_train, setup.alpha, gen)
    return Digits(x[train], y[train], x[probe], y[probe], masks)


# --- training many MLPs at once --------------------------------------------------------------

def init_params(setup: Setup, seed: int, copies: int) -> list[torch.Tensor]:
    """nn.Linear's default initialisation (U(±1/√fan_in)) from ``seed``, repeated ``copies`` times.

    Every subset shares the initialisation of a given seed (common random numbers): differences
    between subsets then come from the data, which is what LDS measures.
    """
    gen = torch.Generator().manual_seed(10_000 + seed)
    h = setup.hidden
    bound = 1 / math.sqrt(64)
    hidden_bound = 1 / math.sqrt(h)
    shapes = [((64, h), bound), ((h,), bound), ((h, 10), hidden_bound), ((10,), hidden_bound)]
    return [((torch.rand(shape, generator=gen) * 2 - 1) * b).expand(copies, *shape).clone() for shape, b in shapes]


def stacked_logits(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits ``[S, B, 10]`` of S stacked MLPs on inputs ``[S, B, 64]``."""
    w1, b1, w2, b2 = params
    return torch.baddbmm(b2[:, None], torch.relu(torch.baddbmm(b1[:, None], x, w1)), w2)


def train_stacked(setup: Setup, x: torch.Tensor, y: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Train S independent MLPs (one per row of ``x [S, n, 64]``, ``y [S, n]``) from seed ``seed``.

    Adam is elementwise, so one optimizer over stacked parameters and the summed per-model
    objectives trains every model exactly as if it were alone.
    """
    params = [p.requires_grad_() for p in init_params(setup, seed, x.shape[0])]
    opt = torch.optim.Adam(params, lr=setup.lr, weight_decay=setup.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, setup.train_steps)
    for _ in range(setup.train_steps):
        opt.zero_grad(set_to_none=True)
        logits = stacked_logits(params, x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        loss.view(x.shape[0], -1).mean(dim=1).sum().backward()
        opt.step()
        schedule.step()
    return [p.detach() for p in params]


def probe_losses(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-probe cross-entropy ``[S, P]`` of S stacked models."""
    with torch.no_grad():
        logits = stacked_logits(params, x.expand(params[0].shape[0], *x.shape))
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(params[0].shape[0]),
                                           reduction="none").view(params[0].shape[0], -1)


def ground_truth(setup: Setup, data: Digits, chunk: int = 100, log: Callable[[str], None] = print) -> dict:
    """Probe losses ``[M, seeds, P]`` of models retrained on every subset, cached on disk."""
    path = CACHE / f"lds_digits_{setup.key()}.pt"
    if path.exists():
        return torch.load(path)
    start = time.process_time()
    losses = torch.empty(setup.subsets, setup.seeds, setup.n_probes)
    for seed in range(setup.seeds):
        for lo in range(0, setup.subsets, chunk):
            masks = data.masks[lo:lo + chunk]
            index = torch.stack([m.nonzero().flatten() for m in masks])
            params = train_stacked(setup, data.x_train[index], data.y_train[index], seed)
            losses[lo:lo + chunk, seed] = probe_losses(params, data.x_probe, data.y_probe)
            log(f"  ground truth: seed {seed}, subsets {lo}..{lo + len(masks) - 1} "
                f"({time.process_time() - start:.0f} CPU s)")
    truth = {"losses": losses, "cpu_s": time.process_time() - start, "setup": dataclasses.asdict(setup)}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(truth, path)
    return truth


def model_from_params(setup: Setup, params: list[torch.Tensor]) -> nn.Module:
    """An ``nn.Sequential`` MLP holding the parameters ``[w1, b1, w2, b2]`` of one model."""
    w1, b1, w2, b2 = params
    model = nn.Sequential(nn.Linear(64, setup.hidden), nn.ReLU(), nn.Linear(setup.hidden, 10))
    with torch.no_grad():
        model[0].weight.copy_(w1.T)
        model[0].bias.copy_(b1)
        model[2].weight.copy_(w2.T)
        model[2].bias.copy_(b2)
    return model


def full_model(setup: Setup, data: Digits) -> nn.Module:
    """The model whose behaviour is attributed: trained on all training examples with seed 0."""
    return model_from_params(setup, [p[0] for p in train_stacked(setup, data.x_train[None], data.y_train[None],
                                                                   seed=0)])


def per_example_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy per example: the training loss ℓ_i and the probe observable φ_j."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


# --- scoring ---------------------------------------------------------------------------------

def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks along the last axis (continuous predictions and losses: ties do not occur in practice)."""
    return values.argsort(dim=-1).argsort(dim=-1).to(torch.float64)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of every row of ``a`` with the same row of ``b`` (``[..., M]``)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()


def lds(scores: torch.Tensor, masks: torch.Tensor, subset_losses: torch.Tensor) -> tuple[float, float]:
    """LDS of ``scores [P, N]`` (predicted loss contribution) against ``subset_losses [M, P]``: mean ± se."""
    predicted = scores.to(torch.float64) @ masks.to(torch.float64).T  # [P, M]
    per_probe = spearman(predicted, subset_losses.T.to(torch.float64))
    return float(per_probe.mean()), float(per_probe.std() / math.sqrt(len(per_probe)))


def seed_ceiling(losses: torch.Tensor) -> dict[str, float]:
    """Noise ceilings: one seed predicting another, and one seed predicting the mean of the others."""
    seeds = losses.shape[1]
    pairs = [float(spearman(losses[:, a].T, losses[:, b].T).mean())
             for a in range(seeds) for b in range(a + 1, seeds)]
    rest = [float(spearman(losses[:, a].T, (losses.sum(1) - losses[:, a]).T).mean()) for a in range(seeds)]
    return {"seed_vs_seed": sum(pairs) / len(pairs), "seed_vs_rest": sum(rest) / len(rest)}


def flat_params(
    model: nn.Module, loss_fn: Callable[[Callable, list[torch.Tensor]], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]]:
    """The model's parameters as one vector and ``losses(flat, batch)``: ``loss_fn``'s per-example losses at ``flat``.

    ``loss_fn(model, batch)`` (default :func:`per_example_loss`) gets the model as a function of its inputs.
    """
    loss_fn = per_example_loss if loss_fn is None else loss_fn
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def losses(w: torch.Tensor, batch: list[torch.Tensor]) -> torch.Tensor:
        tensors = {n: t.view(s) for n, t, s in zip(names, w.split(numels), shapes, strict=True)}
        return loss_fn(lambda *x: functional_call(model, tensors, x), batch)

    return flat, losses


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_w ℓ(w*, z) for every example, ``[B, D]`` (float64)."""
    flat, losses = flat_params(model.double())
    one = lambda w, xi, yi: losses(w, [xi[None], yi[None]])[0]  # noqa: E731
    grads = vmap(grad(one), in_dims=(None, 0, 0))(flat, x.double(), y)
    model.float()
    return grads


def objective_hessian(model: nn.Module, data: Digits, weight_decay: float, chunk: int = 256) -> torch.Tensor:
    """Exact Hessian ``[D, D]`` (float64) of mean cross-entropy + λ/2·||w||² over the training examples."""
    flat, losses = flat_params(model.double())
    batch = [data.x_train.double(), data.y_train]
    objective_grad = grad(lambda w: losses(w, batch).mean() + weight_decay / 2 * w.square().sum())

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return jvp(objective_grad, (flat,), (v,))[1]

    eye = torch.eye(flat.numel(), dtype=torch.float64)
    hessian = torch.cat([vmap(hvp)(eye[i:i + chunk]) for i in range(0, flat.numel(), chunk)])
    model.float()
    return (hessian + hessian.T) / 2


# --- the methods -----------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the table."""

    method: str
    lds: float
    se: float
    cpu_s: float
    details: dict

    def text(self) -> str:
        cpu = f"{self.cpu_s:8.2f}" if math.isfinite(self.cpu_s) else "       -"
        return f"{self.method:<44} {self.lds:6.3f} ± {self.se:5.3f} {cpu}"


def baseline_scores(model: nn.Module, data: Digits, setup: Setup,
                    dampings: tuple[float, ...] = (0.0, 0.1, 1.0, 3.0, 10.0)) -> dict:
    """Scores of the gradient dot product and the classical influence function, cached on disk.

    The exact Hessian costs about a CPU minute, so its scores are cached next to the ground truth.
    Damping δ is given in units of the mean eigenvalue of the objective's Hessian (trace / D),
    the convention of issue 6 ("3× mean eigenvalue").
    """
    path = CACHE / f"lds_digits_{setup.key()}_baselines.pt"
    if path.exists():
        return torch.load(path)
    start = time.process_time()
    g_train = per_example_grads(model, data.x_train, data.y_train)
    g_probe = per_example_grads(model, data.x_probe, data.y_probe)
    dot = -(g_probe @ g_train.T)
    grad_s = time.process_time() - start
    rows = {"gradient dot product": (dot, grad_s, {})}

    start = time.process_time()
    hessian = objective_hessian(model, data, setup.weight_decay)
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
    hessian_s = time.process_time() - start
    mean_eig = float(eigenvalues.mean())
    details = {"eig_min": float(eigenvalues[0]), "eig_max": float(eigenvalues[-1]), "eig_mean": mean_eig,
               "negative_eigenvalues": int((eigenvalues < 0).sum()), "hessian_cpu_s": hessian_s}
    probe_rot = g_probe @ eigenvectors  # [P, D]
    train_rot = g_train @ eigenvectors  # [N, D]
    for factor in dampings:
        damping = factor * mean_eig
        shifted = eigenvalues + damping
        if factor == 0.0 and (shifted <= 0).any():
            # Undamped H is indefinite at a ReLU-network checkpoint: invert |λ| so the row still means something.
            shifted = shifted.abs().clamp_min(1e-12)
        scores = -(probe_rot / shifted) @ train_rot.T
        rows[f"influence function, exact H, damping {factor:g}x mean eig"] = (
            scores, grad_s + hessian_s, {**details, "damping": damping})
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(rows, path)
    return rows


def score_baselines(model: nn.Module, data: Digits, setup: Setup, truth: torch.Tensor) -> list[Row]:
    """Table rows of the gradient dot product and the classical influence functions."""
    return [Row(name, *lds(scores, data.masks, truth), cpu_s, details)
            for name, (scores, cpu_s, details) in baseline_scores(model, data, setup).items()]


def score_bif(name: str, model: nn.Module, data: Digits, truth: torch.Tensor, config: SGLDConfig,
              calibrated: bool = False) -> Row:
    """Our BIF at the final checkpoint with ``config``; the predicted loss contribution is the influence.

    With ``calibrated`` the step size is first chosen by :func:`lightning_bif.estimation.calibration.calibrate`
    from a ladder around ``config.step_size``; its CPU time is reported apart from the estimate's.
    """
    calibration: dict[str, object] = {}
    if calibrated:
        start = time.process_time()
        chosen = calibrate(model, per_example_loss, (data.x_train, data.y_train), config)
        config = chosen.config
        calibration = {"calibration": chosen.summary(), "calibration_cpu_s": time.process_time() - start}
        name = f"{name} calibrated (step_size={config.step_size:.3g})"
    start = time.process_time()
    result = estimate_bif(model, per_example_loss, (data.x_train, data.y_train), (data.x_probe, data.y_probe),
                          config=config)
    cpu_s = time.process_time() - start
    diag = result.diagnostics
    details = {"config": result.config.to_dict(), "draws_total": result.config.chains * result.config.draws,
               "split_half": diag.split_half, "loss_rise": diag.loss_rise, "ess": diag.ess,
               "diverged": int(diag.diverged.sum()), "nbeta": diag.nbeta, "wall_s": diag.duration_s,
               "lds_correlation": lds(-result.correlation, data.masks, truth)[0], **calibration}
    return Row(name, *lds(result.influence, data.masks, truth), cpu_s, details)


def parse_bif(text: str) -> tuple[str, SGLDConfig]:
    """``name`` from BIF_SETTINGS, or ``[name,]key=value,...``: SGLDConfig fields on top of that setting.

    Without a leading name the fields go on top of ``bif-fast``; ``defaults,chains=16`` starts from
    ``SGLDConfig()`` (with the training weight decay).
    """
    if text in BIF_SETTINGS:
        return text, SGLDConfig(**BIF_SETTINGS[text])
    items = text.split(",")
    base = items.pop(0) if items[0] in BIF_SETTINGS else "bif-fast"
    values = dict(BIF_SETTINGS[base])
    for item in items:
        key, value = item.split("=")
        if value == "None":
            values[key] = None
        elif key in ("chains", "draws", "burn_in", "thin", "batch_size", "seed", "chains_per_batch"):
            values[key] = int(value)
        elif key == "preconditioner":
            values[key] = value
        else:
            values[key] = float(value)
    return f"bif {text}", SGLDConfig(**values)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bif", action="append", default=None,
                        help="BIF setting to score: a name in BIF_SETTINGS, or [name,]key=value,... over that setting "
                             "(bif-fast when no name; repeatable; default: every named setting)")
    parser.add_argument("--skip-baselines", action="store_true", help="only score the BIF settings")
    parser.add_argument("--calibrate", action="store_true",
                        help="also score every BIF setting with its step size chosen by calibrate()")
    parser.add_argument("--curve", type=str, default=None,
                        help="LDS-versus-draws curve: comma-separated draws per chain, scored for every --bif "
                             "setting (e.g. 250,500,1000,2000)")
    parser.add_argument("--subsets", type=int, default=Setup.subsets)
    parser.add_argument("--seeds", type=int, default=Setup.seeds)
    parser.add_argument("--train-steps", type=int, default=Setup.train_steps)
    parser.add_argument("--n-train", type=int, default=Setup.n_train)
    parser.add_argument("--n-probes", type=int, default=Setup.n_probes)
    parser.add_argument("--hidden", type=int, default=Setup.hidden)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the rows (default: results/)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    setup = Setup(subsets=args.subsets, seeds=args.seeds, train_steps=args.train_steps, n_train=args.n_train,
                  n_probes=args.n_probes, hidden=args.hidden)
    data = load_split(setup)
    print(f"setup {setup.key()}: {dataclasses.asdict(setup)}")
    truth_record = ground_truth(setup, data)
    losses = truth_record["losses"]
    truth = losses.mean(dim=1)
    ceiling = seed_ceiling(losses) if setup.seeds >= 2 else {}
    print(f"ground truth: {truth_record['cpu_s']:.0f} CPU s for {setup.subsets} x {setup.seeds} retrainings "
          f"(cached); noise ceiling {ceiling}")
    model = full_model(setup, data)

    rows: list[Row] = []
    header = f"{'method':<44} {'LDS':>6}   {'se':>5} {'CPU s':>8}"
    print(header)
    if not args.skip_baselines:
        for row in score_baselines(model, data, setup, truth):
            print(row.text(), flush=True)
            rows.append(row)
    settings = [parse_bif(text) for text in args.bif or list(BIF_SETTINGS)]
    if args.curve:
        settings = [(f"{name} draws={d}", config.replace(draws=d))
                    for name, config in settings for d in map(int, args.curve.split(","))]
    for name, config in settings:
        for calibrated in (False, True) if args.calibrate else (False,):
            row = score_bif(name, model, data, truth, config, calibrated)
            extra = f" (+{row.details['calibration_cpu_s']:.1f} s calibration)" if calibrated else ""
            print(row.text(), f" split-half {row.details['split_half']:.2f} loss_rise "
                  f"{row.details['loss_rise']:.3g}{extra}", flush=True)
            rows.append(row)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"lds_digits_{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({
        "setup": dataclasses.asdict(setup), "ceiling": ceiling, "ground_truth_cpu_s": truth_record["cpu_s"],
        "machine": f"{platform.machine()} {platform.processor()} threads={args.threads}",
        "python": sys.version.split()[0], "torch": torch.__version__,
        "rows": [dataclasses.asdict(r) for r in rows],
    }, indent=1))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
