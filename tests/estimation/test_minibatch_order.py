"""SGLDConfig.shared_minibatch_order: every chain sees the same minibatch at the same step."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lightning_bif import SGLDConfig
from lightning_bif.estimation.sampler import SGLDSampler
from lightning_bif.example_sets import ExampleSet
from lightning_bif.functional import FunctionalModel

N, M = 40, 8


def cross_entropy(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def sampler(shared: bool, seed: int = 0) -> tuple[SGLDSampler, list[torch.Tensor]]:
    """A small sampler whose data records the example indices of every minibatch it gathers."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 4, generator=generator), torch.randint(3, (N,), generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    data = ExampleSet((x, y), "data")
    gathered: list[torch.Tensor] = []
    gather = data.gather

    def recording_gather(indices: torch.Tensor, device: torch.device):
        gathered.append(indices.clone())
        return gather(indices, device)

    data.gather = recording_gather  # type: ignore[method-assign]
    config = SGLDConfig(chains=3, draws=5, burn_in=0, thin=2, step_size=1e-3, localization=10.0, batch_size=M,
                        seed=seed, shared_minibatch_order=shared)
    return SGLDSampler(FunctionalModel(model, None, torch.device("cpu")), data, cross_entropy, config, N), gathered


def per_chain_indices(shared: bool, chains: list[int], vectorized: bool, seed: int = 0) -> torch.Tensor:
    """Minibatch indices ``[steps, len(chains), M]`` the chains drew, and the draws, from one run."""
    sgld, gathered = sampler(shared, seed)
    list(sgld.run(chains, vectorized))
    steps = torch.stack(gathered)
    if shared:  # one minibatch per step serves every chain
        return steps[:, None, :].expand(-1, len(chains), -1)
    return steps.view(len(steps), len(chains), M)


def draws(shared: bool, chains: list[int], vectorized: bool, seed: int = 0) -> torch.Tensor:
    sgld, _ = sampler(shared, seed)
    return torch.stack([d.params for d in sgld.run(chains, vectorized)])


def test_shared_order_gives_every_chain_the_same_minibatches_whichever_chains_run_together() -> None:
    together = per_chain_indices(True, [0, 1, 2], vectorized=True)
    assert together.shape == (10, 3, M)
    assert (together == together[:, :1]).all()
    assert len(together[:, 0].unique()) > M  # a fresh minibatch every step, not one batch repeated
    for c in range(3):  # a chain alone, or run one by one, draws the same sequence
        assert torch.equal(per_chain_indices(True, [c], vectorized=False)[:, 0], together[:, c])
    assert not torch.equal(per_chain_indices(True, [0], vectorized=False, seed=1)[:, 0], together[:, 0])


def test_without_shared_order_each_chain_draws_its_own_minibatches() -> None:
    together = per_chain_indices(False, [0, 1, 2], vectorized=True)
    assert not torch.equal(together[:, 0], together[:, 1]) and not torch.equal(together[:, 1], together[:, 2])
    assert torch.equal(per_chain_indices(False, [1], vectorized=False)[:, 0], together[:, 1])


def test_shared_order_is_bitwise_reproducible_and_leaves_the_global_rng_alone() -> None:
    sgld, _ = sampler(True)
    before = torch.get_rng_state()
    first = torch.stack([d.params for d in sgld.run([0, 1, 2], vectorized=True)])
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first, draws(True, [0, 1, 2], vectorized=True))
    assert not torch.equal(first[:, 0], first[:, 1])  # the chains' noise still differs
    torch.testing.assert_close(first, torch.cat([draws(True, [c], vectorized=False) for c in range(3)], dim=1),
                               rtol=1e-5, atol=1e-6)


def spread_between_chains(shared: bool, seed: int) -> float:
    """Mean squared distance between two chains at the same step, over steps and chain pairs (linear regression)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + torch.randn(64, generator=generator,
                                                                              dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
        model.bias.zero_()

    def half_squared_error(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        return 0.5 * (model(batch[0]).squeeze(1) - batch[1]).square()

    config = SGLDConfig(chains=6, draws=150, burn_in=50, thin=1, step_size=1e-2, localization=1.0, batch_size=4,
                        seed=seed, shared_minibatch_order=shared)
    sgld = SGLDSampler(FunctionalModel(model, None, torch.device("cpu")), ExampleSet((x, y), "data"),
                       half_squared_error, config, 64.0)
    positions = torch.stack([d.params for d in sgld.run(list(range(6)), vectorized=True)])  # [D, C, 4]
    return float(torch.cdist(positions, positions).square().mean())


def test_shared_order_reduces_the_spread_between_chains_not_the_noise_of_each() -> None:
    """Common random numbers: with the same minibatches, the chains' differences lose the minibatch-noise part.

    That is a variance reduction for differences between chains, not for the covariance over draws
    that the BIF is (docs/how-it-works.md#coming-from-devinterp).
    """
    ratios = [spread_between_chains(True, seed) / spread_between_chains(False, seed) for seed in range(3)]
    assert all(ratio < 0.7 for ratio in ratios), ratios
