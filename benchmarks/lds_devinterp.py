"""devinterp 2.0.1's ``bif()`` as a method of the LDS suite (``lds_suite.py --devinterp``), at our settings mapped.

devinterp (the BIF paper authors' library) wants a HuggingFace dataset of ``input_ids`` and a per-token loss
``(model, input_ids) -> [B, T]``. Any of the suite's problems is fed to it by index: example k becomes the two
"tokens" ``[k, 0]`` (k < N: training example k, else probe k - N) and the loss looks the examples up and returns
the problem's per-example loss as one "token". It is a benchmark-only dependency (``pip install -e ".[bench]"``).

The settings are those of one of our configs, mapped as docs/how-it-works.md ("Coming from devinterp") tabulates:
``lr = step_size``, ``n_beta = nbeta``, ``localization = localization``, ``llc_weight_decay = nbeta · weight_decay``
(their prior sits outside the tempered likelihood, ours inside), chains, draws, burn-in, thin (``num_steps_bw_draws``)
and minibatch size as ours; plain SGLD (no preconditioner, no control variates). devinterp's own defaults stay:
every chain sees the same minibatch order, drawn without replacement from one shuffled epoch that is replayed.
Chain c is seeded with ``init_seed + c``: ``init_seed = seed · chains`` keeps different seeds' chains disjoint.

Observables are evaluated in batches of the sampling batch size, so the tracked sets are tiled to whole batches;
a duplicate has the same trace as its original, and the first occurrence is read back. The SGLD data is the N
training examples as they are (devinterp drops the last partial batch of its one epoch).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # devinterp's per-chain progress bars; read when tqdm is first imported

import torch
from torch import nn

from lightning_bif import SGLDConfig


def devinterp_influence(model: nn.Module, loss_fn, train: tuple[torch.Tensor, ...], probes: tuple[torch.Tensor, ...],
                        config: SGLDConfig) -> tuple[torch.Tensor, float]:
    """−Cov(ℓ_i, φ_j) over devinterp's draws, ``[P, N]`` in our sign and order, and the CPU seconds it took.

    ``config`` must be resolved (``step_size``, ``localization``, ``nbeta``, ``draws``, ``thin`` set), e.g. the
    ``config`` of a :class:`~lightning_bif.BIFResult`.
    """
    from datasets import Dataset
    from devinterp.slt.bif import compute_bif
    from devinterp.slt.sampling import sample

    n, p = len(train[0]), len(probes[0])
    examples = [torch.cat([a, b]) for a, b in zip(train, probes, strict=True)]
    m = n if config.batch_size is None else min(config.batch_size, n)

    def per_token_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return loss_fn(model, [t[input_ids[:, 0]] for t in examples])[:, None]

    def indices(rows: torch.Tensor, whole_batches: bool = True) -> Dataset:
        total = -(-len(rows) // m) * m if whole_batches else len(rows)
        tiled = rows.repeat(-(-total // len(rows)))[:total]
        return Dataset.from_dict({"input_ids": torch.stack([tiled, torch.zeros_like(tiled)], 1).tolist()}) \
            .with_format("torch")

    start = time.process_time()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_set, probe_set = indices(torch.arange(n)), indices(n + torch.arange(p))
        samples = sample(model=copy.deepcopy(model), dataset=indices(torch.arange(n), whole_batches=False),
                         observables={"a_train": (train_set, len(train_set) // m),
                                      "b_probe": (probe_set, len(probe_set) // m)},
                         lr=config.step_size, n_beta=config.nbeta, localization=config.localization,
                         llc_weight_decay=config.nbeta * config.weight_decay, num_chains=config.chains,
                         num_draws=config.draws, num_steps_bw_draws=config.thin, num_burnin_steps=config.burn_in,
                         batch_size=m, num_init_loss_batches=1, loss_fn=per_token_loss, device="cpu",
                         init_seed=config.seed * config.chains, output_path=Path(tmp) / "samples.zarr")
        result = compute_bif(samples, correlation_method="sequence", compute_covariance=True, device="cpu")
        matrix = torch.as_tensor(result["influences"].values, dtype=torch.float64)
        ids = torch.as_tensor(result["input_ids"].values)[:, 0].tolist()
    first: dict[int, int] = {}
    for row, k in enumerate(ids):
        first.setdefault(k, row)
    train_rows = [first[k] for k in range(n)]
    probe_rows = [first[n + j] for j in range(p)]
    return -matrix[probe_rows][:, train_rows], time.process_time() - start  # theirs is +Cov
