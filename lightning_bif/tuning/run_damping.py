"""Damping from the run itself: the horizon of a snapshot that has no steps ahead of it.

A snapshot at the end of training (or where the learning rate is 0, as at the end of a cosine
schedule) asks what retraining asks: how the weights training reached depend on z_i. In the
unrolling view (docs/horizon.md) heavy-ball training on a quadratic with Hessian eigenvalue λ
responds to up-weighting z_i through the filter ≈ (1 - exp(-λ·S))/λ, where

    S = Σ_t η_t / (1 - μ_t)

is the length of the run: the sum over the optimizer steps taken of their heavy-ball learning
rates (:func:`lightning_bif.tuning.horizon.optimizer_step`: Adam's effective η = lr·(1 - β1)/√v̂,
μ = β1, so η/(1 - μ) = lr/√v̂). Directions with λ·S ≫ 1 have settled (the filter is 1/λ, the
classical influence function); flat ones with λ·S ≪ 1 moved by S·force. Both limits are those of
1/(λ + 1/S): the run brings its own damping **1/S**, the horizon rule's (1 - μ)/(η·H) with the
whole run as the horizon. No constant enters; the run's steps and learning rates set it.

:class:`RunLength` accumulates S and T from the optimizers after each step (``BIFCallback`` does it
at every optimizer step); :meth:`RunLength.horizon` gives it to a snapshot as an equivalent horizon
(H = T, η = S/T, μ = 0, so that (1 - μ)/(η·H) = 1/S), with the sentence for the tuning record.
The saddle shift, the localization floor and ε = 1/(nβ·λ_max + γ) of a horizon snapshot then apply
as they do to any horizon.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .horizon import optimizer_step


@dataclass(frozen=True)
class RunHorizon:
    """A run's length as a snapshot's horizon.

    Attributes:
        horizon_steps: T, the optimizer steps taken.
        learning_rate: S/T, the mean heavy-ball η/(1 - μ) per step (with momentum 0).
        source: The sentence the tuning record keeps ("run damping: Σ η/(1 - μ) = ..., T = ...").
    """

    horizon_steps: float
    learning_rate: float
    source: str

    @property
    def damping(self) -> float:
        """1/S: the damping of the whole run's unrolled response."""
        return 1.0 / (self.learning_rate * self.horizon_steps)


@dataclass
class RunLength:
    """The length S = Σ_t η_t/(1 - μ_t) of a training run, accumulated one optimizer step at a time.

    Attributes:
        length: S so far.
        steps: T, the optimizer steps observed (steps at learning rate 0 count in T and add 0 to S).
        unknown_steps: Steps whose optimizer has no known heavy-ball step (other optimizers, Adam before
            its moments exist); they add nothing to S.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> sgd = torch.optim.SGD([w], lr=0.1, momentum=0.5)
        >>> run = RunLength()
        >>> for _ in range(10):
        ...     run.observe([sgd])
        >>> round(run.length, 6), run.steps, round(run.horizon().damping, 6)
        (2.0, 10, 0.5)
    """

    length: float = 0.0
    steps: int = 0
    unknown_steps: int = 0

    def observe(self, optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer], steps: int = 1) -> None:
        """Add ``steps`` optimizer steps taken at the optimizers' current learning rate and state.

        Call it right after the step (Lightning: ``on_train_batch_end``); a scheduler that has already
        moved the learning rate shifts S by one step's η (0.7 % of a 300-step cosine run).
        """
        self.steps += steps
        zero_rate = all(float(g["lr"]) == 0.0 for o in _listed(optimizers) for g in o.param_groups)
        if zero_rate:
            return
        found = optimizer_step(optimizers)
        if found is None:
            self.unknown_steps += steps
            return
        self.length += steps * found.learning_rate / (1.0 - found.momentum)

    def horizon(self) -> RunHorizon | None:
        """The run as a horizon (H = T, η = S/T, μ = 0), or ``None`` before any step with a known η."""
        if not self.length > 0 or self.steps < 1:
            return None
        unknown = f", {self.unknown_steps} steps of unknown η left out" if self.unknown_steps else ""
        source = (f"run damping 1/S: S = Σ η/(1 - μ) = {self.length:.4g} over T = {self.steps} optimizer steps "
                  f"(damping {1.0 / self.length:.4g}{unknown})")
        return RunHorizon(float(self.steps), self.length / self.steps, source)

    def state_dict(self) -> dict[str, float]:
        return {"length": self.length, "steps": self.steps, "unknown_steps": self.unknown_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.length, self.steps = float(state["length"]), int(state["steps"])
        self.unknown_steps = int(state.get("unknown_steps", 0))


def _listed(optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    return [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
