"""The one Lanczos implementation (lightning_bif/curvature/lanczos.py) and the Hessian-vector products it runs on,
checked against explicit matrices and Hessians (torch.autograd.functional.hessian)."""

from __future__ import annotations

import pytest
import torch
from helpers import TanhOnceDifferentiable, classification_data, cross_entropy, mlp
from torch.func import functional_call

import lightning_bif.curvature.hessian as curvature_module
from lightning_bif.curvature.extremes import extreme_curvature
from lightning_bif.curvature.hessian import hessian_vector_products, top_curvature
from lightning_bif.curvature.lanczos import lanczos
from lightning_bif.curvature.objective import Objective
from lightning_bif.functional import FunctionalModel

WEIGHT_DECAY = 1e-2


def symmetric(dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return (a + a.T) / 2 + shift * torch.eye(dim, dtype=torch.float64)


def small_problem() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    x, y = classification_data(40, seed=3)
    return mlp(hidden=5).double(), [x.double(), y]


def explicit_hessian(model: torch.nn.Module, batch: list[torch.Tensor], loss_fn=cross_entropy) -> torch.Tensor:
    """Hessian of mean loss + λ/2·‖w‖² in the functional model's flat parameter order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def objective(w: torch.Tensor) -> torch.Tensor:
        pieces = w.split([s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        loss = loss_fn(lambda x: functional_call(model, params, (x,)), batch).mean()
        return loss + WEIGHT_DECAY / 2 * w.square().sum()

    return torch.autograd.functional.hessian(objective, flat)


def test_lanczos_to_full_dimension_finds_the_exact_extreme_eigenvalues_and_vectors() -> None:
    matrix = symmetric(12, seed=0)
    exact = torch.linalg.eigvalsh(matrix)
    found = lanczos(lambda v: matrix @ v, torch.ones(12, 1, dtype=torch.float64), steps=12)
    assert float(found.lowest[0]) == pytest.approx(float(exact[0]), rel=1e-8)
    assert float(found.highest[0]) == pytest.approx(float(exact[-1]), rel=1e-8)
    ritz = found.vectors[:, 0]
    assert torch.allclose(matrix @ ritz, ritz * torch.stack([found.lowest[0], found.highest[0]]), atol=1e-6)


def test_operators_in_lockstep_give_what_each_gives_alone() -> None:
    matrices = [symmetric(30, seed=s, shift=s) for s in range(3)]
    start = torch.randn(30, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def together(block: torch.Tensor) -> torch.Tensor:
        return torch.stack([m @ block[:, j] for j, m in enumerate(matrices)], dim=1)

    joint = lanczos(together, start, steps=10)
    for j, m in enumerate(matrices):
        alone = lanczos(lambda v, m=m: m @ v, start[:, j:j + 1], steps=10)
        assert float(joint.highest[j]) == pytest.approx(float(alone.highest[0]), rel=1e-10)
        assert float(joint.lowest[j]) == pytest.approx(float(alone.lowest[0]), rel=1e-10)
        exact = torch.linalg.eigvalsh(m)
        assert exact[0] - 1e-9 <= joint.lowest[j] and joint.highest[j] <= exact[-1] + 1e-9  # inside the spectrum


def test_early_stop_ends_once_the_top_ritz_value_settles() -> None:
    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64)).Q
    values = torch.cat([torch.tensor([10.0], dtype=torch.float64), torch.rand(199, generator=g, dtype=torch.float64)])
    matrix = basis @ torch.diag(values) @ basis.T  # a well separated top eigenvalue
    start = torch.randn(200, 1, generator=g, dtype=torch.float64)
    stopped = lanczos(lambda v: matrix @ v, start, steps=50, tolerance=1e-6)
    assert stopped.steps < 50
    assert float(stopped.highest[0]) == pytest.approx(10.0, rel=1e-5)
    assert lanczos(lambda v: matrix @ v, start, steps=50).steps == 50


@pytest.mark.parametrize("width", [1, 3, 20])
def test_hessian_vector_products_match_the_explicit_hessian(width: int) -> None:
    model, batch = small_problem()
    hessian = explicit_hessian(model, batch)
    fmodel = FunctionalModel(model, None, torch.device("cpu"))
    objective = Objective(fmodel, cross_entropy, fmodel.fresh_buffers(), WEIGHT_DECAY)
    products = hessian_vector_products(objective, batch, 40)
    vectors = torch.randn(fmodel.dim, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(products(vectors), hessian @ vectors, rtol=1e-8, atol=1e-10)
    assert torch.allclose(products(vectors), hessian @ vectors, rtol=1e-8, atol=1e-10)  # the kept graph again



def test_products_that_double_backward_gets_wrong_raise_instead_of_returning_them() -> None:
    model, batch = small_problem()

    def loss(m, b):
        return torch.nn.functional.cross_entropy(m[2](TanhOnceDifferentiable.apply(m[0](b[0]))), b[1],
                                                 reduction="none")

    fmodel = FunctionalModel(model, None, torch.device("cpu"))
    buffers = fmodel.fresh_buffers()
    leaf = fmodel.center.clone().requires_grad_(True)
    gradient = torch.autograd.grad(fmodel.losses(leaf, batch, 40, loss, buffers, "loss_fn").mean(), leaf,
                                   create_graph=True)[0]
    assert gradient.grad_fn is not None  # double backward runs, silently without the tanh terms
    products = hessian_vector_products(Objective(fmodel, loss, buffers, WEIGHT_DECAY), batch, 40)
    with pytest.raises(RuntimeError, match="both failed: reverse-over-reverse: its product differs from a central "
                                           "difference of gradients"):
        products(torch.ones(fmodel.dim, 2, dtype=torch.float64))


def test_extreme_curvature_matches_the_explicit_hessian() -> None:
    model, batch = small_problem()
    exact = torch.linalg.eigvalsh(explicit_hessian(model, batch))
    fmodel = FunctionalModel(model, None, torch.device("cpu"))
    objective = Objective(fmodel, cross_entropy, fmodel.fresh_buffers(), WEIGHT_DECAY)
    found = extreme_curvature(objective, batch, 40, seed=0, steps=fmodel.dim)
    assert found == pytest.approx((float(exact[0]), float(exact[-1])), rel=1e-6)


def randomized_subspace_iteration(products, dim: int, rank: int, oversample: int = 20) -> torch.Tensor:
    """Top ``rank + 1`` eigenvalues by Halko–Martinsson–Tropp algorithm 4.4, one power iteration: 3·(K + p)."""
    probes = torch.randn(dim, rank + oversample, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    block = products(torch.linalg.qr(products(probes)).Q)
    basis = torch.linalg.qr(block).Q
    projected = basis.T @ products(basis)
    return torch.linalg.eigvalsh((projected + projected.T) / 2).flip(0)[:rank + 1]


@pytest.mark.parametrize("rank", [20, 50])
def test_block_krylov_needs_fewer_products_than_randomized_subspace_iteration_for_the_same_accuracy(
    rank, monkeypatch
) -> None:
    x, y = classification_data(300, inputs=8, seed=4, label_noise=2.0)
    model, batch = mlp(inputs=8, hidden=40).double(), [x.double(), y]
    hessian = explicit_hessian(model, batch)
    exact = torch.linalg.eigvalsh(hessian).flip(0)[:rank + 1]
    fmodel = FunctionalModel(model, None, torch.device("cpu"))
    counted = [0]

    def count(products):
        def counting(vectors: torch.Tensor) -> torch.Tensor:
            counted[0] += vectors.shape[1]
            return products(vectors)
        return counting

    randomized = randomized_subspace_iteration(count(lambda v: hessian @ v), fmodel.dim, rank)
    randomized_products, counted[0] = counted[0], 0
    original = curvature_module.hessian_vector_products
    monkeypatch.setattr(curvature_module, "hessian_vector_products", lambda *a: count(original(*a)))
    objective = Objective(fmodel, cross_entropy, fmodel.fresh_buffers(), WEIGHT_DECAY)
    curvature = top_curvature(objective, batch, len(x), rank, seed=0)
    krylov_error = float(((curvature.values - exact).abs() / exact[0]).max())
    randomized_error = float(((randomized - exact).abs() / exact[0]).max())
    assert counted[0] == rank + 80 < randomized_products == 3 * (rank + 20)
    assert krylov_error <= randomized_error
    assert curvature.mean == pytest.approx(float(torch.linalg.eigvalsh(hessian).mean()), rel=0.3)  # 30 probes
