"""The texts of ``BIFCallback``'s warnings about snapshots; the callback decides when (once per fit or run).

Lightning-free: each function returns the message, or ``None`` when there is nothing to say.
"""

from __future__ import annotations

import math
from typing import Any

from ..snapshot.record import SnapshotRecord
from ..snapshot.snapshotter import shown_setting
from ..tuning import locality, minibatch


def unusable_snapshot(record: SnapshotRecord) -> str:
    """A snapshot that is suspect, diverged or failed: recorded with its status, and what to change."""
    advice = (f"{record.message}. Lower SGLDConfig.step_size (calibrate=True picks one from pilot chains) "
              "or raise localization; more chains or draws do not help." if record.status != "failed"
              else record.message)
    verb = "is suspect" if record.status == "suspect" else record.status
    return (f"BIFCallback: the snapshot at step {record.step} {verb} and is recorded with status "
            f"{record.status!r}; training goes on. {advice} (Shown once; see the log's status and message "
            "columns.)")


def low_split_half(record: SnapshotRecord, min_split_half: float | None) -> str | None:
    """A snapshot whose two halves of the chains disagree (or whose probes are constant); ``None`` if reliable."""
    if min_split_half is None or record.result is None:
        return None
    split_half = record.result.diagnostics.split_half
    low = split_half < min_split_half if math.isfinite(split_half) else record.result.config.chains >= 2
    if not low:
        return None
    constant, probes = record.result.diagnostics.constant_probes, record.result.influence.shape[0]
    if constant:
        return (
            f"BIFCallback: at step {record.step}, {constant} of {probes} probe(s) took the same value in every "
            "SGLD draw (a probe_fn that does not depend on the sampled weights, or one saturated at a constant): "
            f"their BIF is exactly 0 and they carry no signal, so the split-half reliability ({split_half:.2f}) "
            f"{'is undefined' if constant == probes else 'rests on the other probes only'}. Check probe_fn; more "
            "chains or draws do not change this. (Shown once per fit.)"
        )
    return (
        f"BIFCallback: the snapshot at step {record.step} has split-half reliability {split_half:.2f}, below "
        f"min_split_half={min_split_half:g}: the BIF of two halves of the chains disagree, so single "
        "entries are mostly Monte-Carlo noise (group means may still be usable). Raise SGLDConfig.chains "
        "(most effective) or draws; see 'How much to trust a curve' in docs/user-guide.md. (Shown once per fit; "
        "the log's split_half column has every snapshot's value.)"
    )


def below_target(record: SnapshotRecord, overhead: float | None) -> str | None:
    """A snapshot whose rounds of chains stopped below the split-half target: by how much, the fix and its cost."""
    precision = None if record.result is None else record.result.diagnostics.precision
    if precision is None or not precision.below_target:
        return None
    factor = precision.predicted_chains / precision.chains if precision.predicted_chains else None
    if precision.limit == "max_seconds" and overhead is not None:
        fix = ("raise BIFCallback(overhead=...) from " f"{overhead:g}" +
               (f" (the target needs about {factor:.1f}x this snapshot's sampling, "
                f"~{factor * record.duration_s:.1f} s instead of {record.duration_s:.1f} s)" if factor else ""))
    elif precision.limit == "max_seconds":
        fix = "raise SGLDConfig.max_seconds" + (f" about {factor:.1f}x" if factor else "")
    else:
        fix = (f"raise SGLDConfig.max_chains to about {precision.predicted_chains} "
               f"({factor:.1f}x this snapshot's sampling time, ~{factor * record.duration_s:.1f} s)" if factor
               else "check probe_fn and the step size: the halves share no signal, more chains may not help")
    return (f"BIFCallback: the snapshot at step {record.step} stopped below its split-half target: "
            f"{precision.shortfall()}. Fix: {fix}, or lower SGLDConfig.target_split_half. (Shown once per fit; "
            "the log's below_target and chains_used columns have every snapshot's.)")


def minibatch_noise(record: SnapshotRecord) -> str | None:
    """A snapshot whose automatic minibatch was capped before its gradient noise reached the target: the fix.

    ``batch_size="auto"`` caps the minibatch at the tracked examples' count where the SGLD data are more than four
    times that (:mod:`lightning_bif.tuning.minibatch`). The capped minibatch's gradient noise then stays above its
    target, and nβ cannot be raised to make the tracked losses linear across the posterior (that would grow the
    noise): the estimate is the weaker one of the two, measured on the suite in docs/self-tuning.md.
    """
    tuning = None if record.result is None else record.result.diagnostics.tuning
    ratio = None if tuning is None else tuning.gradient_noise_ratio
    if ratio is None or not ratio > minibatch.GRADIENT_NOISE_RATIO or "batch_size" not in tuning.chosen:
        return None
    config, influence = record.result.config, record.result.influence
    m, tracked = config.batch_size, influence.shape[0] + influence.shape[1]
    wider = (f", so the chains sample a distribution about {1 + ratio:.0f}x wider than the posterior there"
             if ratio > 1 else "")
    linear = ""
    if tuning.nonlinearity is not None and tuning.nonlinearity > locality.NONLINEARITY_LIMIT:
        linear = (f"; and nβ stayed at {record.result.diagnostics.nbeta:.4g}, where the tracked losses are not linear "
                  f"across the posterior (Q = {tuning.nonlinearity:.2g}, target {locality.NONLINEARITY_LIMIT:g}), "
                  "because raising it would grow that noise")
    return (f"BIFCallback: at step {record.step} the SGLD minibatch was capped at the tracked examples' count "
            f"(m = {m}) and carries {ratio:.2g}x the noise SGLD injects along the stiffest direction (target "
            f"{minibatch.GRADIENT_NOISE_RATIO:g}){wider}{linear}. More chains do not fix this. Fix: "
            "SGLDConfig(batch_size=None) for the full batch (each SGLD step then takes the gradient of all the SGLD "
            f"data instead of {m} examples), or BIFCallback(data=...) a subset of at most "
            f"{minibatch.FULL_BATCH_FACTOR * max(tracked, minibatch.SMALLEST_MINIBATCH)} training examples (the "
            "automatic minibatch then covers it). (Shown once per fit; the log's tuning column has every snapshot's "
            "gradient_noise_ratio and nonlinearity.)")


def skipped_snapshot(step: int, overhead: float | None) -> str:
    """A scheduled snapshot skipped to keep snapshots within ``overhead`` of the fit."""
    return (f"BIFCallback: skipped the snapshot scheduled at step {step}: overhead={overhead:g} has not yet earned "
            "what the cheapest snapshot (its tuning and two chains) cost last time. Later ones are taken as the fit "
            "earns them; raise overhead or schedule fewer snapshots to keep them all. (Shown once; the fit's end "
            "says how many were skipped.)")


def calibration_rejected(evidence: dict[str, Any], step: int, configured: float | None) -> str:
    """Step-size calibration accepted no candidate: why, and that the configured step size stays."""
    reasons = evidence.get("error") or "; ".join(
        f"{c['step_size']:.3g}: {c['reason']}" for c in evidence["candidates"][-3:]
    )
    return (
        f"BIFCallback: step-size calibration at step {step} accepted no step size ({reasons}). This is "
        "typical early in training, where the weights are not yet a stationary point of the sampled "
        f"posterior. Keeping the configured step_size={shown_setting(configured)} and "
        "calibrating again at the next snapshot until one is accepted; every attempt is in the log's "
        "calibration column. (Shown once.)"
    )


def several_steps_per_batch(steps: int) -> str:
    """One batch advanced ``global_step`` by ``steps``: what the schedule counts then."""
    return (
        f"BIFCallback: one training batch advanced trainer.global_step by {steps} (manual optimization stepping "
        "several optimizers, or several optimizer.step() calls a batch). The schedule counts global_step, as "
        "max_steps, checkpoints and the log's step column do: a step it names inside a batch is taken at the "
        f"end of that batch. To count batches instead, multiply: every_n_steps=n*{steps}, at_steps=[s*{steps}, "
        "...]. (Shown once.)"
    )
