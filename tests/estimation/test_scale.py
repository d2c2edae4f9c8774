"""Snapshot scale: parameter subsets, out-of-memory splitting of chain batches, autocast evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.estimation.estimator import BIFEstimator
from lightning_bif.estimation.sampler import SGLDSampler
from lightning_bif.estimation.tracked_losses import joint_batch
from lightning_bif.example_sets import ExampleSet
from lightning_bif.functional import FunctionalModel


def cross_entropy(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def problem(n: int = 48, p: int = 6) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], tuple]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n + p, 5, generator=generator)
    y = torch.randint(3, (n + p,), generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    return model, (x[:n], y[:n]), (x[n:], y[n:])


def test_sampling_a_subset_keeps_the_chain_state_at_the_subsets_size_and_leaves_the_rest_frozen() -> None:
    model, train, probes = problem()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fmodel = FunctionalModel(model, ("2.*",), torch.device("cpu"))
    subset = model[2].weight.numel() + model[2].bias.numel()
    assert fmodel.dim == subset
    assert fmodel.center.shape == (subset,)
    # The frozen parameters are the model's own tensors, not copies: no memory beyond the subset.
    frozen = {name: t for name, t in fmodel._frozen.items()}
    assert {n.removeprefix("model.") for n in frozen} == {"0.weight", "0.bias"}
    assert frozen["model.0.weight"].data_ptr() == model[0].weight.data_ptr()

    config = SGLDConfig(chains=2, draws=4, burn_in=2, thin=4, step_size=1e-3, localization=100.0,
                        sample_params=("2.*",))
    sampler = SGLDSampler(fmodel, ExampleSet(train, "data"), cross_entropy, config, nbeta=48.0)
    draws = list(sampler.run([0, 1], vectorized=True))
    assert len(draws) == 4
    assert all(d.params.shape == (2, subset) for d in draws)
    assert not torch.equal(draws[-1].params[0], fmodel.center)  # the subset does move
    unset = SGLDSampler(fmodel, ExampleSet(train, "data"), cross_entropy, config.replace(localization=None), 48.0)
    with pytest.raises(ValueError, match="localization set"):  # None is resolved by BIFEstimator, not the sampler
        next(unset.run([0], vectorized=False))

    result = estimate_bif(model, cross_entropy, train, probes, config=config)
    assert result.influence.shape == (6, 48) and result.ok
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_a_batch_that_runs_out_of_gpu_memory_is_split_and_gives_the_same_result_as_smaller_batches() -> None:
    model, train, probes = problem()
    # One round: added chains would run in other vmap batches than the halves' (equal only up to rounding).
    config = SGLDConfig(chains=4, draws=6, burn_in=2, step_size=1e-3, vectorize=True, target_split_half=None)
    state = {"armed": False, "fired": False}

    def progress(done: int, total: int) -> None:
        # Four chains at once have taken 4 steps (2 draws accumulated): fail the next loss call.
        if not state["fired"] and done >= 4 * 4:
            state["armed"] = True

    def flaky_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        if state["armed"] and not state["fired"]:
            state["fired"] = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return cross_entropy(model, batch)

    with pytest.warns(UserWarning, match="ran out of GPU memory; running 2 at a time"):
        split = estimate_bif(model, flaky_loss, train, probes, config=config, progress=progress)
    assert state["fired"]
    halves = estimate_bif(model, cross_entropy, train, probes, config=config.replace(chains_per_batch=2))
    torch.testing.assert_close(split.influence, halves.influence, rtol=0, atol=0)
    torch.testing.assert_close(split.diagnostics.draw_loss, halves.diagnostics.draw_loss, rtol=0, atol=0)


def test_an_explicit_chains_per_batch_does_not_hide_out_of_memory() -> None:
    model, train, probes = problem()

    def oom(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        if torch.is_grad_enabled():  # SGLD gradients only: the losses at w* still evaluate
            raise torch.cuda.OutOfMemoryError("injected")
        return cross_entropy(model, batch)

    config = SGLDConfig(chains=2, draws=2, burn_in=0, chains_per_batch=2, vectorize=True)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        estimate_bif(model, oom, train, probes, config=config)


def test_bf16_autocast_evaluation_tracks_the_fp32_estimate() -> None:
    model, train, probes = problem(n=64, p=8)
    config = SGLDConfig(chains=2, draws=30, burn_in=10, step_size=1e-3, localization=10.0)
    full = estimate_bif(model, cross_entropy, train, probes, config=config)
    half = estimate_bif(model, cross_entropy, train, probes, config=config.replace(autocast="bf16"))
    assert half.ok and half.config.autocast == "bf16"
    assert not torch.equal(full.influence, half.influence)  # bf16 really ran
    a, b = full.influence.flatten(), half.influence.flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9
    torch.testing.assert_close(full.train_loss, half.train_loss, rtol=2e-2, atol=2e-2)


def test_autocast_is_validated_and_round_trips_through_json() -> None:
    with pytest.raises(ValueError, match="autocast"):
        SGLDConfig(autocast="int8")
    config = SGLDConfig(autocast="bf16")
    assert SGLDConfig.from_json(config.to_json()) == config


def test_train_and_probes_are_evaluated_in_one_pass_with_the_same_result_as_two() -> None:
    model, train, probes = problem()
    config = SGLDConfig(chains=2, draws=8, burn_in=2, step_size=1e-3)
    joint = BIFEstimator(model, cross_entropy, train, probes, config=config)
    separate = BIFEstimator(model, cross_entropy, train, probes, config=config,
                            probe_fn=lambda m, b: cross_entropy(m, b))
    for estimator in (joint, separate):
        estimator.prepare()
    one, two = (estimator.summarize(estimator.sample_checked(range(config.chains)), 0.0)
                for estimator in (joint, separate))
    assert joint.losses.joint_batch is not None and separate.losses.joint_batch is None
    torch.testing.assert_close(one.influence, two.influence)
    torch.testing.assert_close(one.probe_loss, two.probe_loss)
    # Sets that do not stack (other trailing shape) or do not fit one evaluation batch stay apart.
    assert joint_batch([(2, [torch.zeros(2, 5)])], [(1, [torch.zeros(1, 5, 2)])], 8) is None
    assert joint_batch([(2, [torch.zeros(2, 5)])], [(1, [torch.zeros(1, 5)])], 2) is None
    size, batch = joint_batch([(2, [torch.zeros(2, 5)])], [(1, [torch.ones(1, 5)])], 3)
    assert size == 3 and torch.equal(batch[0][2], torch.ones(5))
