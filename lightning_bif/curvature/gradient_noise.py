"""The per-example gradient spread along one direction at w*: what minibatch SGLD adds as noise.

A minibatch of m of the n SGLD examples replaces the mean gradient ḡ by ĝ_B, whose covariance is
C·(1/m - 1/n) with C the covariance of the per-example gradients ∇ℓ_i. Along a unit direction v,
vᵀCv is the variance over examples of the slopes ∇ℓ_i·v: one forward-mode derivative of the
per-example losses (:func:`directional_gradient_variance`). :mod:`lightning_bif.tuning.minibatch`
compares it with the noise SGLD injects on purpose.
"""

from __future__ import annotations

import torch
from torch.func import jvp

from ..example_sets import Batch
from .hessian import FINITE_DIFFERENCE_STEP
from .objective import Objective


def directional_gradient_variance(objective: Objective, batch: Batch, size: int, direction: torch.Tensor) -> float:
    """vᵀCv: the variance over the ``size`` examples of ``batch`` of the slopes ∇ℓ_i(w*)·v.

    ``direction`` (``[D]``) is normalised to unit length. The L2 prior is the same for every example and
    adds nothing. Where forward-mode differentiation of ``loss_fn`` fails, the slopes are central
    differences of the per-example losses.

    Example:
        >>> import torch
        >>> from lightning_bif.functional import FunctionalModel
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> x = torch.tensor([[1.0], [2.0], [3.0]]); y = torch.zeros(3)
        >>> loss = lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2 / 2
        >>> fmodel = FunctionalModel(model, None, torch.device("cpu"))
        >>> objective = Objective(fmodel, loss, {}, 0.0)
        >>> slopes = model.weight.detach().squeeze() * x.squeeze() ** 2  # d/dw (w·x)²/2 = w·x²
        >>> variance = directional_gradient_variance(objective, (x, y), 3, torch.ones(1))
        >>> abs(variance - float(slopes.var())) < 1e-5
        True
    """
    fmodel = objective.fmodel
    unit = direction.to(fmodel.center) / direction.norm().clamp_min(torch.finfo(fmodel.center.dtype).tiny)

    def losses(flat: torch.Tensor) -> torch.Tensor:
        return fmodel.losses(flat, batch, size, objective.loss_fn, objective.buffers, "loss_fn")

    try:
        _, slopes = jvp(losses, (fmodel.center,), (unit,))
    except RuntimeError:  # a loss without forward-mode rules: central differences
        step = FINITE_DIFFERENCE_STEP * max(1.0, float(fmodel.center.norm()))
        with torch.no_grad():
            slopes = (losses(fmodel.center + step * unit) - losses(fmodel.center - step * unit)) / (2 * step)
    return float(slopes.detach().double().var()) if size > 1 else 0.0
