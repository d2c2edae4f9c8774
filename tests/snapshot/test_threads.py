"""Snapshot thread counts (snapshot/threads.py): set around a block, restored, and the oversubscription check."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_bif.snapshot.threads import available_cores, oversubscription, snapshot_threads


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
