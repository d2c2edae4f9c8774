"""The horizon of a snapshot: localization from "the next H steps of training", and the saddle check.

A snapshot at step t with a horizon H estimates how up-weighting a training example z_i from
step t on changes the probe φ_j after H more optimizer steps. For heavy-ball SGD
(v ← μ·v + g, w ← w - η·v) on a quadratic with Hessian eigenvalue λ, the first-order response of
w_{t+H} to up-weighting z_i is the influence function with the inverse Hessian 1/λ replaced by a
filter that is ≈ η·H/(1 - μ) for η·H·λ ≪ 1 - μ and 1/λ for η·H·λ ≫ 1 - μ: a damped influence
function with damping ≈ (1 - μ)/(η·H) (the unrolling view; classical IF is H → ∞). The localized
posterior's BIF is a damped IF with damping γ/nβ, so γ = nβ·(1 - μ)/(η·H) makes a snapshot answer
the horizon question (docs/horizon.md derives it and checks it against continued training).

Optimizers are mapped to their heavy-ball equivalent (η, μ) by :func:`optimizer_step`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..config import SGLDConfig

# ε·(nβ·λ_max + γ) of a horizon snapshot: a quarter of the SGLD stability bound 4 (the stiffest direction's
# variance is inflated by 1/(1 - 1/4)). Chosen against 2 and a fixed ε on the development set-up
# (docs/horizon.md, "Which step-size rule, and why").
STIFFNESS_STEP = 1.0


@dataclass(frozen=True)
class OptimizerStep:
    """An optimizer's step as heavy-ball SGD: v ← μ·v + g, w ← w - η·v.

    Attributes:
        learning_rate: η.
        momentum: μ.
    """

    learning_rate: float
    momentum: float


def horizon_damping(horizon_steps: float, learning_rate: float, momentum: float) -> float:
    """The damping (1 - μ)/(η·H) whose damped influence function is the H-step response of heavy-ball SGD."""
    return (1.0 - momentum) / (learning_rate * horizon_steps)


def optimizer_step(optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer]) -> OptimizerStep | None:
    """The heavy-ball equivalent (η, μ) of the optimizers' current step, or ``None`` when it is unknown.

    Every trainable parameter element k contributes its own (η_k, μ_k) with a weight w_k, and the
    result is the weighted mean over all elements of all param groups of all optimizers. The
    current ``lr`` of each group is used, so an LR scheduler's value at the snapshot counts.

    * ``SGD``: η_k = lr·(1 - dampening) (lr without momentum), μ_k = momentum, w_k = 1. Nesterov
      has the same steady-state step g·η/(1 - μ) and is treated alike.
    * ``Adam``, ``AdamW`` (and subclasses): the step is lr·m̂/(√v̂ + eps), m an EMA of g with β1,
      i.e. heavy-ball with η_k = lr·(1 - β1)/(√v̂_k + eps) and μ_k = β1, where v̂_k is the
      bias-corrected second moment (``max_exp_avg_sq`` with amsgrad). w_k = v̂_k: elements that
      received no gradient (v̂_k = 0, where lr/eps would be huge) carry no weight. AdamW's decoupled
      decay does not change η. ``None`` before the first step (no second moments yet).
    * ``RMSprop``: η_k = lr/(√s_k + eps) (s the squared-gradient average, centred when
      ``centered``), μ_k = momentum, w_k = s_k.

    Args:
        optimizers: One optimizer or several (e.g. ``trainer.optimizers``).

    Returns:
        The :class:`OptimizerStep`, or ``None`` for other optimizers, without trainable parameters,
        or while the learning rate is 0.
    """
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    weight = rate = momentum = 0.0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if not param.requires_grad:
                    continue
                parts = _element_step(optimizer, group, param)
                if parts is None:
                    return None
                w, w_rate, mu = parts
                weight, rate, momentum = weight + w, rate + w_rate, momentum + w * mu
    if not weight > 0 or not rate > 0:
        return None
    return OptimizerStep(learning_rate=rate / weight, momentum=momentum / weight)


def _element_step(
    optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor
) -> tuple[float, float, float] | None:
    """(Σ_k w_k, Σ_k w_k·η_k, μ) over the elements of one parameter; ``None`` for an unknown optimizer."""
    lr = float(group["lr"])
    state = optimizer.state.get(param, {})
    if isinstance(optimizer, torch.optim.SGD):
        mu = float(group.get("momentum", 0.0))
        rate = lr * (1.0 - float(group.get("dampening", 0.0))) if mu else lr
        return float(param.numel()), rate * param.numel(), mu
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1, beta2 = group["betas"]
        second = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
        if second is None or "step" not in state:
            return 0.0, 0.0, 0.0
        steps = float(state["step"])
        v_hat = second.detach().double() / (1.0 - float(beta2) ** steps)
        rates = lr * (1.0 - float(beta1)) / (v_hat.sqrt() + float(group["eps"]))
        return float(v_hat.sum()), float((v_hat * rates).sum()), float(beta1)
    if isinstance(optimizer, torch.optim.RMSprop):
        square = state.get("square_avg")
        if square is None:
            return 0.0, 0.0, 0.0
        s = square.detach().double()
        if group.get("centered") and "grad_avg" in state:
            s = s - state["grad_avg"].detach().double().square()
        rates = lr / (s.clamp_min(0).sqrt() + float(group["eps"]))
        return float(s.sum()), float((s * rates).sum()), float(group.get("momentum", 0.0))
    return None


@dataclass(frozen=True)
class HorizonCheck:
    """How a snapshot's localization was set from its horizon.

    Attributes:
        horizon_steps: H.
        learning_rate: η (heavy-ball equivalent).
        momentum: μ.
        damping: The horizon damping (1 - μ)/(η·H).
        lambda_min: Lanczos estimate of the least eigenvalue of the training objective's Hessian
            (H + λ) at w*; negative at a saddle.
        lambda_max: Lanczos estimate of its largest eigenvalue.
        localization: The γ used: nβ·(damping + max(0, -lambda_min)), or the localization floor when higher.
        step_size: The ε used: ``STIFFNESS_STEP / (nβ·max(lambda_max, 0) + γ)`` unless the config set one.
    """

    horizon_steps: float
    learning_rate: float
    momentum: float
    damping: float
    lambda_min: float
    lambda_max: float
    localization: float
    step_size: float

    @property
    def saddle(self) -> bool:
        """Whether the Hessian had a negative eigenvalue, so the damping was raised by |λ_min|."""
        return self.lambda_min < 0


def horizon_localization(config: SGLDConfig, nbeta: float, lambda_min: float) -> float:
    """The horizon's own γ = nβ·((1 - μ)/(η·H) + max(0, -λ_min)), before any floor (``config`` has the horizon)."""
    damping = horizon_damping(config.horizon_steps, config.learning_rate, config.momentum)
    return nbeta * (damping + max(0.0, -lambda_min))


def horizon_config(
    config: SGLDConfig, nbeta: float, lambda_min: float, lambda_max: float, floor: float = 0.0
) -> tuple[SGLDConfig, HorizonCheck]:
    """The config with γ and ε set from ``config``'s horizon and the curvature, and the record of how.

    γ/nβ = (1 - μ)/(η·H) + max(0, -λ_min): at a saddle the damping is raised by |λ_min|, so the
    most negative direction gets exactly the horizon damping, as an influence function with clipped
    negative eigenvalues gives it, and the posterior stays proper. ε = ``STIFFNESS_STEP / (nβ·λ_max + γ)``
    unless ``config.step_size`` is set: the largest posterior curvature is known here, so the chains take
    the largest step that keeps it well inside the stability bound, whatever the horizon (a short one
    makes γ large, a long one leaves the flat directions to explore). ``floor`` is the least γ
    (:func:`lightning_bif.tuning.localization.localization_floor`; 0 when the user set ``localization``).
    """
    if config.horizon_steps is None or config.learning_rate is None or config.momentum is None:
        raise ValueError("horizon_config needs SGLDConfig(horizon_steps=..., learning_rate=..., momentum=...).")
    damping = horizon_damping(config.horizon_steps, config.learning_rate, config.momentum)
    localization = max(horizon_localization(config, nbeta, lambda_min), floor)
    stiffest = nbeta * max(lambda_max, 0.0) + localization
    step_size = STIFFNESS_STEP / stiffest if config.step_size is None else float(config.step_size)
    if not (math.isfinite(localization) and math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"The horizon gives no usable localization (γ = {localization!r}, ε = {step_size!r}); "
                         "check horizon_steps, learning_rate and momentum.")
    check = HorizonCheck(horizon_steps=float(config.horizon_steps), learning_rate=float(config.learning_rate),
                         momentum=float(config.momentum), damping=damping, lambda_min=lambda_min,
                         lambda_max=lambda_max, localization=localization, step_size=step_size)
    return config.replace(localization=localization, step_size=step_size), check
