"""The collectives a snapshot uses (snapshot/collectives.py): one process alone, and a Lightning strategy."""

from __future__ import annotations

import torch
from helpers import cross_entropy, mlp
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_bif import SGLDConfig
from lightning_bif.snapshot.collectives import SingleProcess, StrategyCollectives
from lightning_bif.snapshot.snapshotter import Snapshotter


def test_collectives_of_one_process_and_of_a_lightning_strategy() -> None:
    tensor = torch.arange(3.0)
    for collectives in (SingleProcess(), StrategyCollectives(SingleDeviceStrategy(device="cpu"))):
        assert (collectives.rank, collectives.world_size) == (0, 1)
        assert collectives.broadcast({"ok": True}) == {"ok": True}
        assert collectives.any(True) is True and collectives.any(False) is False
        assert torch.equal(collectives.sum(tensor), tensor)


def test_a_snapshot_through_a_strategys_collectives_equals_one_through_a_single_process() -> None:
    x, y = torch.randn(12, 4, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 3
    config = SGLDConfig(chains=2, draws=3, burn_in=2, step_size=1e-4, batch_size=6)
    influences = []
    for collectives in (SingleProcess(), StrategyCollectives(SingleDeviceStrategy(device="cpu"))):
        snapshotter = Snapshotter(cross_entropy, (x, y), (x[:3], y[:3]), collectives=collectives)
        influences.append(snapshotter.take(mlp(), config).result.influence)
    assert torch.equal(influences[0], influences[1])
