"""What one estimate returns: :class:`BIFResult` (the ``[probe, train]`` matrices) and its :class:`Diagnostics`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import SGLDConfig
from ..tuning.autotune import Tuning
from ..tuning.horizon import HorizonCheck
from .divergence import LOSS_RISE_MARGIN, SUSPECT_MARGIN
from .rounds import Precision


@dataclass
class Diagnostics:
    """How the sampling went.

    Attributes:
        sampling_loss: Mean SGLD minibatch loss per chain and draw, ``[C, D]``.
        draw_loss: Mean loss of the tracked training examples per chain and draw, ``[C, D]``.
        diverged: Chains that produced non-finite values and were left out, ``[C]``.
        loss_rise: Mean over draws and tracked examples of ``ℓ_i(w) - ℓ_i(w*)``: how far the
            chains climbed above w* (large values mean drift or too large a step size).
        split_half: Correlation between the BIF of two disjoint halves of the chains (NaN with
            fewer than two healthy chains); low values mean the estimate is mostly noise.
        ess: Effective sample size of ``draw_loss`` over all chains.
        vectorized: Whether chains ran batched with ``vmap``.
        nbeta: The nβ actually used.
        duration_s: Wall time of the estimate.
        horizon: With ``SGLDConfig(horizon_steps=...)``: how γ (and ε) were set from the horizon,
            with the Hessian's extreme eigenvalues (a negative ``lambda_min`` is a saddle, whose
            damping was raised by |λ_min|). ``None`` otherwise.
        tuning: The settings chosen automatically, the measurements they rest on (extreme and top
            eigenvalues) and whether the curvature was reused (:class:`~lightning_bif.tuning.autotune.Tuning`).
        loss_rise_bound: The largest mean loss rise a chain may show and still count as near w*
            (:func:`lightning_bif.estimation.divergence.loss_rise_bound`); a chain beyond it makes the result diverged.
        suspect_rise_bound: The largest mean loss rise a chain may show and still count as equilibrated
            near w* (:func:`lightning_bif.estimation.divergence.suspect_rise_bound`); a chain beyond it
            (and within ``loss_rise_bound``) makes the result suspect.
        constant_probes: How many probes took one value in every draw (their BIF is 0 and the
            split-half reliability cannot use them; NaN when every probe is constant).
        precision: The rounds of chains (:class:`~lightning_bif.estimation.rounds.Precision`): the target, the
            chains and draws used, and whether the budget ran out below the target; ``None`` when not recorded.
    """

    sampling_loss: torch.Tensor
    draw_loss: torch.Tensor
    diverged: torch.Tensor
    loss_rise: float
    split_half: float
    ess: float
    vectorized: bool
    nbeta: float
    duration_s: float
    horizon: HorizonCheck | None = None
    tuning: Tuning | None = None
    loss_rise_bound: float = math.inf
    suspect_rise_bound: float = math.inf
    constant_probes: int = 0
    precision: Precision | None = None

    @property
    def any_diverged(self) -> bool:
        """Whether at least one chain diverged."""
        return bool(self.diverged.any())


@dataclass
class BIFResult:
    """A BIF snapshot. Every matrix is ``[probe, train]``.

    Sign convention: ``influence = -Cov(ℓ_train, φ_probe)``; negative means up-weighting the
    training example lowers the probe's loss (helpful), positive means harmful.

    Attributes:
        influence: The BIF, ``[P, N]``.
        correlation: The posterior correlation of the same pair, ``[P, N]``.
        stderr: Standard error of each ``influence`` entry from per-chain estimates, ``[P, N]``.
        train_loss: Losses of the tracked training examples at w*, ``[N]``.
        probe_loss: Probe observables at w*, ``[P]``.
        diagnostics: Sampler diagnostics.
        config: The configuration that produced this result.
        token_influence: With ``config.per_token``, ``-Cov(ℓ_i, φ_{p,t})`` for the loss of probe p at
            token t, ``[P, T, N]``; its mean over T is ``influence``. ``None`` otherwise.
        token_stderr: Standard error of each ``token_influence`` entry, ``[P, T, N]``, or ``None``.
    """

    influence: torch.Tensor
    correlation: torch.Tensor
    stderr: torch.Tensor
    train_loss: torch.Tensor
    probe_loss: torch.Tensor
    diagnostics: Diagnostics
    config: SGLDConfig
    token_influence: torch.Tensor | None = None
    token_stderr: torch.Tensor | None = None

    @property
    def divergence(self) -> str | None:
        """Why the chains are not a sample from near w* (non-finite, or a loss rise beyond the bound), or ``None``."""
        return _divergence(self)

    @property
    def suspicion(self) -> str | None:
        """Why the chains, though not diverged, rose beyond what equilibrated chains near w* can, or ``None``."""
        return None if self.divergence is not None else _suspicion(self)

    @property
    def status(self) -> str:
        """``"diverged"`` (:attr:`divergence`), ``"suspect"`` (:attr:`suspicion`) or ``"ok"``."""
        if self.divergence is not None:
            return "diverged"
        return "ok" if self.suspicion is None else "suspect"

    @property
    def ok(self) -> bool:
        """True when every chain stayed finite and within the suspect bound, and the influence is finite."""
        return self.status == "ok"


def _chain_rise(result: BIFResult) -> torch.Tensor:
    """Each chain's mean loss rise over the tracked training examples, ``[C]``."""
    return result.diagnostics.draw_loss.double().mean(dim=1) - result.train_loss.double().mean()


def _suspicion(result: BIFResult) -> str | None:
    """Why a snapshot's finite chains climbed beyond ``result.diagnostics.suspect_rise_bound``, or ``None``."""
    d = result.diagnostics
    rise = _chain_rise(result)
    far = ~d.diverged.bool() & torch.isfinite(rise) & (rise > d.suspect_rise_bound)
    if not bool(far.any()):
        return None
    return (f"{int(far.sum())} of {d.diverged.numel()} chains climbed a mean loss rise of up to "
            f"{float(rise[far].max()):.3g} above w*, beyond what chains near w* rise ({d.suspect_rise_bound:.3g} = "
            f"{SUSPECT_MARGIN:g} x D/(2n*beta) + loss at w*); lower the step size")


def _divergence(result: BIFResult) -> str | None:
    """Why a snapshot's chains are not a sample from near w*, or ``None`` when they are.

    A chain counts as diverged when its draws hold non-finite values or its mean loss rise over
    the tracked training examples exceeds ``result.diagnostics.loss_rise_bound``.
    """
    d = result.diagnostics
    chains = d.diverged.numel()
    rise = _chain_rise(result)
    non_finite = d.diverged.bool() | ~torch.isfinite(rise)
    bound = d.loss_rise_bound
    far = ~non_finite & (rise > bound) if math.isfinite(bound) else torch.zeros_like(non_finite)
    left = int((non_finite | far).sum())
    if left:
        parts = []
        if int(non_finite.sum()):
            parts.append(f"{int(non_finite.sum())} produced non-finite losses")
        if int(far.sum()):
            parts.append(f"{int(far.sum())} climbed a mean loss rise of up to {float(rise[far].max()):.3g} above "
                         f"w*, beyond the bound {bound:.3g} ({LOSS_RISE_MARGIN:g} x max(D/(2n*beta), loss at w*))")
        return f"{left} of {chains} chains left the neighbourhood of w*: " + " and ".join(parts)
    if not bool(torch.isfinite(result.influence).all()):
        return (f"the influence is not finite although all {chains} chains stayed finite (each chain needs at "
                "least two finite draws)")
    return None
