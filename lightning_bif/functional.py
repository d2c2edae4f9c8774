"""A functional view of a model: sampled parameters as one flat vector per chain, losses as pure functions.

Nothing here writes to the user's module: parameters and buffers are passed to
``torch.func.functional_call`` as separate tensors (buffers as private copies, so even a
forward that updates a buffer in place leaves the model's own buffers alone).
"""

from __future__ import annotations

import copy
import fnmatch
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten

from .example_sets import Batch

LossFn = Callable[[nn.Module, Batch], torch.Tensor]


class _LossCall(nn.Module):
    """Wraps ``fn(model, batch)`` as a module so ``functional_call`` can swap the model's tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.fn: LossFn | None = None

    def forward(self, batch: Batch) -> torch.Tensor:
        assert self.fn is not None
        return self.fn(self.model, batch)


def check_losses(losses: torch.Tensor, batch_size: int, what: str, tokens: bool = False) -> torch.Tensor:
    """Validate a loss function's output for a batch and reduce it to one loss per example.

    Extra trailing dimensions (per-token losses ``[B, T]``) are averaged per example, unless
    ``tokens`` asks for the per-token losses ``[B, T]`` themselves. ``[B, 1]`` is one loss per
    example (noted once); a square ``[B, B]`` is refused as a broadcasting bug, unless ``tokens``.
    """
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"{what} must return a Tensor of per-example losses, got {type(losses).__name__}.")
    if losses.ndim == 0:
        raise ValueError(
            f"{what} returned a scalar, but one loss per example is needed: a Tensor of shape "
            f"[{batch_size}] for this batch. Compute the loss with reduction='none'."
        )
    if losses.shape[0] != batch_size:
        raise ValueError(
            f"{what} returned shape {tuple(losses.shape)} for a batch of {batch_size} examples; "
            f"expected [{batch_size}] (or [{batch_size}, T] for per-token losses)."
        )
    if tokens:
        if losses.ndim != 2:
            raise ValueError(
                f"{what} returned shape {tuple(losses.shape)}, but SGLDConfig(per_token=True) needs per-token "
                f"losses of shape [{batch_size}, T]: return the loss with reduction='none' before averaging over "
                "tokens (0 at padded positions), or set per_token=False."
            )
        return losses
    if losses.ndim == 2 and losses.shape[1] == batch_size > 1:
        raise ValueError(
            f"{what} returned shape {tuple(losses.shape)} for a batch of {batch_size} examples: a square "
            f"[{batch_size}, {batch_size}] is the classic broadcasting bug, e.g. (pred - y) ** 2 with pred of shape "
            f"[{batch_size}, 1] and y of shape [{batch_size}] pairs every prediction with every target. Squeeze the "
            f"prediction (pred.squeeze(-1) - y) to return [{batch_size}]. If these really are {batch_size} "
            f"per-token losses per example, average them over tokens in {what} and return [{batch_size}]."
        )
    if losses.ndim == 2 and losses.shape[1] == 1:
        _note_once(what, f"{what} returned shape {tuple(losses.shape)}: read as one loss per example. Return "
                         f"shape [{batch_size}] (e.g. loss.squeeze(-1)) to silence this note.")
    return losses.reshape(batch_size, -1).mean(dim=1) if losses.ndim > 1 else losses


_noted: set[str] = set()


def _note_once(key: str, message: str) -> None:
    """Warn once per process and key: the loss functions run at every draw of every snapshot."""
    if key not in _noted:
        _noted.add(key)
        warnings.warn(message, stacklevel=3)


def select_parameters(model: nn.Module, patterns: tuple[str, ...] | None) -> list[str]:
    """Names of the parameters to sample: those that require grad and match a pattern."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if patterns is not None:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not names:
            available = [n for n, _ in model.named_parameters()]
            raise ValueError(
                f"sample_params={list(patterns)} matches no trainable parameter; parameter names are "
                f"{available[:20]}{' ...' if len(available) > 20 else ''}."
            )
    if not names:
        raise ValueError("The model has no parameter that requires grad: there is nothing to sample.")
    return names


class FunctionalModel:
    """The model seen as ``loss(flat_params, batch)``, with the sampled parameters flattened.

    Args:
        model: The module; never modified.
        sample_params: Glob patterns of the parameters to sample (``None``: all trainable).
        device: Where the flat parameters, frozen tensors and buffers live.
        autocast: ``"bf16"`` or ``"fp16"`` to run every loss evaluation under ``torch.autocast``.
    """

    def __init__(
        self, model: nn.Module, sample_params: tuple[str, ...] | None, device: torch.device,
        autocast: str | None = None,
    ) -> None:
        self._call = _LossCall(model)
        self.device = device
        self.autocast_dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[autocast]
        self.names = select_parameters(model, sample_params)
        params = dict(model.named_parameters())
        sampled = [params[n].detach() for n in self.names]
        self.shapes = [p.shape for p in sampled]
        self.numels = [p.numel() for p in sampled]
        dtypes = {p.dtype for p in sampled}
        if len(dtypes) != 1:
            raise ValueError(f"Sampled parameters must share one dtype; got {sorted(map(str, dtypes))}.")
        self.center = torch.cat([p.reshape(-1) for p in sampled]).to(device=device, copy=True)
        chosen = set(self.names)
        self._frozen = {f"model.{n}": p.detach().to(device) for n, p in params.items() if n not in chosen}
        self._buffer_source = {f"model.{n}": b for n, b in model.named_buffers()}
        # Which loss function first ran, and on examples of which shapes: what a failing forward is compared with.
        self._ran_on: tuple[str, list[tuple[int, ...]]] | None = None

    @property
    def dim(self) -> int:
        """Number of sampled scalars D."""
        return self.center.numel()

    def _tensors(self, flat: torch.Tensor, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pieces = torch.split(flat, self.numels)
        sampled = {f"model.{n}": x.view(s) for n, x, s in zip(self.names, pieces, self.shapes, strict=True)}
        return {**self._frozen, **buffers, **sampled}

    def fresh_buffers(self) -> dict[str, torch.Tensor]:
        """Private copies of the model's buffers, on the working device."""
        return {n: b.detach().to(self.device, copy=True) for n, b in self._buffer_source.items()}

    def losses(
        self, flat: torch.Tensor, batch: Batch, size: int, fn: LossFn, buffers: dict[str, torch.Tensor], what: str,
        tokens: bool = False,
    ) -> torch.Tensor:
        """Per-example losses ``[size]`` (``tokens``: ``[size, T]``) of ``batch`` at the parameters ``flat [D]``."""
        self._call.fn = fn
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = functional_call(self._call, self._tensors(flat, buffers), (batch,))
        return check_losses(out, size, what, tokens)

    def batched_losses(
        self,
        flat: torch.Tensor,
        batch: Batch,
        size: int,
        fn: LossFn,
        buffers: dict[str, torch.Tensor],
        what: str,
        vectorized: bool,
        tokens: bool = False,
    ) -> torch.Tensor:
        """Per-example losses ``[G, size]`` (``tokens``: ``[G, size, T]``) at parameters ``flat [G, D]``, no grad.

        Run one chain at a time (how the losses are first checked), a forward that fails on examples
        shaped unlike those the model ran on raises a ``ValueError`` naming the set and both shapes.
        """
        with torch.no_grad():
            if vectorized:
                return vmap(lambda f: self.losses(f, batch, size, fn, buffers, what, tokens))(flat)
            try:
                out = torch.stack([self.losses(f, batch, size, fn, buffers, what, tokens) for f in flat])
            except RuntimeError as error:
                explained = self._explain_forward_error(batch, what, error)
                if explained is None:
                    raise
                raise explained from error
        if self._ran_on is None:
            self._ran_on = (what, _example_shapes(batch))
        return out

    def _explain_forward_error(self, batch: Batch, what: str, error: RuntimeError) -> ValueError | None:
        """Which set a failed forward ran on, its example shapes and those the model ran on (``None``: no clue)."""
        shapes = _example_shapes(batch)
        if isinstance(error, torch.OutOfMemoryError) or (self._ran_on is not None and self._ran_on[1] == shapes):
            return None
        examples = "the probes" if what == "probe_fn" else "the tracked training examples"
        expected = "" if self._ran_on is None else (
            f", while the model ran on {'the probes' if self._ran_on[0] == 'probe_fn' else 'the training examples'} "
            f"with tensors of shape {_shapes_text(self._ran_on[1])} per example"
        )
        return ValueError(
            f"{what} failed on {examples} ({type(error).__name__}: {error}). Their tensors have shape "
            f"{_shapes_text(shapes)} per example{expected}. Prepare {examples.removeprefix('the ')} the way the "
            "training batches are prepared (same features, same preprocessing)."
        )

    def batched_grads(
        self,
        flat: torch.Tensor,
        batches: Batch,
        size: int,
        fn: LossFn,
        buffers: dict[str, torch.Tensor],
        vectorized: bool,
        shared_batch: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients ``[G, D]`` and values ``[G]`` of the mean loss, one minibatch per chain.

        ``batches`` is one batch for all chains when ``shared_batch``; otherwise it is stacked
        along a leading chain axis when ``vectorized`` and a list of per-chain batches if not.
        """

        def mean_loss(f: torch.Tensor, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            value = self.losses(f, b, size, fn, buffers, "loss_fn").mean()
            return value, value.detach()

        if vectorized:
            # vmap the forward only and let plain autograd run the batched backward: the chains
            # are independent, so the gradient of the summed losses is each chain's own gradient,
            # and the backward skips functorch's per-op wrapping (faster than vmap(grad(...))).
            leaf = flat.detach().requires_grad_(True)
            with torch.enable_grad():
                values = vmap(lambda f, b: mean_loss(f, b)[0], in_dims=(0, None if shared_batch else 0))(leaf, batches)
                (grads,) = torch.autograd.grad(values.sum(), leaf)
            return grads, values.detach()
        # Plain autograd one chain at a time, written straight into the [G, D] result: functorch's
        # grad transform and stacking per-chain results cost a third of a small model's step.
        per_chain = [batches] * flat.shape[0] if shared_batch else batches
        grads, values = torch.empty_like(flat), flat.new_empty(flat.shape[0])
        for row, (f, b) in enumerate(zip(flat, per_chain, strict=True)):
            leaf = f.detach().requires_grad_(True)
            with torch.enable_grad():
                value = mean_loss(leaf, b)[0]
                grads[row] = torch.autograd.grad(value, leaf)[0]
            values[row] = value.detach()
        return grads, values


def _example_shapes(batch: Batch) -> list[tuple[int, ...]]:
    """The shape of one example in each tensor of a batch (the batch dimension dropped)."""
    return [tuple(t.shape[1:]) for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]


def _shapes_text(shapes: list[tuple[int, ...]]) -> str:
    return ", ".join(str(list(s)) for s in shapes)


@contextmanager
def preserved_state(model: nn.Module, devices: list[torch.device]) -> Iterator[None]:
    """Put ``model`` in eval mode, fork the global RNGs and run ``torch.compile``d code eagerly; restore on exit.

    Every submodule's own ``torch.compile`` wrapper is bypassed (``set_stance("force_eager")``):
    a snapshot calling a compiled module with other shapes, under vmap or ``functional_call``
    would make dynamo recompile, and training would then run a different graph (e.g. one with
    dynamic shapes) whose floats differ in the last bits. Every submodule's own ``training``
    flag is restored, so mixed train/eval models come back exactly as they were.
    """
    modes = [(m, m.training) for m in model.modules()]
    cuda = [d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda"]
    with torch.random.fork_rng(devices=cuda), _eager():
        try:
            model.eval()
            yield
        finally:
            for module, training in modes:
                module.training = training


class _EagerStance:
    """Ignore ``torch.compile`` inside the block (``torch.compiler.set_stance`` exists from torch 2.6 on).

    The stance is global to the process: blocks that overlap (snapshots in several threads) share one
    ``force_eager`` entry, and the last to leave restores the stance the first one found. Each restoring
    its own would leave the process eager when they interleave.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._entered: AbstractContextManager[object] | None = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is None:
            yield
            return
        with self._lock:
            if self._depth == 0:
                self._entered = set_stance("force_eager")
                self._entered.__enter__()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._entered is not None:
                    self._entered.__exit__(None, None, None)
                    self._entered = None


_eager = _EagerStance()


def float32_model(module: nn.Module) -> nn.Module:
    """The module itself, or a float32 copy when its parameters are half precision (bf16-true, 16-true).

    SGLD steps of size ε·∇ vanish in bf16/fp16 rounding, so the estimate runs on float32 weights.
    Mixed-precision trainers keep float32 parameters and need no copy.
    """
    if all(p.dtype not in (torch.float16, torch.bfloat16) for p in module.parameters()):
        return module
    return copy.deepcopy(module).float()
