"""The run's own damping 1/S, S = Σ η_t/(1 - μ_t): against the exact unrolled response of a real run on a quadratic."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_bif import SGLDConfig
from lightning_bif.snapshot.snapshotter import with_horizon
from lightning_bif.tuning.run_damping import RunLength


def _quadratic(seed: int = 0, n: int = 60, d: int = 6):
    """Linear regression: ℓ_i = ½(x_iᵀw - y_i)², A = XᵀX/n with eigenvalues spread over 0.02–2; w* its minimum."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    scales = torch.logspace(math.log10(0.02), math.log10(2.0), d, dtype=torch.float64)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    x = torch.linalg.qr(x)[0] * math.sqrt(n) @ torch.diag(scales.sqrt()) @ basis.T  # XᵀX/n = B diag(scales) Bᵀ
    y = x @ torch.randn(d, generator=generator, dtype=torch.float64) + torch.randn(n, generator=generator,
                                                                                dtype=torch.float64)
    a = x.T @ x / n
    w_star = torch.linalg.solve(a, x.T @ y / n)
    return x, y, a, w_star


def _run(x, y, w_star, up: torch.Tensor, steps: int, lr: float, momentum: float, run: RunLength | None = None):
    """w_T of torch.optim.SGD with a cosine schedule to 0 from w*, on the objective L + Σ_i up_i·ℓ_i/n."""
    w = torch.nn.Parameter(w_star.clone())
    optimizer = torch.optim.SGD([w], lr=lr, momentum=momentum)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    weights = 1.0 + up
    for _ in range(steps):
        optimizer.zero_grad()
        (weights * 0.5 * (x @ w - y).square()).mean().backward()
        optimizer.step()
        if run is not None:
            run.observe([optimizer])
        schedule.step()
    return w.detach()


def test_run_damping_is_the_unrolled_response_of_a_real_run_on_a_quadratic() -> None:
    """∂φ_j/∂ε after T steps of SGD (momentum 0.5, cosine lr 0.1 → 0) from w* against the IF damped by 1/S.

    On a quadratic the response is exactly linear in ε, so central differences of real runs give it to
    rounding. Per eigenvalue a the unrolled filter f(a) = Σ_t η_t·Π_{s>t}(1 - η_s·a) (μ = 0) has the limits
    S and 1/a of 1/(a + 1/S); between them the two differ by a bounded factor, so the damped IF matches
    the run entry by entry to about 30 %, and damping 10× larger or smaller does markedly worse.
    """
    x, y, a, w_star = _quadratic()
    n, steps, lr, momentum = len(x), 100, 0.1, 0.5
    run = RunLength()
    _run(x, y, w_star, torch.zeros(n, dtype=torch.float64), steps, lr, momentum, run)
    horizon = run.horizon()
    cosine = [0.5 * lr * (1 + math.cos(math.pi * t / steps)) for t in range(steps)]
    assert run.steps == steps and run.length == pytest.approx(sum(cosine) / (1 - momentum), rel=1e-9)
    assert horizon.damping == pytest.approx(1 / run.length) and "T = 100" in horizon.source
    probes, tracked, eps = x[:8], range(0, n, 3), 1e-4
    responses = []
    for i in tracked:
        up = torch.zeros(n, dtype=torch.float64)
        up[i] = eps
        d_w = (_run(x, y, w_star, up, steps, lr, momentum) - _run(x, y, w_star, -up, steps, lr, momentum)) / (2 * eps)
        responses.append(probes @ d_w)  # ∂(x_jᵀw_T)/∂ε; the probe gradients are x_j times a fixed residual
    exact = torch.stack(responses, 1)
    gradients = x[list(tracked)] * (x[list(tracked)] @ w_star - y[list(tracked)])[:, None]

    def damped(delta: float) -> torch.Tensor:
        return -(probes @ torch.linalg.solve(a + delta * torch.eye(len(a), dtype=torch.float64), gradients.T)) / n

    def error(delta: float) -> float:
        return float((damped(delta) - exact).norm() / exact.norm())

    rule = error(horizon.damping)
    correlation = torch.corrcoef(torch.stack([damped(horizon.damping).flatten(), exact.flatten()]))[0, 1]
    print(f"relative error {rule:.3f} (10x: {error(10 * horizon.damping):.3f}, /10: "
          f"{error(horizon.damping / 10):.3f}), correlation {float(correlation):.4f}")
    assert rule < 0.35 and correlation > 0.95
    assert rule < 0.7 * min(error(10 * horizon.damping), error(horizon.damping / 10))


def test_steps_at_learning_rate_zero_count_in_t_and_add_nothing() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([w], lr=0.0, momentum=0.9)
    run = RunLength()
    run.observe([optimizer], steps=3)
    assert run.horizon() is None and run.steps == 3 and run.unknown_steps == 0
    optimizer.param_groups[0]["lr"] = 0.2
    run.observe(optimizer, steps=2)
    assert run.length == pytest.approx(2 * 0.2 / 0.1) and run.horizon().horizon_steps == 5
    adam = torch.optim.Adam([w], lr=0.1)
    run.observe([adam])  # before Adam's first step its η is unknown: not counted in S, said in the record
    assert run.unknown_steps == 1 and "1 steps of unknown η" in run.horizon().source
    restored = RunLength()
    restored.load_state_dict(run.state_dict())
    assert restored == run


def test_with_horizon_uses_the_run_where_the_optimizer_has_no_step() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([w], lr=0.1, momentum=0.5)
    run = RunLength()
    run.observe([optimizer], steps=40)  # S = 40·0.1/0.5 = 8
    optimizer.param_groups[0]["lr"] = 0.0  # the end of a cosine schedule
    resolved = with_horizon(SGLDConfig(), [optimizer], None, step=40, run=run)
    config = resolved.config
    assert not resolved.warnings and "run so far" in resolved.notes[0]
    assert config.horizon_steps == 40 and config.momentum == 0.0
    assert (1 - config.momentum) / (config.learning_rate * config.horizon_steps) == pytest.approx(1 / 8)
    assert config.horizon_source.startswith("run damping 1/S: S = Σ η/(1 - μ) = 8 over T = 40")
    assert "has no horizon" in with_horizon(SGLDConfig(), [optimizer], None, step=40).warnings[0]  # no run known
    optimizer.param_groups[0]["lr"] = 0.1  # with a step and H known the horizon rule applies, not the run
    ahead = with_horizon(SGLDConfig(), [optimizer], 20, step=40, run=run).config
    assert ahead.horizon_steps == 20 and ahead.momentum == 0.5 and ahead.horizon_source is None
