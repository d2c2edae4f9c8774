"""What the LDS benchmarks share: a set-up's cache key, the random training subsets, kronfluence's task losses."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch
from torch.nn import functional as F


class CacheKey:
    """Mixin of a frozen set-up dataclass whose hash names its cache files under ``benchmarks/cache/``."""

    def key(self) -> str:
        """12 hex digits of the SHA-1 of every field as sorted JSON: any change of the set-up changes the key."""
        return hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def subset_masks(subsets: int, n_train: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """``[subsets, n_train]`` bool: each row keeps ``round(alpha · n_train)`` examples, drawn from ``generator``."""
    size = round(alpha * n_train)
    masks = torch.zeros(subsets, n_train, dtype=torch.bool)
    for m in range(subsets):
        masks[m, torch.randperm(n_train, generator=generator)[:size]] = True
    return masks


class ClassificationLosses:
    """kronfluence task losses for ``(x, y)`` examples: summed cross-entropy; ``sample`` draws the true Fisher's labels.

    A mixin (kronfluence's ``Task`` is imported only where EK-FAC runs, so that kronfluence stays optional):
    ``type("Task", (ClassificationLosses, kronfluence.task.Task), {})()``.
    """

    def compute_train_loss(
        self, batch: list[torch.Tensor], model: torch.nn.Module, sample: bool = False
    ) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.distributions.Categorical(logits=logits.detach()).sample()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch: list[torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")
