"""The curvature cache (lightning_bif/curvature/cache.py): reused while the Hessian's directions hold, else stale."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_bif.curvature.cache import CachedCurvature, CurvatureCache
from lightning_bif.curvature.hessian import Curvature

KEY = ("settings", 6)


def hessian(scale_top: float = 1.0) -> torch.Tensor:
    """A symmetric 6 × 6 matrix with eigenvalues 10·scale_top, 5, 3, 2, 1, 0.5 in a fixed random basis."""
    basis = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).Q
    values = torch.tensor([10.0 * scale_top, 5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    return basis @ torch.diag(values) @ basis.T


def measured(matrix: torch.Tensor, eigenpairs: bool = True) -> CachedCurvature:
    """What a snapshot would store after measuring ``matrix`` exactly."""
    values, vectors = torch.linalg.eigh(matrix)
    values, vectors = values.flip(0), vectors.flip(1)
    curvature = Curvature(values=values[:4], vectors=vectors[:, :3], mean=float(values.mean())) if eigenpairs else None
    ritz = torch.stack([vectors[:, -1], vectors[:, 0]], dim=1)  # λ_min's and λ_max's vectors
    return CachedCurvature(KEY, (float(values[-1]), float(values[0])), ritz, curvature)


def products_of(matrix: torch.Tensor):
    calls = []

    def products(vectors: torch.Tensor) -> torch.Tensor:
        calls.append(vectors.shape[1])
        return matrix @ vectors

    return products, calls


def test_an_empty_cache_or_other_settings_measure_anew() -> None:
    cache = CurvatureCache()
    products, calls = products_of(hessian())
    entry, freshness = cache.check(KEY, products, need_eigenpairs=True)
    assert entry is None and not freshness.fresh and freshness.reason == "first measurement"
    cache.store(measured(hessian()))
    entry, freshness = cache.check(("other", 6), products, need_eigenpairs=True)
    assert entry is None and freshness.reason == "settings changed" and math.isnan(freshness.drift)
    assert calls == []  # decided without a single Hessian-vector product


def test_the_same_hessian_reuses_the_cache_for_a_few_products() -> None:
    cache = CurvatureCache()
    stored = measured(hessian())
    cache.store(stored)
    products, calls = products_of(hessian())
    entry, freshness = cache.check(KEY, products, need_eigenpairs=True)
    assert freshness.fresh and freshness.reason == "reused" and freshness.drift == pytest.approx(0, abs=1e-12)
    assert sum(calls) <= 2 + 3  # a reuse costs 2 + min(K, 4) products at most (the module's docstring)
    assert entry.extremes == pytest.approx((0.5, 10.0)) and entry.curvature is stored.curvature


def test_a_small_change_is_reused_with_the_new_extremes_and_a_large_one_is_stale() -> None:
    cache = CurvatureCache(tolerance=0.1)
    cache.store(measured(hessian()))
    entry, freshness = cache.check(KEY, products_of(hessian(scale_top=1.05))[0], need_eigenpairs=True)
    assert freshness.fresh and freshness.drift == pytest.approx(0.05)  # |10.5 - 10| / 10
    assert entry.extremes == pytest.approx((0.5, 10.5))  # the Rayleigh quotients at the new w*
    entry, freshness = cache.check(KEY, products_of(hessian(scale_top=1.5))[0], need_eigenpairs=True)
    assert entry is None and not freshness.fresh and freshness.drift == pytest.approx(0.5)
    assert "drifted by 0.50" in freshness.reason


def test_eigenpairs_that_were_not_measured_make_the_cache_stale_only_when_needed() -> None:
    cache = CurvatureCache()
    cache.store(measured(hessian(), eigenpairs=False))
    products, calls = products_of(hessian())
    assert cache.check(KEY, products, need_eigenpairs=True)[1].reason == "eigenpairs not measured before"
    entry, freshness = cache.check(KEY, products, need_eigenpairs=False)
    assert freshness.fresh and entry.curvature is None and sum(calls) <= 2


def test_the_tolerance_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        CurvatureCache(tolerance=0)
