"""The locality rule: nβ = n·max(1, Q/limit), Q the tracked losses' nonlinearity at nβ = n."""

from __future__ import annotations

import math

import pytest

from lightning_bif.tuning import locality
from lightning_bif.tuning.locality import choose_nbeta


def test_nbeta_rises_by_the_factor_that_brings_q_to_the_limit() -> None:
    choice = choose_nbeta(500.0, 0.3, limit=0.03)
    assert choice.nbeta == pytest.approx(5000.0) and choice.nonlinearity == 0.3
    assert "above 0.03" in choice.reason and "5000" in choice.reason
    # Q ∝ 1/nβ: at the chosen nβ the expected Q is the limit itself.
    assert choice.nonlinearity * 500.0 / choice.nbeta == pytest.approx(0.03)


@pytest.mark.parametrize("q", [0.0, 0.01, 0.03, math.inf, math.nan])
def test_linear_enough_or_unmeasurable_keeps_the_data_nbeta(q: float) -> None:
    choice = choose_nbeta(500.0, q, limit=0.03)
    assert choice.nbeta == 500.0


def test_the_module_limit_is_read_at_call_time(monkeypatch) -> None:
    monkeypatch.setattr(locality, "NONLINEARITY_LIMIT", 0.3)
    assert choose_nbeta(500.0, 0.3).nbeta == 500.0


def test_the_minibatch_noise_room_caps_the_rise() -> None:
    choice = choose_nbeta(500.0, 0.3, limit=0.03, noise_room=2.0)
    assert choice.nbeta == 1000.0 and "allows nβ to grow only 2×" in choice.reason
    noisy = choose_nbeta(500.0, 0.3, limit=0.03, noise_room=0.5)
    assert noisy.nbeta == 500.0 and "already 2× its target at nβ = n" in noisy.reason  # never below the data's nβ
