"""Snapshot thread counts (snapshot/threads.py): set around a block, restored, and the oversubscription check."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.snapshot.threads import (
    SMALL_MODEL_PARAMETERS,
    available_cores,
    default_snapshot_threads,
    oversubscription,
    snapshot_threads,
)


@pytest.fixture
def threads():
    """Restore the suite's thread count (conftest sets 1) whatever a test does."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_block_runs_with_the_count_and_the_count_comes_back_even_after_an_error(threads) -> None:
    torch.set_num_threads(1)
    with snapshot_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1
    with pytest.raises(RuntimeError, match="inside"), snapshot_threads(3):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 1
    with snapshot_threads(None):
        assert torch.get_num_threads() == 1


def test_available_cores_is_the_affinity_set() -> None:
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cores() == expected >= 1


def test_oversubscription_needs_more_than_one_thread_and_more_threads_plus_workers_than_cores(threads) -> None:
    cores = available_cores()
    torch.set_num_threads(1)
    assert oversubscription(workers=cores + 8) is None  # one thread cannot oversubscribe
    torch.set_num_threads(2)
    assert oversubscription(workers=max(cores - 2, 0)) is None
    message = oversubscription(workers=cores)
    assert message == f"torch uses 2 threads and the training DataLoader {cores} worker processes on {cores} cores"


def test_a_small_model_on_a_cpu_gets_one_thread_unless_a_count_was_chosen(threads) -> None:
    cpu = torch.device("cpu")
    small = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))  # 484 parameters, the MLP
    assert default_snapshot_threads(small, cpu) == 1
    assert default_snapshot_threads(small, torch.device("cuda")) is None  # GPU kernels do not use intra-op threads
    large = nn.Linear(SMALL_MODEL_PARAMETERS, 1)  # one more parameter than the bound (the bias)
    assert default_snapshot_threads(large, cpu) is None
    large.weight.requires_grad_(False)  # frozen parameters are not sampled: what counts is what SGLD moves
    assert default_snapshot_threads(large, cpu) == 1
    with snapshot_threads(2):
        assert default_snapshot_threads(small, cpu) is None  # BIFCallback(num_threads=2) holds
    assert default_snapshot_threads(small, cpu) == 1


def test_estimate_bif_samples_a_small_model_with_one_thread_and_restores_the_count(threads) -> None:
    seen: list[int] = []

    def loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    x, y = torch.randn(40, 10), torch.randint(0, 4, (40,))
    torch.set_num_threads(2)
    config = SGLDConfig(chains=2, draws=3, burn_in=1, step_size=1e-4, localization=1.0, nbeta=40.0, batch_size=8)
    estimate_bif(model, loss, (x, y), (x[:4], y[:4]), config=config)
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    seen.clear()
    with snapshot_threads(2):
        estimate_bif(model, loss, (x, y), (x[:4], y[:4]), config=config)
    assert set(seen) == {2}
