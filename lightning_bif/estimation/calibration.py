"""Choose the SGLD step size from short pilot chains, before the first snapshot.

The rule: the largest step size ε whose pilot chains neither diverge, nor drift, nor are
biased by the step itself. Bias is judged by the loss rise E[ℓ(w) - ℓ(w*)] (the quantity
``Diagnostics.loss_rise`` reports): on a posterior that the chain samples correctly it does
not depend on ε, while discretization inflates it (for a Gaussian posterior a direction of
curvature a gets variance 1/(a·(1 - ε·a/4)) instead of 1/a, and diverges at ε·a = 4). Each
candidate ε is therefore compared with ε/2 run for twice as many steps — the same simulated
time, so both chains have spread equally far — and accepted when

* every pilot chain stays finite,
* the loss rise at ε exceeds its step-free value by at most ``tolerance`` (relative), where
  the step-free value is extrapolated from ε and ε/2 (Richardson: the bias is linear in ε for
  small ε, so r₀ ≈ 2·rise(ε/2) - rise(ε)), and
* the loss trace is flat: the mean of the second half of the kept draws differs from the
  first half by at most ``drift_tolerance`` times the rise, beyond three standard errors of
  that difference (estimated from the spread over chains).

Candidates are tried from the largest down; the chosen step size is the first accepted one
divided by ``safety`` (default 2): the BIF's accuracy is flat below the stability edge and falls
off a cliff just above it, where the pilots' bias estimate can still pass, so halving costs little
and keeps the choice off the cliff (measured in docs/benchmarks.md, "Step-size calibration").
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..config import SGLDConfig
from ..curvature.cache import CurvatureCache
from ..example_sets import ExampleSet, ExampleSource
from ..functional import LossFn, float32_model, preserved_state
from .estimator import BIFEstimator

_MIN_PILOT_STEPS = 20


@dataclass
class Pilot:
    """The evidence of one pilot run.

    Attributes:
        step_size: The ε of the pilot chains.
        steps: SGLD steps per pilot chain (half burn-in, half kept draws).
        loss_rise: Mean over kept draws and tracked examples of ``ℓ_i(w) - ℓ_i(w*)``.
        drift: Mean loss of the second half of the kept draws minus the first half.
        drift_se: Standard error of ``drift`` from the spread over chains (0 with one chain).
        diverged: Whether any pilot chain produced non-finite values.
        loss_trace: Mean tracked loss per draw, averaged over chains, ``[draws]``.
    """

    step_size: float
    steps: int
    loss_rise: float
    drift: float
    drift_se: float
    diverged: bool
    loss_trace: torch.Tensor = field(repr=False)


@dataclass
class Candidate:
    """A step size put to the test: its pilot, the half-step reference, and the verdict."""

    step_size: float
    pilot: Pilot
    reference: Pilot | None
    bias: float
    accepted: bool
    reason: str


@dataclass
class CalibrationResult:
    """The chosen step size and the pilot chains behind the choice.

    Attributes:
        step_size: The chosen ε: the largest accepted candidate divided by ``safety`` (the
            smallest candidate tried when none was accepted).
        config: The input config with ``step_size`` replaced by the chosen value.
        candidates: Every candidate tried, largest first, with its evidence.
        ok: Whether a candidate passed every check.
        duration_s: Wall time of the calibration.
    """

    step_size: float
    config: SGLDConfig
    candidates: list[Candidate]
    ok: bool
    duration_s: float

    def summary(self) -> dict[str, object]:
        """The chosen value and the evidence as plain JSON-compatible values (for logs)."""
        return {
            "step_size": self.step_size,
            "ok": self.ok,
            "candidates": [
                {"step_size": c.step_size, "loss_rise": c.pilot.loss_rise, "drift": c.pilot.drift,
                 "diverged": c.pilot.diverged, "bias": c.bias, "accepted": c.accepted,
                 "reason": c.reason}
                for c in self.candidates
            ],
        }


def _leading(source: ExampleSource, count: int) -> ExampleSource:
    """The first ``count`` examples of ``source``; a ``DataLoader`` keeps its ``collate_fn``."""
    if isinstance(source, DataLoader):
        return DataLoader(Subset(source.dataset, range(count)), collate_fn=source.collate_fn)
    return Subset(ExampleSet(source, "data").dataset, range(count))


def _pilot(model: nn.Module, loss_fn: LossFn, tracked: ExampleSource, data: ExampleSource,
           config: SGLDConfig,
           step_size: float, steps: int, chains: int, device: torch.device | str | None,
           cache: CurvatureCache) -> Pilot:
    half = max(steps // 2, 2)
    # Only the training losses matter here: one probe, and no token axis, keeps the evaluation cheap.
    pilot_config = config.replace(step_size=step_size, chains=chains, draws=half, burn_in=half, thin=1,
                                  per_token=False, control_variates=False)
    estimator = BIFEstimator(model, loss_fn, tracked, _leading(tracked, 1), data=data, config=pilot_config,
                             device=device, cache=cache)
    with preserved_state(model, [estimator.device]), torch.inference_mode(False):
        estimator.prepare()
        start = time.perf_counter()
        accumulator = estimator.sample_checked(range(pilot_config.chains))
        result = estimator.summarize(accumulator, time.perf_counter() - start)
    diag = result.diagnostics
    traces = diag.draw_loss[~diag.diverged] if not diag.diverged.all() else diag.draw_loss
    mid = traces.shape[1] // 2
    per_chain = traces[:, mid:].mean(dim=1) - traces[:, :mid].mean(dim=1)
    drift_se = float(per_chain.std() / math.sqrt(len(per_chain))) if len(per_chain) > 1 else 0.0
    diverged = diag.any_diverged or not math.isfinite(diag.loss_rise)
    return Pilot(step_size, 2 * half, diag.loss_rise, float(per_chain.mean()), drift_se, diverged,
                 traces.mean(dim=0))


def _step_bias(rise: float, half_step_rise: float) -> float:
    """Relative bias of the loss rise at ε, by Richardson extrapolation from ε and ε/2.

    The bias grows linearly in ε for small ε (rise(ε) ≈ r₀·(1 + c·ε)), so r₀ ≈ 2·rise(ε/2) - rise(ε).
    """
    exact = 2 * half_step_rise - rise
    return rise / exact - 1 if exact > 0 else math.inf


def calibrate(
    model: nn.Module,
    loss_fn: LossFn,
    data: ExampleSource,
    config: SGLDConfig | None = None,
    *,
    step_sizes: Sequence[float] | None = None,
    pilot_steps: int = 400,
    pilot_chains: int = 4,
    tracked: int = 256,
    tolerance: float = 0.2,
    drift_tolerance: float = 0.25,
    safety: float = 2.0,
    device: torch.device | str | None = None,
    cache: CurvatureCache | None = None,
) -> CalibrationResult:
    """Pick the largest SGLD step size that neither diverges, drifts nor biases the loss rise.

    Runs short pilot chains with ``config`` (its nβ, γ, λ, preconditioner and batch size) from
    the model's current weights, leaving the model exactly as it was. See the module docstring
    for the rule.

    Args:
        model: The model at the weights the BIF will be estimated at.
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example training loss.
        data: The examples SGLD minibatches come from (the estimate's ``data``, or its ``train``).
        config: The sampler settings to calibrate; defaults to ``SGLDConfig()``.
        step_sizes: Candidate step sizes; default: ``config.step_size`` times 16, 8, ..., 1/16 (the automatic
            step size of :mod:`lightning_bif.tuning.autotune` when ``config.step_size`` is ``None``).
        pilot_steps: SGLD steps of a candidate's pilot chains (half burn-in); its half-step
            reference runs twice as many, so both cover the same simulated time. Instabilities
            that build up slowly (a chain that wanders into a stiffer region) only show in pilots
            about as long as the real chains.
        pilot_chains: Chains per pilot.
        tracked: How many examples of ``data`` the loss rise is measured on (the first ones).
        tolerance: Largest accepted relative bias of the loss rise caused by the step size.
        drift_tolerance: Largest accepted change of the mean loss between the two halves of the
            kept draws, relative to the loss rise.
        safety: The chosen step size is the largest accepted candidate divided by this (>= 1).
        device: Where to compute; defaults to the device of the model's parameters.
        cache: Curvature shared with the estimates (:mod:`lightning_bif.curvature.cache`): the pilots
            measure it once, not once each.

    Returns:
        A :class:`CalibrationResult` with the chosen step size and the pilots' evidence.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_bif import SGLDConfig
        >>> from lightning_bif.estimation.calibration import calibrate
        >>> x = torch.randn(128, 3)
        >>> y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(128)
        >>> model = nn.Linear(3, 1)
        >>> mse = lambda m, b: 0.5 * (m(b[0]).squeeze(-1) - b[1]).square()
        >>> result = calibrate(model, mse, (x, y), SGLDConfig(step_size=1e-3, batch_size=None),
        ...                    step_sizes=[1e-2, 1e-3], pilot_steps=40)
        >>> result.step_size in (1e-2 / 2, 1e-3 / 2, 1e-3)
        True
    """
    start = time.perf_counter()
    model = float32_model(model)  # SGLD steps vanish in half-precision rounding
    config = config or SGLDConfig()
    cache = cache if cache is not None else CurvatureCache()
    examples = ExampleSet(data, "data")
    subset = _leading(data, min(tracked, len(examples)))
    sgld_data = data if isinstance(data, DataLoader) else examples.dataset
    if step_sizes is None:
        base = config.step_size
        if base is None:
            estimator = BIFEstimator(model, loss_fn, subset, _leading(subset, 1), data=sgld_data,
                                     config=config.replace(control_variates=False), device=device, cache=cache)
            with preserved_state(model, [estimator.device]), torch.inference_mode(False):
                estimator.check_losses()
                estimator.tune()
            base = estimator.config.step_size
        step_sizes = [base * 2.0**k for k in range(4, -5, -1)]
    step_sizes = sorted({float(s) for s in step_sizes}, reverse=True)
    if not step_sizes or min(step_sizes) <= 0:
        raise ValueError(f"calibrate: step_sizes must be positive, got {step_sizes!r}.")
    if not safety >= 1:
        raise ValueError(f"calibrate: safety must be >= 1, got {safety!r}.")
    if pilot_steps < _MIN_PILOT_STEPS or pilot_chains < 1 or tracked < 1:
        raise ValueError(f"calibrate: pilot_steps must be >= {_MIN_PILOT_STEPS}, pilot_chains and tracked >= 1.")
    candidates: list[Candidate] = []
    chosen: float | None = None
    for eps in step_sizes:
        pilot = _pilot(model, loss_fn, subset, sgld_data, config, eps, pilot_steps, pilot_chains, device, cache)
        reference, bias = None, math.nan
        if pilot.diverged:
            reason = "diverged"
        elif not pilot.loss_rise > 0:
            reason = "loss fell below w*: w* is not a stationary point of the posterior (check weight_decay)"
        elif abs(pilot.drift) - 3 * pilot.drift_se > drift_tolerance * pilot.loss_rise:
            reason = (f"drift {pilot.drift:.3g} ± {pilot.drift_se:.2g} beyond {drift_tolerance} x "
                      f"rise {pilot.loss_rise:.3g}")
        else:
            reference = _pilot(model, loss_fn, subset, sgld_data, config, eps / 2, 2 * pilot_steps,
                               pilot_chains, device, cache)
            bias = _step_bias(pilot.loss_rise, reference.loss_rise)
            reason = "accepted" if bias <= tolerance else f"step-size bias: loss rise {bias:+.0%} from the step"
        accepted = reason == "accepted"
        candidates.append(Candidate(eps, pilot, reference, bias, accepted, reason))
        if accepted:
            chosen = eps
            break
    ok = chosen is not None
    step_size = chosen / safety if chosen is not None else step_sizes[-1]
    return CalibrationResult(step_size, config.replace(step_size=step_size), candidates, ok,
                             time.perf_counter() - start)
