"""The Lanczos iteration for the extreme eigenvalues of symmetric operators given by their products.

One implementation serves the saddle check's λ_min and λ_max (:mod:`lightning_bif.tuning.horizon`) and
the drift's stiffness with and without the preconditioner (:mod:`lightning_bif.curvature.stiffness`).
Several independent operators can run in lockstep: column j of the start block is the start of
operator j, and ``products`` applies operator j to column j, so one call (e.g. one batched
Hessian-vector product) advances all of them. Full reorthogonalization (twice, Kahan–Parlett)
keeps the Ritz values clean; they lie inside each spectrum and approach its ends first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Extremes:
    """Ritz estimates of the ends of the spectra of ``b`` operators run in lockstep.

    Attributes:
        lowest: The least Ritz value of each operator, ``[b]`` (float64, host).
        highest: The largest, ``[b]``.
        vectors: Unit Ritz vectors ``[D, b, 2]``: of the least (``[..., 0]``) and the largest (``[..., 1]``).
        steps: Products each operator took.
    """

    lowest: torch.Tensor
    highest: torch.Tensor
    vectors: torch.Tensor
    steps: int


def lanczos(
    products: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int,
    tolerance: float | None = None,
) -> Extremes:
    """Lanczos with full reorthogonalization on ``b`` operators at once.

    Args:
        products: ``block [D, b] -> block [D, b]``, column j the product of operator j with column j.
        start: Start vectors ``[D, b]`` (any norm, none zero).
        steps: Most products per operator (at most D).
        tolerance: Stop early once every operator's largest Ritz value changed by less than
            ``tolerance`` × its size in the last step (``None``: run all ``steps``).

    Returns:
        :class:`Extremes`. The iteration also stops when an operator's Krylov space is exhausted
        (its Ritz values are then exact).
    """
    dim = start.shape[0]
    steps = max(1, min(steps, dim))
    basis = [start / start.norm(dim=0)]
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    top = None
    for k in range(steps):
        w = products(basis[k])
        alphas.append((basis[k] * w).sum(0))
        stacked = torch.stack(basis, dim=2)  # [D, b, k + 1]
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            w = w - torch.einsum("dbk,bk->db", stacked, torch.einsum("dbk,db->bk", stacked, w))
        beta = w.norm(dim=0)
        if tolerance is not None:
            latest = torch.linalg.eigvalsh(_tridiagonal(alphas, betas))[:, -1]
            if top is not None and bool(((latest - top).abs() <= tolerance * latest.abs()).all()):
                break
            top = latest
        scale = torch.stack(alphas).abs().amax(0).clamp_min(1e-30)
        if k == steps - 1 or bool((beta <= 1e-10 * scale).any()):
            break
        betas.append(beta)
        basis.append(w / beta)
    n = len(alphas)
    values, rotation = torch.linalg.eigh(_tridiagonal(alphas, betas[:n - 1]))
    ends = rotation[:, :, [0, -1]].to(device=start.device, dtype=start.dtype)  # [b, n, 2]
    vectors = torch.einsum("dbk,bke->dbe", torch.stack(basis[:n], dim=2), ends)
    return Extremes(lowest=values[:, 0], highest=values[:, -1], vectors=vectors / vectors.norm(dim=0, keepdim=True),
                    steps=n)


def _tridiagonal(alphas: list[torch.Tensor], betas: list[torch.Tensor]) -> torch.Tensor:
    """The Lanczos matrices ``[b, n, n]`` (float64, host) of the first ``n = len(alphas)`` steps."""
    diagonal = torch.stack(alphas, dim=1).double().cpu()
    matrix = torch.diag_embed(diagonal)
    if betas:
        off = torch.stack(betas[:diagonal.shape[1] - 1], dim=1).double().cpu()
        matrix = matrix + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    return matrix
