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
from contextvars import ContextVar

import torch
from torch import nn

#: Models with at most this many trainable parameters are sampled with one intra-op thread on a CPU
#: unless a thread count is chosen (:func:`snapshot_threads`). Their kernels are a few microseconds long, so a
#: second thread gains little even on a quiet machine, while every kernel's threads must all be scheduled before
#: it ends: on a busy machine each of a snapshot's thousands of kernels then waits for the scheduler
#: (docs/lightning.md, "Threads", has the measurements). A size, not a timing, so the choice is reproducible.
SMALL_MODEL_PARAMETERS = 100_000

_chosen: ContextVar[int | None] = ContextVar("snapshot_threads", default=None)


@contextmanager
def snapshot_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(num_threads)``; restore the previous count after.

    ``None`` leaves the thread count alone. Training never runs inside the block, so its own thread
    count (and with it the order of its float reductions) is unchanged.
    """
    if num_threads is None:
        yield
        return
    before, token = torch.get_num_threads(), _chosen.set(num_threads)
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        _chosen.reset(token)


def default_snapshot_threads(model: nn.Module, device: torch.device) -> int | None:
    """The thread count of a snapshot for which none was chosen: 1 for a small model on a CPU, else ``None`` (keep).

    ``None`` too inside :func:`snapshot_threads` with a count (``BIFCallback(num_threads=...)``): that choice holds.
    """
    if device.type != "cpu" or _chosen.get() is not None:
        return None
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 1 if parameters <= SMALL_MODEL_PARAMETERS else None


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
