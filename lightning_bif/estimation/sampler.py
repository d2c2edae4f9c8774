"""Localized SGLD chains from the current weights, batched over chains, with their own RNG.

The sampler knows nothing of Lightning or of what is evaluated at a draw: it yields the
parameter vectors of the kept draws and leaves their use to the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils._pytree import tree_map

from ..config import SGLDConfig
from ..curvature.hessian import Curvature, LowRankPreconditioner, top_curvature
from ..curvature.objective import Objective
from ..example_sets import Batch, ExampleSet
from ..functional import FunctionalModel, LossFn
from ..tuning.minibatch import SMALLEST_MINIBATCH

ProgressFn = Callable[[int, int], None]

# Minibatches' worth of SGLD examples whose Hessian the "lowrank" preconditioner uses: one minibatch
# gives a noticeably worse preconditioner, all the data no better than four (docs/benchmarks.md).
_CURVATURE_MINIBATCHES = 4
# chain_seed's "chain" of the one minibatch-index stream all chains share with shared_minibatch_order
# (negative: not a chain; -1 .. -4 seed the curvature and tuning streams).
_SHARED_ORDER_STREAM = -5


@dataclass
class Draw:
    """One kept draw of a batch of chains (chains run together).

    Attributes:
        chains: Indices of the chains in this batch, ``[G]``.
        params: Their flat sampled parameters, ``[G, D]``.
        sampling_loss: Mean SGLD minibatch loss over the steps since the previous draw, ``[G]``.
        index: Position of the draw within each chain, ``0 .. draws - 1``.
    """

    chains: torch.Tensor
    params: torch.Tensor
    sampling_loss: torch.Tensor
    index: int


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], batch: Batch) -> Batch:
    return tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, batch)


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    return _map_tensors(lambda t: t[start:stop], batch)


def chain_seed(seed: int, chain: int) -> int:
    """Seed of chain ``chain``'s generators: fixed per (seed, chain), independent of how chains are batched."""
    return (seed * 1_000_003 + chain * 7_919 + 17) % (2**63 - 1)


class _ChainRandomness:
    """Per-chain generators: minibatch indices on the CPU, Gaussian noise on the device.

    With ``shared_order`` one index stream, seeded from the seed alone, serves every chain: each
    chain sees the same minibatch at the same step (whichever chains run together), and only the
    noise differs between chains.
    """

    def __init__(self, chains: list[int], seed: int, device: torch.device, shared_order: bool = False) -> None:
        self.shared_order = shared_order
        streams = [_SHARED_ORDER_STREAM] if shared_order else chains
        self.index_gens = [torch.Generator().manual_seed(chain_seed(seed, c)) for c in streams]
        self.noise_gens = [torch.Generator(device=device).manual_seed(chain_seed(seed, c) + 1) for c in chains]
        self.device = device

    def indices(self, n: int, m: int) -> torch.Tensor:
        """The step's minibatch indices: ``[G·m]``, chain after chain, or ``[m]`` for all with ``shared_order``."""
        return torch.cat([torch.randint(n, (m,), generator=g) for g in self.index_gens])

    def noise(self, out: torch.Tensor) -> torch.Tensor:
        """Fill row i of ``out [G, D]`` from chain i's stream (in place: no per-step allocation)."""
        for row, g in zip(out, self.noise_gens, strict=True):
            row.normal_(generator=g)
        return out


class Preconditioner(Protocol):
    """A constant positive-definite G applied to rows ``[G, D]``; either method may overwrite its argument."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``G x``."""
        ...

    def apply_sqrt(self, x: torch.Tensor) -> torch.Tensor:
        """``G^{1/2} x``."""
        ...


class _DiagonalPreconditioner:
    """Elementwise G per chain (``preconditioner="rmsprop"`` once frozen), applied in place."""

    def __init__(self, diagonal: torch.Tensor) -> None:
        self.diagonal = diagonal
        self.diagonal_sqrt = diagonal.sqrt()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.diagonal)

    def apply_sqrt(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.diagonal_sqrt)


def sgld_drift(
    w: torch.Tensor, grads: torch.Tensor, center: torch.Tensor, nbeta: float, localization: float, weight_decay: float
) -> torch.Tensor:
    """Gradient of the localized posterior's potential, ``nβ·∇L + nβλ·w + γ·(w − w*)``, per chain.

    Args:
        w: Chain positions ``[G, D]``.
        grads: Minibatch gradients of the mean loss at ``w``, ``[G, D]``; overwritten with the result
            (so a step allocates nothing of the size of the parameters).
        center: w*, ``[D]``.
        nbeta: nβ.
        localization: γ.
        weight_decay: λ.

    Returns:
        ``grads``, now holding the drift.
    """
    return grads.mul_(nbeta).add_(w, alpha=localization + nbeta * weight_decay).sub_(center, alpha=localization)


def sgld_step(
    w: torch.Tensor, drift: torch.Tensor, noise: torch.Tensor, step_size: float, precondition: Preconditioner | None
) -> None:
    """The SGLD update, in place: ``w ← w − ε/2·G·drift + √ε·G^{1/2}·ξ`` (G = 1 when ``precondition`` is None).

    Args:
        w: Chain positions ``[G, D]``, updated in place.
        drift: :func:`sgld_drift` at ``w`` (may be overwritten).
        noise: Standard Gaussian noise ξ, ``[G, D]`` (may be overwritten).
        step_size: ε.
        precondition: G, or None for the identity.
    """
    if precondition is not None:
        drift, noise = precondition.apply(drift), precondition.apply_sqrt(noise)
    w.add_(drift, alpha=-step_size / 2).add_(noise, alpha=step_size**0.5)


class SGLDSampler:
    """Runs batches of localized SGLD chains from ``fmodel.center`` (w*).

    Args:
        fmodel: The functional view of the model; its ``center`` is w*.
        data: Examples SGLD minibatches are drawn from.
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example training loss.
        config: Sampler hyperparameters.
        nbeta: The effective nβ (``config.nbeta`` or its default, resolved by the caller).
    """

    def __init__(
        self, fmodel: FunctionalModel, data: ExampleSet, loss_fn: LossFn, config: SGLDConfig, nbeta: float
    ) -> None:
        if config.draws is None or config.thin is None:
            raise ValueError("SGLDSampler needs SGLDConfig.draws and thin set (BIFEstimator chooses them when None).")
        self.fmodel = fmodel
        self.data = data
        self.loss_fn = loss_fn
        self.config = config
        self.nbeta = nbeta
        self._full_batch: Batch | None = None
        #: With ``batch_size="auto"``: the largest minibatch the tuning may choose (it sizes the curvature sample).
        self.largest_minibatch = 0
        self.use_minibatch(SMALLEST_MINIBATCH if config.batch_size == "auto" else config.batch_size)
        self._lowrank: LowRankPreconditioner | None = None
        self.cached_curvature: Curvature | None = None

    def use_minibatch(self, batch_size: int | None) -> None:
        """Draw minibatches of ``batch_size`` examples (``None`` or ≥ the data: the full batch) from now on.

        ``batch_size="auto"`` samples with ``SMALLEST_MINIBATCH`` until the tuning sets the chosen size here.
        """
        full = batch_size is None or batch_size >= len(self.data)
        self.minibatch = len(self.data) if full else int(batch_size)
        if full and self._full_batch is None:
            self._full_batch = self.data.gather(torch.arange(len(self.data)), self.fmodel.device)
        elif not full:
            self._full_batch = None

    def lowrank_preconditioner(self, buffers: dict[str, torch.Tensor]) -> LowRankPreconditioner:
        """The ``preconditioner="lowrank"`` operator, computed on first use and kept for later batches of chains.

        Its Hessian is that of the SGLD data's mean loss (all of it with full-batch SGLD, else a fixed
        sample of four minibatches' worth of examples drawn with the sampler's seed) plus the L2 prior.
        Its K + 80 Hessian-vector products run on that sample.
        """
        if self._lowrank is None:
            cfg = self.config
            self._lowrank = LowRankPreconditioner(self.curvature(buffers), cfg.preconditioner_damping,
                                                  floor=cfg.localization / self.nbeta)
        return self._lowrank

    def curvature(self, buffers: dict[str, torch.Tensor]) -> Curvature:
        """The top ``preconditioner_rank`` eigenpairs of the objective's Hessian at w*, computed on first use.

        One computation serves the low-rank preconditioner and the subspace control variates; a
        caller that has them already (from an earlier snapshot) sets :attr:`cached_curvature`.
        """
        if self.cached_curvature is None:
            cfg = self.config
            size, batch = self.curvature_sample()
            objective = Objective(self.fmodel, self.loss_fn, buffers, cfg.weight_decay)
            self.cached_curvature = top_curvature(objective, batch, size, cfg.preconditioner_rank,
                                                  seed=chain_seed(cfg.seed, -1))
        return self.cached_curvature

    def curvature_sample(self) -> tuple[int, Batch]:
        """The examples whose Hessian describes the posterior's curvature: all SGLD data with full-batch
        SGLD, else four minibatches' worth drawn with the sampler's seed. With ``batch_size="auto"``, all
        SGLD data where the rule may choose the full batch (:attr:`largest_minibatch` covers them), else
        four minibatches of 64 as before. Returns ``(size, batch)``."""
        if self._full_batch is not None:
            return len(self.data), self._full_batch
        if self.largest_minibatch >= len(self.data):
            return len(self.data), self.data.gather(torch.arange(len(self.data)), self.fmodel.device)
        size = min(len(self.data), _CURVATURE_MINIBATCHES * self.minibatch)
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.config.seed))
        return size, self.data.gather(order[:size], self.fmodel.device)

    def drift_samples(self, count: int = _CURVATURE_MINIBATCHES) -> list[tuple[int, Batch]]:
        """Examples whose Hessians are those the SGLD drift sees: the full data with full-batch SGLD, else
        ``count`` minibatches drawn as the chains draw theirs (with replacement), from the sampler's seed
        but not from :meth:`curvature_sample`'s examples alone. Returns ``[(size, batch), ...]``."""
        if self._full_batch is not None:
            return [(len(self.data), self._full_batch)]
        generator = torch.Generator().manual_seed(chain_seed(self.config.seed, -4))
        return [(self.minibatch, self.data.gather(torch.randint(len(self.data), (self.minibatch,),
                                                                generator=generator), self.fmodel.device))
                for _ in range(count)]

    @property
    def steps_per_chain(self) -> int:
        """SGLD steps every chain takes: burn-in plus draws times thinning."""
        return self.config.burn_in + self.config.draws * self.config.thin

    def _minibatches(self, rng: _ChainRandomness, chains: int, vectorized: bool) -> tuple[Batch, bool]:
        """Per-chain minibatches (stacked on a chain axis when vectorized), and whether one is shared."""
        if self._full_batch is not None:
            return self._full_batch, True
        m = self.minibatch
        flat = self.data.gather(rng.indices(len(self.data), m), self.fmodel.device)
        if rng.shared_order:
            return flat, True
        if vectorized:
            return _map_tensors(lambda t: t.view(chains, m, *t.shape[1:]), flat), False
        return [_rows(flat, g * m, (g + 1) * m) for g in range(chains)], False

    def example_minibatch(self, chains: int, vectorized: bool = True) -> tuple[Batch, bool]:
        """A minibatch for a batch of ``chains`` chains from throwaway generators (for checks and timing)."""
        return self._minibatches(self._randomness(list(range(chains))), chains, vectorized)

    def _randomness(self, chains: list[int]) -> _ChainRandomness:
        return _ChainRandomness(chains, self.config.seed, self.fmodel.device, self.config.shared_minibatch_order)

    def run(
        self, chains: list[int], vectorized: bool, progress: ProgressFn | None = None
    ) -> Iterator[Draw]:
        """Run the chains ``chains`` together and yield every kept draw.

        Chain c's trajectory depends only on (seed, c): the same chain gives the same draws
        whether it runs alone, in a vectorized batch, or on another DDP rank.

        Raises:
            ValueError: When ``step_size`` or ``localization`` is still ``None`` (:class:`BIFEstimator` resolves
                them from the curvature at w*; a sampler used on its own needs them set).
        """
        cfg = self.config
        unset = [name for name in ("step_size", "localization") if getattr(cfg, name) is None]
        if unset:
            raise ValueError(f"SGLDSampler.run needs SGLDConfig.{' and '.join(unset)} set: None means 'chosen at w*', "
                             "which BIFEstimator (and estimate_bif) do before sampling. Set a number, or sample "
                             "through BIFEstimator.")
        fmodel = self.fmodel
        size = len(chains)
        center = fmodel.center
        buffers = fmodel.fresh_buffers()
        rng = self._randomness(chains)
        chain_index = torch.as_tensor(chains, dtype=torch.long, device=fmodel.device)
        w = center.expand(size, -1).clone()
        noise = torch.empty_like(w)
        precondition: Preconditioner | None = (  # G = 1 until the "rmsprop" preconditioner is frozen
            self.lowrank_preconditioner(buffers) if cfg.preconditioner == "lowrank" else None
        )
        second_moment = torch.zeros_like(w) if cfg.preconditioner == "rmsprop" else None
        loss_since_draw = torch.zeros(size, device=fmodel.device, dtype=w.dtype)
        for step in range(self.steps_per_chain):
            batch, shared = self._minibatches(rng, size, vectorized)
            grads, values = fmodel.batched_grads(
                w, batch, self.minibatch, self.loss_fn, buffers, vectorized=vectorized, shared_batch=shared
            )
            drift = sgld_drift(w, grads, center, self.nbeta, cfg.localization, cfg.weight_decay)
            if second_moment is not None:
                second_moment += drift.square()
                if step == cfg.burn_in - 1:
                    precondition = _DiagonalPreconditioner(self._frozen_preconditioner(second_moment / cfg.burn_in))
                    second_moment = None
            sgld_step(w, drift, rng.noise(noise), cfg.step_size, precondition)
            if progress is not None:
                progress(step + 1, self.steps_per_chain)
            kept = step - cfg.burn_in + 1
            if kept <= 0:
                continue
            loss_since_draw = loss_since_draw + values
            if kept % cfg.thin == 0:
                yield Draw(chain_index, w.clone(), loss_since_draw / cfg.thin, kept // cfg.thin - 1)
                loss_since_draw = torch.zeros_like(loss_since_draw)

    def _frozen_preconditioner(self, mean_square_drift: torch.Tensor) -> torch.Tensor:
        """Diagonal preconditioner G_i = sqrt(max_j V_j / V_i) per chain.

        The stiffest coordinate keeps G = 1, so a step size that is stable without the
        preconditioner stays stable with it, while flat coordinates move up to
        sqrt(curvature ratio) times faster. V_i is floored at the prior curvature γ + nβλ, the
        least curvature any coordinate of the localized posterior can have.
        """
        floor = self.config.localization + self.nbeta * self.config.weight_decay
        floor = max(floor, 1e-12)
        v = mean_square_drift.clamp_min(floor)
        return (v.amax(dim=1, keepdim=True) / v).sqrt()
