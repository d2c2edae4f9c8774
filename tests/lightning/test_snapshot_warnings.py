"""The texts of BIFCallback's snapshot warnings that need no fit to check: when the capped minibatch one speaks."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import make_result, record

from lightning_bif.lightning.snapshot_warnings import minibatch_noise
from lightning_bif.tuning.autotune import Tuning


def _capped(ratio: float | None, nonlinearity: float | None, chosen: bool = True):
    tuning = Tuning(gradient_noise_ratio=ratio, nonlinearity=nonlinearity)
    if chosen:
        tuning.choose("batch_size", 64, "capped")
    result = make_result(1, probes=4, train=12)
    result = dataclasses.replace(result, config=result.config.replace(batch_size=64),
                                 diagnostics=dataclasses.replace(result.diagnostics, tuning=tuning, nbeta=400.0))
    return record(8, result=result)


def test_a_capped_minibatch_below_one_but_far_from_linear_is_named_with_both_numbers() -> None:
    """The regression-like case: r = 0.36 (above the target 0.1, below 1) and Q = 1.4 at nβ = n."""
    message = minibatch_noise(_capped(0.36, 1.4))
    assert message is not None and "0.36x the noise" in message and "Q = 1.4" in message
    assert "nβ stayed at 400" in message and "wider than the posterior" not in message
    assert "SGLDConfig(batch_size=None)" in message and "at most 256 training examples" in message


@pytest.mark.parametrize(("ratio", "nonlinearity", "chosen"), [(0.05, 1.4, True), (0.0, None, True),
                                                                 (None, None, True), (3.0, 1.4, False)])
def test_within_target_unmeasured_or_a_size_the_user_set_says_nothing(ratio, nonlinearity, chosen) -> None:
    assert minibatch_noise(_capped(ratio, nonlinearity, chosen)) is None


def test_linear_enough_mentions_only_the_noise() -> None:
    message = minibatch_noise(_capped(2.5, 0.01))
    assert message is not None and "about 4x wider" in message and "Q =" not in message
