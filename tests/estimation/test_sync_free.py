"""The SGLD loop never makes the host wait for the device.

On a GPU, reading a tensor's value on the host (``.item()``, ``float(t)``, ``bool(t)``, an
``if`` on a tensor, boolean-mask indexing, ``nonzero``) blocks until every queued kernel has run,
and one such read per step serialises the whole loop. These ops are the same on every device, so
the check runs on the CPU: every aten op that ``sample`` dispatches is recorded, and none of the
ops that need a value on the host may appear.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_bif import SGLDConfig
from lightning_bif.estimation.estimator import BIFEstimator

# aten ops whose result (or whose output shape) depends on tensor values the host must read.
HOST_READS = {
    "aten._local_scalar_dense.default",  # .item(), float(t), int(t), bool(t)
    "aten.is_nonzero.default",  # `if t:`
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten.equal.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor",
}


class HostReadWatch(TorchDispatchMode):
    """Records every dispatched aten op; flags those that read device values on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.host_reads: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func)
        self.ops[name] += 1
        boolean_index = name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in _index_tensors(args)
        )
        if name in HOST_READS or boolean_index:
            self.host_reads.append(name)
        return func(*args, **(kwargs or {}))


def _index_tensors(args: tuple) -> list:
    """The index tensors of an ``aten.index*`` call (its second argument, a list of optional tensors)."""
    return list(args[1]) if len(args) > 1 and isinstance(args[1], (list, tuple)) else []


def cross_entropy(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def probe_margin(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    logits = model(batch[0])
    return logits.gather(1, batch[1][:, None]).squeeze(1) - logits.logsumexp(1)


def estimator(**overrides: Any) -> BIFEstimator:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(140, 5, generator=generator)
    y = torch.randint(3, (140,), generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    settings: dict[str, Any] = dict(chains=4, draws=5, burn_in=3, thin=2, batch_size=32) | overrides
    probe_fn = settings.pop("probe_fn", None)
    config = SGLDConfig(**settings)
    bif = BIFEstimator(model, cross_entropy, (x[:120], y[:120]), (x[120:], y[120:]), probe_fn=probe_fn,
                       config=config)
    bif.prepare()
    return bif


@pytest.mark.parametrize(
    "overrides",
    [
        dict(vectorize=True),
        dict(vectorize=False),
        dict(vectorize=True, batch_size=None),
        dict(vectorize=True, preconditioner="rmsprop"),
        dict(vectorize=True, preconditioner="lowrank", preconditioner_rank=8),
        dict(vectorize=True, weight_decay=1e-2, chains_per_batch=2),
        dict(vectorize=True, probe_fn=probe_margin, eval_batch_size=8),
        dict(vectorize=True, autocast="bf16"),
    ],
    ids=["vmap", "sequential", "full-batch", "rmsprop", "lowrank", "prior+groups", "probe_fn+small-eval", "bf16"],
)
def test_sampling_and_accumulating_never_read_a_device_value_on_the_host(overrides: dict) -> None:
    bif = estimator(**overrides)
    watch = HostReadWatch()
    with watch:
        accumulator = bif.sample(range(4))
    assert sum(watch.ops.values()) > 100  # the watch did see the loop
    assert watch.host_reads == [], f"host reads inside the SGLD loop: {Counter(watch.host_reads)}"
    assert int(accumulator.count.sum()) == 4 * 5


def test_the_watch_catches_the_host_reads_it_is_meant_to_catch() -> None:
    t = torch.randn(6)
    watch = HostReadWatch()
    with watch:
        t.sum().item()
        bool(t[0] > 0)
        t[t > 0].sum()
        t.nonzero()
    assert {"aten._local_scalar_dense.default", "aten.nonzero.default"} <= set(watch.host_reads)
    assert any(name.startswith("aten.index") for name in watch.host_reads)
