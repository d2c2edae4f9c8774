"""``TuningRun``: one resolution of a config's unset settings from the curvature at w*."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import SGLDConfig
from ..curvature.cache import CachedCurvature, CurvatureCache
from ..curvature.extremes import lanczos_extremes
from ..curvature.gradient_noise import directional_gradient_variance
from ..curvature.hessian import LowRankPreconditioner, curvature_products, top_curvature
from ..curvature.objective import Objective
from ..curvature.stiffness import STIFFNESS_STEPS, STIFFNESS_TOLERANCE, drift_stiffness
from ..tuning import minibatch as minibatch_rule
from ..tuning.autotune import Tuning, lowrank_fits, rechoose_budget
from ..tuning.horizon import STIFFNESS_STEP, HorizonCheck, horizon_config, horizon_localization
from ..tuning.locality import choose_nbeta
from ..tuning.localization import choose_localization, hutchinson_mean_eigenvalue
from ..tuning.minibatch import choose_minibatch, gradient_noise_ratio
from .control_variates import Subspace, projected_gradients
from .nonlinearity import LOCALITY_PROBES, nonlinearity, posterior_deltas
from .sampler import SGLDSampler, chain_seed
from .tracked_losses import TrackedLosses


@dataclass
class TunedSettings:
    """What a :class:`TuningRun` resolved.

    Attributes:
        config: The config with every setting the tuning resolves set.
        horizon: The horizon check, with ``config.horizon_steps``; else ``None``.
        subspace: The control variates' eigenbasis, with ``config.control_variates``; else ``None``.
        nbeta: The nβ the estimate samples at.
    """

    config: SGLDConfig
    horizon: HorizonCheck | None
    subspace: Subspace | None
    nbeta: float


class TuningRun:
    """Resolves the settings left unset (:mod:`lightning_bif.tuning.autotune`) from the curvature at w*.

    Args:
        losses: The tracked losses at w* (functional model, buffers, loss functions, evaluation batches).
        sampler: The SGLD sampler of the estimate; its ``config`` follows the resolution, and it keeps the
            measured curvature for the low-rank preconditioner.
        nbeta: The inverse temperature nβ (the one chosen for this estimate when it is tuned again).
        tuning: The record of what was chosen and why; filled in place.
        cache: Curvature measured by earlier estimates, reused while fresh; the new measurement is stored in it.
        data_nbeta: n, when ``SGLDConfig.nbeta`` is ``None``: nβ is then chosen from it
            (:mod:`lightning_bif.tuning.locality`); ``None`` keeps ``nbeta``.
    """

    def __init__(
        self, losses: TrackedLosses, sampler: SGLDSampler, nbeta: float, tuning: Tuning, cache: CurvatureCache | None,
        data_nbeta: float | None = None,
    ) -> None:
        self.losses = losses
        self.fmodel = losses.fmodel
        self.sampler = sampler
        self.nbeta = nbeta
        self.data_nbeta = data_nbeta
        self._variance: float | None = None
        self.tuning = tuning
        self.cache = cache

    def run(self, config: SGLDConfig) -> TunedSettings:
        """Resolve ``config``'s unset settings; the sampler's config is the resolved one on return."""
        cfg, tuning = config, self.tuning
        horizon = subspace = None
        preconditioner = cfg.preconditioner
        if preconditioner is None:
            fits, why = lowrank_fits(cfg, self.fmodel.dim, self.fmodel.center.element_size(), tuning)
            if fits and self.cache is not None and self.cache.lowrank_runaway is not None:
                fits, why = False, f"its chains ran away at an earlier estimate ({self.cache.lowrank_runaway})"
            preconditioner = "lowrank" if fits else "none"
            tuning.choose("preconditioner", preconditioner, why)
        need_eigenpairs = preconditioner == "lowrank" or bool(cfg.control_variates)
        need_extremes = (cfg.step_size is None or cfg.horizon_steps is not None or cfg.localization is None
                         or cfg.batch_size == "auto")
        try:
            measured = self._measure(cfg, need_extremes, need_eigenpairs)
        except RuntimeError as error:
            if cfg.preconditioner is not None or cfg.control_variates:
                raise
            preconditioner = "none"  # Hessian-vector products failed: plain SGLD, said why
            tuning.choose("preconditioner", preconditioner, f"Hessian-vector products failed: {str(error)[:300]}")
            measured = self._measure(cfg, need_extremes, need_eigenpairs=False)
        control_variates = cfg.control_variates
        if control_variates is None:
            control_variates = preconditioner == "lowrank" and not cfg.per_token
            tuning.choose("control_variates", control_variates,
                          "the top eigenpairs are measured for the preconditioner" if control_variates else
                          "per-token estimate" if preconditioner == "lowrank" else "no eigenpairs measured")
        cfg = cfg.replace(preconditioner=preconditioner, control_variates=control_variates)
        if measured is not None:
            tuning.lambda_min, tuning.lambda_max = measured.extremes
            if measured.curvature is not None:
                tuning.mean_eigenvalue = measured.curvature.mean
                tuning.top_eigenvalues = measured.curvature.values.tolist()
                self.sampler.cached_curvature = measured.curvature
        resolved, horizon = self._damping_and_step(cfg, config, measured)
        if self.data_nbeta is not None:
            resolved, horizon = self._choose_nbeta(cfg, config, resolved, horizon, measured)
        cfg = resolved
        if cfg.batch_size == "auto":
            cfg = self._choose_minibatch(cfg, measured)
        self.sampler.config = cfg  # γ, ε and m are resolved before any chain runs
        if cfg.preconditioner == "lowrank":  # here, not in the SGLD loop: it reads values on the host
            lowrank = self.sampler.lowrank_preconditioner(self.losses.buffers)
            if tuning.chosen.get("step_size") is not None:
                cfg = self._preconditioned_step(cfg, lowrank, measured)
        self.sampler.config = cfg
        if cfg.control_variates:
            subspace = self._subspace(self.sampler.curvature(self.losses.buffers).vectors)
        return TunedSettings(cfg, horizon, subspace, self.nbeta)

    def _damping_and_step(
        self, cfg: SGLDConfig, config: SGLDConfig, measured: CachedCurvature | None
    ) -> tuple[SGLDConfig, HorizonCheck | None]:
        """γ (the floor, the horizon's or the run's) and ε at the current nβ (``config``: as the user gave it)."""
        floor, horizon = 0.0, None
        if cfg.localization is None:
            cfg, floor = self._choose_localization(cfg, measured)
        if cfg.horizon_steps is not None:
            cfg, horizon = horizon_config(cfg, self.nbeta, *measured.extremes, floor=floor)
            if config.step_size is None:
                self.tuning.choose("step_size", cfg.step_size,
                                   f"{STIFFNESS_STEP:g}/(nβ·λ_max + γ) with the horizon's γ")
        elif cfg.step_size is None:
            step_size = STIFFNESS_STEP / (self.nbeta * max(measured.extremes[1], 0.0) + cfg.localization)
            cfg = cfg.replace(step_size=step_size)
            self.tuning.choose("step_size", step_size, f"{STIFFNESS_STEP:g}/(nβ·λ_max + γ)")
        return cfg, horizon

    def _choose_nbeta(
        self, cfg: SGLDConfig, config: SGLDConfig, resolved: SGLDConfig, horizon: HorizonCheck | None,
        measured: CachedCurvature | None,
    ) -> tuple[SGLDConfig, HorizonCheck | None]:
        """nβ by :mod:`lightning_bif.tuning.locality` where it applies; γ and ε again at the new nβ."""
        curvature = measured.curvature if measured is not None else None
        if config.localization is not None or config.step_size is not None:  # set by the user for nβ = n
            return resolved, horizon
        if curvature is None:
            self.tuning.choose("nbeta", self.nbeta, f"nβ = n = {self.nbeta:.6g}: the locality rule needs the top "
                                                    "eigenpairs, which this estimate does not measure")
            return resolved, horizon
        deltas = posterior_deltas(curvature, self.fmodel.dim, self.data_nbeta, resolved.localization,
                                  resolved.weight_decay, LOCALITY_PROBES, chain_seed(resolved.seed, -5),
                                  self.fmodel.device, self.fmodel.center.dtype)
        choice = choose_nbeta(self.data_nbeta, nonlinearity(self.losses, self.fmodel, deltas),
                              noise_room=self._noise_room(resolved, measured))
        self.tuning.nonlinearity = choice.nonlinearity
        self.tuning.choose("nbeta", choice.nbeta, choice.reason)
        if choice.nbeta == self.nbeta:
            return resolved, horizon
        self.nbeta = self.sampler.nbeta = choice.nbeta
        return self._damping_and_step(cfg, config, measured)

    def _choose_localization(self, cfg: SGLDConfig, measured: CachedCurvature) -> tuple[SGLDConfig, float]:
        """γ by :mod:`lightning_bif.tuning.localization` (the horizon's γ itself is set later by ``horizon_config``).

        Returns the config with γ set (without a horizon) and the floor on γ.
        """
        mean = measured.curvature.mean if measured.curvature is not None else measured.mean_eigenvalue
        lambda_min = measured.extremes[0]
        horizon = horizon_localization(cfg, self.nbeta, lambda_min) if cfg.horizon_steps is not None else None
        choice = choose_localization(self.nbeta, mean, lambda_min, horizon, horizon_source=cfg.horizon_source)
        self.tuning.mean_eigenvalue = mean
        self.tuning.localization_floor = choice.floor
        self.tuning.choose("localization", choice.localization, choice.reason)
        return (cfg if horizon is not None else cfg.replace(localization=choice.localization)), choice.floor

    def _noise_room(self, resolved: SGLDConfig, measured: CachedCurvature) -> float:
        """How many times nβ may grow before the largest minibatch the estimate may use reaches the minibatch-noise
        target (r ∝ nβ at a fixed ε·nβ): infinite with the full batch."""
        examples = len(self.sampler.data)
        largest = (self.sampler.largest_minibatch if resolved.batch_size == "auto"
                   else examples if resolved.batch_size is None else int(resolved.batch_size))
        ratio = gradient_noise_ratio(resolved.step_size, self.nbeta, self._gradient_variance(resolved, measured),
                                     largest, examples)
        return minibatch_rule.GRADIENT_NOISE_RATIO / ratio if ratio > 0 else math.inf

    def _gradient_variance(self, cfg: SGLDConfig, measured: CachedCurvature) -> float:
        """vᵀCv along λ_max's Ritz vector on the curvature sample (measured once per tuning)."""
        if self._variance is None:
            size, batch = self.sampler.curvature_sample()
            self._variance = directional_gradient_variance(self._objective(cfg), batch, size, measured.ritz[:, 1])
        return self._variance

    def _choose_minibatch(self, cfg: SGLDConfig, measured: CachedCurvature) -> SGLDConfig:
        """m by :mod:`lightning_bif.tuning.minibatch` from the gradient spread along λ_max's Ritz vector (measured on
        the curvature sample); ``thin`` and ``draws`` follow it where they are automatic."""
        variance = self._gradient_variance(cfg, measured)
        tracked = self.losses.train_count + sum(size for size, _ in self.losses.probes)
        choice = choose_minibatch(cfg.step_size, self.nbeta, variance, len(self.sampler.data),
                                  largest=self.sampler.largest_minibatch)
        self.tuning.gradient_noise_variance, self.tuning.gradient_noise_ratio = variance, choice.noise_ratio
        self.tuning.choose("batch_size", choice.batch_size, choice.reason)
        self.sampler.use_minibatch(choice.batch_size)
        return rechoose_budget(cfg.replace(batch_size=choice.batch_size), tracked, self.sampler.minibatch, self.tuning)

    def _preconditioned_step(
        self, cfg: SGLDConfig, lowrank: LowRankPreconditioner, measured: CachedCurvature
    ) -> SGLDConfig:
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
        gamma, stored = cfg.localization, measured.preconditioned
        cached = stored.get((gamma, lowrank.damping))
        if cached is not None:  # same curvature, same γ and δ: the same operators
            return self._preconditioned_choice(cfg, *cached, "cached")
        if self.tuning.curvature_reused and stored:  # the curvature is still fresh: so is its stiffness ratio
            (old_gamma, old_damping), pair = next(reversed(stored.items()))
            return self._preconditioned_choice(cfg, *pair, f"reused with the curvature, measured at γ = {old_gamma:.4g}"
                                                           f", δ = {old_damping:.4g}")
        samples = self.sampler.drift_samples()
        found = drift_stiffness(self._objective(cfg), samples, self.nbeta, gamma, lowrank,
                                seed=chain_seed(cfg.seed, -3))
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

    def _measure(self, cfg: SGLDConfig, need_extremes: bool, need_eigenpairs: bool) -> CachedCurvature | None:
        """The Hessian's extreme eigenvalues (and top eigenpairs when needed) at w*: from the cache if fresh.

        With an automatic ``localization`` and no eigenpairs, also the mean eigenvalue (Hutchinson).
        """
        if not (need_extremes or need_eigenpairs):
            return None
        # Local: the products keep the gradient's graph on the curvature sample, freed when this returns.
        entry, products = self._measure_curvature(cfg, need_eigenpairs)
        if cfg.localization is None and entry.curvature is None and entry.mean_eigenvalue is None:
            entry.mean_eigenvalue = hutchinson_mean_eigenvalue(
                products, self.fmodel.dim, self.fmodel.device, self.fmodel.center.dtype,
                seed=chain_seed(cfg.seed, -4))
        return entry

    def _measure_curvature(
        self, cfg: SGLDConfig, need_eigenpairs: bool
    ) -> tuple[CachedCurvature, Callable[[torch.Tensor], torch.Tensor]]:
        """The cached or newly measured curvature, and the curvature sample's Hessian-vector products."""
        size, batch = self.sampler.curvature_sample()
        products = curvature_products(self._objective(cfg), batch, size)
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
            curvature = top_curvature(self._objective(cfg), batch, size, cfg.preconditioner_rank,
                                      seed=chain_seed(cfg.seed, -1))
        entry = CachedCurvature(key, extremes, ritz, curvature)
        if self.cache is not None:
            self.cache.store(entry)
        return entry, products

    def _objective(self, cfg: SGLDConfig) -> Objective:
        """The training objective at w* whose curvature the tuning measures."""
        return Objective(self.fmodel, self.losses.loss_fn, self.losses.buffers, cfg.weight_decay)

    def _subspace(self, basis: torch.Tensor) -> Subspace:
        """The control variates' eigenbasis with the tracked losses' gradients projected on it."""
        losses = self.losses
        train = projected_gradients(self.fmodel, losses.train, losses.loss_fn, losses.buffers, basis, "loss_fn")
        probes = projected_gradients(self.fmodel, losses.probes, losses.probe_fn, losses.buffers, basis, "probe_fn")
        return Subspace(basis=basis, train=train, probe=probes)
