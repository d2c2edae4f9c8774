"""``TrackedLosses``: the tracked training losses and probe observables at a batch of parameter vectors."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..config import SGLDConfig
from ..example_sets import Batch
from ..functional import FunctionalModel, LossFn


class TrackedLosses:
    """The functions a draw evaluates, on the evaluation batches of the tracked examples and the probes.

    Args:
        fmodel: The functional model whose parameter vectors are evaluated.
        buffers: The model's buffers, shared by every evaluation.
        train: The tracked training examples as ``(size, batch)`` evaluation batches.
        probes: The probes as ``(size, batch)`` evaluation batches.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``, the training losses ℓ_i.
        probe_fn: ``probe_fn(model, batch)``, the probe observables φ_j.
        per_token: Whether ``probe_fn`` returns per-token losses ``[B, T]``.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        buffers: dict[str, torch.Tensor],
        train: list[tuple[int, Batch]],
        probes: list[tuple[int, Batch]],
        loss_fn: LossFn,
        probe_fn: LossFn,
        per_token: bool,
    ) -> None:
        self.fmodel = fmodel
        self.buffers = buffers
        self.train = train
        self.probes = probes
        self.loss_fn = loss_fn
        self.probe_fn = probe_fn
        self.per_token = per_token
        self.train_count = sum(size for size, _ in train)
        #: Tracked examples and probes as one batch (:func:`joint_batch`); ``None`` while the losses at w* are
        #: checked set by set, and whenever they do not stack.
        self.joint_batch: tuple[int, Batch] | None = None

    def evaluate(
        self, fmodel: FunctionalModel, params: torch.Tensor, vectorized: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Train losses ``[G, N]`` and probe observables ``[G, P]`` at parameter vectors ``[G, D]``.

        With ``per_token`` the probe observables are ``[G, P + P·T]``: the P token means, then
        the P·T token losses (probe-major), so that one accumulator (and one DDP merge) holds both.
        """
        buffers = self.buffers
        if self.joint_batch is not None:
            size, batch = self.joint_batch
            losses = fmodel.batched_losses(params, batch, size, self.loss_fn, buffers, "loss_fn", vectorized)
            return losses[:, :self.train_count], losses[:, self.train_count:]
        per_token = self.per_token
        train = torch.cat([fmodel.batched_losses(params, batch, size, self.loss_fn, buffers, "loss_fn", vectorized)
                           for size, batch in self.train], dim=1)
        probes = [fmodel.batched_losses(params, batch, size, self.probe_fn, buffers, "probe_fn", vectorized, per_token)
                  for size, batch in self.probes]
        if not per_token:
            return train, torch.cat(probes, dim=1)
        tokens = probe_tokens(probes)
        return train, torch.cat([tokens.mean(dim=2), tokens.flatten(1)], dim=1)


def joint_batch(
    train: list[tuple[int, Batch]], probes: list[tuple[int, Batch]], limit: int
) -> tuple[int, Batch] | None:
    """Tracked examples and probes as one batch, when one loss function serves both and they fit.

    One forward pass per draw instead of two: for small models the per-call overhead, not the
    arithmetic, is what a draw costs. ``None`` when the sets do not stack (other structure,
    trailing shapes or dtypes) or exceed one evaluation batch.
    """
    if len(train) != 1 or len(probes) != 1 or train[0][0] + probes[0][0] > limit:
        return None
    (n, a), (p, b) = train[0], probes[0]
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    if spec_a != spec_b or not all(
        isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.ndim > 0 and y.ndim > 0
        and (x.shape[0], y.shape[0]) == (n, p) and x.shape[1:] == y.shape[1:] and x.dtype == y.dtype
        for x, y in zip(leaves_a, leaves_b, strict=True)
    ):
        return None
    return n + p, tree_unflatten([torch.cat([x, y]) for x, y in zip(leaves_a, leaves_b, strict=True)], spec_a)


def probe_tokens(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-token losses of all probe batches ``[G, B, T]`` joined to ``[G, P, T]``; T must agree."""
    lengths = sorted({part.shape[2] for part in parts})
    if len(lengths) > 1:
        raise ValueError(
            f"probe_fn returned per-token losses of different lengths T = {lengths} for different probe batches, "
            "but SGLDConfig(per_token=True) needs one T: pad every probe to the same length (a collate_fn or "
            "dataset that pads to a fixed length) and return 0 loss at padded positions."
        )
    return torch.cat(parts, dim=1)


def check_token_budget(config: SGLDConfig, probes: int, tokens: int, train: int) -> None:
    """Refuse per-token influence whose float64 sums would exceed ``config.max_token_entries``."""
    entries = config.chains * probes * tokens * train
    if entries > config.max_token_entries:
        raise ValueError(
            f"Per-token influence needs chains·probes·tokens·train = {config.chains}·{probes}·{tokens}·{train} = "
            f"{entries:,} float64 sums ({entries * 8 / 2**20:,.1f} MiB), more than "
            f"SGLDConfig.max_token_entries={config.max_token_entries:,}. Use fewer or shorter probes, fewer tracked "
            "training examples or chains, or raise max_token_entries if the memory is there."
        )


def check_finite(losses: torch.Tensor, fn_name: str, what: str) -> None:
    """Refuse non-finite losses at w*, naming the function and the positions."""
    bad = (~torch.isfinite(losses)).nonzero().flatten()
    if bad.numel():
        raise ValueError(
            f"{fn_name} gives non-finite values at the current weights for {bad.numel()} {what}(s) "
            f"(positions {bad[:10].tolist()}); the BIF needs finite losses. Check the inputs and the model."
        )
