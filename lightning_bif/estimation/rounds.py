"""Precision on demand: how many chains the next round adds, and when the rounds stop.

A snapshot runs ``config.chains`` chains, then, while its split-half reliability r is below
``config.target_split_half``, rounds of more chains. Chains rather than draws per chain: a chain's draws depend only
on (seed, chain), the accumulator keeps per-chain sums, so a round adds rows without touching the draws already taken,
splits over DDP ranks like the first round, and the split-half (odd against even chains) sees every new chain; longer
chains would have to carry each chain's state from round to round. The measurement behind the choice is in
docs/self-tuning.md ("Precision on demand").

How many chains: Monte-Carlo noise in each entry falls as 1/chains while the signal stays, so the split-half of k
times the chains follows the Spearman–Brown formula r_k = k·r / (1 + (k - 1)·r). The round adds the chains that
formula says reach the target (with 10 % to spare), at least half the chains so far (progress when the prediction is
optimistic), at most three times them (a noisy small r must not launch a huge round), and never more than
``max_chains`` in all or than the rest of ``max_seconds`` affords at the speed the last round ran.

The clock is injectable (:class:`RoundPlan` takes ``clock``), so the budget logic is tested without waiting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import SGLDConfig

#: Most chains a round adds, as a multiple of the chains so far.
MAX_GROWTH = 3.0
#: Least chains a round adds, as a fraction of the chains so far.
MIN_GROWTH = 0.5
#: Chains beyond the Spearman–Brown prediction (its r is itself an estimate).
MARGIN = 1.1
#: ``max_chains=None`` means this many times ``chains``.
DEFAULT_MAX_CHAINS_FACTOR = 4


@dataclass
class Precision:
    """What the rounds of one snapshot reached.

    Attributes:
        target: The split-half reliability aimed at (``None``: no target).
        split_half: The split-half reliability of the whole snapshot.
        chains: Chains run (all rounds).
        draws: Draws kept per chain.
        rounds: Rounds of chains run (1: only the first).
        budget_ran_out: The rounds stopped at ``max_seconds`` or ``max_chains`` below the target (without a target:
            the budget stopped them).
        limit: What stopped them below target: ``"max_seconds"``, ``"max_chains"``, or ``""``.
        predicted_chains: The chains the Spearman–Brown formula says the target needs (``None`` without a target
            or a positive split-half): what the fix would cost.
    """

    target: float | None
    split_half: float
    chains: int
    draws: int
    rounds: int
    budget_ran_out: bool
    limit: str = ""
    predicted_chains: int | None = None

    @property
    def below_target(self) -> bool:
        """Whether a target was set and not reached (NaN split-half included)."""
        return self.target is not None and not self.split_half >= self.target

    def shortfall(self) -> str:
        """What a snapshot below its target says (``""`` when it is not): by how much, what limited it, the fix."""
        if not self.below_target:
            return ""
        limit = {"max_seconds": "its time budget (SGLDConfig.max_seconds, or BIFCallback(overhead=...))",
                 "max_chains": "SGLDConfig.max_chains"}.get(self.limit, "its budget")
        cost = (f"about {self.predicted_chains} chains would reach it ({self.predicted_chains / self.chains:.1f}x "
                "this snapshot's sampling time)" if self.predicted_chains
                else "the split-half shows no shared signal, so more chains may not reach it")
        return (f"split-half {self.split_half:.2f} below the target {self.target:.2f} after {self.chains} chains "
                f"x {self.draws} draws in {self.rounds} round(s): stopped by {limit}; {cost}")


def chain_capacity(config: SGLDConfig) -> int:
    """The most chains a snapshot with ``config`` runs (the log's chain axis): ``chains`` without rounds."""
    if config.target_split_half is None and config.max_seconds is None:
        return config.chains
    return config.max_chains if config.max_chains is not None else DEFAULT_MAX_CHAINS_FACTOR * config.chains


def chains_for_target(split_half: float, chains: int, target: float) -> int | None:
    """Chains whose split-half the Spearman–Brown formula predicts at ``target``, from ``split_half`` at ``chains``.

    ``None`` when ``split_half`` is not positive (no prediction: the entries carry no shared signal yet).
    """
    if not split_half > 0:
        return None
    if split_half >= target:
        return chains
    factor = target * (1 - split_half) / (split_half * (1 - target))
    return math.ceil(chains * factor - 1e-9)  # 4.000000001 chains is 4


class RoundPlan:
    """The stopping rule of one snapshot's rounds.

    Call :meth:`begin_round` before a round's chains run and :meth:`next_chains` after them, with the split-half of
    everything sampled so far; it returns how many chains to add (0: stop).

    Args:
        config: The snapshot's config (``chains``, ``target_split_half``, ``max_seconds``, ``max_chains``).
        clock: Seconds, monotonic (default ``time.perf_counter``); read once per :meth:`begin_round` and
            :meth:`next_chains` call, and once here (the start of the budget).
        started: When the estimate started on ``clock`` (the budget covers tuning too); default now.
        max_chains: A cap below the config's (e.g. the per-token memory budget); ``None``: the config's.
    """

    def __init__(self, config: SGLDConfig, clock: Callable[[], float] = time.perf_counter,
                 started: float | None = None, max_chains: int | None = None) -> None:
        self.target = config.target_split_half
        self.max_seconds = config.max_seconds
        cap = chain_capacity(config)
        self.max_chains = max(config.chains, min(cap, max_chains) if max_chains is not None else cap)
        self.clock = clock
        self.started = clock() if started is None else started
        self.chains = 0
        self.rounds = 0
        self.limit = ""
        self._round_started = self.started
        self._round_chains = 0

    @property
    def active(self) -> bool:
        """Whether rounds beyond the first can happen (a target or a budget is set)."""
        return self.target is not None or self.max_seconds is not None

    def begin_round(self, chains: int) -> None:
        """A round of ``chains`` chains starts now."""
        self._round_started = self.clock()
        self._round_chains = chains
        self.chains += chains
        self.rounds += 1

    def next_chains(self, split_half: float) -> int:
        """How many chains the next round adds (0: stop), given the split-half of all chains so far."""
        now = self.clock()
        if not self.active or (self.target is not None and split_half >= self.target):
            return 0
        wanted = self._wanted(split_half)
        room = self.max_chains - self.chains
        if room <= 0:
            self.limit = "max_chains"
            return 0
        add = min(wanted, room)
        if wanted > room:
            self.limit = "max_chains"
        if self.max_seconds is not None:
            per_chain = (now - self._round_started) / max(self._round_chains, 1)
            left = self.max_seconds - (now - self.started)
            affordable = math.floor(left / per_chain) if per_chain > 0 else add
            if affordable < add:  # this round is cut short, or not run, by the time budget
                add = max(affordable, 0)
                self.limit = "max_seconds"
        return add

    def _wanted(self, split_half: float) -> int:
        low = max(1, math.ceil(MIN_GROWTH * self.chains))
        high = max(low, math.floor(MAX_GROWTH * self.chains))
        if self.target is None:  # a budget alone: double until it is spent
            return self.chains
        needed = chains_for_target(split_half, self.chains, self.target)
        if needed is None:
            return high
        return min(max(math.ceil(MARGIN * needed) - self.chains, low), high)

    def outcome(self, split_half: float, draws: int) -> Precision:
        """The record of the rounds, with the split-half of the whole snapshot."""
        below = self.target is not None and not split_half >= self.target
        limit = self.limit if (below or self.target is None) else ""
        predicted = None
        if below:
            predicted = chains_for_target(split_half, self.chains, self.target)
        return Precision(target=self.target, split_half=split_half, chains=self.chains, draws=draws,
                         rounds=self.rounds, budget_ran_out=bool(limit), limit=limit, predicted_chains=predicted)
