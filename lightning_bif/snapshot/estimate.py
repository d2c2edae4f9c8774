"""``estimate_bif``: one BIF snapshot of any ``nn.Module`` at its current weights, in one call."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import SGLDConfig
from ..curvature.cache import CurvatureCache
from ..estimation.result import BIFResult
from ..estimation.sampler import ProgressFn
from ..example_sets import Batch, ExampleSource
from .snapshotter import Snapshotter


def estimate_bif(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    train: ExampleSource,
    probes: ExampleSource,
    *,
    probe_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
    data: ExampleSource | None = None,
    config: SGLDConfig | None = None,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
    cache: CurvatureCache | None = None,
) -> BIFResult:
    """Estimate the local Bayesian influence of each training example on each probe.

    Runs ``config.chains`` localized SGLD chains from the model's current weights w* (then more, in rounds, until
    the split-half reliability reaches ``config.target_split_half`` or ``max_seconds`` / ``max_chains`` is spent;
    ``result.diagnostics.precision`` says how it went) and returns
    ``BIF(z_i → φ_j) = -Cov(ℓ_i(w), φ_j(w))`` over the draws, with correlations,
    per-entry standard errors and sampler diagnostics. The model is left exactly as it was
    (parameters, gradients, buffers, train/eval mode) and the global RNG is not advanced. A
    half-precision model is sampled as a float32 copy (:class:`~lightning_bif.snapshot.snapshotter.Snapshotter`).

    Args:
        model: Any ``nn.Module`` at the weights to explain.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``: per-example losses (``[B, T]``
            per-token losses are averaged over T; ``[B, 1]`` is read as ``[B]`` with a note; a
            square ``[B, B]``, the broadcasting bug, is refused). Drives SGLD and gives ℓ_i.
        train: The training examples whose influence is measured (``Dataset``, ``Subset``,
            ``DataLoader`` or tuple of tensors); N examples.
        probes: The probe examples (same kinds); P examples.
        probe_fn: ``probe_fn(model, batch) -> Tensor[B]``, the probe observable φ_j;
            defaults to ``loss_fn``. With ``config.per_token`` it must return ``[B, T]``.
        data: Where SGLD minibatches come from; defaults to ``train``.
        config: Sampler settings; defaults to ``SGLDConfig()``.
        device: Where to compute; defaults to the device of the model's parameters.
        progress: Called as ``progress(done_steps, total_steps)`` during sampling.
        cache: A :class:`~lightning_bif.curvature.cache.CurvatureCache` shared by several estimates (e.g.
            of nearby weights): the curvature at w* is reused from it while fresh.

    Returns:
        A :class:`BIFResult` with ``[P, N]`` matrices.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_bif import SGLDConfig, estimate_bif
        >>> x, y = torch.randn(64, 3), torch.randn(64)
        >>> model = nn.Linear(3, 1)
        >>> mse = lambda m, b: (m(b[0]).squeeze(-1) - b[1]).square()
        >>> result = estimate_bif(model, mse, (x, y), (x[:4], y[:4]),
        ...                       config=SGLDConfig(chains=2, draws=20, burn_in=10))
        >>> result.influence.shape
        torch.Size([4, 64])

    References:
        Kreer et al. 2025, "Bayesian Influence Functions for Hessian-Free Data Attribution".
    """
    taken = Snapshotter(loss_fn, train, probes, probe_fn=probe_fn, data=data, cache=cache).take(
        model, config or SGLDConfig(), device=device, progress=progress)
    if taken.error is not None:
        raise taken.error
    return taken.result
