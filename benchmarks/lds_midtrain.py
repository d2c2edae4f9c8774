"""Time-resolved LDS: attribution at checkpoints *during* training, checked against continued training.

The setup (issue 10; not the end-of-training digits MLP of ``lds_digits.py``):

* a tanh MLP 16-32-4 (676 parameters) on a synthetic 4-class problem
  (``sklearn.datasets.make_classification``, 500 training examples, 50 held-out probes), trained
  with minibatch heavy-ball SGD (``torch.optim.SGD``, lr η = 0.05, momentum μ = 0.9, L2 weight
  decay 5e-4, batch 32, epoch-wise shuffling) for 600 steps;
* checkpoints at steps 0, 100, ..., 500 (weights *and* the momentum buffers);
* ground truth at a checkpoint t with horizon H: training continues from the checkpoint for H
  steps on each of M = 100 random half-subsets of the training set (α = 0.5) with R = 3 batch
  orders; the probe losses at t + H, averaged over orders, are what an attribution must rank.
  Two horizons: ``interval`` (to the next checkpoint: H = 100 everywhere) and ``rest`` (to the
  end of training: H = 600 - t);
* noise ceiling per checkpoint: one batch order's subset losses predicting another's (Spearman,
  averaged over probes and pairs of orders) — what a perfect attribution could reach;
* scores follow lds_digits.py's convention (predicted contribution of including z_i to probe j's
  loss, positive = harmful); LDS = mean over probes of the Spearman correlation over subsets.

Methods at each checkpoint: our BIF as the callback runs it (``SGLDConfig()`` defaults plus the
training weight decay, with the horizon read from the real ``torch.optim.SGD`` by
``lightning_bif.tuning.horizon.optimizer_step``), the same without a horizon (today's γ), the gradient
dot product, TracIn summed over the actual continuation of the full-data run (an oracle: it uses
the future weights), classical influence functions from the exact Hessian (negative eigenvalues
clipped) with horizon damping (1 - μ)/(η·H) or 3 × the mean eigenvalue, the exact unrolled
linear response (the heavy-ball filter per Hessian eigenvalue), and kronfluence EK-FAC.

Run ``python benchmarks/lds_midtrain.py --help``. Ground truth and the training run are cached
under ``benchmarks/cache/``; rows go to ``benchmarks/results/lds_midtrain_<time>.json``; the
figure to ``docs/images/lds_midtrain.png`` with ``--figure``. CPU seconds are ``time.process_time``
with one thread.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, vmap
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lds_common import CacheKey, ClassificationLosses, subset_masks
from lds_digits import lds, seed_ceiling

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.tuning.horizon import horizon_damping, optimizer_step

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RESULTS = HERE / "results"
FIGURE = HERE.parent / "docs" / "images" / "lds_midtrain.png"
RULES = ("interval", "rest")


@dataclass(frozen=True)
class Setup(CacheKey):
    """Everything that determines the training run and the ground truth (its hash names the cache file)."""

    n_train: int = 500
    n_probes: int = 50
    features: int = 16
    classes: int = 4
    hidden: int = 32
    batch: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    total_steps: int = 600
    checkpoints: tuple[int, ...] = (0, 100, 200, 300, 400, 500)
    subsets: int = 100
    alpha: float = 0.5
    orders: int = 3
    data_seed: int = 0

    def horizon(self, step: int, rule: str) -> int:
        """H after checkpoint ``step``: to the next checkpoint (``interval``) or to the end (``rest``)."""
        later = [c for c in self.checkpoints if c > step]
        return (later[0] if rule == "interval" and later else self.total_steps) - step


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_probe: torch.Tensor
    y_probe: torch.Tensor
    masks: torch.Tensor  # [M, N] bool


def load_data(setup: Setup) -> Data:
    """The synthetic problem, standardized; disjoint train and probe examples; the random half-subsets."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=setup.n_train + setup.n_probes, n_features=setup.features,
                               n_informative=8, n_redundant=2, n_classes=setup.classes, n_clusters_per_class=2,
                               flip_y=0.05, class_sep=1.0, random_state=setup.data_seed)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(setup.data_seed)
    masks = subset_masks(setup.subsets, setup.n_train, setup.alpha, gen)
    n = setup.n_train
    return Data(x[:n], y[:n], x[n:], y[n:], masks)


# --- training many MLPs at once ----------------------------------------------------------------

def init_params(setup: Setup) -> list[torch.Tensor]:
    """nn.Linear's initialisation U(±1/√fan_in) of one model, stacked with a leading axis of 1."""
    gen = torch.Generator().manual_seed(1234 + setup.data_seed)
    f, h, c = setup.features, setup.hidden, setup.classes
    shapes = [((f, h), f), ((h,), f), ((h, c), h), ((c,), h)]
    return [((torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(fan_in))[None] for shape, fan_in in shapes]


def stacked_logits(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits ``[S, B, C]`` of S stacked MLPs on inputs ``[S, B, F]``."""
    w1, b1, w2, b2 = params
    return torch.baddbmm(b2[:, None], torch.tanh(torch.baddbmm(b1[:, None], x, w1)), w2)


def positions(count: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """Minibatch positions ``[steps, batch]`` into ``count`` examples: epoch-wise shuffles (no replacement)."""
    gen = torch.Generator().manual_seed(seed)
    epochs = -(-steps * batch // count)
    order = torch.cat([torch.randperm(count, generator=gen) for _ in range(epochs)])
    return order[:steps * batch].view(steps, batch)


def sgd(params: list[torch.Tensor], setup: Setup, buffers: list[torch.Tensor] | None) -> torch.optim.SGD:
    """The training optimizer over stacked parameters (elementwise: each model trains as if alone)."""
    optimizer = torch.optim.SGD(params, lr=setup.lr, momentum=setup.momentum, weight_decay=setup.weight_decay)
    if buffers is not None:
        for p, b in zip(params, buffers, strict=True):
            optimizer.state[p]["momentum_buffer"] = b.clone()
    return optimizer


def train(setup: Setup, params: list[torch.Tensor], buffers: list[torch.Tensor] | None, x: torch.Tensor,
          y: torch.Tensor, batches: torch.Tensor, record: bool = False):
    """Continue S stacked models (``x [S, n, F]``) for ``len(batches)`` steps; returns params, buffers, trajectory."""
    params = [p.detach().clone().requires_grad_() for p in params]
    optimizer = sgd(params, setup, buffers)
    trajectory = [torch.cat([p.detach().flatten(1) for p in params], 1)] if record else []
    for index in batches:
        optimizer.zero_grad(set_to_none=True)
        logits = stacked_logits(params, x[:, index])
        loss = F.cross_entropy(logits.flatten(0, 1), y[:, index].flatten(), reduction="none")
        loss.view(x.shape[0], -1).mean(1).sum().backward()
        optimizer.step()
        if record:
            trajectory.append(torch.cat([p.detach().flatten(1) for p in params], 1))
    new_buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in params] if len(batches) else buffers
    return [p.detach() for p in params], new_buffers, trajectory


def probe_losses(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = stacked_logits(params, x.expand(params[0].shape[0], *x.shape))
        return F.cross_entropy(logits.flatten(0, 1), y.repeat(params[0].shape[0]),
                               reduction="none").view(params[0].shape[0], -1)


def run_and_truth(setup: Setup, data: Data, log=print) -> dict:
    """The full-data run (checkpoints, trajectory) and the continued-training ground truth, cached on disk."""
    path = CACHE / f"lds_midtrain_{setup.key()}.pt"
    if path.exists():
        return torch.load(path)
    start = time.process_time()
    batches = positions(setup.n_train, setup.total_steps, setup.batch, seed=99)
    checkpoints: dict[int, tuple[list[torch.Tensor], list[torch.Tensor] | None]] = {}
    params, buffers, trajectory = init_params(setup), None, []
    done = 0
    for step in [*setup.checkpoints, setup.total_steps]:
        params, buffers, part = train(setup, params, buffers, data.x_train[None], data.y_train[None],
                                      batches[done:step], record=True)
        trajectory.extend(part[1:] if trajectory else part)
        done = step
        checkpoints[step] = ([p.clone() for p in params], None if buffers is None else [b.clone() for b in buffers])
    run_s = time.process_time() - start
    index = torch.stack([m.nonzero().flatten() for m in data.masks])
    x_sub, y_sub = data.x_train[index], data.y_train[index]
    truth: dict[str, dict[int, torch.Tensor]] = {rule: {} for rule in RULES}
    for t in setup.checkpoints:
        weights, momentum = checkpoints[t]
        expand = lambda ts: None if ts is None else [v.expand(setup.subsets, *v.shape[1:]) for v in ts]  # noqa: E731
        for rule in RULES:
            horizon = setup.horizon(t, rule)
            if rule == "rest" and horizon == setup.horizon(t, "interval"):
                truth[rule][t] = truth["interval"][t]
                continue
            losses = torch.empty(setup.subsets, setup.orders, setup.n_probes)
            for r in range(setup.orders):
                order = positions(index.shape[1], horizon, setup.batch, seed=1000 + r)
                end, _, _ = train(setup, expand(weights), expand(momentum), x_sub, y_sub, order)
                losses[:, r] = probe_losses(end, data.x_probe, data.y_probe)
            truth[rule][t] = losses
            log(f"  ground truth: step {t}, {rule} (H = {horizon}): {time.process_time() - start:.0f} CPU s")
    result = {"checkpoints": checkpoints, "trajectory": torch.cat(trajectory), "run_cpu_s": run_s,
              "truth": truth, "truth_cpu_s": time.process_time() - start - run_s, "setup": dataclasses.asdict(setup)}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


# --- the model at a checkpoint, gradients, Hessian ----------------------------------------------

def as_module(setup: Setup, params: list[torch.Tensor]) -> nn.Module:
    w1, b1, w2, b2 = (p[0] for p in params)
    model = nn.Sequential(nn.Linear(setup.features, setup.hidden), nn.Tanh(), nn.Linear(setup.hidden, setup.classes))
    with torch.no_grad():
        model[0].weight.copy_(w1.T)
        model[0].bias.copy_(b1)
        model[2].weight.copy_(w2.T)
        model[2].bias.copy_(b2)
    return model


def per_example_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def flat_loss(model: nn.Module):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    model = copy.deepcopy(model).double()

    def losses(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tensors = {n: t.view(s) for n, t, s in zip(names, w.split(sizes), shapes, strict=True)}
        return F.cross_entropy(functional_call(model, tensors, (x,)), y, reduction="none")

    return flat, losses


def example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    flat, losses = flat_loss(model)
    return vmap(grad(lambda w, a, b: losses(w, a[None], b[None])[0]), in_dims=(None, 0, 0))(flat, x.double(), y)


def objective_hessian(model: nn.Module, data: Data, weight_decay: float) -> torch.Tensor:
    flat, losses = flat_loss(model)
    x = data.x_train.double()
    h = hessian(lambda w: losses(w, x, data.y_train).mean() + weight_decay / 2 * w.square().sum())(flat)
    return (h + h.T) / 2


def heavy_ball_filter(values: torch.Tensor, horizon: int, lr: float, momentum: float) -> torch.Tensor:
    """f_H(λ): the H-step response of heavy-ball SGD to a unit constant force along an eigenvalue-λ direction."""
    d, u = torch.zeros_like(values), torch.zeros_like(values)
    for _ in range(horizon):
        u = momentum * u + values * d + 1
        d = d - lr * u
    return -d


# --- methods -------------------------------------------------------------------------------------

@dataclass
class Scores:
    method: str
    scores: torch.Tensor  # [P, N], predicted contribution to the probe loss (positive = harmful)
    cpu_s: float
    details: dict = field(default_factory=dict)


def bif_scores(setup: Setup, model: nn.Module, data: Data, config: SGLDConfig, name: str) -> Scores:
    start = time.process_time()
    result = estimate_bif(model, per_example_loss, (data.x_train, data.y_train), (data.x_probe, data.y_probe),
                          config=config)
    d = result.diagnostics
    details = {"localization": result.config.localization, "step_size": result.config.step_size,
               "split_half": d.split_half, "loss_rise": d.loss_rise,
               "train_loss": float(result.train_loss.mean()), "diverged": int(d.diverged.sum()),
               "ok": result.ok}
    if d.horizon is not None:
        details.update(horizon_steps=d.horizon.horizon_steps, damping=d.horizon.damping,
                       lambda_min=d.horizon.lambda_min, lambda_max=d.horizon.lambda_max)
    return Scores(name, result.influence.double(), time.process_time() - start, details)


def kronfluence_scores(model: nn.Module, data: Data, dampings: dict[str, float | None]) -> list[Scores]:
    """kronfluence EK-FAC (true Fisher, seed 0) with the given dampings; its raw scores are negated."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    train = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    probes = torch.utils.data.TensorDataset(data.x_probe, data.y_probe)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = type("ClassificationTask", (ClassificationLosses, Task), {})()
        analyzer = Analyzer(analysis_name="midtrain", model=prepare_model(copy.deepcopy(model), task), task=task,
                            cpu=True, disable_tqdm=True, output_dir=tmp)
        torch.manual_seed(0)
        start = time.process_time()
        analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=len(train),
                                 factor_args=FactorArguments(strategy="ekfac"))
        factor_s = time.process_time() - start
        for label, damping in dampings.items():
            start = time.process_time()
            analyzer.compute_pairwise_scores(scores_name=f"s{len(rows)}", factors_name="ekfac", query_dataset=probes,
                                             train_dataset=train, per_device_query_batch_size=len(probes),
                                             per_device_train_batch_size=len(train),
                                             score_args=ScoreArguments(damping_factor=damping))
            raw = analyzer.load_pairwise_scores(f"s{len(rows)}")["all_modules"]
            rows.append(Scores(f"kronfluence EK-FAC, {label}", -raw.double(), factor_s + time.process_time() - start,
                               {"damping_factor": damping}))
    return rows


def tracin_prefix(setup: Setup, data: Data, run: dict) -> tuple[dict[int, torch.Tensor], float]:
    """Σ_{s<k} -η·∇φ(w_s)·∇ℓ_i(w_s) along the full-data run, at every step k a row needs; CPU s per step."""
    needed = {s for t in setup.checkpoints for s in (t, t + setup.horizon(t, "interval"))} | {setup.total_steps}
    weights = run["checkpoints"][setup.checkpoints[0]][0]
    sizes = [p[0].numel() for p in weights]
    total = torch.zeros(len(data.x_probe), len(data.x_train), dtype=torch.float64)
    prefix = {}
    start = time.process_time()
    for s in range(setup.total_steps + 1):
        if s in needed:
            prefix[s] = total.clone()
        if s == setup.total_steps:
            break
        flat = run["trajectory"][s]
        at = as_module(setup, [t.view(1, *p.shape[1:]) for t, p in zip(flat.split(sizes), weights, strict=True)])
        total -= setup.lr * example_grads(at, data.x_probe, data.y_probe) @ example_grads(
            at, data.x_train, data.y_train).T
    return prefix, (time.process_time() - start) / setup.total_steps


def checkpoint_scores(setup: Setup, data: Data, run: dict, step: int, bif: SGLDConfig, peers: bool,
                      tracin: tuple[dict[int, torch.Tensor], float]) -> list[Scores]:
    """Every method's scores at checkpoint ``step`` (horizon rule ``interval`` unless the name says ``rest``)."""
    weights = run["checkpoints"][step][0]
    model = as_module(setup, weights)
    # The optimizer as Lightning would hold it at this step: what the callback reads η and μ from.
    optimizer = torch.optim.SGD(model.parameters(), lr=setup.lr, momentum=setup.momentum,
                                weight_decay=setup.weight_decay)
    found = optimizer_step(optimizer)
    rows: list[Scores] = []
    for rule in RULES:
        horizon = setup.horizon(step, rule)
        config = bif.replace(weight_decay=setup.weight_decay, horizon_steps=horizon,
                             learning_rate=found.learning_rate, momentum=found.momentum)
        rows.append(bif_scores(setup, model, data, config, f"BIF, callback defaults, horizon {rule}"))
    interval = bif.replace(weight_decay=setup.weight_decay, horizon_steps=setup.horizon(step, "interval"),
                           learning_rate=found.learning_rate, momentum=found.momentum)
    rows.append(bif_scores(setup, model, data, interval.replace(preconditioner="lowrank"),
                           "BIF, horizon interval, lowrank preconditioner"))
    doubled = interval.replace(draws=2 * interval.draws) if interval.draws else interval.replace(
        chains=2 * interval.chains)  # draws chosen automatically: twice the chains is twice the draws
    rows.append(bif_scores(setup, model, data, doubled, "BIF, horizon interval, 2x draws"))
    rows.append(bif_scores(setup, model, data, bif.replace(weight_decay=setup.weight_decay),
                           "BIF, defaults without a horizon"))

    start = time.process_time()
    g_train = example_grads(model, data.x_train, data.y_train)
    g_probe = example_grads(model, data.x_probe, data.y_probe)
    grad_s = time.process_time() - start
    rows.append(Scores("gradient dot product", -(g_probe @ g_train.T), grad_s))

    prefix, step_cpu_s = tracin
    for rule in RULES:
        end = step + setup.horizon(step, rule)
        rows.append(Scores(f"TracIn over the continuation (oracle), {rule}", prefix[end] - prefix[step],
                           step_cpu_s * (end - step)))

    start = time.process_time()
    values, vectors = torch.linalg.eigh(objective_hessian(model, data, setup.weight_decay))
    hessian_s = time.process_time() - start
    probe_rot, train_rot = g_probe @ vectors, g_train @ vectors
    info = {"eig_min": float(values[0]), "eig_max": float(values[-1]), "eig_mean": float(values.mean()),
            "negative_eigenvalues": int((values < 0).sum())}

    def spectral(name: str, weights: torch.Tensor, extra: dict) -> None:
        start = time.process_time()
        scores = -(probe_rot * weights) @ train_rot.T
        rows.append(Scores(name, scores, grad_s + hessian_s + time.process_time() - start, {**info, **extra}))

    for rule in RULES:
        horizon = setup.horizon(step, rule)
        damping = horizon_damping(horizon, found.learning_rate, found.momentum)
        spectral(f"IF, exact H clipped, horizon damping, {rule}", 1 / (values.clamp_min(0) + damping),
                 {"damping": damping})
        shifted = damping + max(0.0, -float(values[0]))
        spectral(f"IF, exact H, damping horizon + |λ_min| (the BIF's), {rule}", 1 / (values + shifted),
                 {"damping": shifted})
        spectral(f"unrolled heavy-ball response (exact linearization), {rule}",
                 heavy_ball_filter(values, horizon, found.learning_rate, found.momentum), {"horizon": horizon})
    mean_eig = float(values.mean())
    spectral("IF, exact H clipped, damping 3x mean eig", 1 / (values.clamp_min(0) + 3 * mean_eig),
             {"damping": 3 * mean_eig})
    if peers:
        damping = horizon_damping(setup.horizon(step, "interval"), found.learning_rate, found.momentum)
        rows.extend(kronfluence_scores(model, data, {"heuristic damping": None,
                                                     "horizon damping + λ": damping + setup.weight_decay}))
    return rows


# --- report ----------------------------------------------------------------------------------------

def ceiling(losses: torch.Tensor) -> float:
    return seed_ceiling(losses)["seed_vs_seed"] if losses.shape[1] > 1 else math.nan


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subsets", type=int, default=Setup.subsets)
    parser.add_argument("--orders", type=int, default=Setup.orders)
    parser.add_argument("--n-train", type=int, default=Setup.n_train)
    parser.add_argument("--n-probes", type=int, default=Setup.n_probes)
    parser.add_argument("--hidden", type=int, default=Setup.hidden)
    parser.add_argument("--total-steps", type=int, default=Setup.total_steps)
    parser.add_argument("--checkpoints", default=",".join(map(str, Setup.checkpoints)))
    parser.add_argument("--lr", type=float, default=Setup.lr)
    parser.add_argument("--momentum", type=float, default=Setup.momentum)
    parser.add_argument("--data-seed", type=int, default=Setup.data_seed,
                        help="another synthetic problem and subsets (the held-out setup of docs/horizon.md: 1)")
    parser.add_argument("--bif", default="", help="SGLDConfig overrides key=value,... (default: SGLDConfig())")
    parser.add_argument("--no-peers", action="store_true", help="skip kronfluence")
    parser.add_argument("--figure", action="store_true", help=f"write the figure to {FIGURE}")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setup = Setup(subsets=args.subsets, orders=args.orders, n_train=args.n_train, n_probes=args.n_probes,
                  hidden=args.hidden, total_steps=args.total_steps, lr=args.lr, momentum=args.momentum,
                  data_seed=args.data_seed,
                  checkpoints=tuple(int(c) for c in args.checkpoints.split(",")))
    overrides = {}
    for item in filter(None, args.bif.split(",")):
        key, value = item.split("=")
        overrides[key] = int(value) if key in ("chains", "draws", "burn_in", "thin", "seed") else (
            value if key == "preconditioner" else float(value))
    bif = SGLDConfig(**overrides)
    data = load_data(setup)
    run = run_and_truth(setup, data)
    print(f"training run {run['run_cpu_s']:.1f} CPU s, ground truth {run['truth_cpu_s']:.1f} CPU s")
    table: dict[str, dict] = {}
    tracin = tracin_prefix(setup, data, run)
    for step in setup.checkpoints:
        rows = checkpoint_scores(setup, data, run, step, bif, not args.no_peers, tracin)
        for rule in RULES:
            truth = run["truth"][rule][step]
            table.setdefault("ceiling " + rule, {})[step] = ceiling(truth)
        for row in rows:
            entry = table.setdefault(row.method, {})
            value = {rule: lds(row.scores, data.masks, run["truth"][rule][step].mean(1))[0] for rule in RULES}
            entry[step] = {"lds": value, "cpu_s": row.cpu_s, "details": row.details}
        print(f"step {step}: " + ", ".join(
            f"{r.method.split(',')[0][:14]} {table[r.method][step]['lds']['interval']:.2f}" for r in rows))
    report = {"setup": dataclasses.asdict(setup), "bif": bif.to_dict(), "table": table,
              "run_cpu_s": run["run_cpu_s"], "truth_cpu_s": run["truth_cpu_s"],
              "machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                          "platform": platform.platform()}}
    print_table(report)
    out = args.out or RESULTS / f"lds_midtrain_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float))
    if args.figure:
        figure(report, FIGURE)
    return report


def print_table(report: dict) -> None:
    steps = report["setup"]["checkpoints"]
    for rule in RULES:
        print(f"\nLDS against continued training, horizon {rule}")
        print(f"{'method':<62}" + "".join(f"{s:>8}" for s in steps) + "   CPU s")
        print(f"{'noise ceiling (order vs order)':<62}" + "".join(
            f"{report['table']['ceiling ' + rule][s]:8.3f}" for s in steps))
        for method, entry in report["table"].items():
            if method.startswith("ceiling") or (rule == "interval" and method.endswith(", rest")) or (
                    rule == "rest" and method.endswith(", interval")):
                continue
            cpu = sum(entry[s]["cpu_s"] for s in steps) / len(steps)
            print(f"{method:<62}" + "".join(f"{entry[s]['lds'][rule]:8.3f}" for s in steps) + f"{cpu:8.2f}")


def figure(report: dict, path: Path) -> None:
    """LDS against the interval ground truth versus the checkpoint's step, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["setup"]["checkpoints"]
    table = report["table"]
    shown = {
        "BIF, callback defaults, horizon interval": ("BIF, callback default (horizon)", "C0", "-"),
        "BIF, horizon interval, lowrank preconditioner": ("BIF, horizon, lowrank preconditioner", "C4", "-"),
        "BIF, defaults without a horizon": ("BIF, no horizon (γ = 100, ε = 1e-4)", "C0", ":"),
        "TracIn over the continuation (oracle), interval": ("TracIn over the continuation (oracle)", "C1", "-"),
        "gradient dot product": ("gradient dot product", "C7", "-"),
        "IF, exact H clipped, horizon damping, interval": ("IF, exact H, horizon damping", "C2", "-"),
        "IF, exact H clipped, damping 3x mean eig": ("IF, exact H, 3× mean eig", "C2", ":"),
        "kronfluence EK-FAC, horizon damping + λ": ("kronfluence EK-FAC, horizon damping", "C3", "-"),
        "kronfluence EK-FAC, heuristic damping": ("kronfluence EK-FAC, its heuristic", "C3", ":"),
    }
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(steps, [table["ceiling interval"][s] for s in steps], color="k", ls="--", lw=1, label="noise ceiling")
    for method, (label, color, style) in shown.items():
        if method in table:
            ax.plot(steps, [table[method][s]["lds"]["interval"] for s in steps], color=color, ls=style, marker="o",
                    ms=3, label=label)
    ax.set_xlabel("training step t of the checkpoint")
    ax.set_ylabel("LDS vs training continued to the next checkpoint")
    ax.set_ylim(-0.1, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
