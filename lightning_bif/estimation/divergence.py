"""Whether a snapshot's chains stayed in the neighbourhood of w*: the loss-rise bound and the divergence reason.

Under the Gaussian (Laplace) approximation of the localized posterior around a minimum w*, with
Hessian eigenvalues λ_k of the training loss, the expected rise of the loss over the draws is

    E[L(w) - L(w*)] ≈ (1 / (2nβ)) · Σ_k λ_k / (λ_k + γ/nβ)  ≤  D / (2nβ),

D the number of sampled parameters: each direction adds at most 1/(2nβ), the equipartition
share. Away from a minimum (early training, a horizon localization with small γ) the chains also
follow the gradient, and a rise of several times the loss at w* is legitimate. Chains that blow
up (a step size beyond the stiffest direction's stability limit) climb instead by many orders of
magnitude (1e16 on the toy at step size 0.3). The bound sits between the two with a wide margin:

    loss rise bound = LOSS_RISE_MARGIN · max(D / (2nβ), mean |ℓ_i(w*)|),   LOSS_RISE_MARGIN = 1000,

so a snapshot is ``diverged`` only when some chain's mean rise is a thousand times what either the
equipartition bound or the loss itself allows, or its losses are not finite.
"""

from __future__ import annotations

#: How far beyond max(D/(2nβ), mean loss at w*) a chain's mean loss rise may go before it counts as diverged.
LOSS_RISE_MARGIN = 1000.0


def loss_rise_bound(dimension: int, nbeta: float, loss_at_center: float) -> float:
    """The largest mean loss rise a chain may show and still count as near w* (see the module docstring).

    Args:
        dimension: D, the number of sampled parameters.
        nbeta: The nβ of the posterior.
        loss_at_center: Mean loss of the tracked training examples at w*.
    """
    return LOSS_RISE_MARGIN * max(dimension / (2.0 * nbeta), abs(loss_at_center))
