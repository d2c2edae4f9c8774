"""The stiff directions of the sampled posterior, and the low-rank preconditioner built from them.

SGLD's step size is capped by the stiffest direction of the posterior (ε·nβ·λ_max must stay below
about 4), so a short chain from w* barely moves along the flat directions, which are the ones
an influence function weighs most. ``preconditioner="lowrank"`` finds the top-K eigenpairs of the
Hessian of the training objective at w* from Hessian-vector products (block Krylov: no Hessian is
ever formed) and gives the flat complement a larger step. A constant
preconditioner keeps the stationary distribution, so the BIF is the same quantity, reached faster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch
from torch.func import jvp, vmap

from ..example_sets import Batch
from ..functional import FunctionalModel, LossFn
from .objective import Objective

# Block Krylov eigen-decomposition: width of a block, and the dimensions of the Krylov space beyond K (K + 70
# products; the accuracy of 3·(K + 20) randomized ones). The mean eigenvalue takes Hutchinson's estimate from
# the first block and HUTCHINSON_PROBES - KRYLOV_BLOCK more probes in the same call.
KRYLOV_BLOCK = 20
KRYLOV_EXTRA = 70
HUTCHINSON_PROBES = 30
# Hessian-vector products run this many at a time under vmap (bounds activation memory).
_HVP_CHUNK = 16
# Length of the parameter step of a finite-difference Hessian-vector product (when automatic differentiation
# fails, and to check reverse-over-reverse products).
FINITE_DIFFERENCE_STEP = 1e-3
# Relative disagreement with a central difference, and then with forward-over-reverse, above which
# reverse-over-reverse products are not trusted (checked once per model and loss function).
_REVERSE_TOLERANCE = 1e-3
_DIFFERENCE_TOLERANCE = 0.1
# Which Hessian-vector products were verified per functional model and loss function: "reverse" or "forward".
_VERIFIED: WeakKeyDictionary[FunctionalModel, dict[LossFn, str]] = WeakKeyDictionary()


@dataclass
class Curvature:
    """Top of the spectrum of the objective's Hessian H + λ at w*.

    Attributes:
        values: The K + 1 largest eigenvalues, descending, ``[K + 1]``.
        vectors: Orthonormal eigenvectors of the first K, ``[D, K]``.
        mean: The mean eigenvalue tr(H + λ)/D (Hutchinson estimate from the same products).
    """

    values: torch.Tensor
    vectors: torch.Tensor
    mean: float


def hessian_vector_products(objective: Objective, batch: Batch, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``vectors [D, b] -> (H + λ) vectors [D, b]`` for the mean loss of ``batch`` at w*.

    Reverse-over-reverse first: the gradient's graph at w* is built once and every product is a
    backward pass through it (``torch.autograd.grad`` of ``∇·v``), which skips the forward and the
    first backward that forward-over-reverse (``torch.func.jvp`` over ``torch.func.grad``) repeats
    for every call. Where double backward fails (e.g. a ``once_differentiable`` op), forward-over-reverse
    takes over for this and later calls; where both fail the error says so.
    """
    reverse = _reverse_over_reverse(objective, batch, size)
    forward = _forward_over_reverse(objective, batch, size)
    loss_fn = objective.loss_fn
    verified = _VERIFIED.setdefault(objective.fmodel, {})
    failures: list[str] = []  # why reverse-over-reverse is not used, once known

    def products(vectors: torch.Tensor) -> torch.Tensor:
        if not failures and verified.get(loss_fn) != "forward":
            try:
                result = reverse(vectors)
                if loss_fn not in verified:
                    _check_reverse(result[:, 0], vectors[:, 0], forward, objective, batch, size)
                    verified[loss_fn] = "reverse"
                return result
            except RuntimeError as error:  # an op without double backward, or one whose backward is not differentiable
                failures.append(f"reverse-over-reverse: {error}")
                verified[loss_fn] = "forward"
        try:
            return forward(vectors)
        except RuntimeError as error:
            why = failures[0] if failures else "reverse-over-reverse: failed at an earlier call"
            raise RuntimeError(
                "preconditioner='lowrank' needs Hessian-vector products of loss_fn (double backward with "
                f"torch.autograd.grad, else torch.func.jvp over torch.func.grad), and both failed: {why}; "
                f"forward-over-reverse: {error}. Use SGLDConfig(preconditioner='none')."
            ) from error

    return products


def _check_reverse(
    product: torch.Tensor, vector: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
    objective: Objective, batch: Batch, size: int,
) -> None:
    """Raise when a reverse-over-reverse product is wrong: checked against a central difference of gradients,
    and where that disagrees (it is only approximate, e.g. across ReLU kinks), against forward-over-reverse.

    A custom op whose backward is not itself differentiable (``once_differentiable``, detached saved
    values) drops its Hessian terms from double backward silently. Forward-over-reverse is consulted
    only when needed: its first use in a process loads forward-mode decompositions (tenths of a second).
    """
    reference = finite_difference_products(objective, batch, size)(vector[:, None])[:, 0]
    error = float((product - reference).norm()) / max(float(reference.norm()), 1e-30)
    if error <= _DIFFERENCE_TOLERANCE:
        return
    try:
        exact = forward(vector[:, None])[:, 0]
    except RuntimeError:
        raise RuntimeError(f"its product differs from a central difference of gradients by {error:.2g} (relative): "
                           "an op's backward is not differentiable") from None
    error = float((product - exact).norm()) / max(float(exact.norm()), 1e-30)
    if not error <= _REVERSE_TOLERANCE:
        raise RuntimeError(f"its product differs from forward-over-reverse by {error:.2g} (relative): an op's "
                           "backward is not differentiable")


def finite_difference_products(objective: Objective, batch: Batch, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``vectors [D, b] -> (H + λ) vectors``: (∇(w* + h·v) - ∇(w* - h·v))/(2h) per column, 2 gradients each."""
    gradient = objective.gradient(batch, size)
    center = objective.fmodel.center

    def products(vectors: torch.Tensor) -> torch.Tensor:
        columns = []
        for vector in vectors.T:
            h = FINITE_DIFFERENCE_STEP / max(float(vector.norm()), 1e-30)
            columns.append((gradient(center + h * vector) - gradient(center - h * vector)) / (2 * h))
        return torch.stack(columns, dim=1)

    return products


def _reverse_over_reverse(objective: Objective, batch: Batch, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Products by double backward through the gradient's graph at w*, built on the first call and kept."""
    graph: list[torch.Tensor] = []  # [leaf, gradient] once built
    vectorized = [True]  # until batched double backward fails once

    def products(vectors: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            if not graph:
                leaf = objective.fmodel.center.detach().requires_grad_(True)
                value = objective.value(leaf, batch, size)
                graph.extend([leaf, torch.autograd.grad(value, leaf, create_graph=True)[0]])
            leaf, gradient = graph
            columns = vectors.T.contiguous()
            if columns.shape[0] > 1 and vectorized[0]:
                try:
                    return torch.cat([torch.autograd.grad(gradient, leaf, chunk, retain_graph=True,
                                                          is_grads_batched=True)[0]
                                      for chunk in columns.split(_HVP_CHUNK)]).T
                except RuntimeError:  # an op without a batching rule
                    vectorized[0] = False
            return torch.stack([torch.autograd.grad(gradient, leaf, column, retain_graph=True)[0]
                                for column in columns]).T

    return products


def _forward_over_reverse(objective: Objective, batch: Batch, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Products by ``torch.func.jvp`` over ``torch.func.grad`` (vmapped in chunks while vmap works)."""
    gradient = objective.gradient(batch, size)
    center = objective.fmodel.center

    def one(vector: torch.Tensor) -> torch.Tensor:
        return jvp(gradient, (center,), (vector,))[1]

    vectorized = [True]  # until vmap fails once; later blocks then go one product at a time straight away

    def products(vectors: torch.Tensor) -> torch.Tensor:
        columns = vectors.T.contiguous()
        if vectorized[0]:
            try:
                return torch.cat([vmap(one)(chunk) for chunk in columns.split(_HVP_CHUNK)]).T
            except RuntimeError:  # an op without a batching rule
                vectorized[0] = False
        return torch.stack([one(column) for column in columns]).T

    return products


def curvature_products(objective: Objective, batch: Batch, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``vectors [D, b] -> (H + λ) vectors``, by automatic differentiation, or central differences where it fails."""
    exact = hessian_vector_products(objective, batch, size)
    fallback = finite_difference_products(objective, batch, size)
    use_exact = [True]

    def products(vectors: torch.Tensor) -> torch.Tensor:
        if use_exact[0]:
            try:
                return exact(vectors)
            except RuntimeError:  # an op without forward-mode AD (e.g. fused attention kernels on a CPU)
                use_exact[0] = False
        return fallback(vectors)

    return products


def top_curvature(
    objective: Objective, batch: Batch, size: int, rank: int, seed: int, block: int = KRYLOV_BLOCK,
    extra: int = KRYLOV_EXTRA, probes: int = HUTCHINSON_PROBES,
) -> Curvature:
    """Top ``rank`` eigenpairs of the Hessian of ``mean loss + λ/2·‖w‖²`` at w*, by block Krylov (block Lanczos).

    The Krylov space of a Gaussian block Ω, span(Ω, AΩ, A²Ω, ...), is grown one block at a time
    (fully reorthogonalized) to ``rank + extra`` dimensions (at most D), and the eigenpairs come from
    Rayleigh–Ritz on it: ``rank + extra`` Hessian-vector products on ``batch`` (plus ``probes - block``
    for the mean), where randomized subspace iteration (Halko, Martinsson & Tropp 2011, algorithm 4.4)
    needs (2 + q)·(rank + oversample) for about the same accuracy. The mean eigenvalue is Hutchinson's
    estimate from ``probes`` Gaussian probes: Ω and ``probes - block`` more in the same call. The
    sampler's own seed drives them, so the global RNG is untouched and a snapshot is reproducible.

    Args:
        objective: The objective (model, loss, buffers, λ); its model's ``center`` is w*.
        batch: The examples whose mean loss defines the Hessian.
        size: Number of examples in ``batch``.
        rank: K, the number of eigenpairs; fewer than the number of sampled parameters.
        seed: Seed of the random start.
        block: Width of each Krylov block.
        extra: Dimensions of the Krylov space beyond K (accuracy of the K-th pair).
        probes: Hutchinson probes of the mean eigenvalue (the first ``block`` of them start the Krylov space).

    Returns:
        :class:`Curvature`.
    """
    fmodel = objective.fmodel
    dim = fmodel.dim
    if rank >= dim:
        raise ValueError(
            f"SGLDConfig.preconditioner_rank={rank} must be below the number of sampled parameters ({dim})."
        )
    products = hessian_vector_products(objective, batch, size)
    total = min(rank + extra, dim)
    generator = torch.Generator(device=fmodel.device).manual_seed(seed)
    first = min(block, total)
    start = torch.randn(dim, max(first, probes), generator=generator, device=fmodel.device, dtype=fmodel.center.dtype)
    images = products(start)
    mean = float((start * images).sum(0).mean()) / dim  # E[zᵀAz] = tr(A) for z ~ N(0, I)
    q, r = torch.linalg.qr(start[:, :first])
    basis, image = [q], [torch.linalg.solve_triangular(r, images[:, :first], upper=True, left=False)]  # A·Q = AΩ·R⁻¹
    width = q.shape[1]
    while width < total:
        spanned = torch.cat(basis, dim=1)
        nxt = image[-1][:, :min(block, total - width)]
        for _ in range(2):  # orthogonal to the space so far, twice (also the directions QR adds at a breakdown)
            nxt = nxt - spanned @ (spanned.T @ nxt)
            nxt = torch.linalg.qr(nxt).Q
        basis.append(nxt)
        image.append(products(nxt))
        width += nxt.shape[1]
    spanned = torch.cat(basis, dim=1)
    projected = spanned.T @ torch.cat(image, dim=1)
    values, rotation = torch.linalg.eigh((projected + projected.T) / 2)
    values, rotation = values.flip(0), rotation.flip(1)
    return Curvature(values=values[:rank + 1], vectors=spanned @ rotation[:, :rank], mean=mean)


class LowRankPreconditioner:
    """``G = g_rest·I + U diag(g - g_rest) Uᵀ`` with ``g_k = (λ_1 + δ)/(λ_k + δ)``.

    The stiffest direction keeps G = 1 and the other top-K directions and the flat complement (all
    given λ_{K+1}) move up to (λ_1 + δ)/(λ_{K+1} + δ) times faster. Along eigenvector k the
    posterior's curvature is A_k = nβ·λ_k + γ, and g_k·A_k ≤ A_1 exactly when δ ≥ γ/nβ: δ is
    raised to γ/nβ when it is below, so no direction becomes stiffer than the stiffest one and a
    step size that is stable without the preconditioner stays stable with it (in the quadratic
    approximation). δ = γ/nβ equalises every direction; a larger δ equalises less and keeps chains
    closer to the region where the posterior is quadratic (docs/benchmarks.md compares settings).

    Args:
        curvature: The top eigenpairs.
        damping: δ; ``None`` means 10 × the mean eigenvalue.
        floor: The least δ, γ/nβ.
    """

    def __init__(self, curvature: Curvature, damping: float | None, floor: float = 0.0) -> None:
        delta = max(10 * max(curvature.mean, 0.0) if damping is None else damping, floor)
        values = curvature.values.clamp_min(0) + max(delta, torch.finfo(curvature.values.dtype).tiny)
        gains = values[0] / values
        self.damping = float(delta)
        self.rest = float(gains[-1])
        self.basis = curvature.vectors.contiguous()
        self._top = (gains[:-1] - self.rest).to(self.basis.dtype)
        self._top_sqrt = (gains[:-1].sqrt() - self.rest**0.5).to(self.basis.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``G x`` for rows ``x [G, D]``."""
        return self.rest * x + ((x @ self.basis) * self._top) @ self.basis.T

    def apply_sqrt(self, x: torch.Tensor) -> torch.Tensor:
        """``G^{1/2} x`` for rows ``x [G, D]`` (scales the injected noise)."""
        return self.rest**0.5 * x + ((x @ self.basis) * self._top_sqrt) @ self.basis.T
