"""``choose_vectorized``: whether an estimate's chains run together under ``torch.func.vmap``, and why not."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import SGLDConfig
from .sampler import SGLDSampler
from .tracked_losses import TrackedLosses

#: On a CPU, chains run one after another under vectorize="auto" when one chain's SGLD step counts this many
#: FLOPs (:func:`step_flops`) or more. A count, not a clock, so that a seed takes the same path on an idle and a
#: busy machine. From benchmarks/vmap_threshold.py (docs/benchmarks.md, "Speed"): 8 chains batched under vmap
#: ran 2-6x faster than one by one up to ~30 MFLOP a step and on par from ~100 MFLOP (about the old 5 ms a step).
CPU_VMAP_MAX_STEP_FLOPS = 50_000_000


@dataclass(frozen=True)
class Vectorization:
    """Whether chains run under vmap, and why not (``None`` when they do, or when ``vectorize=False`` says so)."""

    vectorized: bool
    sequential_reason: str | None = None


def choose_vectorized(
    config: SGLDConfig, device: torch.device, losses: TrackedLosses, sampler: SGLDSampler
) -> Vectorization:
    """Resolve ``config.vectorize``.

    "auto" runs chains one after another on a CPU when one chain's SGLD step counts at least
    ``CPU_VMAP_MAX_STEP_FLOPS`` (:func:`step_flops`), and otherwise tries vmap once on every function a
    draw runs (:func:`vmap_error`), falling back on failure. On a CPU, vmap only saves per-call overhead,
    while its batched matmuls run slower than one matmul per chain: once a step is large enough for
    overhead not to matter, vmap loses. The rule reads sizes, never a clock: the same model, data and
    config take the same path however busy the machine is. Both ways give the same draws up to float
    rounding. ``True`` is checked the same way and refused with the failing function named.

    Args:
        config: The estimate's config.
        device: Where the chains run.
        losses: The functions a draw evaluates.
        sampler: The SGLD sampler (for the SGLD gradient and an example minibatch).

    Raises:
        ValueError: With ``vectorize=True`` when vmap cannot run one of the functions.
    """
    if config.vectorize is False:
        return Vectorization(False)
    if config.vectorize == "auto" and device.type == "cpu":
        flops = step_flops(losses, sampler)
        if flops >= CPU_VMAP_MAX_STEP_FLOPS:
            return Vectorization(False, f"one chain's SGLD step counts {flops / 1e6:.3g} MFLOP, and on a CPU vmap "
                                        f"is slower from {CPU_VMAP_MAX_STEP_FLOPS / 1e6:g} MFLOP on")
    error = vmap_error(config, losses, sampler)
    if error is None:
        return Vectorization(True)
    if config.vectorize is True:
        raise ValueError(f"SGLDConfig(vectorize=True), but {error} Use vectorize='auto' (falls back to "
                         "running chains one after another) or vectorize=False.")
    warnings.warn(f"Chains run one after another because {error} Set SGLDConfig(vectorize=False) to silence this.",
                  stacklevel=4)  # the line that called BIFEstimator.prepare or decide_vectorized
    return Vectorization(False, error)


def vmap_error(config: SGLDConfig, losses: TrackedLosses, sampler: SGLDSampler) -> str | None:
    """Why ``torch.func.vmap`` cannot run this estimate's functions, or ``None`` when it can.

    Runs each function a snapshot calls, for two copies of w*: the SGLD gradient of ``loss_fn``
    on a minibatch, ``loss_fn`` on the tracked examples and ``probe_fn`` on the probes
    (per-token when configured).
    """
    fmodel = losses.fmodel
    probe = fmodel.center.expand(2, -1)
    buffers, tokens = losses.buffers, config.per_token
    batch, shared = sampler.example_minibatch(chains=2)
    trials: list[tuple[str, Callable[[], object]]] = [
        ("the SGLD gradient of loss_fn", lambda: fmodel.batched_grads(
            probe, batch, sampler.minibatch, losses.loss_fn, buffers, vectorized=True, shared_batch=shared)),
        *[("loss_fn on the tracked examples", lambda s=size, b=train: fmodel.batched_losses(
            probe, b, s, losses.loss_fn, buffers, "loss_fn", True)) for size, train in losses.train],
        *[("probe_fn on the probes", lambda s=size, b=probes: fmodel.batched_losses(
            probe, b, s, losses.probe_fn, buffers, "probe_fn", True, tokens))
          for size, probes in losses.probes],
    ]
    for what, trial in trials:
        try:
            trial()
        except Exception as error:  # any failure under vmap means: run chains one at a time
            if isinstance(error, torch.cuda.OutOfMemoryError) and config.vectorize is True:
                raise  # memory, not something vmap cannot run: chains_per_batch is the remedy
            return (f"torch.func.vmap failed on {what} ({type(error).__name__}: "
                    f"{str(error)[:300]}). Typical causes: Python control flow on a tensor value "
                    "(`if tensor...:`, `.item()`), stateful objects such as a torchmetrics Metric, or "
                    "data-dependent masking code.")
    return None


def step_flops(losses: TrackedLosses, sampler: SGLDSampler) -> int:
    """FLOPs of one SGLD gradient step of one chain on an example minibatch, as ``FlopCounterMode`` counts them.

    The count covers matrix products, convolutions and attention (the work that grows with the model and
    the minibatch, sequence length included) and depends only on shapes.
    """
    batch, shared = sampler.example_minibatch(chains=1, vectorized=False)
    with FlopCounterMode(display=False) as counter:
        losses.fmodel.batched_grads(losses.fmodel.center[None], batch, sampler.minibatch, losses.loss_fn,
                                    losses.buffers, vectorized=False, shared_batch=shared)
    return counter.get_total_flops()
