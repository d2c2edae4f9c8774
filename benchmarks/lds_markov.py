"""LDS set-up of a different character: a tiny causal transformer trained minibatch with AdamW on Markov-chain text.

Where ``lds_digits.py`` is an MLP trained full-batch with Adam on images and ``lds_midtrain.py`` a
tanh MLP with momentum SGD attributed mid-training, this set-up is a sequence model:

* a GPT (``benchmarks/workloads.py``: pre-LayerNorm block, causal attention, GELU MLP, learned
  positions; vocabulary 16, 1 layer, width 8, 2 heads, 10 predicted tokens: ~1.2k parameters);
* sequences of 11 tokens from workloads.py's random sparse first-order Markov chain; 256 training
  sequences, 64 held-out probe sequences; the per-example loss and the probe observable are the
  mean next-token cross-entropy of a sequence;
* AdamW (lr 1e-2, decoupled weight decay 0.01, constant learning rate), minibatches of 16 from
  epoch-wise shuffles, on all 256 sequences; checkpoints (weights and AdamW moments) at steps 200
  and 300;
* ground truth at a checkpoint: training continues from it (moments included) for H = 100 steps
  on each of M = 100 random halves of the training set (α = 0.5) with R = 3 batch orders; the
  probe losses at t + H, averaged over orders, are what an attribution must rank. All subsets of
  an order train together (``torch.func.vmap`` over stacked parameters; AdamW is elementwise, so
  each trains as if alone). Cached under ``benchmarks/cache/``.

Retraining from scratch was tried first and rejected: at this size the initialisation and batch
order dominate the probe losses (seed-vs-seed noise ceiling 0.08–0.28 over lr, weight decay,
batch, 256–1024 sequences), so no attribution could be scored; continued training from a shared
checkpoint has a ceiling of 0.8–0.95.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lds_common import CacheKey, subset_masks
from workloads import GPT, markov_tokens, sequence_loss

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"


@dataclass(frozen=True)
class Setup(CacheKey):
    """Everything that determines the training run and the ground truth (its hash names the cache file)."""

    vocab: int = 16
    context: int = 10
    width: int = 8
    heads: int = 2
    layers: int = 1
    n_train: int = 256
    n_probes: int = 64
    batch: int = 16
    lr: float = 1e-2
    weight_decay: float = 0.01
    steps: int = 400
    checkpoints: tuple[int, ...] = (200, 300)
    horizon: int = 100
    subsets: int = 100
    alpha: float = 0.5
    orders: int = 3
    data_seed: int = 0


@dataclass
class Data:
    """Token sequences ``[count, context + 1]`` and the subset masks."""

    train: torch.Tensor
    probes: torch.Tensor
    masks: torch.Tensor  # [M, N] bool


def load_data(setup: Setup) -> Data:
    """Training and probe sequences from one Markov chain, and the random half-subsets."""
    gen = torch.Generator().manual_seed(setup.data_seed)
    tokens = markov_tokens(setup.n_train + setup.n_probes, setup.context + 1, setup.vocab, gen)
    masks = subset_masks(setup.subsets, setup.n_train, setup.alpha, gen)
    return Data(tokens[:setup.n_train], tokens[setup.n_train:], masks)


def new_model(setup: Setup) -> nn.Module:
    """The freshly initialised GPT the run starts from."""
    torch.manual_seed(20_000 + setup.data_seed)
    return GPT(setup.vocab, setup.layers, setup.width, setup.heads, setup.context)


def batch_positions(count: int, steps: int, setup: Setup, seed: int) -> torch.Tensor:
    """Minibatch positions ``[steps, batch]`` into ``count`` examples from epoch-wise shuffles."""
    gen = torch.Generator().manual_seed(seed)
    epochs = -(-steps * setup.batch // count)
    order = torch.cat([torch.randperm(count, generator=gen) for _ in range(epochs)])
    return order[:steps * setup.batch].view(steps, setup.batch)


def optimizer(setup: Setup, params) -> torch.optim.AdamW:
    """The training optimizer (constant learning rate)."""
    return torch.optim.AdamW(params, lr=setup.lr, weight_decay=setup.weight_decay)


State = tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]  # stacked parameters, AdamW state per tensor


def train_stacked(setup: Setup, start: State, sequences: torch.Tensor, positions: torch.Tensor,
                  record: list[tuple[dict[str, torch.Tensor], float]] | None = None) -> State:
    """Continue S stacked models from ``start`` (leading axis 1: broadcast) on ``sequences [S, n, T + 1]``.

    Model s trains on ``sequences[s]``, all in the same batch order ``positions [steps, batch]``;
    AdamW is elementwise, so one optimizer over the stacked parameters trains each as if alone.
    Returns the parameters and the optimizer state after the last step. ``record``: a list that gets,
    before each step, the parameters (detached copies) and the step's learning rate (TracIn's trajectory).
    """
    base = new_model(setup)
    buffers = dict(base.named_buffers())
    copies = sequences.shape[0]
    params = {k: v.detach().expand(copies, *v.shape[1:]).clone().requires_grad_() for k, v in start[0].items()}
    opt = optimizer(setup, params.values())
    for p, state in zip(params.values(), start[1], strict=True):
        if state:
            opt.state[p] = {k: v.clone() if k == "step" else v.expand(copies, *v.shape[1:]).clone()
                            for k, v in state.items()}

    def one(p: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        return sequence_loss(lambda x: functional_call(base, (p, buffers), (x,)), [tokens]).mean()

    batched = vmap(one)
    for index in positions:
        if record is not None:
            record.append(({k: v.detach().clone() for k, v in params.items()}, opt.param_groups[0]["lr"]))
        opt.zero_grad(set_to_none=True)
        batched(params, sequences[:, index]).sum().backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}, [dict(opt.state[p]) for p in params.values()]


def probe_losses(setup: Setup, params: dict[str, torch.Tensor], probes: torch.Tensor) -> torch.Tensor:
    """Per-probe sequence losses ``[S, P]`` of S stacked models."""
    base = new_model(setup)
    buffers = dict(base.named_buffers())
    with torch.no_grad():
        return vmap(lambda p: sequence_loss(lambda x: functional_call(base, (p, buffers), (x,)), [probes]))(params)


def run_and_truth(setup: Setup, data: Data, log: Callable[[str], None] = print) -> dict:
    """The full-data run's checkpoints (weights and AdamW state) and the continued-training ground truth, cached."""
    path = CACHE / f"lds_markov_{setup.key()}.pt"
    if path.exists():
        return torch.load(path)
    start = time.process_time()
    params, _ = stack_module_state([new_model(setup)])
    state: State = ({k: v.detach() for k, v in params.items()}, [{} for _ in params])
    batches = batch_positions(setup.n_train, setup.steps, setup, seed=99)
    checkpoints: dict[int, State] = {}
    done = 0
    for step in setup.checkpoints:
        state = train_stacked(setup, state, data.train[None], batches[done:step])
        checkpoints[step], done = state, step
    index = torch.stack([m.nonzero().flatten() for m in data.masks])
    truth = {}
    for step in setup.checkpoints:
        losses = torch.empty(setup.subsets, setup.orders, setup.n_probes)
        for r in range(setup.orders):
            order = batch_positions(index.shape[1], setup.horizon, setup, seed=1000 + r)
            end, _ = train_stacked(setup, checkpoints[step], data.train[index], order)
            losses[:, r] = probe_losses(setup, end, data.probes)
        truth[step] = losses
        log(f"  ground truth: step {step} (H = {setup.horizon}): {time.process_time() - start:.0f} CPU s")
    result = {"checkpoints": checkpoints, "truth": truth, "cpu_s": time.process_time() - start,
              "setup": dataclasses.asdict(setup)}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


def checkpoint_model(setup: Setup, state: State) -> tuple[nn.Module, torch.optim.AdamW]:
    """The model at a checkpoint and its AdamW holding the moments it had there (what the callback reads)."""
    model = new_model(setup)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[0][name][0])
    opt = optimizer(setup, model.parameters())
    for p, saved in zip(model.parameters(), state[1], strict=True):
        opt.state[p] = {k: v.clone() if k == "step" else v[0].clone() for k, v in saved.items()}
    return model, opt


def per_example_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence: ℓ_i and φ_j."""
    return sequence_loss(model, batch)


def kronfluence_task():
    """kronfluence's Task for this set-up: summed per-sequence losses; ``sample`` draws the true Fisher's tokens."""
    from kronfluence.task import Task

    class SequenceTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            tokens = batch[0]
            logits = model(tokens[:, :-1])
            targets = tokens[:, 1:]
            if sample:
                with torch.no_grad():
                    targets = torch.distributions.Categorical(logits=logits.detach()).sample()
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(
                targets.shape).mean(1).sum()

        def compute_measurement(self, batch, model):
            return sequence_loss(model, batch).sum()

    return SequenceTask()
