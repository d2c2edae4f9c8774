"""Precision on demand (estimation/rounds.py): rounds of more chains until a split-half target or a budget.

No test reads the wall clock: the target logic runs with ``max_seconds=None`` and the budget logic with a fake clock.
"""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from helpers import cross_entropy, mlp

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.estimation.estimator import BIFEstimator
from lightning_bif.estimation.rounds import RoundPlan, chains_for_target
from lightning_bif.snapshot.snapshotter import Snapshotter


class FakeClock:
    """Seconds that move only when a test says so (``tick`` per call, or ``advance``)."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now = 0.0
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.arange(40) % 3
    return (x, y), (x[:5], y[:5])


BASE = dict(chains=2, draws=6, burn_in=2, step_size=1e-3, batch_size=10, localization=100.0, vectorize=False)


def test_spearman_brown_predicts_the_chains_a_target_needs() -> None:
    # r_k = k r / (1 + (k - 1) r): r = 0.5 at 16 chains reaches 0.8 at 4 x 16.
    assert chains_for_target(0.5, 16, 0.8) == 64
    assert chains_for_target(0.9, 16, 0.8) == 16
    assert chains_for_target(0.0, 16, 0.8) is None and chains_for_target(math.nan, 16, 0.8) is None


def test_the_plan_adds_what_the_target_needs_within_its_growth_bounds_and_the_chain_cap() -> None:
    plan = RoundPlan(SGLDConfig(chains=16, target_split_half=0.8, max_chains=128), clock=FakeClock())
    plan.begin_round(16)
    assert plan.next_chains(0.85) == 0  # reached
    assert plan.next_chains(0.6) == math.ceil(1.1 * 43) - 16  # Spearman–Brown (43 chains) with 10 % to spare
    assert plan.next_chains(0.79) == 8  # at least half the chains so far
    assert plan.next_chains(0.05) == 48  # at most three times them ...
    assert plan.next_chains(math.nan) == 48  # ... also without a prediction
    plan.begin_round(48)
    assert plan.next_chains(0.5) == 64 and plan.limit == "max_chains"  # the cap cuts this round ...
    plan.begin_round(64)
    assert plan.next_chains(0.5) == 0 and plan.limit == "max_chains"  # ... and stops the next
    outcome = plan.outcome(0.5, draws=10)
    assert outcome.budget_ran_out and outcome.below_target and outcome.predicted_chains == 512
    assert (outcome.chains, outcome.rounds, outcome.draws) == (128, 3, 10)
    default = RoundPlan(SGLDConfig(chains=16, target_split_half=0.8), clock=FakeClock())
    assert default.max_chains == 64  # max_chains=None: 4 x chains


def test_without_target_and_budget_there_is_one_round() -> None:
    plan = RoundPlan(SGLDConfig(chains=4, target_split_half=None), clock=FakeClock())
    plan.begin_round(4)
    assert not plan.active and plan.next_chains(0.1) == 0
    assert not plan.outcome(0.1, 5).budget_ran_out


def test_the_budget_cuts_rounds_at_the_speed_the_last_round_ran() -> None:
    clock = FakeClock()
    plan = RoundPlan(SGLDConfig(chains=8, target_split_half=0.9, max_seconds=10.0), clock=clock)
    clock.advance(2.0)  # tuning
    plan.begin_round(8)
    clock.advance(4.0)  # 0.5 s per chain; 4 s left: 8 chains fit, Spearman–Brown wants more
    assert plan.next_chains(0.5) == 8 and plan.limit == "max_seconds"
    plan.begin_round(8)
    clock.advance(4.0)  # the budget is spent
    assert plan.next_chains(0.6) == 0
    outcome = plan.outcome(0.6, 5)
    assert outcome.budget_ran_out and outcome.limit == "max_seconds" and outcome.chains == 16
    assert outcome.predicted_chains == chains_for_target(0.6, 16, 0.9)


def test_a_budget_without_a_target_doubles_until_it_is_spent() -> None:
    clock = FakeClock()
    plan = RoundPlan(SGLDConfig(chains=4, target_split_half=None, max_seconds=100.0, max_chains=12), clock=clock)
    plan.begin_round(4)
    clock.advance(4.0)
    assert plan.next_chains(0.99) == 4
    plan.begin_round(4)
    clock.advance(4.0)
    assert plan.next_chains(0.99) == 4 and plan.limit == "max_chains"


def test_a_target_reached_after_a_cut_round_is_not_a_budget_stop() -> None:
    clock = FakeClock()
    plan = RoundPlan(SGLDConfig(chains=8, target_split_half=0.9, max_seconds=10.0), clock=clock)
    plan.begin_round(8)
    clock.advance(8.0)
    assert plan.next_chains(0.5) == 2
    plan.begin_round(2)
    assert plan.next_chains(0.95) == 0
    assert not plan.outcome(0.95, 5).budget_ran_out and plan.outcome(0.95, 5).limit == ""


@pytest.mark.parametrize("field, value", [
    ("target_split_half", 0.0), ("target_split_half", 1.0), ("target_split_half", 1.5), ("target_split_half", -0.2),
    ("target_split_half", math.nan), ("target_split_half", True), ("max_seconds", 0.0), ("max_seconds", -1.0),
    ("max_seconds", math.inf), ("max_chains", 1), ("max_chains", 2.5),
])
def test_bad_targets_and_budgets_are_refused_when_the_config_is_made(field, value) -> None:
    with pytest.raises(ValueError, match=f"SGLDConfig.{field}"):
        SGLDConfig(chains=2, **{field: value})


def test_target_and_budget_off_give_bitwise_the_single_round_estimate() -> None:
    train, probes = data()
    config = SGLDConfig(**{**BASE, "chains": 4, "vectorize": "auto"}, target_split_half=None, max_seconds=None)
    model = mlp()
    result = estimate_bif(model, cross_entropy, train, probes, config=config)
    # The estimate as it was before rounds: prepare, one sample of every chain, summarize.
    estimator = BIFEstimator(model, cross_entropy, train, probes, config=config)
    estimator.prepare()
    reference = estimator.summarize(estimator.sample_checked(range(4)), 0.0)
    assert torch.equal(result.influence, reference.influence) and torch.equal(result.stderr, reference.stderr)
    assert result.diagnostics.split_half == reference.diagnostics.split_half
    p = result.diagnostics.precision
    assert (p.chains, p.rounds, p.target, p.budget_ran_out) == (4, 1, None, False)


def test_rounds_run_until_the_target_and_equal_one_round_of_as_many_chains() -> None:
    train, probes = data()
    model = mlp()
    result = estimate_bif(model, cross_entropy, train, probes,
                          config=SGLDConfig(**BASE, target_split_half=0.97, max_chains=64))
    p = result.diagnostics.precision
    assert p.rounds > 1 and p.chains > 2 and result.config.chains == p.chains
    assert p.split_half == result.diagnostics.split_half
    assert p.split_half >= 0.97 or p.limit == "max_chains"
    # Chain c's draws depend on (seed, c) alone: the rounds are the estimate with that many chains.
    same = estimate_bif(model, cross_entropy, train, probes,
                        config=SGLDConfig(**{**BASE, "chains": p.chains}, target_split_half=None))
    assert torch.equal(result.influence, same.influence)
    assert result.diagnostics.sampling_loss.shape == (p.chains, p.draws)


def test_an_unreachable_target_stops_at_the_chain_cap_and_says_so() -> None:
    train, probes = data()
    result = estimate_bif(mlp(), cross_entropy, train, probes, config=SGLDConfig(**BASE, target_split_half=0.9999))
    p = result.diagnostics.precision
    assert p.chains == 8 and p.budget_ran_out and p.limit == "max_chains" and p.below_target
    assert p.predicted_chains is None or p.predicted_chains > 8


def test_a_spent_budget_stops_the_rounds_on_a_fake_clock() -> None:
    train, probes = data()
    snapshotter = Snapshotter(cross_entropy, train, probes, clock=FakeClock(tick=1.0))
    taken = snapshotter.take(mlp(), SGLDConfig(**BASE, target_split_half=0.9999, max_seconds=2.0))
    p = taken.result.diagnostics.precision
    assert p.chains == 2 and p.rounds == 1 and p.budget_ran_out and p.limit == "max_seconds"


class ThreadRanks:
    """Two ranks as threads of one process: broadcast from rank 0, any, sum (for the DDP round test)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[object] = [None] * world

    def rank(self, rank: int):
        ranks = self

        class Collectives:
            world_size = ranks.world

            def __init__(self) -> None:
                self.rank = rank

            def _gather(self, value):
                ranks.barrier.wait()
                ranks.slots[rank] = value
                ranks.barrier.wait()
                values = list(ranks.slots)
                ranks.barrier.wait()
                return values

            def broadcast(self, obj):
                return self._gather(obj)[0]

            def any(self, flag):
                return any(self._gather(flag))

            def sum(self, tensor):
                return sum(self._gather(tensor.clone()))

        return Collectives()


def test_ddp_ranks_run_the_same_rounds_decided_on_rank_zero() -> None:
    train, probes = data()
    model = mlp()
    # Rank 1's clock runs much faster: were it to decide alone, it would stop at once.
    # No tuning that measures curvature: threads share the global RNG its Lanczos start draws from.
    config = SGLDConfig(**BASE, target_split_half=0.97, max_chains=64, max_seconds=1e6, preconditioner="none",
                        control_variates=False)
    ranks = ThreadRanks(2)
    clocks = [FakeClock(tick=0.0), FakeClock(tick=1e7)]
    outcomes: list[object] = [None, None]

    def run(rank: int) -> None:
        snapshotter = Snapshotter(cross_entropy, train, probes, collectives=ranks.rank(rank), clock=clocks[rank])
        outcomes[rank] = snapshotter.take(copy.deepcopy(model), config, vectorized=False)  # a model per rank

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)  # a hang guard only
    assert all(o is not None and o.status == "ok" for o in outcomes)
    p0, p1 = (o.result.diagnostics.precision for o in outcomes)
    assert p0.rounds > 1 and (p0.chains, p0.rounds) == (p1.chains, p1.rounds)
    assert torch.equal(outcomes[0].result.influence, outcomes[1].result.influence)
    alone = estimate_bif(model, cross_entropy, train, probes,
                         config=config.replace(chains=p0.chains, target_split_half=None, max_seconds=None))
    torch.testing.assert_close(outcomes[0].result.influence, alone.influence, rtol=1e-5, atol=1e-9)
