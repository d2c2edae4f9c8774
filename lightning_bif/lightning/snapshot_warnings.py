"""The texts of ``BIFCallback``'s warnings about snapshots; the callback decides when (once per fit or run).

Lightning-free: each function returns the message, or ``None`` when there is nothing to say.
"""

from __future__ import annotations

import math
from typing import Any

from ..snapshot.record import SnapshotRecord
from ..snapshot.snapshotter import shown_setting


def unusable_snapshot(record: SnapshotRecord) -> str:
    """A snapshot that diverged or failed: recorded with its status, and what to change."""
    advice = (f"{record.message}. Lower SGLDConfig.step_size (calibrate=True picks one from pilot chains) "
              "or raise localization; more chains or draws do not help." if record.status == "diverged"
              else record.message)
    return (f"BIFCallback: the snapshot at step {record.step} {record.status} and is recorded with status "
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
