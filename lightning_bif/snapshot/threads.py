"""The CPU thread count of snapshots: set around each one, and a warning where oversubscription bites.

A snapshot of a small model is thousands of tiny kernels. When torch's intra-op threads plus
dataloader workers (or other processes) exceed the free cores, every kernel waits for threads to be
scheduled, and a snapshot can take many times longer than with one thread (docs/lightning.md,
"Threads").
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def snapshot_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(num_threads)``; restore the previous count after.

    ``None`` leaves the thread count alone. Training never runs inside the block, so its own thread
    count (and with it the order of its float reductions) is unchanged.
    """
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def oversubscription(workers: int) -> str | None:
    """Why CPU snapshots would oversubscribe the cores with ``workers`` dataloader workers, or ``None``."""
    threads, cores = torch.get_num_threads(), available_cores()
    if threads <= 1 or threads + workers <= cores:
        return None
    return (f"torch uses {threads} threads and the training DataLoader {workers} worker processes on {cores} "
            "cores")
