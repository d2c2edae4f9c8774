"""``run_chains``: chains run in batches into an accumulator, splitting a batch on OOM or a failure under vmap;
``runaway``: whether the chains left the region the posterior describes."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import SGLDConfig
from .accumulator import CovarianceAccumulator
from .sampler import ProgressFn, SGLDSampler
from .tracked_losses import TrackedLosses


@dataclass
class SampledChains:
    """The draws of :func:`run_chains` and how they ran.

    Attributes:
        accumulator: The accumulated draws.
        vectorized: Whether the chains ran under vmap to the end (``False`` after a fallback).
        sequential_reason: Why chains fell back to running one after another while sampling, or ``None``.
    """

    accumulator: CovarianceAccumulator
    vectorized: bool
    sequential_reason: str | None


def run_chains(
    sampler: SGLDSampler,
    losses: TrackedLosses,
    config: SGLDConfig,
    accumulator: CovarianceAccumulator,
    chains: Sequence[int],
    vectorized: bool,
    progress: ProgressFn | None = None,
) -> SampledChains:
    """Run the chains ``chains`` with ``sampler`` and add the tracked losses of their draws to ``accumulator``.

    Args:
        sampler: The SGLD sampler, with every setting resolved.
        losses: The tracked losses evaluated at each draw.
        config: The resolved config (``chains_per_batch`` and ``vectorize`` decide the batches and the fallback).
        accumulator: Where the draws go.
        chains: The chains to run.
        vectorized: Whether chains start out under vmap.
        progress: Called as ``progress(done_steps, total_steps)``.
    """
    cfg = config
    sequential_reason = None
    size = (cfg.chains_per_batch or cfg.chains) if vectorized else 1
    # Without an explicit chains_per_batch, a batch of chains that runs out of GPU memory is split in
    # halves and rerun. Its partial draws are dropped first; a chain's draws depend only on
    # (seed, chain), so the rerun yields exactly what a smaller batch would have.
    split_on_oom = vectorized and cfg.chains_per_batch is None
    chains = list(chains)
    total = len(chains) * sampler.steps_per_chain
    start = 0
    while start < len(chains):
        batch = chains[start:start + size]
        step_progress = None if progress is None else _batch_progress(
            progress, start * sampler.steps_per_chain, len(batch), total
        )
        try:
            for draw in sampler.run(batch, vectorized, step_progress):
                train, probe = losses.evaluate(losses.fmodel, draw.params, vectorized)
                accumulator.add(draw.chains, draw.index, train, probe, draw.sampling_loss, draw.params,
                                losses.fmodel.center)
        except torch.cuda.OutOfMemoryError:
            if not split_on_oom or len(batch) == 1:
                raise
            out_of_memory, vmap_failure = True, None
        except Exception as error:
            # A draw can take a path the trial before sampling did not (another minibatch, larger
            # weights): under "auto" the batch reruns one chain at a time, as it would have run
            # had the trial failed. Its draws do not depend on the batch, so the rerun is exact.
            if not vectorized or cfg.vectorize != "auto":
                raise
            out_of_memory, vmap_failure = False, f"{type(error).__name__}: {str(error)[:300]}"
        else:
            out_of_memory, vmap_failure = False, None
        if out_of_memory:  # outside the except block, so the failed batch's tensors are freed
            forget_chains(accumulator, batch)
            size = len(batch) // 2
            warnings.warn(f"{len(batch)} chains at once ran out of GPU memory; running {size} at a time.",
                          stacklevel=3)
            continue
        if vmap_failure is not None:
            forget_chains(accumulator, batch)
            vectorized, size, split_on_oom = False, 1, False
            sequential_reason = f"torch.func.vmap failed during sampling ({vmap_failure})"
            warnings.warn(f"Chains run one after another from here on: {sequential_reason}.", stacklevel=3)
            continue
        start += len(batch)
    return SampledChains(accumulator, vectorized, sequential_reason)


def runaway(accumulator: CovarianceAccumulator, dim: int, nbeta: float, train_loss: torch.Tensor) -> str | None:
    """Why the chains left the region the posterior describes, or ``None``.

    Under the Laplace approximation the localized posterior's mean rise of the training loss is
    ½·tr(H·Σ) with Σ ⪯ (nβ·H)⁻¹, so at most D/(2nβ); twice that leaves room for the step's
    discretization and minibatch noise, and away from a minimum a rise of the order of the loss
    itself is legitimate (:mod:`lightning_bif.estimation.divergence`). A diverged chain or a mean rise above
    max(D/nβ, mean loss at w*) is a runaway: far below the bound at which a snapshot counts as diverged.

    Args:
        accumulator: The accumulated draws.
        dim: D, the number of sampled parameters.
        nbeta: The inverse temperature nβ.
        train_loss: The tracked training losses at w* ``[N]``.
    """
    diverged = int(accumulator.diverged_chains().sum())
    if diverged:
        return f"{diverged} chains diverged"
    healthy = accumulator.healthy_chains()
    if not healthy.any():
        return None
    rise = float((accumulator.sum_train[healthy].sum(0) / accumulator.count[healthy].sum()).mean())
    bound = max(dim / nbeta, float(train_loss.double().abs().mean()))
    return f"mean loss rise {rise:.3g} > max(D/nβ, loss at w*) = {bound:.3g}" if rise > bound else None


def forget_chains(accumulator: CovarianceAccumulator, chains: list[int]) -> None:
    """Zero the accumulated draws of ``chains`` (every accumulator tensor has a leading chain axis)."""
    for tensor in accumulator.tensors():
        tensor[chains] = 0


def _batch_progress(progress: ProgressFn, done_before: int, batch_size: int, total: int) -> ProgressFn:
    """Report a batch's per-chain step count as steps done over all chains."""
    return lambda done, _: progress(done_before + done * batch_size, total)
