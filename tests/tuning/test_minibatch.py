"""The minibatch rule of ``batch_size="auto"``: r(m) = ε·nβ²·vᵀCv/(2m) ≤ the target at the least cost."""

from __future__ import annotations

import math

import pytest

from lightning_bif import SGLDConfig
from lightning_bif.tuning import minibatch
from lightning_bif.tuning.minibatch import SMALLEST_MINIBATCH, choose_minibatch, gradient_noise_ratio


def test_the_ratio_is_the_minibatch_noise_over_the_injected_noise() -> None:
    # Minibatch noise ε²·nβ²·vᵀCv/m per step along v, against the injected 2ε.
    eps, nbeta, variance, m = 1e-4, 400.0, 0.5, 50
    assert gradient_noise_ratio(eps, nbeta, variance, m, 1000) == pytest.approx(eps**2 * nbeta**2 * variance / m
                                                                                 / (2 * eps))
    assert gradient_noise_ratio(eps, nbeta, variance, 1000, 1000) == 0.0  # the full batch has none


@pytest.mark.parametrize(("eps", "variance", "examples", "largest"),
                         [(1e-4, 0.5, 5000, 5000), (3e-5, 2.0, 10_000, 10_000), (1e-6, 0.5, 5000, 5000)])
def test_the_least_minibatch_that_meets_the_target(eps: float, variance: float, examples: int, largest: int) -> None:
    choice = choose_minibatch(eps, 400.0, variance, examples, largest, ratio=0.1)
    m = choice.batch_size
    assert m is not None and m >= SMALLEST_MINIBATCH
    assert choice.noise_ratio == pytest.approx(gradient_noise_ratio(eps, 400.0, variance, m, examples))
    assert choice.noise_ratio <= 0.1 + 1e-12
    if m > SMALLEST_MINIBATCH:  # one example fewer would miss the target
        assert gradient_noise_ratio(eps, 400.0, variance, m - 1, examples) > 0.1
    assert f"m = {m}" in choice.reason


def test_the_full_batch_where_the_need_covers_the_data_and_the_cap_where_it_binds() -> None:
    need = math.ceil(1e-3 * 500**2 * 1.0 / (2 * 0.1))  # 1250 > n = 500
    full = choose_minibatch(1e-3, 500.0, 1.0, 500, largest=600, ratio=0.1)
    assert full.batch_size is None and full.noise_ratio == 0.0 and "the full batch" in full.reason
    capped = choose_minibatch(1e-3, 500.0, 1.0, 50_000, largest=300, ratio=0.1)
    assert capped.batch_size == 300 and capped.noise_ratio == pytest.approx(1e-3 * 500**2 / 600)
    assert f"needs m ≥ {need}" in capped.reason and "capped at m = 300" in capped.reason
    assert choose_minibatch(1e-3, 500.0, 1.0, 50_000, largest=10, ratio=0.1).batch_size == SMALLEST_MINIBATCH


def test_no_spread_keeps_the_smallest_minibatch_and_the_module_target_is_read_at_call_time(monkeypatch) -> None:
    assert choose_minibatch(1e-3, 500.0, 0.0, 5000, 5000).batch_size == SMALLEST_MINIBATCH
    loose = choose_minibatch(1e-5, 500.0, 1.0, 5000, 5000).batch_size
    monkeypatch.setattr(minibatch, "GRADIENT_NOISE_RATIO", 0.01)
    assert choose_minibatch(1e-5, 500.0, 1.0, 5000, 5000).batch_size > loose


@pytest.mark.parametrize("bad", [0, -3, 2.5, "full", True])
def test_a_bad_batch_size_is_refused_with_the_choices(bad: object) -> None:
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, None \(full batch\) or 'auto'"):
        SGLDConfig(batch_size=bad)
    assert SGLDConfig().batch_size == "auto"


def test_the_cap_is_the_tracked_count_or_all_the_data_where_it_is_at_most_four_times_that() -> None:
    assert minibatch.largest_minibatch(250, 1000) == 1000  # the full batch is affordable
    assert minibatch.largest_minibatch(250, 1001) == 250
    assert minibatch.largest_minibatch(10, 256) == 256 and minibatch.largest_minibatch(10, 300) == SMALLEST_MINIBATCH
