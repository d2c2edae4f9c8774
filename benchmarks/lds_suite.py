"""The LDS suite: every attribution method on several LDS set-ups of different character, in one run.

Set-ups (issue 11; each one's protocol is in its own module, whose code and cache this script uses):

* ``midtrain`` — the **development** set-up: ``lds_midtrain.py``'s default configuration, a tanh MLP
  trained with minibatch momentum SGD, attributed at six checkpoints against continued training to
  the next checkpoint (the horizon default of ``lightning_bif.tuning.horizon`` was developed on it);
* ``digits`` — held out: ``lds_digits.py``, an MLP trained full-batch with Adam and a cosine
  schedule, attributed at the end of training against retraining from scratch;
* ``markov`` — held out: ``lds_markov.py``, a tiny causal transformer trained minibatch with AdamW
  on Markov-chain sequences, attributed at two checkpoints against continued training;
* ``midtrain-heldout`` — held out: ``lds_midtrain.py --data-seed 1 --lr 0.1 --momentum 0.5
  --hidden 48`` (another problem, optimizer setting and width);
* ``momentum-late`` — held out (issue 24): ``lds_momentum_late.py``, momentum SGD late in training
  (steps 750–1350 of 1500), where the gradient dot product is strong, against continued training;
* ``regression`` — held out (issue 24): ``lds_regression.py``, an MLP regression with squared error,
  full-batch Adam with a cosine schedule to 0, attributed at the end of training against retraining.

Where the optimizer has no step at the snapshot (``digits``, ``regression``: lr 0 at the end of the
cosine schedule) the callback uses the run itself as the horizon (damping 1/S, S = Σ η/(1 - μ) over
the steps it watched, :mod:`lightning_bif.tuning.run_damping`); the suite records the training run's
steps with the same :class:`~lightning_bif.tuning.run_damping.RunLength`.

Methods, on every set-up and checkpoint:

* ``BIF default`` — ``estimate_bif`` with the config a ``BIFCallback`` user gets: ``SGLDConfig()``
  resolved by the callback's own code (the L2 prior read from the training optimizer's weight
  decay) and, where the training optimizer has a step at the snapshot, the callback's default
  horizon (``horizon="interval"``: H = the steps since the previous snapshot at the end of training,
  to the next checkpoint mid-training; η and μ read by ``lightning_bif.tuning.horizon.optimizer_step``);
* named recipes from the command line, ``--bif NAME=key=value,...``: SGLDConfig fields set on top
  of that default config (``--bif lowrank=preconditioner=lowrank``);
* the gradient dot product;
* ``TracIn over the continuation (oracle)`` — time-resolved set-ups only (``midtrain``, ``midtrain-heldout``,
  ``momentum-late``, ``markov``: the ground truth continues training from the checkpoint): TracIn (Pruthi et
  al. 2020), −Σ_t η_t ∇φ_j(w_t)·∇ℓ_i(w_t) over the H steps the ground truth continues, along the full-data run
  continued from the checkpoint (its optimizer with its momentum buffers or AdamW moments, its learning rate
  and its own batch order); η_t is the per-step learning rate (heavy-ball SGD: η, not η/(1 − μ); AdamW: lr_t);
  the gradients are taken at every 5th step (``--tracin-every``), each weighted by its block's Σ η_t. An
  oracle: it uses the future weights. Issue 24's target is the BIF default ≥ it at every checkpoint;
* the classical influence function with the exact Hessian of the training objective (mean loss +
  λ/2·||w||²), damping swept; the table reports the damping with the best LDS — an oracle choice,
  flagged as such;
* kronfluence 1.0.1 EK-FAC (true Fisher, seed 0) with its heuristic damping and with δ = λ (+ the
  horizon damping where there is a horizon);
* with ``--devinterp``: ``BIF plain SGLD`` (the default config without preconditioner and control
  variates) and devinterp 2.0.1's ``bif()`` at that row's resolved settings, mapped
  (``lds_devinterp.py``): the reference implementation beside ours at equal work.

Scores follow ``lds_digits.py``'s convention (predicted contribution of including z_i to probe j's
loss, positive = harmful); LDS = mean over probes of the Spearman correlation over subsets, ± the
standard error over probes (BIF rows with ``--seeds`` > 1: mean ± s.e. over sampler seeds). CPU
seconds are ``time.process_time`` with one thread.

Run ``python benchmarks/lds_suite.py --help``; rows go to ``benchmarks/results/lds_suite_<time>.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.func import grad, jvp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lds_digits
import lds_markov
import lds_midtrain
import lds_momentum_late
import lds_regression
from lds_digits import lds, seed_ceiling

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.snapshot.snapshotter import training_config, with_horizon
from lightning_bif.tuning.horizon import horizon_damping, optimizer_step
from lightning_bif.tuning.run_damping import RunLength

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SETUPS = ("midtrain", "digits", "markov", "midtrain-heldout", "momentum-late", "regression")
ROLES = {"midtrain": "development", "digits": "held out", "markov": "held out", "midtrain-heldout": "held out",
         "momentum-late": "held out", "regression": "held out"}
MIDTRAIN_HELDOUT = dict(data_seed=1, lr=0.1, momentum=0.5, hidden=48)
# Exact-Hessian influence function: damping δ in units of the mean eigenvalue (trace / D), swept.
DAMPING_FACTORS = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0)
DEFAULT = "BIF default"
PLAIN = "BIF plain SGLD"
DEVINTERP = "devinterp bif(), plain SGLD's settings"
GRAD_DOT = "gradient dot product"
# A recipe value that stands for the problem's training-set size n (``--bif fixed=nbeta=n,batch_size=64``).
DATA_SIZE = "n"
BEST_IF = "IF, exact H, best damping (oracle)"
EKFAC = "kronfluence EK-FAC"
TRACIN = "TracIn over the continuation (oracle)"
# TracIn's gradients are taken at every TRACIN_EVERY-th step of the continuation, each standing for its block
# of steps (weight: the block's Σ η_t). k = 5 against k = 1 at six checkpoints of the four time-resolved set-ups:
# LDS within 0.003, at a third of the CPU s (benchmarks/README.md, "TracIn over the continuation").
TRACIN_EVERY = 5


@dataclass
class Problem:
    """One attribution task: a model at one checkpoint, its examples, and the ground truth.

    Attributes:
        setup: Name of the set-up.
        checkpoint: Training step of the attributed weights.
        model: The model at that step.
        loss_fn: ``loss_fn(model, batch) -> [B]``: ℓ_i and φ_j.
        train: Training examples (tuple of tensors).
        probes: Probe examples (tuple of tensors).
        masks: ``[M, N]`` subsets.
        losses: ``[M, R, P]`` retrained (or continued) probe losses, R seeds or batch orders.
        weight_decay: λ of the training objective.
        optimizer: The training optimizer as it is at the checkpoint (the callback reads λ, η and μ from it).
        horizon_steps: H of the callback's default horizon at this snapshot (steps to the next snapshot, or
            since the previous one at the end of training).
        classification: ``(x, y)`` examples with a cross-entropy loss (else token sequences).
        baselines: Cached gradient-dot and influence-function scores (digits), else computed here.
        truth_cpu_s: CPU s the set-up's ground truth took to compute (once; it is cached).
        run: The steps of the training run as the callback would have accumulated them (end-of-training set-ups).
        task: kronfluence's ``Task`` factory where it is neither classification nor the Markov sequences.
        continuation: Time-resolved set-ups: the full-data run continued from the checkpoint over the ground
            truth's H steps, computed on call: per step, the weights before its update (one vector in
            ``model.parameters()`` order) and its learning rate η_t (what TracIn sums over).
    """

    setup: str
    checkpoint: int
    model: nn.Module
    loss_fn: Callable[[nn.Module, list[torch.Tensor]], torch.Tensor]
    train: tuple[torch.Tensor, ...]
    probes: tuple[torch.Tensor, ...]
    masks: torch.Tensor
    losses: torch.Tensor
    weight_decay: float
    optimizer: torch.optim.Optimizer
    horizon_steps: int
    classification: bool
    baselines: Callable[[], dict] | None = None
    truth_cpu_s: float = math.nan
    run: RunLength | None = None
    task: Callable[[], object] | None = None
    continuation: Callable[[], list[tuple[torch.Tensor, float]]] | None = None


@dataclass
class Score:
    """One method's scores on one problem."""

    method: str
    scores: torch.Tensor  # [P, N]
    cpu_s: float
    details: dict = field(default_factory=dict)


# --- the set-ups ---------------------------------------------------------------------------------

def digits_problems(setup: lds_digits.Setup, snapshots: int) -> list[Problem]:
    """lds_digits.py's model at the end of training (its cached ground truth and exact-Hessian baselines).

    Its Adam runs a cosine schedule down to a learning rate of 0 at the last step, where
    ``optimizer_step`` finds no step: a callback snapshot there takes the run itself as its horizon.
    """
    data = lds_digits.load_split(setup)
    truth = lds_digits.ground_truth(setup, data)
    run = RunLength()
    model = lds_digits.full_model(setup, data, observe=run.observe)
    return [Problem("digits", setup.train_steps, model, lds_digits.per_example_loss, (data.x_train, data.y_train),
                    (data.x_probe, data.y_probe), data.masks, truth["losses"], setup.weight_decay,
                    torch.optim.Adam(model.parameters(), lr=0.0, weight_decay=setup.weight_decay),
                    setup.train_steps // snapshots, True,
                    baselines=lambda: lds_digits.baseline_scores(model, data, setup), truth_cpu_s=truth["cpu_s"],
                    run=run)]


def regression_problems(setup: lds_regression.Setup) -> list[Problem]:
    """lds_regression.py's model at the end of its cosine schedule (lr 0: the run is the horizon)."""
    data = lds_regression.load_data(setup)
    truth = lds_regression.ground_truth(setup, data)
    run = RunLength()
    model = lds_regression.full_model(setup, data, observe=run.observe)
    return [Problem("regression", setup.train_steps, model, lds_regression.per_example_loss,
                    (data.x_train, data.y_train), (data.x_probe, data.y_probe), data.masks, truth["losses"],
                    setup.weight_decay, torch.optim.Adam(model.parameters(), lr=0.0, weight_decay=setup.weight_decay),
                    setup.train_steps, False, truth_cpu_s=truth["cpu_s"], run=run,
                    task=lds_regression.kronfluence_task)]


def midtrain_problems(setup: lds_midtrain.Setup, name: str) -> list[Problem]:
    """lds_midtrain.py's checkpoints against continued training to the next checkpoint."""
    data = lds_midtrain.load_data(setup)
    run = lds_midtrain.run_and_truth(setup, data)
    problems = []
    for step in setup.checkpoints:
        model = lds_midtrain.as_module(setup, run["checkpoints"][step][0])
        optimizer = lds_midtrain.sgd(list(model.parameters()), setup, None)
        problems.append(Problem(name, step, model, lds_midtrain.per_example_loss, (data.x_train, data.y_train),
                                (data.x_probe, data.y_probe), data.masks, run["truth"]["interval"][step],
                                setup.weight_decay, optimizer, setup.horizon(step, "interval"), True,
                                truth_cpu_s=run["run_cpu_s"] + run["truth_cpu_s"],
                                continuation=lambda step=step: midtrain_continuation(setup, data, run, step)))
    return problems


def midtrain_continuation(setup: lds_midtrain.Setup, data: lds_midtrain.Data, run: dict,
                          step: int) -> list[tuple[torch.Tensor, float]]:
    """The full-data run continued from checkpoint ``step`` (weights and momentum buffers) for the ground truth's H.

    On all training examples in the run's own batch order (``positions(..., seed=99)`` from ``step`` on): the
    run itself between this checkpoint and the next. Heavy-ball ``torch.optim.SGD`` with a constant learning
    rate: η_t = ``setup.lr``, the per-step learning rate (not η/(1 − μ)).
    """
    weights, buffers = run["checkpoints"][step]
    batches = lds_midtrain.positions(setup.n_train, setup.total_steps, setup.batch, seed=99)
    end = step + setup.horizon(step, "interval")
    _, _, trajectory = lds_midtrain.train(setup, weights, buffers, data.x_train[None], data.y_train[None],
                                          batches[step:end], record=True)
    sizes = [p[0].numel() for p in weights]
    out = []
    for flat in trajectory[:-1]:  # the weights before each of the H updates
        model = lds_midtrain.as_module(setup, [t.view(1, *p.shape[1:])
                                               for t, p in zip(flat[0].split(sizes), weights, strict=True)])
        out.append((torch.cat([p.detach().reshape(-1) for p in model.parameters()]), setup.lr))
    return out


def markov_problems(setup: lds_markov.Setup) -> list[Problem]:
    """lds_markov.py's transformer at its checkpoints, snapshotted by a callback every H steps."""
    data = lds_markov.load_data(setup)
    run = lds_markov.run_and_truth(setup, data)
    problems = []
    for step in setup.checkpoints:
        model, optimizer = lds_markov.checkpoint_model(setup, run["checkpoints"][step])
        problems.append(Problem("markov", step, model, lds_markov.per_example_loss, (data.train,), (data.probes,),
                                data.masks, run["truth"][step], setup.weight_decay, optimizer, setup.horizon, False,
                                truth_cpu_s=run["cpu_s"],
                                continuation=lambda step=step: markov_continuation(setup, data, run, step)))
    return problems


def markov_continuation(setup: lds_markov.Setup, data: lds_markov.Data, run: dict,
                        step: int) -> list[tuple[torch.Tensor, float]]:
    """The full-data run continued from checkpoint ``step`` (weights and AdamW moments) for H steps.

    On all training sequences in the run's own batch order (``batch_positions(..., seed=99)`` from ``step`` on,
    which the run's 400 steps define beyond its last checkpoint). AdamW with a constant learning rate: η_t is the
    optimizer's lr_t (TracIn's plain learning rate, not Adam's per-coordinate step).
    """
    batches = lds_markov.batch_positions(setup.n_train, setup.steps, setup, seed=99)
    trajectory: list[tuple[dict[str, torch.Tensor], float]] = []
    lds_markov.train_stacked(setup, run["checkpoints"][step], data.train[None], batches[step:step + setup.horizon],
                             record=trajectory)
    names = [name for name, _ in lds_markov.new_model(setup).named_parameters()]
    return [(torch.cat([params[name][0].reshape(-1) for name in names]), lr) for params, lr in trajectory]


# --- the BIF as the callback configures it ---------------------------------------------------------

def callback_config(problem: Problem) -> SGLDConfig:
    """The SGLDConfig a default ``BIFCallback`` would run this snapshot with, resolved by the callback's own code.

    The L2 prior is read from the optimizer's weight decay, then the horizon (H, η, μ) is added
    where the optimizer has a step (exactly the callback's fit-start and per-snapshot resolution,
    :func:`lightning_bif.snapshot.snapshotter.training_config` and
    :func:`~lightning_bif.snapshot.snapshotter.with_horizon`).
    """
    config = training_config(SGLDConfig(), [problem.optimizer]).config
    resolved = with_horizon(config, [problem.optimizer], problem.horizon_steps, problem.checkpoint, problem.run)
    for message in resolved.warnings if problem.checkpoint else ():  # at step 0 the callback only informs
        warnings.warn(message, stacklevel=2)
    return resolved.config


def parse_recipe(text: str) -> tuple[str, dict[str, object]]:
    """``NAME=key=value,key=value``: a recipe's name and its SGLDConfig fields (typed from the dataclass).

    Raises:
        ValueError: Without a name, with an unknown field or a value of the wrong type.
    """
    name, _, rest = text.partition("=")
    if not name or not rest:
        raise ValueError(f"--bif {text!r}: write NAME=key=value[,key=value...], e.g. lowrank=preconditioner=lowrank")
    hints = typing.get_type_hints(SGLDConfig)
    fields: dict[str, object] = {}
    for item in rest.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(f"--bif {text!r}: {item!r} is not key=value with a field of SGLDConfig "
                             f"({', '.join(sorted(hints))})")
        fields[key] = _typed(value, hints[key], text)
    return name, fields


def _typed(value: str, hint: object, text: str) -> object:
    """``value`` read as what a field's annotation ``hint`` allows: None, a literal, bool, int, float or str;
    ``n`` (``DATA_SIZE``) is each problem's training-set size (``nbeta=n``: the data's own nβ, fixed)."""
    if value == "None":
        return None
    if value == DATA_SIZE:
        return DATA_SIZE
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    literals = [v for o in options if typing.get_origin(o) is typing.Literal for v in typing.get_args(o)]
    if value in literals:
        return value
    if bool in options and value in ("True", "False", "true", "false"):
        return value in ("True", "true")
    for kind in (int, float):
        if kind in options:
            try:
                return kind(value)
            except ValueError:
                continue
    if str in options:
        return value
    raise ValueError(f"--bif {text!r}: cannot read {value!r} as {hint}")


def bif_score(problem: Problem, name: str, config: SGLDConfig) -> Score:
    start = time.process_time()
    result = estimate_bif(problem.model, problem.loss_fn, problem.train, problem.probes, config=config)
    cpu_s = time.process_time() - start
    d = result.diagnostics
    details = {"config": result.config.to_dict(), "split_half": d.split_half, "loss_rise": d.loss_rise,
               "ess": d.ess, "diverged": int(d.diverged.sum()), "ok": result.ok, "nbeta": d.nbeta}
    if d.horizon is not None:
        details.update(horizon_steps=d.horizon.horizon_steps, damping=d.horizon.damping,
                       lambda_min=d.horizon.lambda_min, lambda_max=d.horizon.lambda_max)
    tuning = getattr(d, "tuning", None)  # the self-tuned choices and their evidence, where the library records them
    if tuning is not None:
        details["tuning"] = dataclasses.asdict(tuning) if dataclasses.is_dataclass(tuning) else tuning
    return Score(name, result.influence.double(), cpu_s, details)


# --- classical baselines ----------------------------------------------------------------------------

def _flat(model: nn.Module, loss_fn: Callable) -> tuple[torch.Tensor, Callable[[torch.Tensor, list], torch.Tensor]]:
    """The parameters as one float64 vector and ``losses(flat, batch)`` on a float64 copy of the model."""
    return lds_digits.flat_params(copy.deepcopy(model).double(), loss_fn)


def _double(batch: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [t.double() if t.is_floating_point() else t for t in batch]


def _example_grads_at(problem: Problem) -> tuple[torch.Tensor, Callable[..., torch.Tensor]]:
    """w* as one float64 vector and ``grads(w, batch)``: ∇_w ℓ(w, z) of every example of ``batch``, ``[B, D]``."""
    flat, losses = _flat(problem.model, problem.loss_fn)
    one = lambda w, *example: losses(w, [t[None] for t in example])[0]  # noqa: E731

    def grads(w: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return vmap(grad(one), in_dims=(None, *[0] * len(batch)))(w, *_double(batch))

    return flat, grads


def example_grads(problem: Problem, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """∇_w ℓ(w*, z) of every example, ``[B, D]`` (float64)."""
    flat, grads = _example_grads_at(problem)
    return grads(flat, batch)


def exact_hessian(problem: Problem, chunk: int = 128) -> torch.Tensor:
    """Hessian ``[D, D]`` of mean loss + λ/2·||w||² over the training examples, from Hessian-vector products."""
    flat, losses = _flat(problem.model, problem.loss_fn)
    batch = _double(problem.train)
    objective_grad = grad(lambda w: losses(w, batch).mean() + problem.weight_decay / 2 * w.square().sum())
    eye = torch.eye(flat.numel(), dtype=torch.float64)
    rows = [vmap(lambda v: jvp(objective_grad, (flat,), (v,))[1])(eye[i:i + chunk])
            for i in range(0, flat.numel(), chunk)]
    hessian = torch.cat(rows)
    return (hessian + hessian.T) / 2


def classical_scores(problem: Problem) -> list[Score]:
    """The gradient dot product and the exact-Hessian influence function at every damping of the sweep.

    Negative eigenvalues are clipped to 0 (a checkpoint mid-training or of a ReLU network is not a
    minimum). With a horizon, its damping (1 - μ)/(η·H) is one more point of the sweep.
    """
    if problem.baselines is not None:
        rows = problem.baselines()
        return [Score(name, scores.double(), cpu_s, details) for name, (scores, cpu_s, details) in rows.items()]
    start = time.process_time()
    g_train, g_probe = example_grads(problem, problem.train), example_grads(problem, problem.probes)
    grad_s = time.process_time() - start
    out = [Score(GRAD_DOT, -(g_probe @ g_train.T), grad_s)]
    start = time.process_time()
    values, vectors = torch.linalg.eigh(exact_hessian(problem))
    hessian_s = time.process_time() - start
    probe_rot, train_rot = g_probe @ vectors, g_train @ vectors
    mean_eig = float(values.mean())
    info = {"eig_min": float(values[0]), "eig_max": float(values[-1]), "eig_mean": mean_eig,
            "negative_eigenvalues": int((values < 0).sum()), "hessian_cpu_s": hessian_s}
    dampings = {f"{f:g}x mean eig": f * mean_eig for f in DAMPING_FACTORS}
    found = optimizer_step(problem.optimizer)
    if found is not None:
        dampings["horizon"] = horizon_damping(problem.horizon_steps, found.learning_rate, found.momentum)
    for label, damping in dampings.items():
        scores = -(probe_rot / (values.clamp_min(0) + damping)) @ train_rot.T
        out.append(Score(f"IF, exact H clipped, damping {label}", scores, grad_s + hessian_s,
                         {**info, "damping": damping}))
    return out


def tracin_scores(problem: Problem, every: int = TRACIN_EVERY) -> Score:
    """TracIn (Pruthi et al. 2020) over the ground truth's continuation: −Σ_t η_t ∇φ_j(w_t)·∇ℓ_i(w_t).

    An oracle: ``problem.continuation`` trains the full-data run on from the checkpoint for the H steps the
    ground truth continues (same optimizer, schedule and batch order as the run), and the sum runs over the
    weights w_t before each of those updates. η_t is the optimizer's per-step learning rate (heavy-ball SGD: η,
    not η/(1 − μ); AdamW: lr_t, not Adam's per-coordinate step; the paper's plain learning rate). Every example
    counts at every step (the checkpoint form, not only the examples of step t's minibatch). The gradients are
    taken at every ``every``-th step only, each standing for its block of ``every`` steps (weight Σ η_t over the
    block). The sign is the gradient dot product's: positive = harmful. CPU s include the continued training.
    """
    start = time.process_time()
    steps = problem.continuation()
    _, grads = _example_grads_at(problem)
    total = torch.zeros(len(problem.probes[0]), len(problem.train[0]), dtype=torch.float64)
    for first in range(0, len(steps), every):
        weights = steps[first][0].double()
        block_lr = sum(lr for _, lr in steps[first:first + every])
        total -= block_lr * (grads(weights, problem.probes) @ grads(weights, problem.train).T)
    return Score(TRACIN, total, time.process_time() - start,
                 {"steps": len(steps), "every": every, "evaluated": len(range(0, len(steps), every)),
                  "lr_sum": sum(lr for _, lr in steps)})


def ekfac_scores(problem: Problem) -> list[Score]:
    """kronfluence EK-FAC with its heuristic damping and with δ = λ (+ the horizon damping); raw scores negated."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    if problem.task is not None:
        task = problem.task()
    elif problem.classification:
        task = type("ClassificationTask", (lds_midtrain.ClassificationLosses, Task), {})()
    else:
        task = lds_markov.kronfluence_task()
    damping = problem.weight_decay
    found = optimizer_step(problem.optimizer)
    if found is not None:
        damping += horizon_damping(problem.horizon_steps, found.learning_rate, found.momentum)
    train = torch.utils.data.TensorDataset(*problem.train)
    probes = torch.utils.data.TensorDataset(*problem.probes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analyzer = Analyzer(analysis_name="suite", model=prepare_model(copy.deepcopy(problem.model), task), task=task,
                            cpu=True, disable_tqdm=True, output_dir=tmp)
        torch.manual_seed(0)
        start = time.process_time()
        analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=min(len(train), 256),
                                 factor_args=FactorArguments(strategy="ekfac"))
        factor_s = time.process_time() - start
        for name, value in (("heuristic damping", None), ("δ = λ (+ horizon damping)", damping)):
            start = time.process_time()
            scores_name = f"s{len(rows)}"
            analyzer.compute_pairwise_scores(scores_name=scores_name, factors_name="ekfac", query_dataset=probes,
                                             train_dataset=train, per_device_query_batch_size=len(probes),
                                             per_device_train_batch_size=min(len(train), 256),
                                             score_args=ScoreArguments(damping_factor=value))
            raw = analyzer.load_pairwise_scores(scores_name)["all_modules"]
            rows.append(Score(f"{EKFAC}, {name}", -raw.double(), factor_s + time.process_time() - start,
                              {"damping_factor": value, "factors_cpu_s": factor_s}))
    return rows


# --- one problem ------------------------------------------------------------------------------------

def bif_rows(problem: Problem, name: str, config: SGLDConfig, seeds: int) -> dict:
    """One BIF method's row: with ``seeds`` > 1 the mean over sampler seeds ± s.e. over seeds, else ± s.e. over probes.

    The details (split-half, resolved config, ...) are the first seed's; per-seed LDS and split-half are added.
    """
    truth = problem.losses.mean(1)
    runs = [bif_score(problem, name, config.replace(seed=config.seed + k)) for k in range(seeds)]
    values = [lds(run.scores, problem.masks, truth) for run in runs]
    mean = sum(v for v, _ in values) / seeds
    se = values[0][1] if seeds == 1 else math.sqrt(sum((v - mean) ** 2 for v, _ in values) / (seeds - 1) / seeds)
    details = {**runs[0].details, "lds_per_seed": [v for v, _ in values],
               "split_half_per_seed": [run.details["split_half"] for run in runs]}
    return {"lds": mean, "se": se, "cpu_s": sum(run.cpu_s for run in runs) / seeds, "details": details}


def devinterp_rows(problem: Problem, config: SGLDConfig, seeds: int) -> dict[str, dict]:
    """``PLAIN`` (ours, plain SGLD) and ``DEVINTERP`` (devinterp's ``bif()`` at PLAIN's resolved settings, per seed)."""
    from lds_devinterp import devinterp_influence

    truth = problem.losses.mean(1)
    plain = bif_rows(problem, PLAIN, config.replace(preconditioner="none", control_variates=False), seeds)
    resolved = SGLDConfig(**{**plain["details"]["config"], "sample_params": None, "nbeta": plain["details"]["nbeta"]})
    runs = [devinterp_influence(problem.model, problem.loss_fn, problem.train, problem.probes,
                                resolved.replace(seed=config.seed + k)) for k in range(seeds)]
    values = [lds(scores, problem.masks, truth)[0] for scores, _ in runs]
    mean = sum(values) / seeds
    se = lds(runs[0][0], problem.masks, truth)[1] if seeds == 1 else \
        math.sqrt(sum((v - mean) ** 2 for v in values) / (seeds - 1) / seeds)
    return {PLAIN: plain, DEVINTERP: {"lds": mean, "se": se, "cpu_s": sum(c for _, c in runs) / seeds,
                                      "details": {"config": resolved.to_dict(), "lds_per_seed": values}}}


def score_problem(problem: Problem, recipes: list[tuple[str, dict]], kronfluence: bool,
                  default_fields: dict | None = None, seeds: int = 1, devinterp: bool = False,
                  tracin_every: int = TRACIN_EVERY) -> dict[str, dict]:
    """Every method's LDS, CPU s and details on ``problem``; the best damping of the IF sweep as its own row.

    ``default_fields`` replace fields of the default BIF's config (smoke runs shrink its draws);
    every BIF row is the mean over ``seeds`` sampler seeds; ``devinterp`` adds :func:`devinterp_rows`;
    time-resolved problems (with a continuation) get TracIn over it, its gradients at every ``tracin_every``-th step.
    """
    truth = problem.losses.mean(1)
    config = callback_config(problem).replace(**(default_fields or {}))
    rows: dict[str, dict] = {DEFAULT: bif_rows(problem, DEFAULT, config, seeds)}
    for name, fields in recipes:
        fields = {key: len(problem.train[0]) if value == DATA_SIZE else value for key, value in fields.items()}
        rows[f"BIF recipe {name}"] = bif_rows(problem, f"BIF recipe {name}", config.replace(**fields), seeds)
    if devinterp:
        rows.update(devinterp_rows(problem, config, seeds))
    scores = classical_scores(problem)
    if problem.continuation is not None:
        scores.insert(1, tracin_scores(problem, tracin_every))
    if kronfluence:
        scores += ekfac_scores(problem)
    for score in scores:
        value, se = lds(score.scores, problem.masks, truth)
        rows[score.method] = {"lds": value, "se": se, "cpu_s": score.cpu_s, "details": score.details}
    influence = [m for m in rows if m.startswith("IF") or m.startswith("influence function")]
    best = max(influence, key=lambda m: rows[m]["lds"])
    rows[BEST_IF] = {**rows[best], "details": {**rows[best]["details"], "chosen": best}}
    ekfac = [m for m in rows if m.startswith(EKFAC)]
    if ekfac:
        best = max(ekfac, key=lambda m: rows[m]["lds"])
        rows[f"{EKFAC}, best damping"] = {**rows[best], "details": {**rows[best]["details"], "chosen": best}}
    rows["noise ceiling"] = {"lds": seed_ceiling(problem.losses)["seed_vs_seed"] if problem.losses.shape[1] > 1
                             else math.nan, "se": math.nan, "cpu_s": math.nan, "details": {}}
    return rows


# --- targets and the table ----------------------------------------------------------------------------

def targets(report: dict) -> dict[str, dict]:
    """Issue 11's targets, per set-up, from the scored rows (every checkpoint of the time-resolved ones)."""
    out: dict[str, dict] = {}
    for setup, checkpoints in report["setups"].items():
        rows = list(checkpoints.values())
        margin = [r[DEFAULT]["lds"] - r[GRAD_DOT]["lds"] for r in rows]
        ratio = [r[DEFAULT]["lds"] / r[BEST_IF]["lds"] for r in rows]
        split = [h for r in rows for h in r[DEFAULT]["details"]["split_half_per_seed"]]
        entry = {"beats_gradient_dot": all(m > 0 for m in margin), "margin_vs_gradient_dot_min": min(margin),
                 "split_half_min": min(split), "split_half_max": max(split), "split_half_ok": min(split) >= 0.5,
                 "ratio_to_best_if_min": min(ratio), "ratio_ok": min(ratio) >= 0.8}
        if all(TRACIN in r for r in rows):  # issue 24: ≥ TracIn over the continuation at every checkpoint
            tracin = [r[DEFAULT]["lds"] - r[TRACIN]["lds"] for r in rows]
            entry.update(at_least_tracin=all(m >= 0 for m in tracin), margin_vs_tracin_min=min(tracin))
        for which in ("heuristic damping", "best damping"):
            ekfac = f"{EKFAC}, {which}"
            if not all(ekfac in r for r in rows):
                continue
            key = which.split()[0]
            wins = [m for m in rows[0] if m.startswith("BIF") and all(
                r[m]["lds"] > r[ekfac]["lds"] and r[m]["cpu_s"] <= r[ekfac]["cpu_s"] for r in rows)]
            entry[f"beats_ekfac_{key}_at_equal_cpu"] = wins
            entry[f"default_minus_ekfac_{key}_lds"] = [r[DEFAULT]["lds"] - r[ekfac]["lds"] for r in rows]
            entry[f"ekfac_{key}_cpu_over_default_cpu"] = [r[ekfac]["cpu_s"] / r[DEFAULT]["cpu_s"] for r in rows]
        out[setup] = entry
    return out


def _summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{sum(values) / len(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def print_table(report: dict) -> None:
    """One table (LDS per set-up; mean and range over checkpoints where there are several) and the details."""
    setups = report["setups"]
    methods: list[str] = []
    for checkpoints in setups.values():
        for rows in checkpoints.values():
            methods += [m for m in rows if m not in methods]
    if TRACIN in methods and GRAD_DOT in methods:  # beside the gradient dot product, also where digits comes first
        methods.remove(TRACIN)
        methods.insert(methods.index(GRAD_DOT) + 1, TRACIN)
    # The damping sweep's rows are in the JSON and the per-checkpoint tables; the summary shows its best.
    summary = [m for m in methods if not (m.startswith("IF, exact H clipped") or m.startswith("influence function"))]
    print("\nLDS ± se (time-resolved set-ups: mean over checkpoints (min–max)) | CPU s per estimate (mean)")
    print(f"{'method':<58}" + "".join(f"{s + ' (' + ROLES[s][:4] + ')':>28}" for s in setups))
    for method in summary:
        cells = []
        for checkpoints in setups.values():
            found = [rows[method] for rows in checkpoints.values() if method in rows]
            if not found:
                cells.append(f"{'':>28}")
                continue
            values = [r["lds"] for r in found]
            cpu = [r["cpu_s"] for r in found]
            text = _summary(values) if len(found) > 1 else f"{values[0]:.3f} ± {found[0]['se']:.3f}"
            cpu_text = f"{sum(cpu) / len(cpu):6.2f}" if all(math.isfinite(c) for c in cpu) else ""
            cells.append(f"{text + ' ' + cpu_text:>28}")
        print(f"{method[:58]:<58}" + "".join(cells))
    for setup, checkpoints in setups.items():
        if len(checkpoints) == 1:
            continue
        print(f"\n{setup}: LDS per checkpoint (CPU s)")
        print(f"{'method':<58}" + "".join(f"{s:>14}" for s in checkpoints))
        for method in methods:
            if all(method in rows for rows in checkpoints.values()):
                print(f"{method[:58]:<58}" + "".join(
                    f"{rows[method]['lds']:7.3f} ({rows[method]['cpu_s']:4.1f})" if math.isfinite(rows[method]["cpu_s"])
                    else f"{rows[method]['lds']:14.3f}" for rows in checkpoints.values()))
    print(f"\nground truth CPU s (cached): {report['ground_truth_cpu_s']}; whole run {report['wall_s']:.0f} s wall")
    print("\nBIF default: split-half, chosen IF damping, targets")
    for setup, entry in report["targets"].items():
        chosen = sorted({rows[BEST_IF]["details"]["chosen"] for rows in setups[setup].values()})
        print(f"  {setup}: {json.dumps(entry, default=lambda x: round(x, 3) if isinstance(x, float) else x)}; "
              f"best IF damping (oracle): {chosen}")
    tracin = {s: e for s, e in report["targets"].items() if "at_least_tracin" in e}
    if tracin:
        print(f"\nBIF default ≥ {TRACIN} at every checkpoint (min margin): " + "; ".join(
            f"{s} {'met' if e['at_least_tracin'] else 'missed'} ({e['margin_vs_tracin_min']:+.3f})"
            for s, e in tracin.items()))


# --- main ----------------------------------------------------------------------------------------

def build(names: list[str], tiny: bool) -> Iterator[tuple[str, list[Problem]]]:
    """The problems of the chosen set-ups, one set-up at a time; ``tiny`` shrinks them to a smoke test's size."""
    for name in names:
        if name not in SETUPS:
            raise ValueError(f"unknown set-up {name!r}: choose from {', '.join(SETUPS)}")
        if name == "digits":
            setup = lds_digits.Setup(n_train=80, n_probes=8, subsets=8, seeds=2, train_steps=60, hidden=8) if tiny \
                else lds_digits.Setup()
            yield name, digits_problems(setup, snapshots=5)
        elif name == "regression":
            setup = lds_regression.Setup(n_train=60, n_probes=6, subsets=8, seeds=2, train_steps=60, hidden=6) \
                if tiny else lds_regression.Setup()
            yield name, regression_problems(setup)
        elif name == "momentum-late":
            yield name, midtrain_problems(lds_momentum_late.setup(tiny), name)
        elif name in ("midtrain", "midtrain-heldout"):
            extra = MIDTRAIN_HELDOUT if name == "midtrain-heldout" else {}
            tiny_sizes = dict(n_train=60, n_probes=6, hidden=6, total_steps=40, checkpoints=(0, 20), subsets=8,
                              orders=2)
            setup = lds_midtrain.Setup(**{**tiny_sizes, **extra}) if tiny else lds_midtrain.Setup(**extra)
            yield name, midtrain_problems(setup, name)
        else:
            setup = lds_markov.Setup(n_train=32, n_probes=6, steps=30, checkpoints=(20,), horizon=10, subsets=8,
                                     orders=2) if tiny else lds_markov.Setup()
            yield name, markov_problems(setup)


def _json(value: object) -> object:
    """JSON for what ``json`` does not know: numbers (tensors, numpy) as floats, anything else as text."""
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return value.tolist() if isinstance(value, torch.Tensor) else str(value)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, from {', '.join(SETUPS)}")
    parser.add_argument("--bif", action="append", default=[],
                        help="a named recipe NAME=key=value,...: SGLDConfig fields on top of the callback's default "
                             "config (repeatable), e.g. --bif lowrank=preconditioner=lowrank")
    parser.add_argument("--default", default="",
                        help="key=value,... applied to the default BIF itself (e.g. chains=2,draws=10 for a smoke run)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="sampler seeds per BIF row: its LDS is then the mean ± s.e. over seeds")
    parser.add_argument("--no-kronfluence", action="store_true", help="skip kronfluence EK-FAC")
    parser.add_argument("--devinterp", action="store_true",
                        help="add our plain-SGLD BIF and devinterp 2.0.1's bif() at its settings (lds_devinterp.py)")
    parser.add_argument("--tracin-every", type=int, default=TRACIN_EVERY,
                        help="TracIn's gradients at every k-th step of the continuation, weighted by the block's Σ η "
                             "(1: every step)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes of every set-up (the smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: results/lds_suite_<time>.json)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder for ground truths and cached baselines (default: each module's, benchmarks/cache)")
    args = parser.parse_args(argv)
    if args.cache is not None:
        for module in (lds_digits, lds_midtrain, lds_markov, lds_regression):
            module.CACHE = args.cache
    torch.set_num_threads(1)
    recipes = [parse_recipe(text) for text in args.bif]
    default_fields = parse_recipe(f"default={args.default}")[1] if args.default else {}
    wall = time.time()
    report: dict = {"setups": {}, "roles": {}, "recipes": dict(recipes), "default_overrides": default_fields,
                    "commit": _commit(), "command": " ".join(sys.argv if argv is None else ["lds_suite.py", *argv]),
                    "machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                                "platform": platform.platform(), "threads": torch.get_num_threads()}}
    for name, problems in build(args.setups.split(","), args.tiny):
        report["roles"][name] = ROLES[name]
        report.setdefault("ground_truth_cpu_s", {})[name] = problems[0].truth_cpu_s
        report["setups"][name] = {}
        for problem in problems:
            rows = score_problem(problem, recipes, not args.no_kronfluence, default_fields, args.seeds,
                                 args.devinterp, args.tracin_every)
            report["setups"][name][problem.checkpoint] = rows
            print(f"{name} step {problem.checkpoint}: " + ", ".join(
                f"{m} {r['lds']:.3f}" for m, r in rows.items() if m.startswith("BIF") or m in (
                    DEVINTERP, GRAD_DOT, TRACIN, BEST_IF, f"{EKFAC}, best damping", "noise ceiling")), flush=True)
    report["targets"] = targets(report)
    report["wall_s"] = time.time() - wall
    print_table(report)
    out = args.out or RESULTS / f"lds_suite_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=_json))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
