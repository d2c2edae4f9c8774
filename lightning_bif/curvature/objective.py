"""The training objective whose curvature is measured at w*: one value passed to every curvature routine.

The objective of a batch is the mean per-example loss plus the L2 prior, ``mean ℓ(w; batch) + λ/2·‖w‖²``;
its Hessian H + λ is what the preconditioner, the stiffness, the saddle check and the localization floor
measure. The model, the loss, the buffers and λ stay the same for a snapshot; the batch changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad

from ..example_sets import Batch
from ..functional import FunctionalModel, LossFn


@dataclass(frozen=True, eq=False)
class Objective:
    """``mean loss_fn(w; batch) + weight_decay/2·‖w‖²`` as a function of the flat sampled parameters.

    Attributes:
        fmodel: The functional model; its ``center`` is w*.
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example losses.
        buffers: The model's buffers, read by every forward pass.
        weight_decay: λ of the L2 prior.
    """

    fmodel: FunctionalModel
    loss_fn: LossFn
    buffers: dict[str, torch.Tensor]
    weight_decay: float

    def value(self, flat: torch.Tensor, batch: Batch, size: int) -> torch.Tensor:
        """The objective of ``batch`` (``size`` examples) at the flat parameters ``flat``."""
        loss = self.fmodel.losses(flat, batch, size, self.loss_fn, self.buffers, "loss_fn").mean()
        return loss + self.weight_decay / 2 * flat.square().sum()

    def gradient(self, batch: Batch, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``flat [D] -> ∇ objective`` of ``batch``: the gradient whose Jacobian is H + λ."""
        return grad(lambda flat: self.value(flat, batch, size))
