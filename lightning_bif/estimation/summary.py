"""``summarize``: (merged) accumulated draws turned into a :class:`~lightning_bif.estimation.result.BIFResult`."""

from __future__ import annotations

import math

import torch

from ..config import SGLDConfig
from ..tuning.autotune import Tuning
from ..tuning.horizon import HorizonCheck
from .accumulator import CovarianceAccumulator, effective_sample_size
from .divergence import loss_rise_bound, suspect_rise_bound
from .result import BIFResult, Diagnostics


def summarize(
    accumulator: CovarianceAccumulator,
    *,
    probes: int,
    tokens: int | None,
    train_loss: torch.Tensor,
    probe_loss: torch.Tensor,
    dim: int,
    nbeta: float,
    vectorized: bool,
    horizon: HorizonCheck | None,
    tuning: Tuning,
    config: SGLDConfig,
    duration_s: float,
    data_nbeta: float | None = None,
) -> BIFResult:
    """The influence, correlations, standard errors and diagnostics of the accumulated draws.

    Args:
        accumulator: The (merged) accumulated draws.
        probes: P, the number of probes (the observables after the first P are per-token losses).
        tokens: Tokens per probe with a per-token estimate, else ``None``.
        train_loss: The tracked training losses at w* ``[N]``.
        probe_loss: The probe observables at w*.
        dim: D, the number of sampled parameters.
        nbeta: The inverse temperature nβ.
        vectorized: Whether the chains ran under vmap.
        horizon: The horizon check, when one was configured.
        tuning: What was chosen automatically and why.
        config: The resolved config.
        duration_s: The estimate's wall time (recorded, never decides anything).
        data_nbeta: n, where the locality rule sampled at nβ > n (:mod:`lightning_bif.tuning.locality`): the
            influence and its standard errors are then reported at the data's own nβ, -(nβ/n)·Cov, the same
            linear response (-Cov scales as 1/nβ there); ``None``: -Cov as sampled.
    """
    stats = accumulator.statistics(split_half_probes=probes)
    scale = nbeta / data_nbeta if data_nbeta is not None else 1.0
    healthy = stats.healthy
    rise = float(stats.mean_shift_train.mean()) if healthy.any() else math.nan
    diagnostics = Diagnostics(
        sampling_loss=accumulator.sampling_loss.float().cpu(),
        draw_loss=accumulator.draw_loss.float().cpu(),
        diverged=accumulator.diverged_chains().cpu(),
        loss_rise=rise,
        split_half=stats.split_half,
        ess=effective_sample_size(accumulator.draw_loss[healthy]),
        vectorized=vectorized,
        nbeta=nbeta,
        duration_s=duration_s,
        horizon=horizon,
        tuning=tuning,
        loss_rise_bound=loss_rise_bound(dim, nbeta, float(train_loss.double().mean())),
        suspect_rise_bound=suspect_rise_bound(dim, nbeta, float(train_loss.mean())),
        constant_probes=0 if stats.constant_probes is None else int(stats.constant_probes[:probes].sum()),
    )
    per_token = {}
    if tokens is not None:
        shape = (probes, tokens, -1)
        per_token = {"token_influence": (scale * stats.influence[probes:]).reshape(shape).float().cpu(),
                     "token_stderr": (scale * stats.stderr[probes:]).reshape(shape).float().cpu()}
    return BIFResult(
        influence=(scale * stats.influence[:probes]).float().cpu(),
        correlation=stats.correlation[:probes].float().cpu(),
        stderr=(scale * stats.stderr[:probes]).float().cpu(),
        train_loss=train_loss.float().cpu(),
        probe_loss=probe_loss[:probes].float().cpu(),
        diagnostics=diagnostics,
        config=config,
        **per_token,
    )
