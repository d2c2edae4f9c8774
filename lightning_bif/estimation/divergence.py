"""Whether a snapshot's chains stayed in the neighbourhood of w*: the two loss-rise bounds (suspect, diverged).

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

That margin catches explosions, not chains that wandered off: a chain whose step size sits just
under the stability limit climbs tens of nats and returns a BIF hundreds of times too large while
staying finite. Such a snapshot is ``suspect`` (logged and shown, but not ``ok``) when some chain's
mean rise exceeds what an equilibrated local chain can rise, with room for discretisation and for
a w* away from a minimum:

    suspect rise bound = SUSPECT_MARGIN · D / (2nβ) + |mean ℓ_i(w*)|,   SUSPECT_MARGIN = 10.

The first term is ten times the equipartition bound (discretisation inflates a direction's variance
by 1/(1 - εk/4) for stiffness k, a factor of ten only within 10 % of the stability limit εk = 4);
the second lets chains that follow the gradient away from w* move the tracked examples' loss by as
much as the loss itself. docs/reliability.md tabulates both against real snapshots
(``benchmarks/suspect_evidence.py``): healthy ones rise by at most a few hundredths of D/(2nβ).
"""

from __future__ import annotations

#: How far beyond max(D/(2nβ), mean loss at w*) a chain's mean loss rise may go before it counts as diverged.
LOSS_RISE_MARGIN = 1000.0
#: How many times the equipartition rise D/(2nβ) (plus the loss at w*) a chain may climb and still count as ``ok``.
SUSPECT_MARGIN = 10.0


def loss_rise_bound(dimension: int, nbeta: float, loss_at_center: float) -> float:
    """The largest mean loss rise a chain may show and still count as near w* (see the module docstring).

    Args:
        dimension: D, the number of sampled parameters.
        nbeta: The nβ of the posterior.
        loss_at_center: Mean loss of the tracked training examples at w*.
    """
    return LOSS_RISE_MARGIN * max(dimension / (2.0 * nbeta), abs(loss_at_center))


def suspect_rise_bound(dimension: int, nbeta: float, loss_at_center: float) -> float:
    """The largest mean loss rise a chain may show and still count as equilibrated near w* (``ok``).

    Beyond it (and within :func:`loss_rise_bound`) the snapshot is ``suspect``; see the module docstring.

    Args:
        dimension: D, the number of sampled parameters.
        nbeta: The nβ of the posterior.
        loss_at_center: Mean loss of the tracked training examples at w*.
    """
    return SUSPECT_MARGIN * dimension / (2.0 * nbeta) + abs(loss_at_center)
