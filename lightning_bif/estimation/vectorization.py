"""``choose_vectorized``: whether an estimate's chains run together under ``torch.func.vmap``, and why not."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import SGLDConfig
from .sampler import SGLDSampler
from .tracked_losses import TrackedLosses

# On a CPU, chains run one after another under vectorize="auto" when one chain's SGLD step takes this long.
CPU_VMAP_MAX_STEP_S = 0.005


@dataclass(frozen=True)
class Vectorization:
    """Whether chains run under vmap, and why not (``None`` when they do, or when ``vectorize=False`` says so)."""

    vectorized: bool
    sequential_reason: str | None = None


def choose_vectorized(
    config: SGLDConfig, device: torch.device, losses: TrackedLosses, sampler: SGLDSampler
) -> Vectorization:
    """Resolve ``config.vectorize``.

    "auto" runs chains one after another on a CPU when one chain's SGLD step takes at least
    ``CPU_VMAP_MAX_STEP_S``, and otherwise tries vmap once on every function a draw runs
    (:func:`vmap_error`), falling back on failure. On a CPU, vmap only saves per-call overhead,
    while its batched matmuls run slower than one matmul per chain: once a step is long enough
    for overhead not to matter, vmap loses (docs/benchmarks.md, "Speed", has the measurements
    behind the threshold). Both ways give the same draws up to float rounding. ``True`` is checked
    the same way and refused with the failing function named.

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
        seconds = _one_chain_step_seconds(losses, sampler)
        if seconds >= CPU_VMAP_MAX_STEP_S:
            return Vectorization(False, f"one chain's SGLD step takes {seconds * 1e3:.1f} ms on the CPU, where "
                                        f"vmap is slower from {CPU_VMAP_MAX_STEP_S * 1e3:g} ms on")
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


def _one_chain_step_seconds(losses: TrackedLosses, sampler: SGLDSampler) -> float:
    """Wall time of one SGLD gradient step of one chain (at most two calls)."""
    batch, shared = sampler.example_minibatch(chains=1, vectorized=False)
    center = losses.fmodel.center[None]

    def seconds() -> float:
        start = time.perf_counter()
        losses.fmodel.batched_grads(center, batch, sampler.minibatch, losses.loss_fn, losses.buffers,
                                    vectorized=False, shared_batch=shared)
        return time.perf_counter() - start

    # The first call also pays one-time costs, so it can only overstate: when it is below the
    # threshold it decides; otherwise a second call measures the step itself.
    first = seconds()
    return first if first < CPU_VMAP_MAX_STEP_S else seconds()
