"""``BIFCallback``'s arguments, checked and normalised; every error names the argument and what it takes.

Lightning-free: each check raises ``ValueError``, which the callback raises as a ``MisconfigurationException``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..estimation.calibration import calibrate as calibrate_step_size
from ..viewers.tensorboard import check_charts

Groups = Sequence[int] | Sequence[str] | torch.Tensor | np.ndarray

# calibrate()'s settings a user may pass through BIFCallback(calibrate={...}); the rest comes from the callback.
CALIBRATION_OPTIONS = tuple(
    name for name, parameter in inspect.signature(calibrate_step_size).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("device", "cache")
)


def check_options(
    *, if_exists: str, tensorboard: Any, min_split_half: Any, num_threads: Any, horizon: Any, loss_fn: Any,
    probe_fn: Any,
) -> None:
    """Check the callback's plain options.

    Raises:
        ValueError: Naming the first option out of range.
    """
    if if_exists not in ("error", "overwrite", "resume"):
        raise ValueError(f"BIFCallback(if_exists={if_exists!r}): use 'error', 'overwrite' or 'resume'.")
    try:
        check_charts(tensorboard)
    except ValueError as error:
        raise ValueError(f"BIFCallback(tensorboard=...): {error}") from error
    if min_split_half is not None and not (
        isinstance(min_split_half, (int, float)) and not isinstance(min_split_half, bool)
        and -1 <= min_split_half <= 1
    ):
        raise ValueError(f"BIFCallback(min_split_half={min_split_half!r}) must be a correlation in [-1, 1] or None.")
    if num_threads is not None and (not isinstance(num_threads, int) or isinstance(num_threads, bool)
                                    or num_threads < 1):
        raise ValueError(f"BIFCallback(num_threads={num_threads!r}) must be a positive integer or None.")
    if horizon not in ("interval", "rest", None) and not (
        isinstance(horizon, int) and not isinstance(horizon, bool) and horizon >= 1
    ):
        raise ValueError(
            f"BIFCallback(horizon={horizon!r}) must be 'interval', 'rest', a number of steps >= 1, or None."
        )
    for name, fn in (("loss_fn", loss_fn), ("probe_fn", probe_fn)):
        if fn is not None and not callable(fn):
            raise ValueError(f"BIFCallback({name}=...) must be callable as {name}(model, batch).")


def calibration_options(calibrate: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    """``calibrate(...)``'s keyword arguments from ``BIFCallback(calibrate=...)``; ``None`` when off."""
    if isinstance(calibrate, bool):
        return {} if calibrate else None
    if not isinstance(calibrate, Mapping):
        raise ValueError(
            "BIFCallback(calibrate=...) takes True/False or a dict of calibrate() settings, got "
            f"{type(calibrate).__name__}."
        )
    unknown = sorted(set(calibrate) - set(CALIBRATION_OPTIONS))
    if unknown:
        raise ValueError(f"BIFCallback(calibrate=...): unknown setting(s) {unknown}; use {list(CALIBRATION_OPTIONS)}.")
    return dict(calibrate)


def labels_per_example(groups: Groups | None, size: int, name: str, what: str) -> np.ndarray | None:
    """``train_groups``/``probe_groups`` checked: one label per example as int64 or str, ``[size]``; ``None`` stays."""
    if groups is None:
        return None
    if isinstance(groups, (list, tuple)) and len({isinstance(v, (str, np.str_)) for v in groups}) > 1:
        raise ValueError(f"BIFCallback({name}=...) needs labels that are all integers or all strings.")
    array = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    if array.ndim != 1 or array.shape[0] != size:
        raise ValueError(
            f"BIFCallback({name}=...) needs one label per example of {what} ({size}), got shape {array.shape}."
        )
    return array if array.dtype.kind in "US" else array.astype(np.int64)


def display_texts(texts: Sequence | None, size: int, name: str, what: str, nested: bool) -> list | None:
    """Display strings as lists, one entry per example (``nested``: a list of token strings per example)."""
    if texts is None:
        return None
    if isinstance(texts, str) or len(texts) != size or not all(
        not isinstance(entry, str) and all(isinstance(v, str) for v in entry) if nested else isinstance(entry, str)
        for entry in texts
    ):
        kind = "a list of token strings" if nested else "a str"
        raise ValueError(f"BIFCallback({name}=...) needs {kind} for each of the {size} examples of {what}, in order.")
    return [list(entry) for entry in texts] if nested else list(texts)
