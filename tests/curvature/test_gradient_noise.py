"""vᵀCv: the spread of the per-example gradients along one direction, by forward mode or central differences."""

from __future__ import annotations

import torch
from helpers import NoForwardMode, cross_entropy, mlp
from torch.func import functional_call, grad, vmap

from lightning_bif.curvature.gradient_noise import directional_gradient_variance
from lightning_bif.curvature.objective import Objective
from lightning_bif.functional import FunctionalModel


def _explicit(model: torch.nn.Module, batch: list[torch.Tensor], direction: torch.Tensor) -> float:
    """Var_i(∇ℓ_i·v) from per-example gradients by autograd (v normalised)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(flat_params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, flat_params, (x[None],)), y[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, *batch)
    flat = torch.cat([grads[n].reshape(len(batch[0]), -1) for n in names], dim=1)
    return float((flat @ (direction / direction.norm())).var())


def test_the_variance_matches_per_example_gradients() -> None:
    model = mlp(hidden=6).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    fmodel = FunctionalModel(model, None, torch.device("cpu"))
    direction = torch.randn(fmodel.dim, generator=g, dtype=torch.float64) * 3.0  # any norm
    found = directional_gradient_variance(Objective(fmodel, cross_entropy, {}, 0.1), [x, y], 30, direction)
    assert abs(found - _explicit(model, [x, y], direction)) <= 1e-10 * max(1.0, found)


def test_without_forward_mode_central_differences_agree() -> None:
    model = mlp(hidden=6).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)

    def no_forward_mode(module: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        hidden = NoForwardMode.apply(module[0](batch[0]))
        return torch.nn.functional.cross_entropy(module[2](hidden), batch[1], reduction="none")

    fmodel = FunctionalModel(model, None, torch.device("cpu"))
    direction = torch.randn(fmodel.dim, generator=g, dtype=torch.float64)
    found = directional_gradient_variance(Objective(fmodel, no_forward_mode, {}, 0.0), [x, y], 20, direction)
    exact = _explicit(model, [x, y], direction)
    assert abs(found - exact) <= 1e-4 * exact
