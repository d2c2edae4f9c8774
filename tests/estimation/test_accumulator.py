"""CovarianceAccumulator statistics against direct computations, and effective_sample_size."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_bif.estimation.accumulator import CovarianceAccumulator, effective_sample_size


def _draws(chains: int, draws: int, n: int, p: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated train ``[C, D, N]`` and probe ``[C, D, P]`` values with a large common offset."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(chains, draws, 3, generator=g, dtype=torch.float64)
    train = 100.0 + latent @ torch.randn(3, n, generator=g, dtype=torch.float64)
    probe = 50.0 + latent @ torch.randn(3, p, generator=g, dtype=torch.float64)
    return train + 0.1 * torch.randn(chains, draws, n, generator=g, dtype=torch.float64), probe


def _fill(accumulator: CovarianceAccumulator, train: torch.Tensor, probe: torch.Tensor, chains: list[int]) -> None:
    for index in range(train.shape[1]):
        ids = torch.tensor(chains)
        accumulator.add(ids, index, train[ids, index], probe[ids, index], train[ids, index].mean(dim=1))


def test_statistics_match_direct_covariance_correlation_and_stderr() -> None:
    chains, draws, n, p = 3, 40, 5, 4
    train, probe = _draws(chains, draws, n, p)
    accumulator = CovarianceAccumulator(chains, train[0, 0], probe[0, 0], draws)
    _fill(accumulator, train, probe, [0, 1, 2])
    stats = accumulator.statistics()

    pooled = torch.cat([probe.reshape(-1, p), train.reshape(-1, n)], dim=1).T
    cov = torch.cov(pooled)[:p, p:]
    corr = torch.corrcoef(pooled)[:p, p:]
    per_chain = torch.stack([torch.cov(torch.cat([probe[c], train[c]], dim=1).T)[:p, p:] for c in range(chains)])
    torch.testing.assert_close(stats.influence, -cov)
    torch.testing.assert_close(stats.correlation, corr)
    torch.testing.assert_close(stats.stderr, per_chain.std(dim=0) / math.sqrt(chains))
    torch.testing.assert_close(stats.mean_shift_train, (train - train[0, 0]).reshape(-1, n).mean(dim=0))
    assert stats.healthy.all()
    assert -1 <= stats.split_half <= 1


def test_summed_accumulators_of_disjoint_chains_equal_one_accumulator() -> None:
    chains, draws = 4, 20
    train, probe = _draws(chains, draws, 6, 3, seed=1)
    whole = CovarianceAccumulator(chains, train[0, 0], probe[0, 0], draws)
    _fill(whole, train, probe, [0, 1, 2, 3])
    first = CovarianceAccumulator(chains, train[0, 0], probe[0, 0], draws)
    second = CovarianceAccumulator(chains, train[0, 0], probe[0, 0], draws)
    _fill(first, train, probe, [0, 1])
    _fill(second, train, probe, [2, 3])
    for mine, theirs in zip(first.tensors(), second.tensors(), strict=True):
        mine += theirs

    for merged, expected in zip(first.tensors(), whole.tensors(), strict=True):
        torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(first.statistics().influence, whole.statistics().influence)


def test_non_finite_chain_is_left_out_and_reported() -> None:
    chains, draws = 4, 30
    train, probe = _draws(chains, draws, 5, 2, seed=2)
    train[1, 7:, 2] = math.nan
    with_bad = CovarianceAccumulator(chains, train[0, 0], probe[0, 0], draws)
    _fill(with_bad, train, probe, [0, 1, 2, 3])
    without = CovarianceAccumulator(chains, train[0, 0], probe[0, 0], draws)
    _fill(without, train, probe, [0, 2, 3])

    assert with_bad.healthy_chains().tolist() == [True, False, True, True]
    assert with_bad.diverged_chains().tolist() == [False, True, False, False]
    # A chain that was never run (another rank's share) is absent, not diverged.
    assert without.diverged_chains().tolist() == [False, False, False, False]
    torch.testing.assert_close(with_bad.statistics().influence, without.statistics().influence)


def test_no_healthy_chain_gives_nan_statistics() -> None:
    accumulator = CovarianceAccumulator(2, torch.zeros(3), torch.zeros(2), draws=5)
    stats = accumulator.statistics()
    assert stats.influence.shape == (2, 3)
    assert torch.isnan(stats.influence).all() and math.isnan(stats.split_half)


def _ar1(phi: float, chains: int, draws: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(chains, draws, generator=g, dtype=torch.float64) * math.sqrt(1 - phi**2)
    trace = torch.empty(chains, draws, dtype=torch.float64)
    trace[:, 0] = torch.randn(chains, generator=g, dtype=torch.float64)
    for t in range(1, draws):
        trace[:, t] = phi * trace[:, t - 1] + noise[:, t]
    return trace


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9, -0.4])
def test_effective_sample_size_of_ar1_matches_theory(phi: float) -> None:
    chains, draws = 4, 4000
    trace = _ar1(phi, chains, draws, seed=3)
    # For AR(1), the integrated autocorrelation time is (1 + φ) / (1 - φ).
    expected = chains * draws * (1 - phi) / (1 + phi)
    assert effective_sample_size(trace) == pytest.approx(expected, rel=0.2)


def test_effective_sample_size_degenerate_traces() -> None:
    assert math.isnan(effective_sample_size(torch.ones(2, 50)))
    assert math.isnan(effective_sample_size(torch.randn(2, 3)))
    trace = _ar1(0.5, 3, 500, seed=4)
    trace[1, 10] = math.inf
    assert effective_sample_size(trace) == pytest.approx(effective_sample_size(trace[[0, 2]]))
