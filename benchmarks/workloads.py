"""Models and data of the snapshot benchmark: a small GPT on Markov-chain tokens, and an MLP.

Every workload is a token task so that devinterp's ``bif()`` (which reads an ``input_ids``
column and wants per-token losses) can run the very same work as ``estimate_bif``.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Workload:
    """One BIF snapshot's worth of work.

    Attributes:
        name: Workload name on the command line.
        kind: ``"gpt"`` or ``"mlp"``.
        vocab: Vocabulary size (the modulus p for the MLP task).
        layers: Transformer blocks (GPT) or hidden layers (MLP).
        width: d_model (GPT) or hidden width (MLP).
        heads: Attention heads (GPT).
        context: Tokens predicted per sequence; sequences hold ``context + 1`` tokens.
        data: Sequences SGLD minibatches are drawn from.
        train: Tracked training sequences (the first ``train`` of the SGLD data).
        probes: Probe sequences (fresh samples of the same process).
        chains: SGLD chains.
        draws: Draws per chain (no burn-in, thin 1, as in issue 4's reference measurement).
        batch_size: SGLD minibatch size in sequences.
        step_size: SGLD step size ε.
        localization: γ.
    """

    name: str
    kind: str
    vocab: int
    layers: int
    width: int
    heads: int
    context: int
    data: int
    train: int
    probes: int
    chains: int = 4
    draws: int = 100
    batch_size: int = 32
    step_size: float = 1e-5
    localization: float = 100.0

    def to_dict(self) -> dict[str, object]:
        """Plain values for the JSON report."""
        return asdict(self)


WORKLOADS = {
    # 3.4M parameters; 32 x 64-token SGLD batches; 256 + 64 = 320 sequences of 65 tokens per draw.
    "gpt-small": Workload("gpt-small", "gpt", vocab=512, layers=4, width=256, heads=4, context=64,
                          data=2048, train=256, probes=64),
    # 29M parameters: vocab 4096, 8 layers, d=512, 128-token context.
    "gpt-29m": Workload("gpt-29m", "gpt", vocab=4096, layers=8, width=512, heads=8, context=128,
                        data=2048, train=256, probes=64),
    # Modular addition (a + b mod 97) with an embedding + 2-hidden-layer MLP: the CPU workload.
    "mlp": Workload("mlp", "mlp", vocab=97, layers=2, width=256, heads=0, context=2,
                    data=2048, train=256, probes=64, step_size=1e-4),
}


def smoke(workload: Workload) -> Workload:
    """A scaled-down copy of ``workload`` that runs in seconds on one CPU thread.

    A GPT keeps its layers and chains and shrinks its width, so its snapshot costs what the
    per-step launch and Python overhead costs: with ``--draws 100`` it stands in, on a CPU, for
    a GPU run that the arithmetic does not fill.
    """
    if workload.kind == "gpt":
        return replace(workload, vocab=64, width=16, heads=4, context=16, data=128, train=24,
                       probes=8, draws=6, batch_size=8)
    return replace(workload, vocab=13, width=32, data=128, train=24, probes=8, chains=2, draws=6, batch_size=8)


class Block(nn.Module):
    """Pre-LayerNorm transformer block with causal self-attention.

    Attention is written out (QKᵀ, mask, softmax, AV) rather than calling
    ``scaled_dot_product_attention``: its fused kernels have no ``vmap`` batching rule for the
    backward pass (and none at all on CPU), and all three methods must run the same model code.
    """

    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads = heads
        self.register_buffer("mask", torch.ones(context, context, dtype=torch.bool).tril(), persistent=False)
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        attn = scores.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1) @ v
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A plain GPT: token + learned position embeddings, pre-LN blocks, untied output head."""

    def __init__(self, vocab: int, layers: int, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads, context) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class ModularMLP(nn.Module):
    """Embeds the two operands of ``a + b mod p``, concatenates them, and predicts the sum."""

    def __init__(self, vocab: int, layers: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        sizes = [64] + [width] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 2, p]``: the same prediction of the sum at both positions (the task has one target)."""
        x = self.embed(tokens[:, :2]).flatten(1)
        for layer in self.hidden:
            x = F.gelu(layer(x))
        return self.head(x).unsqueeze(1).expand(-1, 2, -1)


def build_model(workload: Workload) -> nn.Module:
    """The workload's model, freshly initialised (seeded by the caller)."""
    if workload.kind == "gpt":
        return GPT(workload.vocab, workload.layers, workload.width, workload.heads, workload.context)
    return ModularMLP(workload.vocab, workload.layers, workload.width)


def markov_tokens(count: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` sequences of ``length`` tokens from a random sparse first-order Markov chain.

    Each token has 8 likely successors, so there is structure for a model to learn and the
    per-sequence losses differ.
    """
    succ = torch.randint(vocab, (vocab, 8), generator=torch.Generator().manual_seed(1234))
    probs = torch.full((vocab, vocab), 0.1 / vocab)
    probs.scatter_add_(1, succ, torch.full((vocab, 8), 0.9 / 8))
    tokens = torch.empty(count, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (count,), generator=generator)
    for t in range(1, length):
        tokens[:, t] = torch.multinomial(probs[tokens[:, t - 1]], 1, generator=generator).squeeze(1)
    return tokens


def modular_tokens(count: int, p: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` rows ``[a, b, (a + b) mod p]`` with random operands (repeats allowed)."""
    a = torch.randint(p, (count,), generator=generator)
    b = torch.randint(p, (count,), generator=generator)
    return torch.stack([a, b, (a + b) % p], dim=1)


def make_data(workload: Workload, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGLD data ``[data, context + 1]``, tracked train (its first rows) and probes, as token ids."""
    generator = torch.Generator().manual_seed(seed)
    count = workload.data + workload.probes
    if workload.kind == "gpt":
        tokens = markov_tokens(count, workload.context + 1, workload.vocab, generator)
    else:
        tokens = modular_tokens(count, workload.vocab, generator)
    data, probes = tokens[:workload.data], tokens[workload.data:]
    return data, data[:workload.train], probes


def token_losses(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy ``[B, T]`` of sequences ``[B, T + 1]``.

    For the MLP the "sequence" is ``[a, b, a + b]`` and both positions carry the loss of the sum,
    so the per-sequence mean is that loss.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)
    if isinstance(model, ModularMLP):
        targets = targets[:, 1:].expand(-1, 2)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(targets.shape)


def sequence_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """``loss_fn`` for ``estimate_bif``: mean token loss per sequence, ``[B]``."""
    return token_losses(model, batch[0]).mean(dim=1)


def matmul_params(workload: Workload) -> int:
    """Parameters that take part in matrix multiplies (embedding lookups and norms excluded)."""
    d, v = workload.width, workload.vocab
    if workload.kind == "gpt":
        return workload.layers * 12 * d * d + d * v
    return 64 * d + (workload.layers - 1) * d * d + d * v


def flops(workload: Workload) -> dict[str, float]:
    """Analytic FLOPs of one snapshot (fwd = 2·N per token, fwd+bwd = 6·N, plus attention).

    Attention adds 4·L·T·d forward FLOPs per token (QKᵀ and AV over the full T×T square, as the
    math kernel computes it) and three times that forward+backward. The MLP's forward runs once
    per example, so its "tokens" are examples.
    """
    n = matmul_params(workload)
    per_token_fwd = 2.0 * n
    tokens_per_example = 1 if workload.kind == "mlp" else workload.context
    if workload.kind == "gpt":
        per_token_fwd += 4.0 * workload.layers * workload.context * workload.width
    steps = workload.chains * workload.draws
    sgld = steps * 3 * per_token_fwd * workload.batch_size * tokens_per_example
    evaluation = steps * per_token_fwd * (workload.train + workload.probes) * tokens_per_example
    return {"sgld": sgld, "evaluation": evaluation, "total": sgld + evaluation}


def parameter_count(model: nn.Module) -> int:
    """All parameters of the model."""
    return sum(p.numel() for p in model.parameters())


def pretrain(model: nn.Module, data: torch.Tensor, steps: int, device: torch.device, seed: int = 0) -> None:
    """A few AdamW steps so the snapshot starts near a sensible point (0 steps: random init)."""
    if steps <= 0:
        return
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        rows = data[torch.randint(len(data), (32,), generator=generator)].to(device)
        loss = token_losses(model, rows).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
