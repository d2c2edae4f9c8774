"""What a snapshot needs from the processes that share its chains: rank, world size, three collectives.

A snapshot split over ranks (DDP) runs each rank's share of the chains, agrees on failures, sums the
accumulators and broadcasts rank 0's decisions. :class:`SingleProcess` is the default (no other ranks);
:class:`StrategyCollectives` adapts a Lightning strategy (``trainer.strategy``) without importing Lightning.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import torch

T = TypeVar("T")


class Collectives(Protocol):
    """The collectives of the ranks taking one snapshot together; every rank calls each of them in the same order."""

    @property
    def rank(self) -> int:
        """This process's global rank (0 writes files and runs rank-0-only work)."""

    @property
    def world_size(self) -> int:
        """How many processes share the chains."""

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` (a picklable value), on every rank."""

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on at least one rank."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over the ranks."""


class SingleProcess:
    """The collectives of one process alone: rank 0 of 1, every collective the identity."""

    rank = 0
    world_size = 1

    def broadcast(self, obj: T) -> T:
        """``obj`` itself."""
        return obj

    def any(self, flag: bool) -> bool:
        """``flag`` itself."""
        return flag

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` itself."""
        return tensor


class StrategyCollectives:
    """The collectives of a Lightning strategy (``trainer.strategy``: DDP, a single device, ...).

    Args:
        strategy: A ``lightning.pytorch.strategies.Strategy``.
    """

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    @property
    def rank(self) -> int:
        """The strategy's global rank."""
        return int(self.strategy.global_rank)

    @property
    def world_size(self) -> int:
        """The strategy's world size."""
        return int(self.strategy.world_size)

    def broadcast(self, obj: T) -> T:
        """``strategy.broadcast`` from rank 0."""
        return self.strategy.broadcast(obj)

    def any(self, flag: bool) -> bool:
        """``strategy.reduce_boolean_decision(flag, all=False)``."""
        return bool(self.strategy.reduce_boolean_decision(flag, all=False))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``strategy.reduce(tensor, reduce_op="sum")``."""
        return self.strategy.reduce(tensor, reduce_op="sum")
