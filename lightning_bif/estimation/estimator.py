"""``BIFEstimator``: the steps of one estimate (prepare, tune, decide vmap, sample, summarize), each delegated to
the module that holds its job."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..config import SGLDConfig
from ..curvature.cache import CurvatureCache
from ..example_sets import ExampleSet, ExampleSource
from ..functional import FunctionalModel, LossFn
from ..tuning.autotune import Tuning, budget_minibatch, resolve_budget
from ..tuning.horizon import HorizonCheck
from ..tuning.minibatch import largest_minibatch
from .accumulator import CovarianceAccumulator
from .control_variates import Subspace
from .result import BIFResult
from .sampler import ProgressFn, SGLDSampler
from .sampling import run_chains
from .sampling import runaway as chains_ran_away
from .summary import summarize
from .tracked_losses import TrackedLosses, check_finite, check_token_budget, joint_batch
from .tuning_run import TuningRun
from .vectorization import choose_vectorized, vmap_error


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
        """Train losses ``[G, N]`` and probe observables ``[G, P]`` at parameter vectors ``[G, D]``
        (:meth:`~lightning_bif.estimation.tracked_losses.TrackedLosses.evaluate`)."""
        return self.losses.evaluate(fmodel, params, vectorized)

    def prepare(self) -> None:
        """Build the functional model and evaluation batches; compute and check the losses at w*; tune.

        Tuning (:mod:`lightning_bif.tuning.autotune`) resolves the settings left unset from the curvature at
        w*, which comes from the cache passed to the constructor when it is still fresh.
        """
        self.check_losses()
        self.tune()
        self._choose_vectorized()

    def check_losses(self) -> None:
        """Build the functional model and evaluation batches; compute and check the losses at w* (no tuning).

        Sets ``train_loss [N]`` and ``probe_loss`` (the tracked losses at w*, as in :class:`BIFResult`).
        """
        cfg = self.config
        self._build()
        train_loss, probe_loss = self.evaluate(self.fmodel, self.fmodel.center[None], vectorized=False)
        self.train_loss, self.probe_loss = train_loss[0], probe_loss[0]
        check_finite(self.train_loss, "loss_fn", "training example")
        check_finite(self.probe_loss, "probe_fn" if self.probe_fn is not self.loss_fn else "loss_fn", "probe")
        # Tokens per probe: the observables are P token means followed by P·T token losses.
        self.tokens = probe_loss.shape[1] // len(self.probes) - 1 if cfg.per_token else None
        if self.tokens is not None:
            check_token_budget(cfg, len(self.probes), self.tokens, len(self.train))
        if self.probe_fn is self.loss_fn and not cfg.per_token:
            self.losses.joint_batch = joint_batch(self.losses.train, self.losses.probes, cfg.eval_batch_size)
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

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        """The model's buffers, shared by every evaluation (built by :meth:`check_losses`)."""
        return self.losses.buffers

    def tune(self) -> None:
        """Resolve the unset settings (:class:`~lightning_bif.estimation.tuning_run.TuningRun`) into :attr:`config`.

        Call check_losses first.
        """
        start = time.perf_counter()
        automatic = self.config.nbeta is None and "nbeta" not in self.tuning.chosen  # chosen once per estimate
        data_nbeta = float(len(self.data)) if automatic else None
        run = TuningRun(self.losses, self.sampler, self.nbeta, self.tuning, self.cache, data_nbeta)
        settings = run.run(self.config)
        self.config, self.horizon, self.subspace = settings.config, settings.horizon, settings.subspace
        self.nbeta = settings.nbeta
        self.tuning.seconds = time.perf_counter() - start  # recorded, never decides anything

    def decide_vectorized(self) -> bool:
        """Resolve ``config.vectorize`` alone (what :meth:`prepare` does last), e.g. once before many estimates.

        Returns:
            Whether chains would run under vmap; :attr:`sequential_reason` says why not under "auto".

        Raises:
            ValueError: With ``vectorize=True`` when vmap cannot run one of the functions.
        """
        self._build()
        self._choose_vectorized()
        return self.vectorized

    def vmap_error(self) -> str | None:
        """Why ``torch.func.vmap`` cannot run this estimate's functions, or ``None`` when it can
        (:func:`~lightning_bif.estimation.vectorization.vmap_error`). Call after :meth:`prepare` or
        :meth:`decide_vectorized`."""
        return vmap_error(self.config, self.losses, self.sampler)

    def _build(self) -> None:
        """The functional model, the tracked losses on their evaluation batches and the sampler."""
        cfg = self.config
        self.fmodel = FunctionalModel(self.model, cfg.sample_params, self.device, autocast=cfg.autocast)
        self.losses = TrackedLosses(self.fmodel, self.fmodel.fresh_buffers(),
                                    self.train.batches(cfg.eval_batch_size, self.device),
                                    self.probes.batches(cfg.eval_batch_size, self.device),
                                    self.loss_fn, self.probe_fn, cfg.per_token)
        self.sampler = SGLDSampler(self.fmodel, self.data, self.loss_fn, cfg, self.nbeta)
        if cfg.batch_size == "auto":
            self.sampler.largest_minibatch = largest_minibatch(len(self.train) + len(self.probes), len(self.data))

    def _choose_vectorized(self) -> None:
        """Set :attr:`vectorized` and :attr:`sequential_reason`: the decision passed to the constructor, or
        :func:`~lightning_bif.estimation.vectorization.choose_vectorized`'s."""
        if self._decided is not None:
            self.vectorized = self._decided
            return
        decision = choose_vectorized(self.config, self.device, self.losses, self.sampler)
        self.vectorized = decision.vectorized
        if decision.sequential_reason is not None:
            self.sequential_reason = decision.sequential_reason

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
        unset: dict[str, object] = {name: None for name in ("step_size", "control_variates")
                                    if name in self.tuning.chosen}
        if "batch_size" in self.tuning.chosen:
            unset["batch_size"] = "auto"
        self.config = self.config.replace(preconditioner="none", **unset)
        self._build()
        self.subspace = None
        self.tune()
        return self.sample(chains, progress)

    def runaway(self, accumulator: CovarianceAccumulator) -> str | None:
        """Why the chains left the region the posterior describes, or ``None``
        (:func:`~lightning_bif.estimation.sampling.runaway`)."""
        return chains_ran_away(accumulator, self.fmodel.dim, self.nbeta, self.train_loss)

    def sample(self, chains: Sequence[int], progress: ProgressFn | None = None) -> CovarianceAccumulator:
        """Run the chains ``chains`` and accumulate their draws (call :meth:`prepare` first).

        A batch of chains that fails under vmap while sampling under "auto" reruns one chain at a time, and
        the rest of the estimate follows (:attr:`vectorized`, :attr:`sequential_reason`).
        """
        cfg = self.config
        accumulator = CovarianceAccumulator(cfg.chains, self.train_loss, self.probe_loss, cfg.draws, self.subspace)
        return self.sample_more(accumulator, chains, progress=progress)

    def sample_more(self, accumulator: CovarianceAccumulator, chains: Sequence[int], total: int | None = None,
                    progress: ProgressFn | None = None) -> CovarianceAccumulator:
        """Run the chains ``chains`` into ``accumulator``: a round of more chains (:mod:`.rounds`).

        Args:
            accumulator: Where the draws go; grown to ``total`` rows first.
            chains: This process's chains of the round.
            total: The chains of every round so far, on every rank (the accumulators of the ranks are summed, so
                they must have the same rows); default ``accumulator.chains``.
            progress: Called as ``progress(done_steps, total_steps)`` for this round.
        """
        accumulator.grow(accumulator.chains if total is None else total)
        sampled = run_chains(self.sampler, self.losses, self.config, accumulator, chains, self.vectorized, progress)
        self.vectorized = sampled.vectorized
        if sampled.sequential_reason is not None:
            self.sequential_reason = sampled.sequential_reason
        return sampled.accumulator

    def max_chains(self) -> int | None:
        """The most chains the per-token memory budget allows (``None`` without ``per_token``)."""
        if self.tokens is None:
            return None
        return max(self.config.chains, self.config.max_token_entries // (len(self.probes) * self.tokens
                                                                         * len(self.train)))

    def summarize(self, accumulator: CovarianceAccumulator, duration_s: float) -> BIFResult:
        """Turn (merged) accumulated draws into a :class:`BIFResult`
        (:func:`~lightning_bif.estimation.summary.summarize`)."""
        return summarize(accumulator, probes=len(self.probes), tokens=self.tokens, train_loss=self.train_loss,
                         probe_loss=self.probe_loss, dim=self.fmodel.dim, nbeta=self.nbeta,
                         vectorized=self.vectorized, horizon=self.horizon, tuning=self.tuning, config=self.config,
                         duration_s=duration_s, data_nbeta=self.raised_from)

    @property
    def raised_from(self) -> float | None:
        """n, where the locality rule raised nβ above it (the result is then reported at nβ = n); else ``None``."""
        data_nbeta = float(len(self.data))
        return data_nbeta if self.config.nbeta is None and self.nbeta != data_nbeta else None
