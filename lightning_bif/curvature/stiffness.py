"""The stiffness of the SGLD drift with and without the low-rank preconditioner: λ_max(A) and λ_max(G·A).

The drift of a step on minibatch B has curvature A_B = nβ·H_B + γ, and G^{1/2}·A_B·G^{1/2} (same
spectrum as G·A_B) with the preconditioner G. The step-size rule keeps the margin the plain rule
leaves on the drift's minibatches, so it needs the largest λ_max of each over a few minibatches
drawn as the chains draw theirs. Both operators of every minibatch run as one Lanczos in lockstep
(:func:`lightning_bif.curvature.lanczos.lanczos`): one call of Hessian-vector products per minibatch and
step advances both, and the iteration stops once no largest Ritz value changes by more than
``STIFFNESS_TOLERANCE`` (relative) in a step, or after ``STIFFNESS_STEPS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..example_sets import Batch
from .hessian import LowRankPreconditioner, curvature_products
from .lanczos import lanczos
from .objective import Objective

# Relative change of every largest Ritz value in one step below which the Lanczos iteration stops.
STIFFNESS_TOLERANCE = 0.02
# Most Lanczos steps of the stiffness (the saddle check's count).
STIFFNESS_STEPS = 24


@dataclass(frozen=True)
class Stiffness:
    """λ_max of the drift's curvature, the largest over the minibatches measured.

    Attributes:
        plain: λ_max(A_B) = λ_max(nβ·H_B + γ).
        preconditioned: λ_max(G·A_B).
        minibatches: How many minibatches were measured.
        steps: Lanczos steps taken (products per operator).
    """

    plain: float
    preconditioned: float
    minibatches: int
    steps: int


def drift_stiffness(
    objective: Objective, samples: list[tuple[int, Batch]], nbeta: float, localization: float,
    lowrank: LowRankPreconditioner, seed: int, steps: int = STIFFNESS_STEPS,
    tolerance: float | None = STIFFNESS_TOLERANCE,
) -> Stiffness:
    """λ_max(A_B) and λ_max(G·A_B), each the largest over ``samples``, by one early-stopped Lanczos in lockstep.

    Args:
        objective: The objective (model, loss, buffers, λ); its model's ``center`` is w*.
        samples: The drift's minibatches ``[(size, batch), ...]``.
        nbeta: nβ.
        localization: γ.
        lowrank: The preconditioner G.
        seed: Seed of the start vector (the same for every operator).
        steps: Most Lanczos steps.
        tolerance: Early stop (see :func:`lightning_bif.curvature.lanczos.lanczos`); ``None`` runs all ``steps``.

    Returns:
        :class:`Stiffness`.
    """
    products = [curvature_products(objective, batch, size) for size, batch in samples]

    def operators(block: torch.Tensor) -> torch.Tensor:
        """Columns 2s, 2s + 1: A_s and G^{1/2}·A_s·G^{1/2} of minibatch s, one product call per minibatch."""
        out = torch.empty_like(block)
        for s, product in enumerate(products):
            pair = block[:, 2 * s:2 * s + 2].clone()
            pair[:, 1] = lowrank.apply_sqrt(pair[:, 1][None])[0]
            curved = nbeta * product(pair) + localization * pair
            out[:, 2 * s] = curved[:, 0]
            out[:, 2 * s + 1] = lowrank.apply_sqrt(curved[:, 1][None])[0]
        return out

    fmodel = objective.fmodel
    generator = torch.Generator(device=fmodel.device).manual_seed(seed)
    start = torch.randn(fmodel.dim, 1, generator=generator, device=fmodel.device, dtype=fmodel.center.dtype)
    found = lanczos(operators, start.expand(-1, 2 * len(samples)).contiguous(), steps, tolerance)
    highest = found.highest.view(len(samples), 2)
    return Stiffness(plain=float(highest[:, 0].max()), preconditioned=float(highest[:, 1].max()),
                     minibatches=len(samples), steps=found.steps)
