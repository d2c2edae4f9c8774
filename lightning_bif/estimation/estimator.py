"""``estimate_bif``: the local Bayesian influence of training examples on probes, at given weights."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..config import SGLDConfig
from ..curvature.cache import CachedCurvature, CurvatureCache
from ..curvature.extremes import lanczos_extremes
from ..curvature.hessian import LowRankPreconditioner, curvature_products, top_curvature
from ..curvature.objective import Objective
from ..curvature.stiffness import STIFFNESS_STEPS, STIFFNESS_TOLERANCE, drift_stiffness
from ..example_sets import Batch, ExampleSet, ExampleSource
from ..functional import FunctionalModel, LossFn
from ..tuning.autotune import Tuning, budget_minibatch, lowrank_fits, resolve_budget
from ..tuning.horizon import STIFFNESS_STEP, HorizonCheck, horizon_config, horizon_localization
from ..tuning.localization import choose_localization, hutchinson_mean_eigenvalue
from .accumulator import CovarianceAccumulator, effective_sample_size
from .control_variates import Subspace, projected_gradients
from .divergence import loss_rise_bound, suspect_rise_bound
from .result import BIFResult, Diagnostics
from .sampler import ProgressFn, SGLDSampler, chain_seed

# On a CPU, chains run one after another under vectorize="auto" when one chain's SGLD step takes this long.
CPU_VMAP_MAX_STEP_S = 0.005


class BIFEstimator:
    """The steps of one estimate, for callers that run chains in parts (DDP ranks).

    ``estimate_bif`` is ``prepare`` → ``sample_checked(all chains)`` → ``summarize``. A DDP caller runs
    ``sample`` on its share of the chains on every rank, sums the accumulator tensors across
    ranks, and calls ``summarize`` on the merged result:
    :class:`~lightning_bif.snapshot.snapshotter.Snapshotter` does both.

    Args: as :func:`estimate_bif`, and
        vectorized: Whether chains run under vmap, decided earlier (e.g. by a first estimate's
            :attr:`vectorized`): skips the trial of ``config.vectorize="auto"``. With "auto" a batch of
            chains that fails under vmap still falls back to running one chain at a time.
        cache: Curvature measured by earlier estimates (:mod:`lightning_bif.curvature.cache`), reused while
            fresh; the new measurement is stored in it.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train: ExampleSource,
        probes: ExampleSource,
        *,
        probe_fn: LossFn | None = None,
        data: ExampleSource | None = None,
        config: SGLDConfig | None = None,
        device: torch.device | str | None = None,
        vectorized: bool | None = None,
        cache: CurvatureCache | None = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) -> Tensor[B]; got {loss_fn!r}.")
        self.model = model
        self.loss_fn = loss_fn
        self.probe_fn = probe_fn or loss_fn
        self.config = config or SGLDConfig()
        self.train = ExampleSet(train, "train")
        self.probes = ExampleSet(probes, "probes")
        self.data = self.train if data is None else ExampleSet(data, "data")
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError("The model has no parameters: there is nothing to sample.")
        self.device = torch.device(device) if device is not None else first.device
        self.nbeta = float(self.config.nbeta) if self.config.nbeta is not None else float(len(self.data))
        self._decided = vectorized
        self.cache = cache
        #: What was chosen automatically and why (:mod:`lightning_bif.tuning.autotune`); filled by :meth:`prepare`.
        self.tuning = Tuning()
        self.config = resolve_budget(self.config, len(self.train) + len(self.probes),
                                     budget_minibatch(self.config, len(self.train)), self.tuning)
        #: Why chains run one at a time under ``vectorize="auto"`` (``None`` when they run under vmap).
        self.sequential_reason: str | None = None

    def evaluate(
        self, fmodel: FunctionalModel, params: torch.Tensor, vectorized: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Train losses ``[G, N]`` and probe observables ``[G, P]`` at parameter vectors ``[G, D]``.

        With ``config.per_token`` the probe observables are ``[G, P + P·T]``: the P token means, then
        the P·T token losses (probe-major), so that one accumulator (and one DDP merge) holds both.
        """
        buffers = self._buffers
        if self._joint_batch is not None:
            size, batch = self._joint_batch
            losses = fmodel.batched_losses(params, batch, size, self.loss_fn, buffers, "loss_fn", vectorized)
            return losses[:, :len(self.train)], losses[:, len(self.train):]
        per_token = self.config.per_token
        train = torch.cat([fmodel.batched_losses(params, batch, size, self.loss_fn, buffers, "loss_fn", vectorized)
                           for size, batch in self._train_batches], dim=1)
        probes = [fmodel.batched_losses(params, batch, size, self.probe_fn, buffers, "probe_fn", vectorized, per_token)
                  for size, batch in self._probe_batches]
        if not per_token:
            return train, torch.cat(probes, dim=1)
        tokens = _probe_tokens(probes)
        return train, torch.cat([tokens.mean(dim=2), tokens.flatten(1)], dim=1)

    def prepare(self) -> None:
        """Build the functional model and evaluation batches; compute and check the losses at w*; tune.

        Tuning (:mod:`lightning_bif.tuning.autotune`) resolves the settings left unset from the curvature at
        w*, which comes from the cache passed to the constructor when it is still fresh.
        """
        self.check_losses()
        self.tune()
        self.vectorized = self._choose_vectorized()

    def check_losses(self) -> None:
        """Build the functional model and evaluation batches; compute and check the losses at w* (no tuning).

        Sets ``train_loss [N]`` and ``probe_loss`` (the tracked losses at w*, as in :class:`BIFResult`).
        """
        cfg = self.config
        self._build()
        train_loss, probe_loss = self.evaluate(self.fmodel, self.fmodel.center[None], vectorized=False)
        self.train_loss, self.probe_loss = train_loss[0], probe_loss[0]
        _check_finite(self.train_loss, "loss_fn", "training example")
        _check_finite(self.probe_loss, "probe_fn" if self.probe_fn is not self.loss_fn else "loss_fn", "probe")
        # Tokens per probe: the observables are P token means followed by P·T token losses.
        self.tokens = probe_loss.shape[1] // len(self.probes) - 1 if cfg.per_token else None
        if self.tokens is not None:
            _check_token_budget(cfg, len(self.probes), self.tokens, len(self.train))
        if self.probe_fn is self.loss_fn and not cfg.per_token:
            self._joint_batch = _joint_batch(self._train_batches, self._probe_batches, cfg.eval_batch_size)
        self.horizon: HorizonCheck | None = None
        self.subspace: Subspace | None = None

    @property
    def train_loss0(self) -> torch.Tensor:
        """Deprecated name of ``train_loss``."""
        warnings.warn("BIFEstimator.train_loss0 is deprecated; use BIFEstimator.train_loss.", DeprecationWarning,
                      stacklevel=2)
        return self.train_loss

    @property
    def probe_loss0(self) -> torch.Tensor:
        """Deprecated name of ``probe_loss``."""
        warnings.warn("BIFEstimator.probe_loss0 is deprecated; use BIFEstimator.probe_loss.", DeprecationWarning,
                      stacklevel=2)
        return self.probe_loss

    def tune(self) -> None:
        """Resolve the unset settings (:mod:`lightning_bif.tuning.autotune`) into :attr:`config`.

        Call check_losses first.
        """
        start = time.perf_counter()
        self._tune()
        self.tuning.seconds = time.perf_counter() - start

    def _tune(self) -> None:
        cfg, tuning = self.config, self.tuning
        preconditioner = cfg.preconditioner
        if preconditioner is None:
            fits, why = lowrank_fits(cfg, self.fmodel.dim, self.fmodel.center.element_size(), tuning)
            if fits and self.cache is not None and self.cache.lowrank_runaway is not None:
                fits, why = False, f"its chains ran away at an earlier estimate ({self.cache.lowrank_runaway})"
            preconditioner = "lowrank" if fits else "none"
            tuning.choose("preconditioner", preconditioner, why)
        need_eigenpairs = preconditioner == "lowrank" or bool(cfg.control_variates)
        need_extremes = cfg.step_size is None or cfg.horizon_steps is not None or cfg.localization is None
        try:
            measured = self._measure(need_extremes, need_eigenpairs)
        except RuntimeError as error:
            if cfg.preconditioner is not None or cfg.control_variates:
                raise
            preconditioner = "none"  # Hessian-vector products failed: plain SGLD, said why
            tuning.choose("preconditioner", preconditioner, f"Hessian-vector products failed: {str(error)[:300]}")
            measured = self._measure(need_extremes, need_eigenpairs=False)
        control_variates = cfg.control_variates
        if control_variates is None:
            control_variates = preconditioner == "lowrank" and not cfg.per_token
            tuning.choose("control_variates", control_variates,
                          "the top eigenpairs are measured for the preconditioner" if control_variates else
                          "per-token estimate" if preconditioner == "lowrank" else "no eigenpairs measured")
        cfg = cfg.replace(preconditioner=preconditioner, control_variates=control_variates)
        self._measured = measured
        if measured is not None:
            tuning.lambda_min, tuning.lambda_max = measured.extremes
            if measured.curvature is not None:
                tuning.mean_eigenvalue = measured.curvature.mean
                tuning.top_eigenvalues = measured.curvature.values.tolist()
                self.sampler.cached_curvature = measured.curvature
        floor = 0.0
        if cfg.localization is None:
            cfg, floor = self._choose_localization(cfg, measured)
        if cfg.horizon_steps is not None:
            cfg, self.horizon = horizon_config(cfg, self.nbeta, *measured.extremes, floor=floor)
            if self.config.step_size is None:
                tuning.choose("step_size", cfg.step_size, f"{STIFFNESS_STEP:g}/(nβ·λ_max + γ) with the horizon's γ")
        elif cfg.step_size is None:
            step_size = STIFFNESS_STEP / (self.nbeta * max(measured.extremes[1], 0.0) + cfg.localization)
            cfg = cfg.replace(step_size=step_size)
            tuning.choose("step_size", step_size, f"{STIFFNESS_STEP:g}/(nβ·λ_max + γ)")
        self.config = self.sampler.config = cfg  # γ and ε are resolved before any chain runs
        if cfg.preconditioner == "lowrank":  # here, not in the SGLD loop: it reads values on the host
            lowrank = self.sampler.lowrank_preconditioner(self._buffers)
            if tuning.chosen.get("step_size") is not None:
                cfg = self._preconditioned_step(cfg, lowrank)
        self.config = self.sampler.config = cfg
        if cfg.control_variates:
            self.subspace = self._subspace(self.sampler.curvature(self._buffers).vectors)

    def _choose_localization(self, cfg: SGLDConfig, measured: CachedCurvature) -> tuple[SGLDConfig, float]:
        """γ by :mod:`lightning_bif.tuning.localization` (the horizon's γ itself is set later by ``horizon_config``).

        Returns the config with γ set (without a horizon) and the floor on γ.
        """
        mean = measured.curvature.mean if measured.curvature is not None else measured.mean_eigenvalue
        lambda_min = measured.extremes[0]
        horizon = horizon_localization(cfg, self.nbeta, lambda_min) if cfg.horizon_steps is not None else None
        choice = choose_localization(self.nbeta, mean, lambda_min, horizon)
        self.tuning.mean_eigenvalue = mean
        self.tuning.localization_floor = choice.floor
        self.tuning.choose("localization", choice.localization, choice.reason)
        return (cfg if horizon is not None else cfg.replace(localization=choice.localization)), choice.floor

    def _preconditioned_step(self, cfg: SGLDConfig, lowrank: LowRankPreconditioner) -> SGLDConfig:
        """ε so that the preconditioned drift is no stiffer than the plain drift at the plain rule's ε.

        The stability of SGLD is set by ε·λ_max of the curvature of the drift each step follows: A_B =
        nβ·H_B + γ for the step's minibatch B, and G^{1/2}·A_B·G^{1/2} with the preconditioner. G
        flattens the top eigenvectors of the curvature sample, so measured on that same sample its
        complement looks as flat as λ_{K+1}; a fresh minibatch has curvature outside that subspace,
        which G amplifies up to (λ_1 + δ)/(λ_{K+1} + δ) times. So both λ_max are measured (Lanczos) on
        minibatches drawn as the chains draw theirs (the full data with full-batch SGLD), the largest
        of each kept, and ε = ε_plain · min(1, λ_max(A_B) / λ_max(G·A_B)): the margin the plain rule
        leaves on the drift's minibatches is kept, whatever G does to them (:mod:`lightning_bif.curvature.stiffness`).
        While the curvature is reused from the cache, the stiffness measured with it is reused too.
        """
        gamma, stored = cfg.localization, self._measured.preconditioned
        cached = stored.get((gamma, lowrank.damping))
        if cached is not None:  # same curvature, same γ and δ: the same operators
            return self._preconditioned_choice(cfg, *cached, "cached")
        if self.tuning.curvature_reused and stored:  # the curvature is still fresh: so is its stiffness ratio
            (old_gamma, old_damping), pair = next(reversed(stored.items()))
            return self._preconditioned_choice(cfg, *pair, f"reused with the curvature, measured at γ = {old_gamma:.4g}"
                                                           f", δ = {old_damping:.4g}")
        samples = self.sampler.drift_samples()
        found = drift_stiffness(self._objective(), samples, self.nbeta, gamma, lowrank, seed=chain_seed(cfg.seed, -3))
        stored[(gamma, lowrank.damping)] = (found.plain, found.preconditioned)
        where = f"{len(samples)} SGLD minibatches" if len(samples) > 1 else "the full-batch drift"
        source = (f"Lanczos in lockstep on {where}, {found.steps} steps "
                  f"(stopped at {STIFFNESS_TOLERANCE:.0%} change or {STIFFNESS_STEPS})")
        return self._preconditioned_choice(cfg, found.plain, found.preconditioned, source)

    def _preconditioned_choice(self, cfg: SGLDConfig, plain: float, preconditioned: float, source: str) -> SGLDConfig:
        step_size = cfg.step_size * min(1.0, plain / preconditioned)
        self.tuning.preconditioned_stiffness, self.tuning.drift_stiffness = preconditioned, plain
        self.tuning.choose("step_size", step_size,
                           f"{cfg.step_size:.3g} · min(1, λ_max(A) / λ_max(G·A)) = {cfg.step_size:.3g} · min(1, "
                           f"{plain:.4g} / {preconditioned:.4g}) on the drift's curvature ({source})")
        return cfg.replace(step_size=step_size)

    def _measure(self, need_extremes: bool, need_eigenpairs: bool) -> CachedCurvature | None:
        """The Hessian's extreme eigenvalues (and top eigenpairs when needed) at w*: from the cache if fresh.

        With an automatic ``localization`` and no eigenpairs, also the mean eigenvalue (Hutchinson).
        """
        if not (need_extremes or need_eigenpairs):
            return None
        # Local: the products keep the gradient's graph on the curvature sample, freed when this returns.
        entry, products = self._measure_curvature(need_eigenpairs)
        if self.config.localization is None and entry.curvature is None and entry.mean_eigenvalue is None:
            entry.mean_eigenvalue = hutchinson_mean_eigenvalue(
                products, self.fmodel.dim, self.fmodel.device, self.fmodel.center.dtype,
                seed=chain_seed(self.config.seed, -4))
        return entry

    def _measure_curvature(
        self, need_eigenpairs: bool
    ) -> tuple[CachedCurvature, Callable[[torch.Tensor], torch.Tensor]]:
        """The cached or newly measured curvature, and the curvature sample's Hessian-vector products."""
        cfg = self.config
        size, batch = self.sampler.curvature_sample()
        products = curvature_products(self._objective(), batch, size)
        key = (self.fmodel.dim, cfg.weight_decay, cfg.preconditioner_rank, cfg.seed, size)
        if self.cache is not None:
            entry, freshness = self.cache.check(key, products, need_eigenpairs)
            self.tuning.curvature_reused = freshness.fresh
            self.tuning.curvature_drift = freshness.drift
            self.tuning.curvature_reason = freshness.reason
            if entry is not None:
                return entry, products
        extremes, ritz = lanczos_extremes(products, self.fmodel, seed=chain_seed(cfg.seed, -2))
        curvature = None
        if need_eigenpairs:
            curvature = top_curvature(self._objective(), batch, size, cfg.preconditioner_rank,
                                      seed=chain_seed(cfg.seed, -1))
        entry = CachedCurvature(key, extremes, ritz, curvature)
        if self.cache is not None:
            self.cache.store(entry)
        return entry, products

    def _objective(self) -> Objective:
        """The training objective at w* whose curvature the tuning measures."""
        return Objective(self.fmodel, self.loss_fn, self._buffers, self.config.weight_decay)

    def _subspace(self, basis: torch.Tensor) -> Subspace:
        """The control variates' eigenbasis with the tracked losses' gradients projected on it."""
        train = projected_gradients(self.fmodel, self._train_batches, self.loss_fn, self._buffers, basis, "loss_fn")
        probes = projected_gradients(self.fmodel, self._probe_batches, self.probe_fn, self._buffers, basis,
                                     "probe_fn")
        return Subspace(basis=basis, train=train, probe=probes)

    def decide_vectorized(self) -> bool:
        """Resolve ``config.vectorize`` alone (what :meth:`prepare` does last), e.g. once before many estimates.

        Returns:
            Whether chains would run under vmap; :attr:`sequential_reason` says why not under "auto".

        Raises:
            ValueError: With ``vectorize=True`` when vmap cannot run one of the functions.
        """
        self._build()
        self.vectorized = self._choose_vectorized()
        return self.vectorized

    def _build(self) -> None:
        """The functional model, its buffers, the evaluation batches and the sampler."""
        cfg = self.config
        self.fmodel = FunctionalModel(self.model, cfg.sample_params, self.device, autocast=cfg.autocast)
        self._buffers = self.fmodel.fresh_buffers()
        self._train_batches = self.train.batches(cfg.eval_batch_size, self.device)
        self._probe_batches = self.probes.batches(cfg.eval_batch_size, self.device)
        self._joint_batch: tuple[int, Batch] | None = None  # the losses at w* are checked set by set
        self.sampler = SGLDSampler(self.fmodel, self.data, self.loss_fn, cfg, self.nbeta)

    def _choose_vectorized(self) -> bool:
        """Resolve ``config.vectorize`` (or adopt the decision passed to the constructor).

        "auto" runs chains one after another on a CPU when one chain's SGLD step takes at least
        ``CPU_VMAP_MAX_STEP_S``, and otherwise tries vmap once on every function a draw runs
        (:meth:`vmap_error`), falling back on failure. On a CPU, vmap only saves per-call overhead,
        while its batched matmuls run slower than one matmul per chain: once a step is long enough
        for overhead not to matter, vmap loses (docs/benchmarks.md, "Speed", has the measurements
        behind the threshold). Both ways give the same draws up to float rounding. ``True`` is checked
        the same way and refused with the failing function named.
        """
        if self._decided is not None:
            return self._decided
        if self.config.vectorize is False:
            return False
        if self.config.vectorize == "auto" and self.device.type == "cpu":
            seconds = self._one_chain_step_seconds()
            if seconds >= CPU_VMAP_MAX_STEP_S:
                self.sequential_reason = (f"one chain's SGLD step takes {seconds * 1e3:.1f} ms on the CPU, where "
                                          f"vmap is slower from {CPU_VMAP_MAX_STEP_S * 1e3:g} ms on")
                return False
        error = self.vmap_error()
        if error is None:
            return True
        if self.config.vectorize is True:
            raise ValueError(f"SGLDConfig(vectorize=True), but {error} Use vectorize='auto' (falls back to "
                             "running chains one after another) or vectorize=False.")
        warnings.warn(f"Chains run one after another because {error} Set SGLDConfig(vectorize=False) to silence this.",
                      stacklevel=3)
        self.sequential_reason = error
        return False

    def vmap_error(self) -> str | None:
        """Why ``torch.func.vmap`` cannot run this estimate's functions, or ``None`` when it can.

        Runs each function a snapshot calls, for two copies of w*: the SGLD gradient of ``loss_fn``
        on a minibatch, ``loss_fn`` on the tracked examples and ``probe_fn`` on the probes
        (per-token when configured). Call after :meth:`prepare` or :meth:`decide_vectorized`.
        """
        probe = self.fmodel.center.expand(2, -1)
        buffers, tokens = self._buffers, self.config.per_token
        batch, shared = self.sampler.example_minibatch(chains=2)
        trials: list[tuple[str, Callable[[], object]]] = [
            ("the SGLD gradient of loss_fn", lambda: self.fmodel.batched_grads(
                probe, batch, self.sampler.minibatch, self.loss_fn, buffers, vectorized=True, shared_batch=shared)),
            *[("loss_fn on the tracked examples", lambda s=size, b=train: self.fmodel.batched_losses(
                probe, b, s, self.loss_fn, buffers, "loss_fn", True)) for size, train in self._train_batches],
            *[("probe_fn on the probes", lambda s=size, b=probes: self.fmodel.batched_losses(
                probe, b, s, self.probe_fn, buffers, "probe_fn", True, tokens))
              for size, probes in self._probe_batches],
        ]
        for what, trial in trials:
            try:
                trial()
            except Exception as error:  # any failure under vmap means: run chains one at a time
                if isinstance(error, torch.cuda.OutOfMemoryError) and self.config.vectorize is True:
                    raise  # memory, not something vmap cannot run: chains_per_batch is the remedy
                return (f"torch.func.vmap failed on {what} ({type(error).__name__}: "
                        f"{str(error)[:300]}). Typical causes: Python control flow on a tensor value "
                        "(`if tensor...:`, `.item()`), stateful objects such as a torchmetrics Metric, or "
                        "data-dependent masking code.")
        return None

    def _one_chain_step_seconds(self) -> float:
        """Wall time of one SGLD gradient step of one chain (at most two calls)."""
        batch, shared = self.sampler.example_minibatch(chains=1, vectorized=False)
        center = self.fmodel.center[None]

        def seconds() -> float:
            start = time.perf_counter()
            self.fmodel.batched_grads(center, batch, self.sampler.minibatch, self.loss_fn, self._buffers,
                                      vectorized=False, shared_batch=shared)
            return time.perf_counter() - start

        # The first call also pays one-time costs, so it can only overstate: when it is below the
        # threshold it decides; otherwise a second call measures the step itself.
        first = seconds()
        return first if first < CPU_VMAP_MAX_STEP_S else seconds()

    def sample_checked(self, chains: Sequence[int], progress: ProgressFn | None = None) -> CovarianceAccumulator:
        """:meth:`sample`, then, when the low-rank preconditioner was chosen automatically and its chains ran
        away (see :meth:`runaway`), the chains again with plain SGLD; the tuning record says why.

        The check reads the accumulated sums on the host once, after sampling (:meth:`sample` itself never
        waits for the device).
        """
        accumulator = self.sample(chains, progress)
        reason = self.runaway(accumulator) if self.tuning.chosen.get("preconditioner") == "lowrank" else None
        if reason is None:
            return accumulator
        self.tuning.choose("preconditioner", "none", f"the low-rank preconditioned chains ran away ({reason}); "
                                                     "sampled again with plain SGLD")
        if self.cache is not None:  # later estimates of the run skip straight to plain SGLD
            self.cache.lowrank_runaway = reason
        unset = {name: None for name in ("step_size", "control_variates") if name in self.tuning.chosen}
        self.config = self.config.replace(preconditioner="none", **unset)
        self._build()
        self.subspace = None
        self.tune()
        return self.sample(chains, progress)

    def runaway(self, accumulator: CovarianceAccumulator) -> str | None:
        """Why the chains left the region the posterior describes, or ``None``.

        Under the Laplace approximation the localized posterior's mean rise of the training loss is
        ½·tr(H·Σ) with Σ ⪯ (nβ·H)⁻¹, so at most D/(2nβ); twice that leaves room for the step's
        discretization and minibatch noise, and away from a minimum a rise of the order of the loss
        itself is legitimate (:mod:`lightning_bif.estimation.divergence`). A diverged chain or a mean rise above
        max(D/nβ, mean loss at w*) is a runaway: far below the bound at which a snapshot counts as diverged.
        """
        diverged = int(accumulator.diverged_chains().sum())
        if diverged:
            return f"{diverged} chains diverged"
        healthy = accumulator.healthy_chains()
        if not healthy.any():
            return None
        rise = float((accumulator.sum_train[healthy].sum(0) / accumulator.count[healthy].sum()).mean())
        bound = max(self.fmodel.dim / self.nbeta, float(self.train_loss.double().abs().mean()))
        return f"mean loss rise {rise:.3g} > max(D/nβ, loss at w*) = {bound:.3g}" if rise > bound else None

    def sample(self, chains: Sequence[int], progress: ProgressFn | None = None) -> CovarianceAccumulator:
        """Run the chains ``chains`` and accumulate their draws (call :meth:`prepare` first)."""
        cfg = self.config
        accumulator = CovarianceAccumulator(cfg.chains, self.train_loss, self.probe_loss, cfg.draws, self.subspace)
        size = (cfg.chains_per_batch or cfg.chains) if self.vectorized else 1
        # Without an explicit chains_per_batch, a batch of chains that runs out of GPU memory is split in
        # halves and rerun. Its partial draws are dropped first; a chain's draws depend only on
        # (seed, chain), so the rerun yields exactly what a smaller batch would have.
        split_on_oom = self.vectorized and cfg.chains_per_batch is None
        chains = list(chains)
        total = len(chains) * self.sampler.steps_per_chain
        start = 0
        while start < len(chains):
            batch = chains[start:start + size]
            step_progress = None if progress is None else _batch_progress(
                progress, start * self.sampler.steps_per_chain, len(batch), total
            )
            try:
                for draw in self.sampler.run(batch, self.vectorized, step_progress):
                    train, probe = self.evaluate(self.fmodel, draw.params, self.vectorized)
                    accumulator.add(draw.chains, draw.index, train, probe, draw.sampling_loss, draw.params,
                                    self.fmodel.center)
            except torch.cuda.OutOfMemoryError:
                if not split_on_oom or len(batch) == 1:
                    raise
                out_of_memory, vmap_failure = True, None
            except Exception as error:
                # A draw can take a path the trial in prepare() did not (another minibatch, larger
                # weights): under "auto" the batch reruns one chain at a time, as it would have run
                # had the trial failed. Its draws do not depend on the batch, so the rerun is exact.
                if not self.vectorized or self.config.vectorize != "auto":
                    raise
                out_of_memory, vmap_failure = False, f"{type(error).__name__}: {str(error)[:300]}"
            else:
                out_of_memory, vmap_failure = False, None
            if out_of_memory:  # outside the except block, so the failed batch's tensors are freed
                _forget_chains(accumulator, batch)
                size = len(batch) // 2
                warnings.warn(f"{len(batch)} chains at once ran out of GPU memory; running {size} at a time.",
                              stacklevel=2)
                continue
            if vmap_failure is not None:
                _forget_chains(accumulator, batch)
                self.vectorized, size, split_on_oom = False, 1, False
                self.sequential_reason = f"torch.func.vmap failed during sampling ({vmap_failure})"
                warnings.warn(f"Chains run one after another from here on: {self.sequential_reason}.", stacklevel=2)
                continue
            start += len(batch)
        return accumulator

    def summarize(self, accumulator: CovarianceAccumulator, duration_s: float) -> BIFResult:
        """Turn (merged) accumulated draws into a :class:`BIFResult`."""
        probes = len(self.probes)
        stats = accumulator.statistics(split_half_probes=probes)
        healthy = stats.healthy
        rise = float(stats.mean_shift_train.mean()) if healthy.any() else math.nan
        diagnostics = Diagnostics(
            sampling_loss=accumulator.sampling_loss.float().cpu(),
            draw_loss=accumulator.draw_loss.float().cpu(),
            diverged=accumulator.diverged_chains().cpu(),
            loss_rise=rise,
            split_half=stats.split_half,
            ess=effective_sample_size(accumulator.draw_loss[healthy]),
            vectorized=self.vectorized,
            nbeta=self.nbeta,
            duration_s=duration_s,
            horizon=self.horizon,
            tuning=self.tuning,
            loss_rise_bound=loss_rise_bound(self.fmodel.dim, self.nbeta, float(self.train_loss.double().mean())),
            suspect_rise_bound=suspect_rise_bound(self.fmodel.dim, self.nbeta, float(self.train_loss.mean())),
            constant_probes=0 if stats.constant_probes is None else int(stats.constant_probes[:probes].sum()),
        )
        per_token = {}
        if self.tokens is not None:
            shape = (probes, self.tokens, -1)
            per_token = {"token_influence": stats.influence[probes:].reshape(shape).float().cpu(),
                         "token_stderr": stats.stderr[probes:].reshape(shape).float().cpu()}
        return BIFResult(
            influence=stats.influence[:probes].float().cpu(),
            correlation=stats.correlation[:probes].float().cpu(),
            stderr=stats.stderr[:probes].float().cpu(),
            train_loss=self.train_loss.float().cpu(),
            probe_loss=self.probe_loss[:probes].float().cpu(),
            diagnostics=diagnostics,
            config=self.config,
            **per_token,
        )


def _batch_progress(progress: ProgressFn, done_before: int, batch_size: int, total: int) -> ProgressFn:
    """Report a batch's per-chain step count as steps done over all chains."""
    return lambda done, _: progress(done_before + done * batch_size, total)


def _joint_batch(
    train: list[tuple[int, Batch]], probes: list[tuple[int, Batch]], limit: int
) -> tuple[int, Batch] | None:
    """Tracked examples and probes as one batch, when one loss function serves both and they fit.

    One forward pass per draw instead of two: for small models the per-call overhead, not the
    arithmetic, is what a draw costs. ``None`` when the sets do not stack (other structure,
    trailing shapes or dtypes) or exceed one evaluation batch.
    """
    if len(train) != 1 or len(probes) != 1 or train[0][0] + probes[0][0] > limit:
        return None
    (n, a), (p, b) = train[0], probes[0]
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    if spec_a != spec_b or not all(
        isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.ndim > 0 and y.ndim > 0
        and (x.shape[0], y.shape[0]) == (n, p) and x.shape[1:] == y.shape[1:] and x.dtype == y.dtype
        for x, y in zip(leaves_a, leaves_b, strict=True)
    ):
        return None
    return n + p, tree_unflatten([torch.cat([x, y]) for x, y in zip(leaves_a, leaves_b, strict=True)], spec_a)


def _probe_tokens(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-token losses of all probe batches ``[G, B, T]`` joined to ``[G, P, T]``; T must agree."""
    lengths = sorted({part.shape[2] for part in parts})
    if len(lengths) > 1:
        raise ValueError(
            f"probe_fn returned per-token losses of different lengths T = {lengths} for different probe batches, "
            "but SGLDConfig(per_token=True) needs one T: pad every probe to the same length (a collate_fn or "
            "dataset that pads to a fixed length) and return 0 loss at padded positions."
        )
    return torch.cat(parts, dim=1)


def _check_token_budget(config: SGLDConfig, probes: int, tokens: int, train: int) -> None:
    """Refuse per-token influence whose float64 sums would exceed ``config.max_token_entries``."""
    entries = config.chains * probes * tokens * train
    if entries > config.max_token_entries:
        raise ValueError(
            f"Per-token influence needs chains·probes·tokens·train = {config.chains}·{probes}·{tokens}·{train} = "
            f"{entries:,} float64 sums ({entries * 8 / 2**20:,.1f} MiB), more than "
            f"SGLDConfig.max_token_entries={config.max_token_entries:,}. Use fewer or shorter probes, fewer tracked "
            "training examples or chains, or raise max_token_entries if the memory is there."
        )


def _forget_chains(accumulator: CovarianceAccumulator, chains: list[int]) -> None:
    """Zero the accumulated draws of ``chains`` (every accumulator tensor has a leading chain axis)."""
    for tensor in accumulator.tensors():
        tensor[chains] = 0


def _check_finite(losses: torch.Tensor, fn_name: str, what: str) -> None:
    bad = (~torch.isfinite(losses)).nonzero().flatten()
    if bad.numel():
        raise ValueError(
            f"{fn_name} gives non-finite values at the current weights for {bad.numel()} {what}(s) "
            f"(positions {bad[:10].tolist()}); the BIF needs finite losses. Check the inputs and the model."
        )
