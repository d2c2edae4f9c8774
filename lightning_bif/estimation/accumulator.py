"""Streaming per-chain moments of the tracked losses, and the BIF statistics computed from them.

Memory is fixed by the shapes, not by the number of draws: per chain, sums of the shifted
losses, their squares and the probe × train cross products (float64). Losses are shifted by
their value at w* before accumulating, which keeps the sums of products well conditioned even
when the posterior spread of a loss is tiny compared to the loss itself.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .control_variates import Subspace

_SUMS = ("count", "sum_train", "sum_probe", "sumsq_train", "sumsq_probe", "cross")
_STATE = (*_SUMS, "draw_loss", "sampling_loss", "sum_coordinates", "cross_coordinates")


@dataclass
class BIFStatistics:
    """What the accumulated moments say, for the healthy (non-diverged) chains.

    Attributes:
        influence: ``-Cov(φ_j, ℓ_i)`` over all pooled draws, ``[P, N]``.
        correlation: The Pearson correlation of the same pair, ``[P, N]``.
        stderr: Standard error of ``influence`` from the spread of per-chain estimates, ``[P, N]``.
        split_half: Correlation between the influence matrices of two disjoint halves of the chains.
        mean_shift_train: Posterior mean of ``ℓ_i(w) - ℓ_i(w*)``, ``[N]``.
        healthy: Which chains entered the statistics, ``[C]``.
        constant_probes: Probes whose observable took one value in every pooled draw, ``[P]`` bool
            (their BIF is 0 and correlations with them are undefined); ``None`` without healthy chains.
    """

    influence: torch.Tensor
    correlation: torch.Tensor
    stderr: torch.Tensor
    split_half: float
    mean_shift_train: torch.Tensor
    healthy: torch.Tensor
    constant_probes: torch.Tensor | None = None


class CovarianceAccumulator:
    """Per-chain sums of tracked losses over SGLD draws.

    Args:
        chains: Total number of chains C (a chain's row stays zero until it is added to).
        train_loss: Losses of the tracked training examples at w*, ``[N]`` (as in ``BIFResult``); every
            draw is accumulated as its shift from them, which keeps the float64 sums well conditioned.
        probe_loss: Probe observables at w*, ``[P]``; likewise.
        draws: Draws per chain D, for the per-draw traces.
        subspace: With subspace control variates (:mod:`lightning_bif.estimation.control_variates`), the eigenbasis
            and projected gradients: the coordinates of every draw in it are accumulated too, and the
            statistics drop the off-diagonal noise of the linear part.
    """

    def __init__(self, chains: int, train_loss: torch.Tensor, probe_loss: torch.Tensor, draws: int,
                 subspace: Subspace | None = None) -> None:
        device = train_loss.device
        f64 = torch.float64
        n, p = train_loss.numel(), probe_loss.numel()
        self.train_loss = train_loss.to(f64)
        self.probe_loss = probe_loss.to(f64)
        self.count = torch.zeros(chains, dtype=f64, device=device)
        self.sum_train = torch.zeros(chains, n, dtype=f64, device=device)
        self.sum_probe = torch.zeros(chains, p, dtype=f64, device=device)
        self.sumsq_train = torch.zeros(chains, n, dtype=f64, device=device)
        self.sumsq_probe = torch.zeros(chains, p, dtype=f64, device=device)
        self.cross = torch.zeros(chains, p, n, dtype=f64, device=device)
        self.draw_loss = torch.zeros(chains, draws, dtype=f64, device=device)
        self.sampling_loss = torch.zeros(chains, draws, dtype=f64, device=device)
        self.subspace = subspace
        rank = 0 if subspace is None else subspace.rank
        self.sum_coordinates = torch.zeros(chains, rank, dtype=f64, device=device)
        self.cross_coordinates = torch.zeros(chains, rank, rank, dtype=f64, device=device)

    def add(
        self,
        chains: torch.Tensor,
        index: int,
        train: torch.Tensor,
        probe: torch.Tensor,
        sampling_loss: torch.Tensor,
        params: torch.Tensor | None = None,
        center: torch.Tensor | None = None,
    ) -> None:
        """Add one draw of the chains ``chains [G]``: train losses ``[G, N]``, probes ``[G, P]``.

        With a subspace, also the draw's parameters ``params [G, D]`` and w* ``center [D]``.
        """
        t = train.to(torch.float64) - self.train_loss
        q = probe.to(torch.float64) - self.probe_loss
        self.count.index_add_(0, chains, torch.ones_like(chains, dtype=torch.float64))
        self.sum_train.index_add_(0, chains, t)
        self.sum_probe.index_add_(0, chains, q)
        self.sumsq_train.index_add_(0, chains, t.square())
        self.sumsq_probe.index_add_(0, chains, q.square())
        self.cross.index_add_(0, chains, q.unsqueeze(2) * t.unsqueeze(1))
        self.draw_loss[chains, index] = train.to(torch.float64).mean(dim=1)
        self.sampling_loss[chains, index] = sampling_loss.to(torch.float64)
        if self.subspace is not None:
            if params is None or center is None:
                raise ValueError("A CovarianceAccumulator with a subspace needs each draw's params and center.")
            z = self.subspace.coordinates(params, center)
            self.sum_coordinates.index_add_(0, chains, z)
            self.cross_coordinates.index_add_(0, chains, z.unsqueeze(2) * z.unsqueeze(1))

    @property
    def chains(self) -> int:
        """Rows of the accumulator (chains run or still to run)."""
        return self.count.shape[0]

    def grow(self, chains: int) -> None:
        """Make room for ``chains`` chains in all (a round of more chains); the rows added are zero."""
        extra = chains - self.chains
        if extra <= 0:
            return
        for name in _STATE:
            tensor = getattr(self, name)
            setattr(self, name, torch.cat([tensor, tensor.new_zeros((extra, *tensor.shape[1:]))]))

    def mapped(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> CovarianceAccumulator:
        """A copy whose state tensors are ``fn`` of this one's (e.g. summed over DDP ranks); this one is unchanged."""
        other = copy.copy(self)
        for name in _STATE:
            setattr(other, name, fn(getattr(self, name)))
        return other

    def split_half(self, probes: int | None = None) -> float:
        """The split-half reliability of the healthy chains (:meth:`statistics`'s, without the rest)."""
        ids = self.healthy_chains().nonzero().flatten()
        return self._split_half(ids, probes) if ids.numel() >= 2 else math.nan

    def _split_half(self, ids: torch.Tensor, probes: int | None) -> float:
        half_a, half_b = (self._pooled(half)[0][:probes] for half in (ids[0::2], ids[1::2]))
        return _pearson(half_a.flatten(), half_b.flatten())

    def tensors(self) -> list[torch.Tensor]:
        """The accumulated state; chains are disjoint across ranks, so summing these merges runs."""
        return [getattr(self, name) for name in _STATE]

    def _finite_chains(self) -> torch.Tensor:
        finite = torch.ones_like(self.count, dtype=torch.bool)
        for tensor in self.tensors():
            finite &= torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
        return finite

    def healthy_chains(self) -> torch.Tensor:
        """Chains with at least two draws and only finite values, ``[C]`` bool."""
        return self._finite_chains() & (self.count >= 2)

    def diverged_chains(self) -> torch.Tensor:
        """Chains that have draws with non-finite values, ``[C]`` bool.

        Chains that were not run here (another rank's share, before merging) have no draws and
        are not counted as diverged.
        """
        return ~self._finite_chains() & (self.count > 0)

    def _pooled(self, chains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Covariance ``[P, N]``, variances and train mean shift of the draws pooled over ``chains``."""
        n = self.count[chains].sum()
        mean_t = self.sum_train[chains].sum(0) / n
        mean_q = self.sum_probe[chains].sum(0) / n
        cov = (self.cross[chains].sum(0) - n * mean_q[:, None] * mean_t[None, :]) / (n - 1)
        var_t = (self.sumsq_train[chains].sum(0) - n * mean_t.square()) / (n - 1)
        var_q = (self.sumsq_probe[chains].sum(0) - n * mean_q.square()) / (n - 1)
        if self.subspace is not None:
            mean_z = self.sum_coordinates[chains].sum(0) / n
            cov_z = (self.cross_coordinates[chains].sum(0) - n * mean_z[:, None] * mean_z[None, :]) / (n - 1)
            cov = cov - self.subspace.correction(cov_z)
            # The same correction on the variances keeps correlations consistent (a duplicate's is 1).
            var_t = var_t - self.subspace.variance_correction(cov_z, self.subspace.train)
            var_q = var_q - self.subspace.variance_correction(cov_z, self.subspace.probe)
        return cov, var_t.clamp_min(0), var_q.clamp_min(0), mean_t

    def statistics(self, split_half_probes: int | None = None) -> BIFStatistics:
        """BIF, correlation, standard errors and split-half reliability over the healthy chains.

        Args:
            split_half_probes: How many leading probe columns the split-half reliability compares
                (default all), so that extra observables after the probes (per-token losses) leave
                it as it is without them.
        """
        healthy = self.healthy_chains()
        ids = healthy.nonzero().flatten()
        p, n = self.cross.shape[1:]
        nan = torch.full((p, n), math.nan, dtype=torch.float64, device=self.count.device)
        if ids.numel() == 0:
            return BIFStatistics(nan, nan.clone(), nan.clone(), math.nan, nan[0].clone(), healthy)
        cov, var_t, var_q, mean_t = self._pooled(ids)
        scale = (var_q[:, None] * var_t[None, :]).sqrt()
        correlation = torch.where(scale > 0, cov / scale.clamp_min(1e-300), torch.zeros_like(cov)).clamp(-1, 1)
        if ids.numel() >= 2:
            per_chain = torch.stack([self._pooled(c.view(1))[0] for c in ids])
            stderr = per_chain.std(dim=0, unbiased=True) / math.sqrt(ids.numel())
            split_half = self._split_half(ids, split_half_probes)
        else:
            stderr, split_half = nan, math.nan
        return BIFStatistics(-cov, correlation, stderr, split_half, mean_t, healthy, constant_probes=var_q == 0)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = (a.square().sum() * b.square().sum()).sqrt()
    return float((a * b).sum() / denom) if denom > 0 else math.nan


def effective_sample_size(trace: torch.Tensor) -> float:
    """Effective number of independent draws in ``trace [C, D]`` (chains × draws).

    The autocorrelation is averaged over chains and summed with Geyer's initial positive
    sequence; ESS = C·D / τ. Returns NaN for fewer than 4 draws or a constant trace.
    """
    trace = trace[torch.isfinite(trace).all(dim=1)].to(torch.float64)
    chains, draws = trace.shape
    if chains == 0 or draws < 4:
        return math.nan
    centred = trace - trace.mean(dim=1, keepdim=True)
    spectrum = torch.fft.rfft(centred, n=2 * draws, dim=1)
    autocov = torch.fft.irfft(spectrum * spectrum.conj(), dim=1)[:, :draws] / draws
    if float(autocov[:, 0].mean()) <= 0:
        return math.nan
    rho = (autocov / autocov[:, :1].clamp_min(1e-300)).mean(dim=0)
    tau = -1.0
    for lag in range(0, draws - 1, 2):
        pair = float(rho[lag] + rho[lag + 1])
        if pair <= 0:
            break
        tau += 2 * pair
    return chains * draws / max(tau, 1e-12)
