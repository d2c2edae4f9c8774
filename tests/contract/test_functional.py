"""The functional view of a model (lightning_bif/functional.py): losses and gradients as the module gives them."""

from __future__ import annotations

import pytest
import torch
from helpers import cross_entropy, mlp
from torch import nn

from lightning_bif.functional import FunctionalModel, check_losses, preserved_state, select_parameters

CPU = torch.device("cpu")


def batch(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)]


def test_check_losses_keeps_one_loss_per_example_and_explains_a_wrong_shape() -> None:
    assert check_losses(torch.ones(3), 3, "loss_fn").shape == (3,)
    tokens = torch.tensor([[1.0, 3.0, 2.0], [2.0, 2.0, 2.0]])
    assert check_losses(tokens, 2, "loss_fn").tolist() == [2.0, 2.0]  # averaged per example
    assert torch.equal(check_losses(tokens, 2, "loss_fn", tokens=True), tokens)
    with pytest.raises(ValueError, match=r"returned a scalar.*reduction='none'"):
        check_losses(torch.tensor(1.0), 3, "loss_fn")
    with pytest.raises(ValueError, match=r"returned shape \(4,\) for a batch of 3"):
        check_losses(torch.ones(4), 3, "probe_fn")
    with pytest.raises(ValueError, match="per_token=True"):
        check_losses(torch.ones(3), 3, "loss_fn", tokens=True)
    with pytest.raises(TypeError, match="must return a Tensor"):
        check_losses([1.0], 1, "loss_fn")


def test_a_square_loss_is_refused_as_the_broadcasting_bug_and_a_column_is_read_with_a_note() -> None:
    pred, y = torch.randn(4, 1), torch.randn(4)
    with pytest.raises(ValueError, match=r"\(4, 4\).*broadcasting bug.*\[4, 1\].*\[4\]"):
        check_losses((pred - y) ** 2, 4, "loss_fn")
    with pytest.warns(UserWarning, match="one loss per example"):  # one example: [1, 1] is a column, not a square
        assert check_losses(torch.ones(1, 1), 1, "one-example loss_fn").shape == (1,)
    square_tokens = torch.randn(4, 4)
    assert torch.equal(check_losses(square_tokens, 4, "probe_fn", tokens=True), square_tokens)  # per-token: legit
    column = (pred - y[:, None]) ** 2
    with pytest.warns(UserWarning, match=r"shape \(4, 1\): read as one loss per example"):
        out = check_losses(column, 4, "a column loss_fn")
    assert torch.equal(out, column[:, 0])


def test_probes_shaped_unlike_the_training_examples_fail_with_the_set_and_both_shapes() -> None:
    from lightning_bif import SGLDConfig, estimate_bif

    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 3))
    train = (torch.randn(20, 64), torch.randint(0, 3, (20,)))
    probes = (torch.randn(5, 32), torch.randint(0, 3, (5,)))
    config = SGLDConfig(chains=2, draws=4, burn_in=2, step_size=1e-4, localization=1.0, nbeta=10.0)
    with pytest.raises(ValueError, match=r"probe_fn failed on the probes \(RuntimeError: mat1 and mat2.*"
                                         r"shape \[32\], \[\] per example, while the model ran on the training "
                                         r"examples with tensors of shape \[64\], \[\]"):
        estimate_bif(model, cross_entropy, train, probes, config=config)
    with pytest.raises(ValueError, match=r"loss_fn failed on the tracked training examples.*shape \[32\], \[\]"):
        estimate_bif(model, cross_entropy, probes, train, config=config)


def test_parameters_are_selected_by_glob_among_the_trainable_ones() -> None:
    model = mlp()
    model[2].bias.requires_grad_(False)
    assert select_parameters(model, None) == ["0.weight", "0.bias", "2.weight"]
    assert select_parameters(model, ("*.bias",)) == ["0.bias"]
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        select_parameters(model, ("head.*",))
    with pytest.raises(ValueError, match="nothing to sample"):
        select_parameters(model.requires_grad_(False), None)


def test_losses_at_the_center_and_elsewhere_are_the_modules_own() -> None:
    model, data = mlp(), batch()
    fmodel = FunctionalModel(model, ("2.*",), CPU)
    assert fmodel.dim == 16 * 3 + 3 and fmodel.names == ["2.weight", "2.bias"]
    buffers = fmodel.fresh_buffers()
    torch.testing.assert_close(fmodel.losses(fmodel.center, data, 6, cross_entropy, buffers, "loss_fn"),
                               cross_entropy(model, data))
    moved = fmodel.center + 0.1
    other = mlp()
    with torch.no_grad():
        other[2].weight.add_(0.1)
        other[2].bias.add_(0.1)
    torch.testing.assert_close(fmodel.losses(moved, data, 6, cross_entropy, buffers, "loss_fn"),
                               cross_entropy(other, data))
    assert torch.equal(model[2].weight, mlp()[2].weight)  # the module itself is untouched


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("shared_batch", [True, False])
def test_batched_gradients_are_each_chains_autograd_gradient(vectorized: bool, shared_batch: bool) -> None:
    model = mlp()
    fmodel = FunctionalModel(model, None, CPU)
    flat = fmodel.center + 0.05 * torch.randn(3, fmodel.dim, generator=torch.Generator().manual_seed(1))
    chains = [batch(seed=s) for s in range(3)]
    batches = chains[0] if shared_batch else (
        [torch.stack(column) for column in zip(*chains, strict=True)] if vectorized else chains)
    grads, values = fmodel.batched_grads(flat, batches, 6, cross_entropy, fmodel.fresh_buffers(), vectorized,
                                         shared_batch)
    for row in range(3):
        leaf = flat[row].clone().requires_grad_(True)
        value = fmodel.losses(leaf, chains[0 if shared_batch else row], 6, cross_entropy, {}, "loss_fn").mean()
        (expected,) = torch.autograd.grad(value, leaf)
        torch.testing.assert_close(grads[row], expected)
        torch.testing.assert_close(values[row], value.detach())
    losses = fmodel.batched_losses(flat, chains[0], 6, cross_entropy, {}, "probe_fn", vectorized)
    assert losses.shape == (3, 6)


def test_buffers_are_private_copies_a_forward_cannot_change() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    fmodel = FunctionalModel(model, None, CPU)
    buffers = fmodel.fresh_buffers()
    fmodel.losses(fmodel.center, batch(), 6, cross_entropy, buffers, "loss_fn")  # a training-mode BN updates stats
    assert not torch.equal(buffers["model.1.running_mean"], model[1].running_mean)
    assert torch.equal(model[1].running_mean, torch.zeros(3))


def test_preserved_state_restores_each_modules_mode_and_the_global_rng() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    model[1].eval()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with preserved_state(model, [CPU]):
        assert not any(m.training for m in model.modules())
        torch.rand(100)
    assert [m.training for m in model.modules()] == [True, True, False]
    assert torch.equal(torch.rand(3), expected)


def test_overlapping_eager_blocks_restore_the_compile_stance_whatever_the_order_they_leave_in() -> None:
    """Snapshots in two threads overlap: A enters, B enters, A leaves, B leaves. torch.compile must work after."""
    from lightning_bif.functional import _eager

    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    first, second = _eager(), _eager()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    torch._dynamo.reset()
    torch.compile(lambda x: x * 2 + 1, backend=backend)(torch.ones(3))
    assert len(graphs) == 1  # compiled: the process is not left in force_eager
