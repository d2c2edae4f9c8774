"""estimate_bif / BIFEstimator: sign, chain batching, model isolation, inputs and errors."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from helpers import classification_data, cross_entropy, mlp, train_briefly
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.estimation import vectorization
from lightning_bif.estimation.accumulator import CovarianceAccumulator
from lightning_bif.estimation.estimator import BIFEstimator
from lightning_bif.example_sets import ExampleSet

# One round of chains (no split-half target): these tests check one estimate's steps (test_rounds.py the rounds).
FAST = SGLDConfig(chains=2, draws=8, burn_in=4, thin=1, step_size=1e-3, localization=100.0,
                  batch_size=16, seed=0, target_split_half=None)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP trained on noisy labels (so examples are not all memorized), and its data."""
    x, y = classification_data(48, seed=0, label_noise=3.0)
    return train_briefly(mlp(), cross_entropy, x, y, steps=100, weight_decay=0.05), x, y


def test_duplicated_probe_is_helped_most_by_its_own_training_example() -> None:
    x, y = classification_data(60, seed=0, label_noise=3.0)
    model = train_briefly(mlp(), cross_entropy, x, y, steps=150, weight_decay=0.05)
    duplicates = torch.arange(8)
    config = SGLDConfig(chains=4, draws=60, burn_in=30, step_size=1e-3, localization=100.0, batch_size=None)
    result = estimate_bif(model, cross_entropy, (x, y), (x[duplicates], y[duplicates]), config=config)

    rows = torch.arange(len(duplicates))
    own = result.influence[rows, duplicates]
    assert result.ok
    assert (own < 0).all(), "a probe identical to a training example must be helped by it (negative BIF)"
    # Same loss function of the same example: posterior correlation 1, the largest in the row.
    assert torch.allclose(result.correlation[rows, duplicates], torch.ones(len(duplicates)), atol=1e-4)
    assert torch.equal(result.correlation.argmax(dim=1), duplicates)
    # The BIF scales with each loss's posterior spread, so examples the model already fits
    # (loss near 0, little spread) can rank lower; the others are among the most negative.
    ranks = torch.tensor([int((result.influence[r] < own[r]).sum()) for r in rows])
    unfitted = result.train_loss[duplicates] >= result.train_loss.median()
    assert unfitted.sum() >= 3
    assert (ranks[unfitted] < 6).all(), f"ranks {ranks.tolist()} (of 60) for unfitted {unfitted.tolist()}"


def _draws(estimator: BIFEstimator, chains: list[int], vectorized: bool) -> torch.Tensor:
    """Parameters of every kept draw, ``[draws, chains, D]``, from the estimator's sampler."""
    per_draw: dict[int, list[torch.Tensor]] = {}
    for draw in estimator.sampler.run(chains, vectorized):
        per_draw.setdefault(draw.index, []).append(draw.params)
    return torch.stack([torch.cat(per_draw[i]) for i in sorted(per_draw)])


@pytest.mark.parametrize("preconditioner", ["none", "rmsprop"])
def test_vectorized_and_sequential_chains_give_the_same_draws(trained, preconditioner: str) -> None:
    model, x, y = trained
    config = FAST.replace(chains=3, draws=10, preconditioner=preconditioner)
    estimator = BIFEstimator(model, cross_entropy, (x, y), (x[:5], y[:5]), config=config)
    estimator.prepare()
    together = _draws(estimator, [0, 1, 2], vectorized=True)
    one_by_one = torch.stack([_draws(estimator, [c], vectorized=False) for c in range(3)], dim=1).squeeze(2)
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-6)
    # Different chains do differ (the generators are per chain, not shared).
    assert not torch.allclose(together[:, 0], together[:, 1])

    vectorized = estimate_bif(model, cross_entropy, (x, y), (x[:5], y[:5]), config=config.replace(vectorize=True))
    sequential = estimate_bif(model, cross_entropy, (x, y), (x[:5], y[:5]), config=config.replace(vectorize=False))
    assert vectorized.diagnostics.vectorized and not sequential.diagnostics.vectorized
    scale = float(vectorized.influence.abs().max())
    assert scale > 0
    torch.testing.assert_close(vectorized.influence, sequential.influence, rtol=1e-4, atol=1e-5 * scale)


def test_chains_per_batch_does_not_change_the_result(trained) -> None:
    model, x, y = trained
    config = FAST.replace(chains=4, vectorize=True)
    reference = estimate_bif(model, cross_entropy, (x, y), (x[:5], y[:5]), config=config)
    for chains_per_batch in (1, 3):
        chunked = estimate_bif(model, cross_entropy, (x, y), (x[:5], y[:5]),
                               config=config.replace(chains_per_batch=chains_per_batch))
        torch.testing.assert_close(chunked.influence, reference.influence, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(chunked.diagnostics.draw_loss, reference.diagnostics.draw_loss)


def test_chains_split_over_two_runs_and_merged_equal_one_run(trained) -> None:
    model, x, y = trained
    config = FAST.replace(chains=4)
    whole = estimate_bif(model, cross_entropy, (x, y), (x[:5], y[:5]), config=config)
    ranks: list[tuple[BIFEstimator, CovarianceAccumulator]] = []
    for chains in ([0, 1], [2, 3]):
        estimator = BIFEstimator(model, cross_entropy, (x, y), (x[:5], y[:5]), config=config)
        estimator.prepare()
        ranks.append((estimator, estimator.sample_checked(chains)))
    (first, kept), (second, accumulator) = ranks
    partial = first.summarize(kept, 0.0)
    for mine, theirs in zip(accumulator.tensors(), kept.tensors(), strict=True):
        mine += theirs  # what an all-reduce across two ranks does
    merged = second.summarize(accumulator, 0.0)

    torch.testing.assert_close(merged.influence, whole.influence, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(merged.stderr, whole.stderr, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(merged.diagnostics.draw_loss, whole.diagnostics.draw_loss)
    # Half the chains alone is a valid (noisier) estimate, not a divergence.
    assert partial.ok and not partial.diagnostics.any_diverged


class _Net(nn.Module):
    """BatchNorm, Dropout and a frozen parameter: everything estimate_bif must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3))
        self.head = nn.Linear(16, 3)
        self.head.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def _assert_same(before: dict, after: dict) -> None:
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys()
        for name in before[key]:
            assert torch.equal(before[key][name], after[key][name]), f"{key} {name} changed"
    for name, grad in before["grads"].items():
        if grad is None:
            assert after["grads"][name] is None, f"grad of {name} appeared"
        else:
            assert torch.equal(grad, after["grads"][name]), f"grad of {name} changed"
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert torch.equal(before["rng"], after["rng"])


@pytest.mark.parametrize("populate_grads", [False, True])
@pytest.mark.parametrize("vectorize", [True, False])
def test_model_and_global_rng_are_untouched(populate_grads: bool, vectorize: bool) -> None:
    torch.manual_seed(0)
    model = _Net()
    x, y = classification_data(32, seed=1)
    model.train()
    for _ in range(3):  # real running statistics in BatchNorm
        model(x)
    model.body[3].eval()  # a mixed train/eval model
    if populate_grads:
        cross_entropy(model, [x, y]).mean().backward()
    before = _snapshot(model)

    result = estimate_bif(model, cross_entropy, (x, y), (x[:4], y[:4]), config=FAST.replace(vectorize=vectorize))

    _assert_same(before, _snapshot(model))
    assert result.ok and torch.isfinite(result.influence).all() and torch.isfinite(result.stderr).all()
    assert result.diagnostics.vectorized == vectorize


def test_bad_loss_functions_raise_clear_errors(trained) -> None:
    model, x, y = trained
    data = (x, y)

    def run(loss_fn, **kwargs) -> None:
        estimate_bif(model, loss_fn, data, (x[:3], y[:3]), config=FAST, **kwargs)

    with pytest.raises(ValueError, match=r"scalar.*reduction='none'"):
        run(lambda m, b: cross_entropy(m, b).mean())
    with pytest.raises(ValueError, match=r"expected \[16\]|expected \[48\]"):
        run(lambda m, b: cross_entropy(m, b)[:-1])
    with pytest.raises(TypeError, match="must return a Tensor"):
        run(lambda m, b: cross_entropy(m, b).tolist())
    with pytest.raises(ValueError, match=r"non-finite.*training example"):
        run(lambda m, b: cross_entropy(m, b) / 0 * torch.zeros(1))
    with pytest.raises(ValueError, match="probe_fn gives non-finite"):
        run(cross_entropy, probe_fn=lambda m, b: torch.full((len(b[0]),), math.inf))
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        run("cross_entropy")


def test_bad_inputs_raise_clear_errors(trained) -> None:
    model, x, y = trained
    with pytest.raises(ValueError, match="train is empty"):
        estimate_bif(model, cross_entropy, (x[:0], y[:0]), (x[:3], y[:3]), config=FAST)
    with pytest.raises(ValueError, match="probes is empty"):
        estimate_bif(model, cross_entropy, (x, y), TensorDataset(x[:0], y[:0]), config=FAST)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        estimate_bif(model, cross_entropy, (x, y), (x[:3], y[:3]), config=FAST.replace(sample_params=("head.*",)))
    with pytest.raises(ValueError, match="share their first"):
        estimate_bif(model, cross_entropy, (x, y[:-1]), (x[:3], y[:3]), config=FAST)
    with pytest.raises(TypeError, match="must hold tensors only"):
        estimate_bif(model, cross_entropy, x.tolist(), (x[:3], y[:3]), config=FAST)
    with pytest.raises(TypeError, match="probes must be a map-style torch Dataset"):
        estimate_bif(model, cross_entropy, (x, y), {"x": x[:3], "y": y[:3]}, config=FAST)


@pytest.mark.parametrize(
    ("field", "value"),
    [("chains", 0), ("chains", True), ("draws", -1), ("thin", 1.5), ("burn_in", -1), ("step_size", 0.0),
     ("step_size", math.nan), ("step_size", math.inf), ("nbeta", 0.0), ("localization", -1.0),
     ("localization", math.nan), ("weight_decay", -0.1), ("preconditioner", "adam"), ("batch_size", 0),
     ("eval_batch_size", 0), ("vectorize", "yes"), ("chains_per_batch", 0)],
)
def test_bad_config_values_name_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"SGLDConfig.{field}"):
        SGLDConfig(**{field: value})


def test_rmsprop_needs_burn_in_and_unknown_json_fields_are_rejected() -> None:
    with pytest.raises(ValueError, match="burn_in >= 1"):
        SGLDConfig(preconditioner="rmsprop", burn_in=0)
    with pytest.raises(ValueError, match="Unknown SGLDConfig fields"):
        SGLDConfig.from_json(json.dumps({"chains": 2, "stepsize": 1e-3}))


def test_config_json_round_trip() -> None:
    config = SGLDConfig(chains=3, draws=7, nbeta=12.5, weight_decay=0.01, preconditioner="rmsprop",
                        batch_size=None, sample_params=["head.*", "body.0.weight"], vectorize=False)
    restored = SGLDConfig.from_json(config.to_json())
    assert restored == config
    assert restored.sample_params == ("head.*", "body.0.weight")
    assert SGLDConfig.from_json(SGLDConfig().to_json()) == SGLDConfig()
    assert config.replace(chains=5).chains == 5 and config.chains == 3


class _DictDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.x[i], "label": self.y[i]}


class _TupleDataset(_DictDataset):
    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.x[i], self.y[i]


def _dict_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return cross_entropy(model, [batch["inputs"], batch["label"]])


def test_every_kind_of_example_source_gives_the_same_result(trained) -> None:
    model, x, y = trained
    pool_x, pool_y = torch.cat([x, x[:10] + 1]), torch.cat([y, y[:10]])
    pool = TensorDataset(pool_x, pool_y)
    probes = (x[:5], y[:5])
    reference = estimate_bif(model, cross_entropy, (x, y), probes, config=FAST)
    sources = {
        "TensorDataset": (TensorDataset(x, y), cross_entropy),
        "Subset": (Subset(pool, range(48)), cross_entropy),
        "nested Subset": (Subset(Subset(pool, list(range(50))), range(48)), cross_entropy),
        "DataLoader": (DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True), cross_entropy),
        "dict Dataset": (_DictDataset(x, y), _dict_loss),
        "tuple Dataset": (_TupleDataset(x, y), cross_entropy),
    }
    for name, (train, loss_fn) in sources.items():
        probe_source = _DictDataset(*probes) if loss_fn is _dict_loss else probes
        result = estimate_bif(model, loss_fn, train, probe_source, config=FAST)
        torch.testing.assert_close(result.influence, reference.influence, rtol=1e-5, atol=1e-9, msg=name)
        torch.testing.assert_close(result.train_loss, reference.train_loss, msg=name)


def test_example_ids_follow_subsets_to_the_underlying_dataset() -> None:
    base = TensorDataset(torch.arange(10.0))
    assert ExampleSet(base, "train").ids().tolist() == list(range(10))
    assert ExampleSet(Subset(base, [7, 3, 5]), "train").ids().tolist() == [7, 3, 5]
    assert ExampleSet(Subset(Subset(base, [9, 8, 7, 6]), [1, 3]), "train").ids().tolist() == [8, 6]
    nested = ExampleSet(Subset(Subset(base, [9, 8, 7, 6]), [1, 3]), "train")
    assert nested.gather(torch.tensor([0, 1]), torch.device("cpu"))[0].tolist() == [8.0, 6.0]


def test_probe_fn_and_separate_sgld_data(trained) -> None:
    model, x, y = trained
    probes = (x[:5], y[:5])

    def negated(m: nn.Module, b: list[torch.Tensor]) -> torch.Tensor:
        return -cross_entropy(m, b)

    plain = estimate_bif(model, cross_entropy, (x, y), probes, config=FAST)
    flipped = estimate_bif(model, cross_entropy, (x, y), probes, probe_fn=negated, config=FAST)
    torch.testing.assert_close(flipped.influence, -plain.influence)
    torch.testing.assert_close(flipped.probe_loss, -plain.probe_loss)

    # SGLD minibatches from a larger pool than the tracked examples: nβ defaults to the pool size.
    pool_x, pool_y = classification_data(96, seed=5, label_noise=3.0)
    pooled = estimate_bif(model, cross_entropy, (x[:10], y[:10]), probes,
                          data=DataLoader(TensorDataset(pool_x, pool_y), batch_size=16), config=FAST)
    assert pooled.influence.shape == (5, 10)
    assert pooled.diagnostics.nbeta == 96.0 and pooled.ok


def test_divergent_run_is_reported_not_raised(trained) -> None:
    model, x, y = trained
    result = estimate_bif(model, cross_entropy, (x, y), (x[:3], y[:3]),
                          config=FAST.replace(step_size=1e3, localization=1e4))
    assert not result.ok
    assert result.diagnostics.diverged.all()
    assert torch.isnan(result.influence).all()
    assert math.isnan(result.diagnostics.ess) and math.isnan(result.diagnostics.loss_rise)


def test_per_token_losses_are_averaged_per_example(trained) -> None:
    model, x, y = trained

    def per_token(m: nn.Module, b: list[torch.Tensor]) -> torch.Tensor:
        return cross_entropy(m, b)[:, None].expand(-1, 4)

    tokens = estimate_bif(model, per_token, (x, y), (x[:3], y[:3]), config=FAST)
    plain = estimate_bif(model, cross_entropy, (x, y), (x[:3], y[:3]), config=FAST)
    torch.testing.assert_close(tokens.influence, plain.influence)


def test_sampling_only_some_parameters(trained) -> None:
    model, x, y = trained
    head_only = estimate_bif(model, cross_entropy, (x, y), (x[:3], y[:3]), config=FAST.replace(sample_params="2.*"))
    everything = estimate_bif(model, cross_entropy, (x, y), (x[:3], y[:3]), config=FAST)
    assert head_only.ok and head_only.config.sample_params == ("2.*",)
    assert not torch.allclose(head_only.influence, everything.influence)
    torch.testing.assert_close(head_only.train_loss, everything.train_loss)


def _column_major_collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Same values as the default collate, but the inputs are a non-contiguous (column-major) view."""
    inputs = torch.stack([x for x, _ in items]).t().contiguous().t()
    return [inputs, torch.stack([y for _, y in items])]


def test_sgld_data_through_a_loaders_own_collate_fn(trained) -> None:
    """A generic (non-tensor) dataset's minibatches come from the DataLoader's collate_fn, vectorized."""
    model, x, y = trained
    config = FAST.replace(vectorize=True)
    loader = DataLoader(_TupleDataset(x, y), batch_size=8, collate_fn=_column_major_collate)
    assert not _column_major_collate([(x[0], y[0]), (x[1], y[1])])[0].is_contiguous()
    result = estimate_bif(model, cross_entropy, (x, y), (x[:3], y[:3]), data=loader, config=config)
    reference = estimate_bif(model, cross_entropy, (x, y), (x[:3], y[:3]), config=config)
    assert result.diagnostics.vectorized
    torch.testing.assert_close(result.influence, reference.influence, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("vectorize", [True, False])
def test_works_inside_inference_mode(trained, vectorize: bool) -> None:
    """Lightning runs validation hooks under torch.inference_mode(); SGLD still needs gradients."""
    model, x, y = trained
    config = FAST.replace(vectorize=vectorize)
    outside = estimate_bif(model, cross_entropy, (x, y), (x[:3], y[:3]), config=config)
    with torch.inference_mode():
        inside = estimate_bif(model, cross_entropy, (x, y), (x[:3], y[:3]), config=config)
    assert inside.diagnostics.vectorized == vectorize
    torch.testing.assert_close(inside.influence, outside.influence)


def test_a_custom_collate_fn_on_a_tensor_dataset_loader_is_used() -> None:
    """The row-gathering fast path for tensor datasets must not bypass a loader's own collate_fn."""
    x, y = torch.randn(6, 3), torch.arange(6)
    seen: list[int] = []

    def counting_collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        seen.append(len(items))
        return [torch.stack([a for a, _ in items]) * 2, torch.stack([b for _, b in items])]

    examples = ExampleSet(DataLoader(TensorDataset(x, y), collate_fn=counting_collate), "data")
    inputs, labels = examples.gather(torch.tensor([4, 1]), torch.device("cpu"))
    assert seen == [2]
    torch.testing.assert_close(inputs, 2 * x[[4, 1]])
    torch.testing.assert_close(labels, y[[4, 1]])


def test_auto_vectorizes_a_small_step_and_runs_a_large_step_chain_by_chain_on_cpu(trained, monkeypatch) -> None:
    model, x, y = trained
    config = FAST.replace(vectorize="auto")
    small = estimate_bif(model, cross_entropy, (x, y), (x[:3], y[:3]), config=config)
    assert small.diagnostics.vectorized
    # A model whose step counts more FLOPs than the threshold: here, a threshold below this model's step.
    monkeypatch.setattr(vectorization, "CPU_VMAP_MAX_STEP_FLOPS", 1)
    estimator = BIFEstimator(model, cross_entropy, (x, y), (x[:3], y[:3]), config=config)
    estimator.prepare()
    assert not estimator.vectorized and "MFLOP, and on a CPU vmap is slower" in estimator.sequential_reason
    large = estimator.summarize(estimator.sample_checked(range(config.chains)), 0.0)
    sequential = estimate_bif(model, cross_entropy, (x, y), (x[:3], y[:3]), config=FAST.replace(vectorize=False))
    assert torch.equal(large.influence, sequential.influence)


def test_the_vmap_decision_is_the_same_however_slow_the_clock_says_a_step_is(trained, monkeypatch) -> None:
    """A busy machine must not change the code path: the rule counts FLOPs and never reads a clock."""
    model, x, y = trained
    config = FAST.replace(vectorize="auto")
    idle = BIFEstimator(model, cross_entropy, (x, y), (x[:3], y[:3]), config=config)
    idle.prepare()
    ticks = iter(range(0, 10**9, 10))  # every reading of the clock 10 s after the last: an overloaded machine
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))
    busy = BIFEstimator(model, cross_entropy, (x, y), (x[:3], y[:3]), config=config)
    busy.prepare()
    assert idle.vectorized and busy.vectorized
    assert (idle.sequential_reason, busy.sequential_reason) == (None, None)


def test_auto_falls_back_to_chain_by_chain_with_a_warning_when_vmap_fails(trained) -> None:
    model, x, y = trained

    def data_dependent_loss(module: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        losses = cross_entropy(module, batch)
        return losses if float(losses.detach().max()) < 1e6 else losses.clamp_max(1e6)  # a host read: vmap refuses

    with pytest.warns(UserWarning, match="one after another because torch.func.vmap failed"):
        result = estimate_bif(model, data_dependent_loss, (x, y), (x[:3], y[:3]), config=FAST.replace(vectorize="auto"))
    assert not result.diagnostics.vectorized and result.ok
    reference = estimate_bif(model, cross_entropy, (x, y), (x[:3], y[:3]), config=FAST.replace(vectorize=False))
    torch.testing.assert_close(result.influence, reference.influence)
