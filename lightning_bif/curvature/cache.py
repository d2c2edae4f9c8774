"""Curvature measured at w*, kept across snapshots and calibration pilots, refreshed when it goes stale.

A snapshot measures the Hessian's extreme eigenvalues (Lanczos) and, for the low-rank
preconditioner and the control variates, its top K eigenpairs. Between two snapshots the weights
move, but the stiff directions of a network's loss change slowly, so the next snapshot first
checks the cached directions at its own w*: one block of Hessian-vector products gives the
Rayleigh quotients uᵀ(H + λ)u of the two Lanczos Ritz vectors and of the top cached eigenvectors.
A Rayleigh quotient is what the cached value would have to be for that vector at the new w*; when
none moved by more than ``tolerance`` × the largest eigenvalue, the cache is fresh and reused (the
extreme eigenvalues then take the new quotients, which are inside the spectrum as Lanczos
estimates are). Otherwise everything is measured again. A reuse costs ``2 + min(K, 4)`` products,
a measurement ``LANCZOS_STEPS + K + 80`` (and the stiffness, reused with the curvature).

Only entries measured with the same settings are reused: the sampled parameters (their count),
the L2 prior, K, the seed and the curvature sample's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .hessian import Curvature

# Top cached eigenvectors whose Rayleigh quotients the staleness check recomputes.
CHECKED_EIGENVECTORS = 4


@dataclass
class CachedCurvature:
    """One snapshot's measurement.

    Attributes:
        key: The settings it was measured with.
        extremes: Lanczos (λ_min, λ_max).
        ritz: Their unit Ritz vectors ``[D, 2]``.
        curvature: The top eigenpairs, or ``None`` when they were not needed.
        preconditioned: (λ_max(A), λ_max(G·A)) of the drift's curvature without and with the low-rank
            preconditioner, per (γ, δ) it was measured for.
        mean_eigenvalue: Hutchinson's tr(H + λ)/D for the localization floor when ``curvature`` is ``None``
            (measured on first use).
    """

    key: tuple
    extremes: tuple[float, float]
    ritz: torch.Tensor
    curvature: Curvature | None = None
    preconditioned: dict[tuple[float, float], tuple[float, float]] = field(default_factory=dict)
    mean_eigenvalue: float | None = None


@dataclass(frozen=True)
class Freshness:
    """The outcome of a staleness check.

    Attributes:
        fresh: Whether the cached curvature was reused.
        drift: Largest |Rayleigh quotient - cached eigenvalue| / |λ_max| over the checked vectors
            (NaN when there was nothing to check).
        reason: Why the curvature was (re)measured, or ``"reused"``.
    """

    fresh: bool
    drift: float
    reason: str


class CurvatureCache:
    """Keeps the last curvature measurement; pass one instance to every estimate of a run.

    Args:
        tolerance: Largest drift of a Rayleigh quotient, relative to |λ_max|, at which the cache
            still counts as fresh.
    """

    def __init__(self, tolerance: float = 0.1) -> None:
        if not tolerance > 0:
            raise ValueError(f"CurvatureCache(tolerance={tolerance!r}) must be > 0.")
        self.tolerance = tolerance
        self.entry: CachedCurvature | None = None
        #: Why automatically preconditioned chains ran away at an earlier estimate (then later ones use plain SGLD).
        self.lowrank_runaway: str | None = None

    def check(
        self, key: tuple, products: Callable[[torch.Tensor], torch.Tensor], need_eigenpairs: bool
    ) -> tuple[CachedCurvature | None, Freshness]:
        """The cached measurement, updated to the new w*, when fresh; else ``None`` and why.

        Args:
            key: The settings of the new estimate (see the module docstring).
            products: ``vectors [D, b] -> (H + λ) vectors`` at the new w*.
            need_eigenpairs: Whether the estimate needs the top eigenpairs (a cache without them is stale).
        """
        entry = self.entry
        if entry is None:
            return None, Freshness(False, float("nan"), "first measurement")
        if entry.key != key:
            return None, Freshness(False, float("nan"), "settings changed")
        if need_eigenpairs and entry.curvature is None:
            return None, Freshness(False, float("nan"), "eigenpairs not measured before")
        vectors, cached = [entry.ritz], [torch.tensor(entry.extremes, dtype=torch.float64)]
        if entry.curvature is not None:
            top = min(CHECKED_EIGENVECTORS, entry.curvature.vectors.shape[1])
            vectors.append(entry.curvature.vectors[:, :top])
            cached.append(entry.curvature.values[:top].double().cpu())
        block = torch.cat(vectors, dim=1)
        quotients = (block * products(block)).sum(0).double().cpu()
        scale = max(abs(entry.extremes[1]), abs(entry.extremes[0]), 1e-30)
        drift = float((quotients - torch.cat(cached)).abs().max()) / scale
        if not drift <= self.tolerance:
            return None, Freshness(False, drift, f"Rayleigh quotients drifted by {drift:.2f} x |λ_max| "
                                                 f"(tolerance {self.tolerance:g})")
        fresh = CachedCurvature(entry.key, (float(quotients[0]), float(quotients[1])), entry.ritz, entry.curvature,
                                entry.preconditioned)
        return fresh, Freshness(True, drift, "reused")

    def store(self, entry: CachedCurvature) -> None:
        """Keep ``entry`` for the next estimate."""
        self.entry = entry
