"""Influence dynamics across induction-head formation in a two-layer attention-only transformer.

The Olsson et al. (2022) toy: half of the training sequences are random letters except for one span of random
length (6-11 tokens) at a random offset that is repeated at once ("..xabcdabcdy.."); the other half are random
throughout. Because neither where the copy starts nor how far back its first occurrence lies is fixed, position
alone cannot predict the copy: the model has to find the current token's earlier occurrence and read the token
after it. A two-layer attention-only transformer (pure torch, random init, nothing downloaded) sits on a loss
plateau, then forms that circuit (a previous-token head in layer 0 composed with an induction head in layer 1),
and the loss on the repeated tokens drops sharply while both heads' scores rise.

The transition is measured without the BIF: a pilot run (the same seed, no callback) records the loss on
first-occurrence and repeated tokens and both layers' head scores (layer 0: previous token; layer 1: prefix
matching) on held-out repeated sequences; the
midpoint of the repeated-token loss drop is the transition step, with a bootstrap standard error over the
held-out sequences. The BIF run then takes snapshots dense around it. ``BIFCallback`` with
``SGLDConfig(per_token=True)`` tracks *packs* of training sequences (a pack's loss is the mean loss of its 8
sequences, so one log entry with its own standard error is the influence of the whole pack) in two groups,
``repeat`` and ``random``, and per-token probes: held-out repeated and random sequences. At every snapshot the
example also computes the classical influence function (damped Gauss-Newton, solved by conjugate gradients)
of the same groups on the same probe tokens, with the damping the posterior has (λ + γ/nβ).

    python examples/induction.py            # about 3.5 minutes of CPU; writes runs/induction/version_N/
    python examples/induction.py --quick    # a shortened run (seconds): the pipeline, not the science
    lightning-bif summary runs/induction/version_0/influence.h5
    lightning-bif tokens runs/induction/version_0/influence.h5 --probe 0 --group repeat

Outputs next to the log: ``induction_loss.png`` (loss on first-occurrence vs repeated tokens, both head scores),
``induction_tokens.png`` (per-token BIF of each group on a probe before, during and after the transition),
``induction_groups.png`` (group curves with the transition marked, and the classical IF), ``tokens.html`` and
``results.json`` (every number printed). docs/induction.md discusses what they show.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import matplotlib
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_bif import BIFCallback, SGLDConfig, open_log
from lightning_bif.viewers.tokens import format_view, token_view, write_html

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Tokens are shown as letters: 32 symbols, drawn uniformly.
VOCAB = list("abcdefghijklmnopqrstuvwxyzABCDEF")
GROUPS = ("repeat", "random")


def sequences(count: int, length: int, repeat: bool, generator: torch.Generator,
              spans: tuple[int, int] = (6, 11)) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random sequences of ``length`` tokens; with ``repeat``, each contains one span that repeats at once.

    A repeat sequence is noise, except that a span of random length ``m`` (``spans[0] ... spans[1]``) starting at a
    random offset ``r`` is followed by a copy of itself (tokens ``r ... r + m - 1`` again at ``r + m ... r + 2m -
    1``), then noise again. Neither where the copy starts nor how far back its first occurrence lies is fixed, so
    position alone cannot predict the copy: a model must find the current token's earlier occurrence and read the
    token after it (a previous-token head composed with an induction head). Returns the ids ``[count, length]``
    and the spans ``[count, 2]`` (``r``, ``m``; ``0, 0`` for sequences without a repeat).
    """
    ids = torch.randint(len(VOCAB), (count, length), generator=generator)
    span = torch.zeros(count, 2, dtype=torch.long)
    if repeat:
        span[:, 1] = torch.randint(spans[0], spans[1] + 1, (count,), generator=generator)
        span[:, 0] = (torch.rand(count, generator=generator) * (length - 2 * span[:, 1] + 1)).long()
        for row, (r, m) in enumerate(span.tolist()):
            ids[row, r + m:r + 2 * m] = ids[row, r:r + m]
    return ids, span


def token_classes(spans: torch.Tensor, length: int) -> dict[str, np.ndarray]:
    """Which token losses (targets t + 1 of each ``length``-token sequence) are first occurrences or repeats.

    Boolean masks ``[count, length - 1]`` per class: ``first`` the targets inside the first occurrence of the span
    (``r + 1 ... r + m - 1``: the span's first token follows noise), ``repeated`` the copy from its second token on
    (``r + m + 1 ... r + 2m - 1``: those an induction head can predict). The copy's first token cannot be predicted
    (nothing says where a repeat starts) and is in neither class, nor is any noise.
    """
    targets = torch.arange(1, length)
    r, m = spans[:, :1], spans[:, 1:]
    first = (targets > r) & (targets < r + m)
    repeated = (targets > r + m) & (targets < r + 2 * m)
    return {"first": first.numpy(), "repeated": repeated.numpy()}


def next_token_losses(forward: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every next token, ``[B, S - 1]`` for ``ids [B, S]`` (pack mean for ``[B, K, S]``)."""
    flat = ids.reshape(-1, ids.shape[-1])
    losses = F.cross_entropy(forward(flat[:, :-1]).transpose(1, 2), flat[:, 1:], reduction="none")
    return losses.view(*ids.shape[:-1], -1).mean(dim=1) if ids.dim() == 3 else losses


class Attention(nn.Module):
    """Causal multi-head self-attention with a pre-LayerNorm and a residual connection (no MLP)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, patterns: list[torch.Tensor] | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads)
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        pattern = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        if patterns is not None:
            patterns.append(pattern)
        return x + self.out((pattern @ v).transpose(1, 2).reshape(batch, length, width))


class AttentionOnly(pl.LightningModule):
    """A two-layer attention-only transformer with per-token and per-example losses.

    A batch is ``[B, S]`` token ids, or ``[B, K, S]``: B packs of K sequences whose losses are averaged (the
    tracked training "examples" are such packs, so one BIF entry is the influence of K sequences together).
    """

    def __init__(self, length: int, width: int = 64, heads: int = 2, layers: int = 2, lr: float = 3e-3,
                 weight_decay: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(len(VOCAB), width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        self.blocks = nn.ModuleList(Attention(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.unembed = nn.Linear(width, len(VOCAB), bias=False)

    def forward(self, ids: torch.Tensor, patterns: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, patterns)
        return self.unembed(self.norm(x))

    def token_losses(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """Next-token cross-entropy at every position, ``[B, S - 1]`` (the mean over a pack for ``[B, K, S]``)."""
        return next_token_losses(self, batch[0])

    def per_example_loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """The mean token loss of each sequence (or pack), ``[B]``: what SGLD samples and the BIF tracks."""
        return self.token_losses(batch).mean(dim=-1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.per_example_loss(batch).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def token_losses(model: AttentionOnly, batch: list[torch.Tensor]) -> torch.Tensor:
    """The probe observable: per-token losses ``[B, T]`` (``SGLDConfig(per_token=True)``)."""
    return model.token_losses(batch)


class Monitor(pl.Callback):
    """Measures the transition without the BIF, every ``every`` steps, on held-out repeated sequences.

    Per held-out sequence: mean loss on first-occurrence and on repeated tokens, and every head's attention
    score for its mechanism (layer 0: previous token; layer 1: prefix matching, i.e. from a repeated token to the
    token after its first occurrence). Also keeps a copy of the weights at ``keep_steps`` (for the classical IF).
    """

    def __init__(self, held_out: tuple[torch.Tensor, torch.Tensor], every: int,
                 keep_steps: tuple[int, ...] = ()) -> None:
        (self.held_out, self.spans), self.every, self.keep_steps = held_out, every, set(keep_steps)
        self.steps: list[int] = []
        self.first: list[np.ndarray] = []
        self.repeated: list[np.ndarray] = []
        self.previous_token: list[np.ndarray] = []
        self.prefix_matching: list[np.ndarray] = []
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def measure(self, model: AttentionOnly, step: int) -> None:
        was_training = model.training
        model.eval()
        ids, spans = self.held_out, self.spans
        patterns: list[torch.Tensor] = []
        logits = model(ids[:, :-1], patterns)
        losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        classes = {name: torch.from_numpy(mask).float() for name, mask in token_classes(spans, ids.shape[1]).items()}
        # Prefix matching: from a repeated token (input position q, whose target q + 1 is in the "repeated"
        # class) to the token after its first occurrence, q - m + 1. Previous token: from every position q ≥ 1
        # to q - 1.
        count, heads, length, _ = patterns[1].shape
        query = torch.arange(length)
        key = (query - spans[:, 1:] + 1).clamp(min=0)  # [count, length]
        matching = patterns[1].gather(-1, key[:, None, :, None].expand(count, heads, length, 1))[..., 0]
        repeated = classes["repeated"][:, None, :]
        previous = patterns[0][:, :, query[1:], query[1:] - 1]
        self.steps.append(step)
        self.first.append(((losses * classes["first"]).sum(1) / classes["first"].sum(1)).numpy())
        self.repeated.append(((losses * classes["repeated"]).sum(1) / classes["repeated"].sum(1)).numpy())
        self.previous_token.append(previous.mean(dim=2).numpy())
        self.prefix_matching.append(((matching * repeated).sum(2) / repeated.sum(2)).numpy())
        model.train(was_training)

    def on_train_start(self, trainer: pl.Trainer, pl_module: AttentionOnly) -> None:
        self.measure(pl_module, 0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: AttentionOnly, *args: object) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            self.measure(pl_module, step)
        if step in self.keep_steps:
            self.weights[step] = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}


@dataclass
class Transition:
    """The transition step from the held-out repeated-token loss minus the first-occurrence loss: the midpoint of
    its drop, with a bootstrap SE."""

    step: float
    stderr: float
    start: float  # 10 % of the drop done
    end: float  # 90 % of the drop done


def crossing(steps: np.ndarray, curve: np.ndarray, fraction: float) -> float:
    """The first step (linearly interpolated) where a falling ``curve`` has done ``fraction`` of its drop.

    The drop runs from the curve's highest value to its mean over the last tenth of training.
    """
    top = int(np.argmax(curve))
    high, low = curve[top], curve[-max(1, len(curve) // 10):].mean()
    level = high - fraction * (high - low)
    below = np.flatnonzero(curve[top:] <= level)
    if len(below) == 0:
        return float("nan")
    i = top + int(below[0])
    if i == 0:
        return float(steps[0])
    return float(np.interp(level, [curve[i], curve[i - 1]], [steps[i], steps[i - 1]]))


def in_context_advantage(monitor: Monitor) -> np.ndarray:
    """Per held-out sequence and measurement, ``[S, n]``: the loss on repeated tokens minus that on first occurrences.

    The difference takes out what the model learns without the circuit (letter frequencies, in the first ~100
    steps), which lowers both losses alike; what remains falls only when copying starts.
    """
    return np.stack(monitor.repeated) - np.stack(monitor.first)


def transition(steps: np.ndarray, per_sequence: np.ndarray, resamples: int = 200) -> Transition:
    """The transition of the mean of ``per_sequence [S, n]`` (e.g. ``in_context_advantage``); the SE resamples the n
    sequences."""
    rng = np.random.default_rng(0)
    curve = per_sequence.mean(axis=1)
    boot = [crossing(steps, per_sequence[:, rng.integers(0, per_sequence.shape[1], per_sequence.shape[1])]
                     .mean(axis=1), 0.5) for _ in range(resamples)]
    return Transition(crossing(steps, curve, 0.5), float(np.nanstd(boot)), crossing(steps, curve, 0.1),
                      crossing(steps, curve, 0.9))


def fit(model: AttentionOnly, train: TensorDataset, steps: int, callbacks: list[pl.Callback], logger: object,
        batch_size: int) -> pl.Trainer:
    """Train ``model`` for ``steps`` AdamW steps; the shuffling has its own generator, so runs repeat exactly."""
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, logger=logger, log_every_n_steps=10,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer.fit(model, loader)
    return trainer


def snapshot_steps(steps: int, found: Transition | None, sparse: int, dense: int) -> list[int]:
    """Every ``sparse`` steps, and every ``dense`` steps over the 10 %-90 % window widened by a quarter each side."""
    chosen = set(range(sparse, steps + 1, sparse))
    if found is not None and math.isfinite(found.start) and math.isfinite(found.end):
        width = max(found.end - found.start, dense)
        low, high = found.start - 0.25 * width, found.end + 0.25 * width
        chosen |= {s for s in range(dense, steps + 1, dense) if low <= s <= high}
    return sorted(chosen)


def classical_influence(model: AttentionOnly, weights: dict[str, torch.Tensor], data: torch.Tensor,
                        groups: dict[str, torch.Tensor], probes: torch.Tensor, damping: float, nbeta: float,
                        iterations: int) -> tuple[dict[str, np.ndarray], float]:
    """Classical IF in BIF units at one checkpoint: ``-(1/nβ) ∇φ_{p,t}ᵀ (G + damping·I)⁻¹ ∇ℓ_g``.

    G is the Gauss-Newton matrix of the mean training loss (on ``data`` sequences; EK-FAC approximates the same
    matrix), ℓ_g the mean loss of a group's sequences, φ_{p,t} the loss of probe p at token t. The linear
    system is solved by ``iterations`` of conjugate gradients. Returns ``{group: [P, T]}`` and the worst
    relative CG residual.
    """
    names = list(weights)
    primal = tuple(weights[name] for name in names)

    def forward_with(flat_params: tuple[torch.Tensor, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda ids: functional_call(model, dict(zip(names, flat_params, strict=True)), (ids,))

    def logits(flat_params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return forward_with(flat_params)(data[:, :-1])

    out, pullback = vjp(logits, primal)
    probs = out.softmax(dim=-1)
    tokens = out.shape[0] * out.shape[1]

    def gauss_newton(vector: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        _, tangent = jvp(logits, (primal,), (vector,))
        # Hessian of the cross-entropy in the logits, diag(p) - p pᵀ, per token. The training loss is a mean of
        # per-sequence mean token losses: G is the mean over tokens.
        curvature = probs * tangent - probs * (probs * tangent).sum(dim=-1, keepdim=True)
        return tuple(g / tokens for g in pullback(curvature)[0])

    def mean_loss(flat_params: tuple[torch.Tensor, ...], ids: torch.Tensor) -> torch.Tensor:
        return next_token_losses(forward_with(flat_params), ids).mean()

    def dot(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return sum((x * y).sum() for x, y in zip(a, b, strict=True))

    def token_loss(flat_params: tuple[torch.Tensor, ...], ids: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        return (next_token_losses(forward_with(flat_params), ids[None])[0] * pick).sum()

    probe_grads = vmap(vmap(grad(token_loss), in_dims=(None, None, 0)), in_dims=(None, 0, None))(
        primal, probes, torch.eye(probes.shape[1] - 1))
    result, worst = {}, 0.0
    for name, ids in groups.items():
        rhs = grad(mean_loss)(primal, ids)
        x = tuple(torch.zeros_like(r) for r in rhs)
        residual = rhs
        direction = residual
        rr = dot(residual, residual)
        for _ in range(iterations):
            product = tuple(g + damping * d for g, d in zip(gauss_newton(direction), direction, strict=True))
            alpha = rr / dot(direction, product)
            x = tuple(a + alpha * d for a, d in zip(x, direction, strict=True))
            residual = tuple(r - alpha * p for r, p in zip(residual, product, strict=True))
            new_rr = dot(residual, residual)
            direction = tuple(r + (new_rr / rr) * d for r, d in zip(residual, direction, strict=True))
            rr = new_rr
        worst = max(worst, float((rr / dot(rhs, rhs)).sqrt()))
        influence = sum((g * v).flatten(2).sum(-1) for g, v in zip(probe_grads, x, strict=True))
        result[name] = (-influence / nbeta).numpy()
    return result, worst


def group_curves(log: object, classes: dict[str, np.ndarray], probe_rows: np.ndarray) -> dict[str, dict]:
    """Per snapshot, the mean per-token BIF of one pack of each group on each token class of ``probe_rows``.

    ``classes`` are the probes' token masks ``{class: [P, T]}`` (``token_classes``); the mean is over the masked
    tokens of all ``probe_rows`` together and over the group's packs.

    Returns ``{group: {class: [S]}}`` and, under ``{group: {class + "_se": [S]}}``, the mean of the entries'
    standard errors: an upper bound of the standard error of the mean (the entries share draws; the log keeps no
    per-chain values to give the exact one), so the z-scores below are lower bounds.
    """
    influence = np.asarray(log.token_influence[:])[:, probe_rows]
    stderr = np.asarray(log.token_stderr[:])[:, probe_rows]
    curves: dict[str, dict[str, np.ndarray]] = {}
    for group in GROUPS:
        packs = np.flatnonzero(log.train_groups == group)
        curves[group] = {}
        for name, mask in classes.items():
            chosen = mask[probe_rows]
            curves[group][name] = influence[:, chosen][..., packs].mean(axis=(1, 2))
            curves[group][name + "_se"] = stderr[:, chosen][..., packs].mean(axis=(1, 2))
    return curves


def peak(steps: np.ndarray, values: np.ndarray, stderr: np.ndarray, resamples: int = 1000) -> tuple[int, float]:
    """The snapshot step of the largest |value| and its SE from resampling every snapshot within its SE."""
    rng = np.random.default_rng(0)
    draws = values + stderr * rng.standard_normal((resamples, len(values)))
    return int(steps[np.argmax(np.abs(values))]), float(np.std(steps[np.argmax(np.abs(draws), axis=1)]))


def sign_changes(steps: np.ndarray, values: np.ndarray, stderr: np.ndarray) -> list[dict[str, float]]:
    """Consecutive snapshots whose values differ in sign, with each side's z-score (value / SE)."""
    return [{"between": [int(steps[i]), int(steps[i + 1])], "z_before": float(values[i] / stderr[i]),
             "z_after": float(values[i + 1] / stderr[i + 1])}
            for i in range(len(values) - 1) if np.sign(values[i]) != np.sign(values[i + 1])]


def head_scores(monitor: Monitor, found: Transition, evaluation: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Each layer's best head score at step 0, before (10 % of the loss drop) and after (90 %) the transition, at
    the end, and the midpoint of its rise (``crossing`` of the negated curve), with the scores of uniform attention.
    """
    steps = np.array(monitor.steps)
    before = int(steps[steps <= found.start][-1]) if (steps <= found.start).any() else 0
    after = int(steps[steps >= found.end][0]) if (steps >= found.end).any() else int(steps[-1])
    result: dict = {"before_step": before, "after_step": after}
    for name in ("previous_token", "prefix_matching"):
        best = np.stack(getattr(monitor, name)).mean(axis=1).max(axis=1)  # [steps]: the best head per step
        result[name] = {"start": float(best[0]), "before": float(best[steps == before][0]),
                        "after": float(best[steps == after][0]), "end": float(best[-1]),
                        "midpoint": crossing(steps, -best, 0.5), "curve": best.tolist()}
    ids, spans = evaluation
    query = np.arange(ids.shape[1] - 1)
    repeated = token_classes(spans, ids.shape[1])["repeated"]
    result["previous_token_uniform"] = float(np.mean(1 / (query[1:] + 1)))
    result["prefix_matching_uniform"] = float((repeated / (query + 1)).sum() / repeated.sum())
    return result


def plot_loss(path: Path, monitor: Monitor, found: Transition, snapshots: np.ndarray) -> None:
    steps = np.array(monitor.steps)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.2), sharex=True)
    for axis in (top, bottom):
        axis.axvspan(found.start, found.end, color="0.9", label="transition (10-90 % of the drop)")
        axis.axvline(found.step, color="k", lw=1, ls="--", label=f"midpoint: step {found.step:.0f}")
    top.plot(steps, np.mean(monitor.first, axis=1), color="tab:gray", label="first-occurrence tokens")
    top.plot(steps, np.mean(monitor.repeated, axis=1), color="tab:purple", label="repeated tokens")
    top.axhline(math.log(len(VOCAB)), color="tab:gray", lw=0.8, ls=":", label="log(vocabulary): chance")
    top.plot(snapshots, np.full(len(snapshots), -0.1), "|", color="tab:orange", ms=8, label="BIF snapshots")
    top.set_ylabel("held-out loss (nats)")
    top.set_title("Induction-head formation: loss on held-out repeated sequences")
    top.legend(fontsize=7, loc="center left")
    for layer, scores, name in ((0, monitor.previous_token, "previous-token"), (1, monitor.prefix_matching,
                                                                               "prefix-matching")):
        mean = np.mean(scores, axis=1)
        for head in range(mean.shape[1]):
            bottom.plot(steps, mean[:, head], ls="-" if layer else ":",
                        label=f"layer {layer} head {head}: {name} score")
    bottom.set_ylabel("attention weight")
    bottom.set_xlabel("training step")
    bottom.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_tokens(path: Path, log: object, probe: int, rows: dict[str, int], span: tuple[int, int]) -> None:
    """Per-token BIF of each group (mean per pack) on one probe at the before/during/after snapshots."""
    tokens = log.probe_tokens[probe]
    fig, axes = plt.subplots(len(GROUPS), 1, figsize=(9.2, 3.6))
    influence = np.asarray(log.token_influence[:])[:, probe]
    for axis, group in zip(axes, GROUPS, strict=True):
        packs = np.flatnonzero(log.train_groups == group)
        values = np.stack([influence[row][:, packs].mean(axis=1) for row in rows.values()])
        scale = np.abs(values).max()
        image = axis.imshow(values, cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
        fig.colorbar(image, ax=axis, pad=0.01, label="BIF")
        for (r, t), value in np.ndenumerate(values):
            axis.text(t, r, tokens[t], ha="center", va="center", fontsize=8,
                      color="white" if abs(value) > 0.6 * scale else "black")
        start, size = span  # the repeated span's first occurrence: targets start ... start + size - 1
        for target, style in ((start, ":"), (start + size, "-"), (start + 2 * size, ":")):
            axis.axvline(target - 1.5, color="k", lw=1, ls=style)
        axis.set_yticks(range(len(rows)), [f"{label} (step {int(log.steps[row])})" for label, row in rows.items()],
                       fontsize=7)
        axis.set_xticks([])
        axis.set_title(f"BIF of one '{group}' pack on each token of probe {probe} (blue helps, red harms; "
                       f"|max| = {scale:.2g})", fontsize=8)
    axes[-1].set_xlabel("probe tokens (the letter is the target): first occurrence between the dotted line and the "
                        "solid one, its copy from the solid line to the next dotted one", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_groups(path: Path, steps: np.ndarray, curves: dict, found: Transition, classical: dict | None) -> None:
    panels = 2 if classical else 1
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.8 * panels + 0.6), sharex=True, squeeze=False)
    colors = {"repeat": "tab:purple", "random": "tab:gray"}
    styles = {"repeated": "-", "first": ":"}
    for axis in axes[:, 0]:
        axis.axvspan(found.start, found.end, color="0.9")
        axis.axvline(found.step, color="k", lw=1, ls="--")
        axis.axhline(0, color="k", lw=0.5)
    bif = axes[0, 0]
    for group in GROUPS:
        for name in ("repeated", "first"):
            mean, se = curves[group][name], curves[group][name + "_se"]
            bif.errorbar(steps, mean, yerr=se, color=colors[group], ls=styles[name], marker=".", ms=3, capsize=2,
                         lw=1, label=f"'{group}' pack on {name} tokens")
    bif.set_ylabel("BIF per token (± SE bound)")
    bif.set_title("BIF of training packs on held-out repeated probes (negative = helpful); "
                  "dashed: transition midpoint", fontsize=8)
    bif.legend(fontsize=7)
    if classical:
        axis = axes[1, 0]
        for group in GROUPS:
            for name in ("repeated", "first"):
                axis.plot(classical["steps"], classical[group][name], color=colors[group], ls=styles[name],
                          marker=".", ms=3, lw=1, label=f"'{group}' on {name} tokens")
        axis.set_ylabel("classical IF per token")
        axis.set_title("Classical IF at the same checkpoints: -(1/nβ) ∇φᵀ (G + λ + γ/nβ)⁻¹ ∇ℓ "
                       "(note the scale: far smaller than the BIF)", fontsize=8)
        axis.legend(fontsize=7)
    axes[-1, 0].set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shortened run (seconds): checks the pipeline only")
    parser.add_argument("--steps", type=int, default=1500, help="AdamW steps")
    parser.add_argument("--length", type=int, default=24, help="tokens per sequence")
    parser.add_argument("--train-size", type=int, default=8192, help="training sequences (half of them repeat)")
    parser.add_argument("--packs", type=int, default=4, help="tracked packs per group")
    parser.add_argument("--pack", type=int, default=8, help="training sequences per tracked pack")
    parser.add_argument("--probes", type=int, default=6, help="held-out repeated probe sequences (plus 2 random)")
    parser.add_argument("--chains", type=int, default=6)
    parser.add_argument("--draws", type=int, default=80, help="draws per chain and snapshot")
    parser.add_argument("--step-size", type=float, default=1e-5, help="SGLD step size ε")
    parser.add_argument("--sparse", type=int, default=300, help="snapshot interval away from the transition")
    parser.add_argument("--dense", type=int, default=50, help="snapshot interval around the transition")
    parser.add_argument("--cg", type=int, default=20, help="conjugate-gradient iterations of the classical IF "
                        "(0: skip it)")
    parser.add_argument("--root", default="runs", help="directory for TensorBoard runs and the log")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.train_size, args.packs, args.pack, args.probes = 45, 512, 2, 4, 2
        args.chains, args.draws, args.sparse, args.dense, args.cg = 2, 6, 15, 15, 3
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give on a busy CPU
    start = time.process_time()
    length, batch_size = args.length, 64
    generator = torch.Generator().manual_seed(0)
    by_group = {group: sequences(args.train_size // 2, length, group == "repeat", generator)[0] for group in GROUPS}
    train = TensorDataset(torch.cat([by_group[group] for group in GROUPS]))
    tracked_packs = torch.stack([by_group[group][i * args.pack:(i + 1) * args.pack]
                                 for group in GROUPS for i in range(args.packs)])
    tracked_groups = [group for group in GROUPS for _ in range(args.packs)]
    held_out = torch.Generator().manual_seed(1)
    probes = [sequences(args.probes, length, True, held_out), sequences(2, length, False, held_out)]
    probe_ids, probe_spans = (torch.cat(parts) for parts in zip(*probes, strict=True))
    probe_groups = ["repeat"] * args.probes + ["random"] * 2
    evaluation = sequences(512, length, True, held_out)
    classes = token_classes(probe_spans, length)  # {class: [probes, length - 1]} masks

    # Pilot: the transition from the loss alone, before any BIF, to place the snapshots.
    pl.seed_everything(0, verbose=False)
    pilot = Monitor(evaluation, every=10)
    fit(AttentionOnly(length - 1), train, args.steps, [pilot], False, batch_size)
    pilot_transition = transition(np.array(pilot.steps), in_context_advantage(pilot))
    at_steps = snapshot_steps(args.steps, pilot_transition, args.sparse, args.dense)
    pilot_cpu = time.process_time() - start

    pl.seed_everything(0, verbose=False)
    nbeta = float(len(train) * (length - 1))  # training tokens: the likelihood is a sum over tokens
    bif = BIFCallback(
        train=TensorDataset(tracked_packs),
        probes=TensorDataset(probe_ids),
        probe_fn=token_losses,
        train_groups=tracked_groups,
        probe_groups=probe_groups,
        probe_tokens=[letters(ids[1:]) for ids in probe_ids],
        train_text=[" | ".join("".join(letters(ids)) for ids in pack) for pack in tracked_packs],
        at_steps=at_steps,
        # A fixed ε and no preconditioner: self-tuning (Lanczos on the Hessian) would cost more than the snapshots.
        config=SGLDConfig(chains=args.chains, draws=args.draws, burn_in=20, thin=2, nbeta=nbeta, localization=1e4,
                          step_size=args.step_size, preconditioner="none", batch_size=batch_size, per_token=True),
        horizon=None,
    )
    monitor = Monitor(evaluation, every=10, keep_steps=tuple(at_steps))
    logger = TensorBoardLogger(args.root, name="induction")
    model = AttentionOnly(length - 1)
    trainer = fit(model, train, args.steps, [bif, monitor], logger, batch_size)
    run_cpu = time.process_time() - start - pilot_cpu
    steps_seen = np.array(monitor.steps)
    found = transition(steps_seen, in_context_advantage(monitor))
    repeat_drift = float(np.abs(np.stack(monitor.repeated) - np.stack(pilot.repeated)).max())
    print(f"\nTrained a {sum(p.numel() for p in model.parameters()):,}-parameter two-layer attention-only transformer "
          f"on {len(train)} sequences of {length} tokens (half contain a span of random length at a random offset, "
          f"repeated at once): {trainer.global_step} "
          f"steps, {len(at_steps)} BIF snapshots. The pilot run without the callback gave the same held-out loss "
          f"curve up to {repeat_drift:.1e}.")
    print(f"Transition (held-out repeated-token loss minus first-occurrence loss, midpoint of its drop): step "
          f"{found.step:.0f} ± {found.stderr:.1f} (bootstrap SE over 512 held-out sequences); 10 %-90 % of the "
          f"drop: steps {found.start:.0f}-{found.end:.0f}.")
    scores = head_scores(monitor, found, evaluation)
    print(f"Head scores (held-out repeated sequences, best head of the layer; uniform causal attention would give "
          f"{scores['previous_token_uniform']:.2f} and {scores['prefix_matching_uniform']:.2f}):")
    for name, layer in (("previous_token", "layer-0 previous-token"), ("prefix_matching", "layer-1 prefix-matching")):
        print(f"  {layer:24s} step 0: {scores[name]['start']:.2f}, before the transition (step "
              f"{scores['before_step']}): {scores[name]['before']:.2f}, after it (step {scores['after_step']}): "
              f"{scores[name]['after']:.2f}, end: {scores[name]['end']:.2f}; rise midpoint at step "
              f"{scores[name]['midpoint']:.0f}")

    path = Path(bif.resolved_log_path)
    results: dict[str, object] = {"transition": vars(found), "head_scores": scores, "snapshot_steps": at_steps,
                                  "probe_spans": probe_spans.tolist()}
    with open_log(path) as log:
        usable = log.status == "ok"
        print(f"Influence log: {path} ({len(log)} snapshots, status {sorted(set(log.status.tolist()))}, "
              f"split-half reliability {np.nanmin(log.split_half):.2f}-{np.nanmax(log.split_half):.2f}, "
              f"loss rise {np.nanmin(log.loss_rise):+.3f}-{np.nanmax(log.loss_rise):+.3f})\n")
        steps = log.steps[usable]
        repeat_rows = np.flatnonzero(np.array(probe_groups) == "repeat")
        curves = group_curves(log, classes, repeat_rows)
        curves = {g: {k: v[usable] for k, v in c.items()} for g, c in curves.items()}
        main_curve, main_se = curves["repeat"]["repeated"], curves["repeat"]["repeated_se"]
        before = int(np.flatnonzero(steps <= found.start)[-1]) if (steps <= found.start).any() else 0
        top_step, top_se = peak(steps, main_curve, main_se)
        top = int(np.flatnonzero(steps == top_step)[0])
        after = len(steps) - 1
        change = {name: float((main_curve[row] - main_curve[before]) / math.hypot(main_se[row], main_se[before]))
                  for name, row in (("peak", top), ("end", after))}
        results.update(bif_peak_step=top_step, bif_peak_step_se=top_se, change_in_se=change,
                       sign_changes=sign_changes(steps, main_curve, main_se),
                       curves={g: {k: v.tolist() for k, v in c.items()} for g, c in curves.items()},
                       bif_steps=steps.tolist())
        print("Mean per-token BIF of one training pack on the held-out repeated probes (negative = helpful; "
              "± an upper bound of the SE):")
        for group in GROUPS:
            for name in ("repeated", "first"):
                row = "  ".join(f"{int(s)}: {v:+.2g}±{e:.1g}" for s, v, e in
                                zip(steps, curves[group][name], curves[group][name + "_se"], strict=True))
                print(f"  {group:6s} pack on {name:8s} tokens  {row}")
        print(f"\n'repeat' packs on repeated tokens: largest |BIF| at step {top_step} ± {top_se:.0f} (transition "
              f"{found.step:.0f} ± {found.stderr:.0f}); change from step {int(steps[before])} (before) to step "
              f"{top_step} (peak): {change['peak']:+.1f} SE, to step {int(steps[after])} (end): "
              f"{change['end']:+.1f} SE.")
        for flip in results["sign_changes"]:
            print(f"  sign change between steps {flip['between']}: z = {flip['z_before']:+.1f} -> "
                  f"{flip['z_after']:+.1f}")

        out = path.parent
        plot_loss(out / "induction_loss.png", monitor, found, steps)
        during = int(np.argmin(np.abs(steps - found.step)))
        rows = {"before": int(np.flatnonzero(usable)[before]), "during": int(np.flatnonzero(usable)[during]),
                "after": int(np.flatnonzero(usable)[after])}
        plot_tokens(out / "induction_tokens.png", log, 0, rows, tuple(probe_spans[0].tolist()))
        classical = None
        classical_start = time.process_time()
        if args.cg:
            damping = float(log.config["sgld"]["weight_decay"]) + float(np.nanmedian(log.localization)) / nbeta
            data = train.tensors[0][torch.randperm(len(train), generator=torch.Generator().manual_seed(2))[:128]]
            group_ids = {group: tracked_packs[np.array(tracked_groups) == group].reshape(-1, length)
                         for group in GROUPS}
            classical = {"steps": [], "damping": damping, "cg_residual": 0.0,
                         **{g: {name: [] for name in classes} for g in GROUPS}}
            for step in steps:
                values, residual = classical_influence(model, monitor.weights[int(step)], data, group_ids,
                                                       probe_ids[repeat_rows], damping, nbeta, args.cg)
                classical["steps"].append(int(step))
                classical["cg_residual"] = max(classical["cg_residual"], residual)
                for group in GROUPS:
                    for name, mask in classes.items():
                        # ℓ_g is the mean loss of the group's packs, so its IF is the mean of the packs' IFs: the
                        # same unit as the BIF curve (the mean over packs and the masked probe tokens).
                        classical[group][name].append(float(values[group][mask[repeat_rows]].mean()))
            results["classical"] = classical
            c = np.array(classical["repeat"]["repeated"])
            print(f"\nClassical IF (Gauss-Newton, damping λ + γ/nβ = {damping:.3g}, {args.cg} CG iterations, worst "
                  f"relative residual {classical['cg_residual']:.2g}), 'repeat' pack on repeated tokens: "
                  + "  ".join(f"{s}: {v:+.2g}" for s, v in zip(classical["steps"], c, strict=True)))
            top_if = int(np.argmax(np.abs(c)))
            flips = [f"{classical['steps'][i]}-{classical['steps'][i + 1]}" for i in range(len(c) - 1)
                     if np.sign(c[i]) != np.sign(c[i + 1])]
            results["classical_peak_step"] = classical["steps"][top_if]
            print(f"  largest |IF| at step {classical['steps'][top_if]} ({c[top_if]:+.2g}); sign changes between "
                  f"steps {', '.join(flips) or 'none'}; BIF / IF at the BIF's peak (step {top_step}): "
                  f"{main_curve[top] / c[top]:.0f}, at the end: {main_curve[after] / c[after]:.0f}")

        classical_cpu = time.process_time() - classical_start
        plot_groups(out / "induction_groups.png", steps, curves, found, classical)
        print()
        print(format_view(token_view(log, 0, group="repeat", step=int(steps[during])), color=sys.stdout.isatty()))
        html = write_html(out / "tokens.html", log, probe=0, group="repeat")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nFigures: {out / 'induction_loss.png'}, {out / 'induction_tokens.png'}, {out / 'induction_groups.png'}")
    print(f"Numbers: {out / 'results.json'}")
    print(f"Token view (HTML): {html}")
    print(f"In a terminal:     lightning-bif tokens {path} --probe 0 --group repeat")
    print(f"TensorBoard:       tensorboard --logdir {args.root}")
    print(f"CPU time of this process: {time.process_time() - start:.0f} s (pilot {pilot_cpu:.0f} s, training with "
          f"the callback {run_cpu:.0f} s, classical IF {classical_cpu:.0f} s)")


def letters(ids: torch.Tensor) -> list[str]:
    """The letters of token ids."""
    return [VOCAB[i] for i in ids.tolist()]


if __name__ == "__main__":
    main()
