"""Divergence of a snapshot's chains (estimation/divergence.py): the two loss-rise bounds, the status and the reason."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import classification_data, cross_entropy, make_result, mlp, train_briefly
from lightning.pytorch import seed_everything
from scripts.toy import FAST, ToyClassifier, toy_dataset, tracked_sets
from torch import nn

from lightning_bif import SGLDConfig, estimate_bif, open_log
from lightning_bif.estimation.divergence import LOSS_RISE_MARGIN, SUSPECT_MARGIN, loss_rise_bound, suspect_rise_bound
from lightning_bif.log import LogWriter, RunIdentity
from lightning_bif.snapshot.snapshotter import Snapshotter


def test_the_bound_is_the_margin_times_the_equipartition_rise_or_the_loss() -> None:
    assert loss_rise_bound(100, 50.0, 0.1) == pytest.approx(LOSS_RISE_MARGIN * 1.0)  # D/(2nβ) = 1 > 0.1
    assert loss_rise_bound(10, 1e4, -2.0) == pytest.approx(LOSS_RISE_MARGIN * 2.0)  # |loss| wins


def test_the_suspect_bound_is_the_margin_times_the_equipartition_rise_plus_the_loss() -> None:
    assert suspect_rise_bound(100, 50.0, 0.1) == pytest.approx(SUSPECT_MARGIN * 1.0 + 0.1)
    assert suspect_rise_bound(10, 1e4, -2.0) == pytest.approx(SUSPECT_MARGIN * 5e-4 + 2.0)
    assert suspect_rise_bound(100, 50.0, 0.1) < loss_rise_bound(100, 50.0, 0.1)


def result_with(draw_loss: list[list[float]], bound: float = 10.0, diverged: list[bool] | None = None,
                suspect: float = math.inf):
    """A result whose tracked training losses at w* average 1 and whose chains have the given draw losses."""
    result = make_result(0, chains=len(draw_loss), draws=len(draw_loss[0]))
    result.train_loss = torch.ones_like(result.train_loss)
    diverged = torch.tensor(diverged if diverged is not None else [False] * len(draw_loss))
    result.diagnostics = dataclasses.replace(result.diagnostics, draw_loss=torch.tensor(draw_loss),
                                             diverged=diverged, loss_rise_bound=bound, suspect_rise_bound=suspect)
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


def test_a_chain_between_the_two_bounds_is_suspect_not_ok() -> None:
    assert result_with([[1.0, 2.0], [1.0, 3.0]], suspect=2.0).status == "ok"  # rises 0.5 and 1 <= 2
    suspect = result_with([[1.0, 2.0], [4.0, 6.0]], suspect=2.0)  # rise 4: beyond 2, within 10
    assert (suspect.status, suspect.ok, suspect.divergence) == ("suspect", False, None)
    assert suspect.suspicion.startswith("1 of 2 chains climbed a mean loss rise of up to 4 above w*")
    diverged = result_with([[1.0, 2.0], [30.0, 40.0]], suspect=2.0)  # beyond both: diverged, not suspect
    assert (diverged.status, diverged.suspicion) == ("diverged", None)


# Real snapshots (issue 22 item 2). Before the suspect status both cases were logged 'ok'.

def test_a_tanh_mlp_sampled_at_a_step_size_near_its_stability_limit_is_suspect() -> None:
    """The issue's 10-32-4 tanh MLP, 2 chains x 20 draws, step size 0.3, nβ 1000, γ 1 (was 'ok': a rise of 70 nats)."""
    torch.manual_seed(0)
    x, y = torch.randn(256, 10), torch.randint(4, (256,))
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    config = SGLDConfig(chains=2, draws=20, step_size=0.3, nbeta=1000.0, localization=1.0)
    result = estimate_bif(model, cross_entropy, (x[:32], y[:32]), (x[32:40], y[32:40]), data=(x, y), config=config)
    d = result.diagnostics
    assert result.status == "suspect" and not result.ok and result.divergence is None
    assert d.suspect_rise_bound < d.loss_rise < d.loss_rise_bound and "lower the step size" in result.suspicion
    small = estimate_bif(model, cross_entropy, (x[:32], y[:32]), (x[32:40], y[32:40]), data=(x, y),
                         config=config.replace(step_size=1e-4))
    assert small.status == "ok"


@pytest.mark.parametrize(("step_size", "status"), [(1e-4, "ok"), (1e-2, "ok"), (3e-2, "suspect"), (0.1, "diverged")])
def test_the_reliability_sweep_grades_a_wandering_chain_suspect(step_size: float, status: str) -> None:
    """docs/reliability.md's sweep on the test toy: 3e-2 rose 24.9 with max |BIF| 423 and was 'ok'."""
    torch.manual_seed(0)
    data = toy_dataset()
    train, probes = tracked_sets(data)
    result = estimate_bif(ToyClassifier(), lambda model, batch: model.per_example_loss(batch), train, probes,
                          data=data, config=FAST.replace(step_size=step_size))
    assert result.status == status


def test_healthy_snapshots_of_a_trained_toy_stay_ok() -> None:
    seed_everything(0)
    x, y = classification_data(96)
    model = train_briefly(mlp(), cross_entropy, x, y, steps=100)
    for config in (SGLDConfig(chains=2, draws=10, burn_in=5, thin=1, step_size=1e-4), SGLDConfig(chains=4, draws=30)):
        result = estimate_bif(model, cross_entropy, (x[:12], y[:12]), (x[12:16], y[12:16]), data=(x, y), config=config)
        assert result.status == "ok", result.suspicion
        assert result.diagnostics.loss_rise < result.diagnostics.suspect_rise_bound / 10


def test_a_suspect_snapshot_is_recorded_with_its_status_and_reason(tmp_path) -> None:
    torch.manual_seed(0)
    data = toy_dataset()
    train, probes = tracked_sets(data)
    snapshotter = Snapshotter(ToyClassifier.per_example_loss, train, probes, data=data)
    taken = snapshotter.take(ToyClassifier(), FAST.replace(step_size=3e-2))
    assert taken.status == "suspect" and taken.message == taken.result.suspicion
    with LogWriter(tmp_path / "bif.h5", RunIdentity.for_snapshots(snapshotter, FAST)) as writer:
        writer.append(taken.record(step=3))
    with open_log(tmp_path / "bif.h5") as log:
        assert log.status.tolist() == ["suspect"] and log.message[0] == taken.message
        assert log.sign_changes() == []  # ok-only readers leave it out
