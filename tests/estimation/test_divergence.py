"""Divergence of a snapshot's chains (estimation/divergence.py): the loss-rise bound and the reason given."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import make_result

from lightning_bif.estimation.divergence import LOSS_RISE_MARGIN, loss_rise_bound


def test_the_bound_is_the_margin_times_the_equipartition_rise_or_the_loss() -> None:
    assert loss_rise_bound(100, 50.0, 0.1) == pytest.approx(LOSS_RISE_MARGIN * 1.0)  # D/(2nβ) = 1 > 0.1
    assert loss_rise_bound(10, 1e4, -2.0) == pytest.approx(LOSS_RISE_MARGIN * 2.0)  # |loss| wins


def result_with(draw_loss: list[list[float]], bound: float = 10.0, diverged: list[bool] | None = None):
    """A result whose tracked training losses at w* average 1 and whose chains have the given draw losses."""
    result = make_result(0, chains=len(draw_loss), draws=len(draw_loss[0]))
    result.train_loss = torch.ones_like(result.train_loss)
    diverged = torch.tensor(diverged if diverged is not None else [False] * len(draw_loss))
    result.diagnostics = dataclasses.replace(result.diagnostics, draw_loss=torch.tensor(draw_loss),
                                             diverged=diverged, loss_rise_bound=bound)
    return result


def test_chains_within_the_bound_are_healthy() -> None:
    assert result_with([[1.0, 2.0], [3.0, 9.0]]).divergence is None  # mean rises 0.5 and 5 < 10


def test_a_chain_beyond_the_bound_or_non_finite_is_named_with_how_far_it_went() -> None:
    reason = result_with([[1.0, 2.0], [30.0, 40.0], [1.0, math.inf]]).divergence
    assert reason.startswith("2 of 3 chains left the neighbourhood of w*: 1 produced non-finite losses and 1 climbed")
    assert "up to 34 above w*, beyond the bound 10" in reason
    flagged = result_with([[1.0, 1.0], [1.0, 1.0]], diverged=[True, False]).divergence
    assert flagged.startswith("1 of 2 chains") and "non-finite" in flagged
    assert result_with([[1.0, 1e9]], bound=math.inf).divergence is None  # no bound: only non-finite chains count


def test_a_non_finite_influence_from_finite_chains_is_reported() -> None:
    result = result_with([[1.0, 2.0]])
    result.influence[0, 0] = math.nan
    assert "the influence is not finite although all 1 chains stayed finite" in result.divergence
