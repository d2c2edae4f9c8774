"""Per-token probe influence (``SGLDConfig(per_token=True)``): token axis, exactness, bounds, log and callback.

A tiny causal character model (each next character predicted from the current one) gives per-token
losses ``[B, T]``; a linear regression whose probes hold T inputs each has the closed-form answer.
"""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import exact_influence, gaussian_posterior, half_squared_error, linear_problem, pearson, relative_error
from helpers import with_bias as bias_column
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_bif import BIFCallback, SGLDConfig, estimate_bif, open_log
from lightning_bif.estimation.estimator import BIFEstimator
from lightning_bif.log import LogWriter, RunIdentity, SnapshotRecord
from lightning_bif.viewers.cli import main as cli_main

VOCAB, T = 5, 8
# Control variates are off with per_token (no per-token projections), so they are off here for both; one round of
# chains (no split-half target), as the tests compare estimates chain for chain.
CONFIG = SGLDConfig(chains=4, draws=12, burn_in=4, thin=2, step_size=1e-3, batch_size=16, localization=100.0,
                    seed=3, control_variates=False, target_split_half=None)
MASKED = 3  # the last MASKED tokens of every probe are padding in the masked tests


class CharModel(pl.LightningModule):
    """Next-character logits from the current character: causal, so every token has its own loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 6)
        self.head = nn.Linear(6, VOCAB)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(chars)))

    def per_example_loss(self, batch) -> torch.Tensor:
        return token_losses(self, batch).mean(dim=1)

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def token_losses(model: nn.Module, batch) -> torch.Tensor:
    """Per-token cross-entropy ``[B, T]`` of sequences ``[B, T + 1]``."""
    chars = batch[0]
    return F.cross_entropy(model(chars[:, :-1]).transpose(1, 2), chars[:, 1:], reduction="none")


def masked_token_losses(model: nn.Module, batch) -> torch.Tensor:
    """Token losses with the last ``MASKED`` positions treated as padding: 0 loss there."""
    keep = torch.arange(T) < T - MASKED
    return token_losses(model, batch) * keep


def sequences(count: int, seed: int) -> torch.Tensor:
    """Sequences ``[count, T + 1]`` from a fixed Markov chain over ``VOCAB`` characters."""
    g = torch.Generator().manual_seed(seed)
    transition = torch.softmax(3 * torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(7)), dim=1)
    chars = torch.empty(count, T + 1, dtype=torch.long)
    chars[:, 0] = torch.randint(VOCAB, (count,), generator=g)
    for t in range(T):
        chars[:, t + 1] = torch.multinomial(transition[chars[:, t]], 1, generator=g).squeeze(1)
    return chars


TRAIN = TensorDataset(sequences(24, seed=1))
PROBES = TensorDataset(sequences(3, seed=2))


def trained_model() -> CharModel:
    model = CharModel()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        token_losses(model, TRAIN.tensors).mean().backward()
        opt.step()
    return model


MODEL = trained_model()


def estimate(config: SGLDConfig = CONFIG, probe_fn=None, probes=PROBES, model: nn.Module = MODEL, **kwargs):
    return estimate_bif(model, lambda m, b: token_losses(m, b).mean(dim=1), TRAIN, probes, probe_fn=probe_fn,
                        config=config, **kwargs)


def per_example(model: nn.Module, batch) -> torch.Tensor:
    return token_losses(model, batch).mean(dim=1)


@pytest.mark.parametrize("loss_is_probe_fn", [True, False], ids=["probe_fn=loss_fn", "own probe_fn"])
def test_influence_is_the_same_with_per_token_on_and_off(loss_is_probe_fn):
    # With probe_fn is loss_fn, per_token off evaluates train and probes in one joint batch; on, apart.
    off = estimate_bif(MODEL, token_losses, TRAIN, PROBES, probe_fn=None if loss_is_probe_fn else per_example,
                       config=CONFIG)
    on = estimate_bif(MODEL, token_losses, TRAIN, PROBES, probe_fn=token_losses, config=CONFIG.replace(per_token=True))

    assert off.token_influence is None and off.token_stderr is None
    assert on.ok and on.influence.shape == (3, 24) and on.token_influence.shape == on.token_stderr.shape == (3, T, 24)
    for name in ("influence", "correlation", "stderr", "probe_loss", "train_loss"):
        torch.testing.assert_close(getattr(on, name), getattr(off, name), rtol=1e-5, atol=1e-9, msg=name)
    assert on.diagnostics.split_half == pytest.approx(off.diagnostics.split_half, rel=1e-5)
    torch.testing.assert_close(on.diagnostics.draw_loss, off.diagnostics.draw_loss)
    assert (on.influence != 0).all()  # not a trivial all-zero match


def test_token_influence_averages_to_the_probe_influence():
    result = estimate(CONFIG.replace(per_token=True), probe_fn=token_losses)

    token = result.token_influence
    # Covariance is linear: the mean over tokens of Cov(ℓ_i, φ_pt) is Cov(ℓ_i, mean_t φ_pt).
    torch.testing.assert_close(token.mean(dim=1), result.influence, rtol=1e-4, atol=1e-6 * token.abs().max())
    # ... while the tokens themselves differ: the axis carries information the mean does not.
    assert (token.std(dim=1) > 0.1 * token.abs().mean()).float().mean() > 0.5
    assert (result.token_stderr > 0).all()


def test_padded_tokens_have_exactly_zero_influence():
    result = estimate(CONFIG.replace(per_token=True), probe_fn=masked_token_losses)

    padded = result.token_influence[:, T - MASKED:]
    assert (padded == 0).all() and (result.token_stderr[:, T - MASKED:] == 0).all()
    assert (result.token_influence[:, :T - MASKED] != 0).all()
    # The probe observable is the mean over all T positions, padding included.
    torch.testing.assert_close(result.token_influence.mean(dim=1), result.influence, rtol=1e-4,
                               atol=1e-6 * result.influence.abs().max())


def test_each_token_is_what_a_probe_of_its_own_would_give_and_matches_the_gaussian_closed_form():
    """Linear regression, probes of T=4 inputs each: the posterior is Gaussian and the answer is known."""
    probes, tokens = 2, 4
    problem = linear_problem(n=40, d=3, probes=probes * tokens, seed=0)
    xp, yp = problem.xp.reshape(probes, tokens, 3), problem.yp.reshape(probes, tokens)

    def token_squared_error(model: nn.Module, batch) -> torch.Tensor:
        return 0.5 * (model(batch[0]).squeeze(-1) - batch[1]).square()  # [B, T]

    # One round each: the two estimates' split-halves see different observables, so rounds could differ.
    config = SGLDConfig(chains=8, draws=100, thin=4, burn_in=50, step_size=1.6e-3, localization=20.0,
                        batch_size=None, seed=0, target_split_half=None)
    train = (problem.x, problem.y)
    result = estimate_bif(problem.model, half_squared_error, train, (xp, yp), probe_fn=token_squared_error,
                          config=config.replace(per_token=True))
    flat = estimate_bif(problem.model, half_squared_error, train, (problem.xp, problem.yp), config=config)

    token = result.token_influence.reshape(probes * tokens, 40)
    torch.testing.assert_close(token, flat.influence, rtol=1e-4, atol=1e-6 * float(token.abs().max()))
    torch.testing.assert_close(result.token_stderr.reshape(probes * tokens, 40), flat.stderr, rtol=1e-4,
                               atol=1e-6 * float(flat.stderr.max()))
    x = bias_column(problem.x)
    mean, cov = gaussian_posterior(x, problem.y, problem.w_star, nbeta=40, localization=20.0)
    exact = exact_influence(x, problem.y, bias_column(problem.xp), problem.yp, mean, cov)
    assert pearson(token, exact) >= 0.9
    assert relative_error(token, exact) <= 0.35


def test_probe_fn_must_return_per_token_losses_of_one_length():
    with pytest.raises(ValueError, match=r"per_token=True\) needs per-token losses of shape \[3, T\]"):
        estimate(CONFIG.replace(per_token=True), probe_fn=per_example)

    def dynamic_padding(model: nn.Module, batch) -> torch.Tensor:
        # Like a collate_fn that pads each batch to its own longest sequence: T changes between batches.
        return token_losses(model, batch)[:, :T - len(batch[0])]

    with pytest.raises(ValueError, match=r"different lengths T = \[6, 7\].*pad every probe to the same length"):
        estimate(CONFIG.replace(per_token=True, eval_batch_size=2), probe_fn=dynamic_padding)


def test_too_many_token_entries_are_refused_before_sampling():
    config = CONFIG.replace(per_token=True, max_token_entries=4 * 3 * T * 24 - 1)
    steps = []
    with pytest.raises(ValueError, match=r"4·3·8·24 = 2,304 float64 sums \(0.0 MiB\).*max_token_entries=2,303"):
        estimate(config, probe_fn=token_losses, progress=lambda done, total: steps.append(done))
    assert steps == []
    assert estimate(config.replace(max_token_entries=4 * 3 * T * 24), probe_fn=token_losses).ok


def test_config_validates_and_round_trips_per_token():
    config = SGLDConfig(per_token=True, max_token_entries=1000)
    assert SGLDConfig.from_json(config.to_json()) == config
    assert SGLDConfig().per_token is False and SGLDConfig().max_token_entries == 2**26
    with pytest.raises(ValueError, match="per_token must be True or False"):
        SGLDConfig(per_token=1)
    with pytest.raises(ValueError, match="max_token_entries must be a positive integer"):
        SGLDConfig(max_token_entries=0)


def test_chains_split_and_merged_like_ddp_ranks_give_the_same_token_influence():
    config = CONFIG.replace(per_token=True)
    whole = estimate_bif(MODEL, per_example, TRAIN, PROBES, probe_fn=token_losses, config=config)
    ranks = []
    for chains in ([0, 2], [1, 3]):
        estimator = BIFEstimator(MODEL, per_example, TRAIN, PROBES, probe_fn=token_losses, config=config)
        estimator.prepare()
        ranks.append(estimator.sample(chains))
    merged = ranks[0]
    for mine, theirs in zip(merged.tensors(), ranks[1].tensors(), strict=True):
        mine += theirs  # what the callback's all-reduce of accumulator.tensors() does
    result = estimator.summarize(merged, 0.0)

    # Equal up to float32 rounding: vmap over 2 chains instead of 4 may round the losses differently.
    for name in ("influence", "stderr", "token_influence", "token_stderr"):
        expected = getattr(whole, name)
        torch.testing.assert_close(getattr(result, name), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _identity(tokens: int | None) -> RunIdentity:
    return RunIdentity({"sgld": CONFIG.replace(per_token=tokens is not None).to_dict()}, train_ids=np.arange(24),
                       probe_ids=np.arange(3), chains=CONFIG.chains, draws=CONFIG.draws, tokens=tokens)


def _record(step: int, result) -> SnapshotRecord:
    return SnapshotRecord(step=step, epoch=0, wall_time=0.0, duration_s=1.0,
                          status="ok" if result is not None else "failed", result=result)


def test_log_stores_and_reads_token_influence(tmp_path, capsys):
    first = estimate(CONFIG.replace(per_token=True), probe_fn=token_losses)
    second = estimate(CONFIG.replace(per_token=True, seed=4), probe_fn=token_losses)
    with LogWriter(tmp_path / "bif.h5", _identity(T)) as writer:
        writer.append(_record(0, first))
        writer.append(_record(5, None))
        writer.append(_record(10, second))

    with open_log(tmp_path / "bif.h5") as log:
        assert log.tokens == T and log.token_influence.shape == (3, 3, T, 24)
        path = log.token_trajectory(probe=2, train=7)
        assert path.steps.tolist() == [0, 5, 10] and path.influence.shape == path.stderr.shape == (3, T)
        np.testing.assert_array_equal(path.influence[0], first.token_influence[2, :, 7].numpy())
        np.testing.assert_array_equal(path.stderr[2], second.token_stderr[2, :, 7].numpy())
        assert np.isnan(path.influence[1]).all()  # the failed snapshot
        snapshot = log.snapshot(-1)
        np.testing.assert_array_equal(snapshot.token_influence, second.token_influence.numpy())
        np.testing.assert_array_equal(snapshot.token_stderr, second.token_stderr.numpy())
        np.testing.assert_allclose(snapshot.token_influence.mean(axis=1), snapshot.influence, rtol=1e-4,
                                   atol=1e-6 * np.abs(snapshot.influence).max())
        with pytest.raises(IndexError, match="train position 24"):
            log.token_trajectory(probe=0, train=24)
    assert cli_main(["summary", str(tmp_path / "bif.h5")]) == 0
    assert f"tokens per probe: {T} (per-token influence)" in capsys.readouterr().out
    assert cli_main(["export", str(tmp_path / "bif.h5"), "--tokens", "--csv", str(tmp_path / "tokens.csv")]) == 0
    with open(tmp_path / "tokens.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    assert len(rows) == 3 * T * 24
    row = next(r for r in rows if (r["probe_id"], r["token"], r["train_id"]) == ("2", "5", "7"))
    assert float(row["influence"]) == float(second.token_influence[2, 5, 7])
    assert float(row["stderr"]) == float(second.token_stderr[2, 5, 7])

    with pytest.raises(ValueError, match=r"tokens \(stored 8, now 6\)"):
        LogWriter(tmp_path / "bif.h5", _identity(6), if_exists="resume")
    with LogWriter(tmp_path / "bif.h5", _identity(T), if_exists="resume") as writer, \
            pytest.raises(ValueError, match=r"stores per-token influence .* but the result has none"):
        writer.append(_record(20, estimate()))


def test_a_log_without_tokens_opens_with_no_token_axis(tmp_path, capsys):
    with LogWriter(tmp_path / "bif.h5", _identity(None)) as writer:
        writer.append(_record(0, estimate()))

    with open_log(tmp_path / "bif.h5") as log:
        assert log.tokens is None and log.token_influence is None and log.token_stderr is None
        snapshot = log.snapshot(0)
        assert snapshot.token_influence is None and snapshot.token_stderr is None
        with pytest.raises(ValueError, match=r"no per-token influence.*per_token=True"):
            log.token_trajectory(probe=0, train=0)
    assert cli_main(["export", str(tmp_path / "bif.h5"), "--tokens", "--csv", "-"]) == 1
    assert "no per-token influence" in capsys.readouterr().err


def test_callback_logs_token_influence_and_refuses_an_oversized_token_axis_at_fit_start(tmp_path):
    def fit(config: SGLDConfig, name: str) -> None:
        pl.seed_everything(0)
        callback = BIFCallback(TRAIN, PROBES, probe_fn=masked_token_losses, config=config, every_n_steps=3,
                               log_path=tmp_path / name, tensorboard=False, min_split_half=None)
        trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback])
        trainer.fit(CharModel(), DataLoader(TRAIN, batch_size=8))

    fit(CONFIG.replace(per_token=True), "bif.h5")
    with open_log(tmp_path / "bif.h5") as log:
        assert len(log) >= 1 and set(log.status.tolist()) == {"ok"} and log.tokens == T
        assert log.config["sgld"]["per_token"] is True
        token = log.token_influence[-1]
        assert (token[:, T - MASKED:] == 0).all() and (token[:, :T - MASKED] != 0).all()
        np.testing.assert_allclose(token.mean(axis=1), log.influence[-1], rtol=1e-4,
                                   atol=1e-6 * np.abs(log.influence[-1]).max())

    with pytest.raises(MisconfigurationException, match="max_token_entries=100"):
        fit(CONFIG.replace(per_token=True, max_token_entries=100), "refused.h5")
    assert not (tmp_path / "refused.h5").exists()
