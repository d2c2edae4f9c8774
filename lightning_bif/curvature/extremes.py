"""The extreme eigenvalues (λ_min, λ_max) of the objective's Hessian at w*, by Lanczos.

The saddle check of a horizon snapshot (:mod:`lightning_bif.tuning.horizon`) needs λ_min, to raise the
damping where the Hessian is indefinite, and λ_max, to bound the step size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..example_sets import Batch
from ..functional import FunctionalModel
from .hessian import curvature_products
from .lanczos import lanczos
from .objective import Objective

# Lanczos iterations of the saddle check: the extreme eigenvalues of the Hessian converge first.
LANCZOS_STEPS = 24


def extreme_curvature(
    objective: Objective, batch: Batch, size: int, seed: int, steps: int = LANCZOS_STEPS
) -> tuple[float, float]:
    """(λ_min, λ_max) of the Hessian of ``mean loss + λ/2·‖w‖²`` at w*, by Lanczos from Hessian-vector products.

    Full reorthogonalization (:func:`lightning_bif.curvature.lanczos.lanczos`); ``steps`` products. The estimates
    lie inside the true spectrum and approach its ends from there (the ends converge first). Where automatic
    differentiation of the gradient of ``loss_fn`` fails, the products are central differences of gradients.
    """
    values, _ = lanczos_extremes(curvature_products(objective, batch, size), objective.fmodel, seed, steps)
    return values


def lanczos_extremes(
    products: Callable[[torch.Tensor], torch.Tensor], fmodel: FunctionalModel, seed: int, steps: int = LANCZOS_STEPS,
) -> tuple[tuple[float, float], torch.Tensor]:
    """Lanczos estimates (λ_min, λ_max) of the operator ``products`` and their unit Ritz vectors ``[D, 2]``."""
    generator = torch.Generator(device=fmodel.device).manual_seed(seed)
    start = torch.randn(fmodel.dim, 1, generator=generator, device=fmodel.device, dtype=fmodel.center.dtype)
    found = lanczos(products, start, steps)
    return (float(found.lowest[0]), float(found.highest[0])), found.vectors[:, 0]
