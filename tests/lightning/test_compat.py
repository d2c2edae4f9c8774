"""BIFCallback in the Lightning setups people use: training untouched where that applies, snapshots ok.

Each setup is small (a few steps of a tiny model, two chains of a few draws). ``_bitwise`` trains
a setup with and without the callback and compares every weight, buffer and optimizer state.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.demos import Transformer
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from scripts.toy import FAST, ToyClassifier, loader, toy_dataset, tracked_sets
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_bif import BIFCallback, open_log

DATA = toy_dataset()
TRAIN, PROBES = tracked_sets(DATA)
TINY = FAST.replace(draws=4, burn_in=2)


def _trainer(tmp_path: Path, callbacks=(), **kwargs) -> pl.Trainer:
    options = dict(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, deterministic=True, default_root_dir=tmp_path)
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def _fit(tmp_path: Path, make_model: Callable[[], pl.LightningModule], callbacks=(), data=None, seed: int = 0,
         **kwargs) -> tuple[pl.Trainer, pl.LightningModule]:
    pl.seed_everything(seed, verbose=False)
    model = make_model()
    trainer = _trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model, loader(DATA) if data is None else data)
    return trainer, model


def _state(trainer: pl.Trainer, model: nn.Module) -> list[torch.Tensor]:
    tensors = [t for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
    for optimizer in trainer.optimizers:
        for state in optimizer.state_dict()["state"].values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def _bitwise(tmp_path: Path, make_model, callback: BIFCallback, data_fn=None, **kwargs) -> pl.Trainer:
    """Train with and without ``callback``; assert equal weights, buffers and optimizer state; return the BIF run."""
    plain_trainer, plain = _fit(tmp_path / "plain", make_model, (), None if data_fn is None else data_fn(), **kwargs)
    trainer, model = _fit(tmp_path / "bif", make_model, (callback,), None if data_fn is None else data_fn(), **kwargs)
    before, after = _state(plain_trainer, plain), _state(trainer, model)
    assert len(before) == len(after) and len(before) > 0
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    return trainer


def _log(callback: BIFCallback):
    return open_log(callback.resolved_log_path)


def _bif(tmp_path: Path, train=TRAIN, probes=PROBES, **kwargs) -> BIFCallback:
    kwargs.setdefault("config", TINY)
    kwargs.setdefault("log_path", tmp_path / "influence.h5")
    kwargs.setdefault("min_split_half", None)
    if not any(k in kwargs for k in ("every_n_steps", "at_steps", "log_spaced", "at_fit_end")):
        kwargs["at_steps"] = [3]
    return BIFCallback(train, probes, **kwargs)


def _ok(callback: BIFCallback, steps: list[int] | None = None) -> None:
    with _log(callback) as log:
        assert (log.status == "ok").all(), log.message
        if steps is not None:
            assert log.steps.tolist() == steps


# ------------------------------------------------------------------ vmap: every function a snapshot runs


def _checked_probe(model: nn.Module, batch) -> torch.Tensor:
    out = F.cross_entropy(model(batch[0]), batch[1], reduction="none")
    if not torch.isfinite(out).all():  # Python control flow on a tensor: vmap refuses it
        raise ValueError("non-finite probe")
    return out


def test_probe_fn_that_vmap_cannot_run_falls_back_once_before_the_first_snapshot(tmp_path):
    callback = _bif(tmp_path, probe_fn=_checked_probe, at_steps=[2, 4], config=TINY.replace(vectorize="auto"))
    with pytest.warns(UserWarning, match="vmap failed on probe_fn"):
        _bitwise(tmp_path, ToyClassifier, callback)
    _ok(callback, [2, 4])
    with _log(callback) as log:  # each snapshot says how its chains ran
        assert all(m.startswith("chains ran one after another: torch.func.vmap failed on probe_fn")
                   for m in log.message)


def test_vectorize_true_with_a_probe_fn_vmap_cannot_run_is_refused_at_fit_start(tmp_path):
    callback = _bif(tmp_path, probe_fn=_checked_probe, config=TINY.replace(vectorize=True))
    with pytest.raises(MisconfigurationException, match=r"vectorize=True.*vmap failed on probe_fn"):
        _fit(tmp_path, ToyClassifier, (callback,))


def test_a_stateful_torchmetrics_metric_in_probe_fn(tmp_path):
    metric = torchmetrics.MeanSquaredError()

    def brier(model: nn.Module, batch) -> torch.Tensor:
        probs, target = model(batch[0]).softmax(-1), F.one_hot(batch[1], 3).float()
        return torch.stack([metric(p, t) for p, t in zip(probs, target, strict=True)])

    callback = _bif(tmp_path, probe_fn=brier, config=TINY.replace(vectorize="auto"))
    with pytest.warns(UserWarning, match="vmap failed on probe_fn"):
        _bitwise(tmp_path, ToyClassifier, callback)
    _ok(callback, [3])


def test_per_token_probe_fn_that_vmap_cannot_run_falls_back(tmp_path):
    def class_losses(model: nn.Module, batch) -> torch.Tensor:
        losses = -F.log_softmax(model(batch[0]), dim=1)
        return losses if bool(losses.isfinite().all()) else losses.nan_to_num()

    callback = _bif(tmp_path, probe_fn=class_losses, config=TINY.replace(per_token=True, vectorize="auto"))
    with pytest.warns(UserWarning, match="vmap failed on probe_fn"):
        _fit(tmp_path, ToyClassifier, (callback,))
    _ok(callback, [3])


def test_a_snapshot_whose_chains_fail_under_vmap_falls_back_instead_of_failing(tmp_path):
    calls = [0]

    def late_host_read(model: nn.Module, batch) -> torch.Tensor:
        calls[0] += 1
        out = F.cross_entropy(model(batch[0]), batch[1], reduction="none")
        if calls[0] > 6:  # passes the trial at fit start, then reads a value on the host while sampling
            float(out.sum())
        return out

    callback = _bif(tmp_path, probe_fn=late_host_read, at_steps=[2, 4], config=TINY.replace(vectorize="auto"))
    with pytest.warns(UserWarning, match="one after another from here on"):
        _fit(tmp_path, ToyClassifier, (callback,))
    _ok(callback, [2, 4])
    with _log(callback) as log:  # decided for vmap at train start; the first snapshot fell back, and the later one too
        assert all("vmap failed during sampling" in m for m in log.message)


class TinyGPT2(pl.LightningModule):
    """A Hugging Face GPT-2 from a tiny config (random init, nothing downloaded), padded batches."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.model = GPT2LMHeadModel(config)

    def per_token_loss(self, batch) -> torch.Tensor:
        ids, mask = batch
        logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return losses * mask[:, 1:]

    def per_example_loss(self, batch) -> torch.Tensor:
        return self.per_token_loss(batch).sum(1) / batch[1][:, 1:].sum(1)

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _token_data() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32, (48, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0  # right padding
    return torch.utils.data.TensorDataset(ids.masked_fill(mask == 0, 0), mask)


@pytest.fixture(scope="module")
def token_data():
    data = _token_data()
    return data, torch.utils.data.Subset(data, range(8)), torch.utils.data.Subset(data, range(40, 44))


def test_gpt2_with_a_padded_mask_under_vectorize_true_is_caught_at_fit_start(tmp_path, token_data):
    pytest.importorskip("transformers")
    data, train, probes = token_data
    config = TINY.replace(vectorize=True, batch_size=8)  # per-chain minibatches: the mask is vmapped too
    callback = _bif(tmp_path, train, probes, config=config)
    with pytest.raises(MisconfigurationException, match=r"vectorize=True.*vmap failed on the SGLD gradient"):
        _fit(tmp_path, TinyGPT2, (callback,), data=DataLoader(data, batch_size=8))


def test_gpt2_from_a_config_trains_bitwise_unchanged_with_per_token_probes(tmp_path, token_data):
    pytest.importorskip("transformers")
    data, train, probes = token_data
    callback = _bif(tmp_path, train, probes, probe_fn=lambda m, b: m.per_token_loss(b),
                    config=TINY.replace(batch_size=8, per_token=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "auto" falls back from vmap (the padded mask)
        _bitwise(tmp_path, TinyGPT2, callback, data_fn=lambda: DataLoader(data, batch_size=8, shuffle=True))
    _ok(callback, [3])
    with open_log(callback.resolved_log_path) as log:
        assert log.token_influence.shape[-2:] == (9, 8)


# ------------------------------------------------------------------ manual optimization, several optimizers


class TwoOptimizers(ToyClassifier):
    """Manual optimization stepping two optimizers every batch (a GAN-like loop): global_step moves by 2."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        for optimizer in (first, second):
            optimizer.zero_grad()
            self.manual_backward(self.per_example_loss(batch).mean())
            optimizer.step()

    def configure_optimizers(self):
        return (torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[3].parameters(), lr=0.1))


def test_manual_optimization_with_two_optimizers_schedules_in_global_steps(tmp_path):
    # 6 batches of 32 a epoch, 2 epochs: 12 batches, global_step 2, 4, ..., 24.
    callback = _bif(tmp_path, every_n_steps=5, at_steps=[3, 7], log_spaced=4, config=TINY.replace(chains=1))
    with pytest.warns(UserWarning, match="advanced trainer.global_step by 2"):
        _bitwise(tmp_path, TwoOptimizers, callback, max_steps=-1, max_epochs=2)
    # every 5: 5→6, 10, 15→16, 20; at 3→4, 7→8; log-spaced over 24 steps: 1→2, 3→4, 8, 24.
    _ok(callback, [2, 4, 6, 8, 10, 16, 20, 24])


# ------------------------------------------------------------------ variable-length examples, lists of tensors


class Sentences(Dataset):
    """Token sequences of different lengths with a label: default collate cannot stack them."""

    def __init__(self, n: int = 24) -> None:
        generator = torch.Generator().manual_seed(1)
        self.items = [(torch.randint(0, 8, (3 + i % 4,), generator=generator), i % 2) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def pad(items):
    ids = nn.utils.rnn.pad_sequence([ids for ids, _ in items], batch_first=True)
    lengths = torch.tensor([len(ids) for ids, _ in items])
    return ids, lengths, torch.tensor([label for _, label in items])


class BagOfWords(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(8, 4), nn.Linear(4, 2)

    def per_example_loss(self, batch) -> torch.Tensor:
        ids, lengths, labels = batch
        keep = (torch.arange(ids.shape[1]) < lengths[:, None]).float()
        mean = (self.embed(ids) * keep[..., None]).sum(1) / lengths[:, None]
        return F.cross_entropy(self.head(mean), labels, reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_variable_length_examples_need_a_collate_fn_and_work_with_one(tmp_path):
    sentences = Sentences()
    data = DataLoader(sentences, batch_size=8, collate_fn=pad)
    plain = _bif(tmp_path, sentences, sentences, config=TINY.replace(batch_size=8))
    with pytest.raises(MisconfigurationException, match=r"different shapes.*collate_fn"):
        _fit(tmp_path, BagOfWords, (plain,), data=data)
    callback = _bif(tmp_path, DataLoader(sentences, collate_fn=pad), DataLoader(sentences, collate_fn=pad),
                    log_path=tmp_path / "padded.h5", config=TINY.replace(batch_size=8))
    _bitwise(tmp_path, BagOfWords, callback, data_fn=lambda: DataLoader(sentences, batch_size=8, collate_fn=pad))
    _ok(callback, [3])


def test_a_list_of_tensors_is_refused_with_the_fix_and_a_dataloader_over_it_works(tmp_path):
    x, y = DATA.tensors
    with pytest.raises(MisconfigurationException, match=r"list of 2 tensors.*tuple.*torch.stack"):
        BIFCallback(TRAIN, [x[:4], y[:4]], at_steps=[3])
    examples = [(x[i], y[i]) for i in range(4)]  # a list of examples that are not bare tensors
    callback = _bif(tmp_path, probes=examples)
    _fit(tmp_path, ToyClassifier, (callback,))
    _ok(callback, [3])
    over_list = _bif(tmp_path, probes=DataLoader([x[i] for i in range(4)], collate_fn=lambda xs: [torch.stack(xs),
                                                                                                  y[:len(xs)]]),
                     log_path=tmp_path / "loader.h5")
    _fit(tmp_path, ToyClassifier, (over_list,))
    _ok(over_list, [3])


# ------------------------------------------------------------------ default log paths


@pytest.mark.parametrize("options", [dict(logger=False), dict(fast_dev_run=3)])
def test_default_log_paths_of_runs_without_a_versioned_logger_never_collide(tmp_path, options):
    paths = []
    for _ in range(2):
        callback = BIFCallback(TRAIN, PROBES, at_steps=[2], config=TINY, min_split_half=None)
        _fit(tmp_path, ToyClassifier, (callback,), **{"max_steps": 3, **options})
        paths.append(callback.resolved_log_path)
        _ok(callback, [2])
    assert paths == [tmp_path / "bif_logs" / f"version_{n}" / "influence.h5" for n in (0, 1)]


# ------------------------------------------------------------------ torch.compile


class CompiledNet(ToyClassifier):
    """The MLP wrapped in ``torch.compile`` with a backend that records every graph dynamo compiles."""

    graphs: ClassVar[list] = []

    def __init__(self) -> None:
        super().__init__()

        def backend(graph, example_inputs):
            CompiledNet.graphs.append(graph)
            return graph.forward

        self.net = torch.compile(self.net, backend=backend)


def test_a_compiled_submodule_is_not_recompiled_by_snapshots_and_trains_bitwise_unchanged(tmp_path):
    # Under inductor a recompile (another shape, vmap) gave training a new graph: max |Δw| 6e-8 after 8 steps.
    def make() -> CompiledNet:
        torch._dynamo.reset()
        CompiledNet.graphs.clear()
        return CompiledNet()

    callback = _bif(tmp_path, every_n_steps=2, at_fit_start=True, config=TINY.replace(vectorize=True))
    _bitwise(tmp_path, make, callback, max_steps=8)
    assert len(CompiledNet.graphs) == 1  # the training graph only: snapshots ran the module eagerly
    _ok(callback, [0, 2, 4, 6, 8])


# ------------------------------------------------------------------ examples from the DataModule, LightningCLI

ROOT = Path(__file__).resolve().parents[2]


class SplitData(pl.LightningDataModule):
    """The toy data split in ``setup`` (the datasets exist only from then on)."""

    def setup(self, stage: str) -> None:
        self.train_set = torch.utils.data.Subset(DATA, range(0, 160))
        self.val_set = torch.utils.data.Subset(DATA, range(160, 192))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=32)


def test_examples_and_probes_from_the_datamodule_resolved_at_setup(tmp_path):
    from lightning_bif import DataModuleExamples

    callback = _bif(tmp_path, DataModuleExamples("train", count=8), DataModuleExamples("val", indices=[0, 5]),
                    train_groups=[0, 1] * 4)
    plain_trainer, plain = _fit(tmp_path / "plain", ToyClassifier, data=SplitData(), limit_val_batches=0)
    trainer, model = _fit(tmp_path / "bif", ToyClassifier, (callback,), data=SplitData(), limit_val_batches=0)
    for a, b in zip(_state(plain_trainer, plain), _state(trainer, model), strict=True):
        assert torch.equal(a, b)
    _ok(callback, [3])
    with _log(callback) as log:
        assert log.train_ids.tolist() == [0, 20, 40, 60, 80, 100, 120, 140]
        assert log.probe_ids.tolist() == [160, 165]  # positions in the innermost dataset


def test_datamodule_examples_that_do_not_exist_are_refused_at_setup(tmp_path):
    from lightning_bif import DataModuleExamples

    with pytest.raises(MisconfigurationException, match=r"position 40 is out of range for the 32 examples"):
        _fit(tmp_path, ToyClassifier, (_bif(tmp_path, probes=DataModuleExamples("val", indices=[40])),),
             data=SplitData())
    with pytest.raises(MisconfigurationException, match=r"SplitData has no test_dataloader\(\)"):
        _fit(tmp_path, ToyClassifier, (_bif(tmp_path, probes=DataModuleExamples("test", count=2)),),
             data=SplitData())
    with pytest.raises(ValueError, match="indices or count, not both"):
        DataModuleExamples("val", indices=[1], count=1)


def test_the_lightningcli_example_runs_from_its_yaml_config(tmp_path):
    pytest.importorskip("jsonargparse")
    import subprocess
    import sys

    command = [sys.executable, str(ROOT / "examples" / "cli" / "train.py"), "fit",
               "--config", str(ROOT / "examples" / "cli" / "config.yaml"), f"--trainer.default_root_dir={tmp_path}",
               "--trainer.max_steps=4", "--trainer.enable_checkpointing=false", "--trainer.enable_model_summary=false"]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with open_log(tmp_path / "lightning_logs" / "version_0" / "influence.h5") as log:
        assert log.steps.tolist() == [0, 1, 2, 3, 4] and (log.status == "ok").all()
        assert len(log.train_ids) == 32 and len(log.probe_ids) == 4


# ------------------------------------------------------------------ threads


def test_snapshots_run_with_num_threads_and_training_keeps_its_own(tmp_path):
    seen = []

    def probe(model: nn.Module, batch) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        callback = _bif(tmp_path, probe_fn=probe, num_threads=1)
        _bitwise(tmp_path, ToyClassifier, callback)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(MisconfigurationException, match="num_threads"):
        _bif(tmp_path, num_threads=0)


def test_more_threads_than_cores_is_warned_about(tmp_path):
    from lightning_bif.snapshot.threads import available_cores, oversubscription

    before = torch.get_num_threads()
    torch.set_num_threads(available_cores() + 1)
    try:
        with pytest.warns(UserWarning, match=r"num_threads=1"):
            _fit(tmp_path, ToyClassifier, (_bif(tmp_path, config=TINY.replace(chains=1, draws=2)),), max_steps=1)
        torch.set_num_threads(2)
        assert oversubscription(workers=available_cores()) is not None  # threads + dataloader workers
        assert oversubscription(workers=0) is None or available_cores() < 2
        torch.set_num_threads(1)
        assert oversubscription(workers=available_cores() + 4) is None  # one thread cannot oversubscribe
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ the setups people use, training bitwise unchanged


class OneCycleAdamW(ToyClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=1e-2)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2,
                                                       total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class BatchNormFrozen(ToyClassifier):
    """BatchNorm (running statistics are buffers a snapshot must not move) and a frozen first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
        self.net[0].requires_grad_(False)


class SmallCNN(pl.LightningModule):
    """A plain CNN on 1×8×8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Linear(64, 3))

    def per_example_loss(self, batch) -> torch.Tensor:
        return F.cross_entropy(self.net(batch[0].view(-1, 1, 8, 8)), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


IMAGES = torch.utils.data.TensorDataset(torch.randn(96, 64, generator=torch.Generator().manual_seed(3)),
                                        torch.arange(96) % 3)


class Boring(pl.LightningModule):
    """Lightning's demo ``BoringModel`` (its own random dataloaders, StepLR) with a per-example loss."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = BoringModel()

    def per_example_loss(self, batch) -> torch.Tensor:
        return (self.inner(batch) - 1).square().mean(dim=1)

    def training_step(self, batch, batch_idx):
        return self.inner.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return self.inner.configure_optimizers()

    def train_dataloader(self):
        return self.inner.train_dataloader()


class DemoTransformer(pl.LightningModule):
    """Lightning's demo ``Transformer`` (encoder-decoder, dropout) on random token sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Transformer(vocab_size=16, ninp=8, nhead=2, nhid=16, nlayers=1, dropout=0.1)

    def per_example_loss(self, batch) -> torch.Tensor:
        inputs, target = batch
        out = self.model(inputs, target).view(inputs.shape[0], inputs.shape[1], -1)
        return F.nll_loss(out.transpose(1, 2), target, reduction="none").mean(1)

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


SEQUENCES = torch.utils.data.TensorDataset(torch.randint(0, 16, (48, 6), generator=torch.Generator().manual_seed(4)),
                                           torch.randint(0, 16, (48, 6), generator=torch.Generator().manual_seed(5)))


class Stream(torch.utils.data.IterableDataset):
    """The toy data as an iterable dataset (the trainer's data cannot be indexed: ``data=`` is given)."""

    def __iter__(self):
        yield from zip(*DATA.tensors, strict=True)


class Combined(ToyClassifier):
    def training_step(self, batch, batch_idx):
        return sum(self.per_example_loss(part).mean() for part in batch.values())


class WithValidation(ToyClassifier):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.per_example_loss(batch).mean())


def _callbacks() -> list:
    return [EarlyStopping("val_loss", patience=1), ModelCheckpoint(monitor="val_loss")]


SETUPS = {
    "gradient accumulation": (ToyClassifier, dict(accumulate_grad_batches=2), {}, None),
    "bf16-mixed": (ToyClassifier, dict(precision="bf16-mixed"), {}, None),
    "OneCycleLR + AdamW": (OneCycleAdamW, {}, dict(log_spaced=3), None),
    "BatchNorm + frozen parameters": (BatchNormFrozen, {}, {}, None),
    "plain CNN": (SmallCNN, {}, dict(train=torch.utils.data.Subset(IMAGES, range(8)),
                                     probes=(IMAGES.tensors[0][:2], IMAGES.tensors[1][:2])), lambda: loader(IMAGES)),
    "Lightning BoringModel": (Boring, {}, dict(train=RandomDataset(32, 8), probes=RandomDataset(32, 2),
                                               data=RandomDataset(32, 64)), False),
    "Lightning demo Transformer": (DemoTransformer, {}, dict(train=torch.utils.data.Subset(SEQUENCES, range(6)),
                                                             probes=torch.utils.data.Subset(SEQUENCES, [40, 41])),
                                   lambda: loader(SEQUENCES, batch_size=8)),
    "iterable training data": (ToyClassifier, {}, dict(data=DATA), lambda: DataLoader(Stream(), batch_size=32)),
    "combined loaders": (Combined, {}, dict(data=DATA),
                         lambda: {"a": loader(DATA), "b": loader(DATA, batch_size=16)}),
    "max_time, EarlyStopping, ModelCheckpoint": (
        WithValidation, dict(max_time="00:00:05:00", val_check_interval=2, enable_checkpointing=True,
                             callbacks_fn=_callbacks), {}, lambda: dict(train_dataloaders=loader(DATA),
                                                                       val_dataloaders=loader(DATA, shuffle=False))),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_setup_trains_bitwise_unchanged_with_ok_snapshots(tmp_path, setup):
    make_model, trainer_options, callback_options, data_fn = SETUPS[setup]
    trainer_options = dict(trainer_options)
    extra = trainer_options.pop("callbacks_fn", None)

    def run(callbacks, where):
        pl.seed_everything(0, verbose=False)
        model = make_model()
        trainer = _trainer(tmp_path / where, [*callbacks, *(extra() if extra else [])], **trainer_options)
        data = loader(DATA) if data_fn is None else (None if data_fn is False else data_fn())
        if isinstance(data, dict) and "train_dataloaders" in data:
            trainer.fit(model, **data)
        else:
            trainer.fit(model, data)
        return trainer, model

    callback = _bif(tmp_path, **{"at_steps": [2, 4], **callback_options})
    plain_trainer, plain = run([], "plain")
    # vmap has no batching rule for the fused transformer layer: the callback must say it runs chains one by one.
    expected = (pytest.warns(UserWarning, match="Chains run one after another")
                if setup == "Lightning demo Transformer" else contextlib.nullcontext())
    with expected:
        trainer, model = run([callback], "bif")
    before, after = _state(plain_trainer, plain), _state(trainer, model)
    assert len(before) == len(after) > 0
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    with _log(callback) as log:
        assert (log.status == "ok").all(), log.message
        assert len(log) >= 2 and log.steps.tolist() == sorted(set(log.steps.tolist()))


def test_datamodule_examples_resume_from_a_checkpoint_into_the_same_log(tmp_path):
    from lightning_bif import DataModuleExamples

    def callback() -> BIFCallback:
        return _bif(tmp_path, DataModuleExamples("train", count=6), DataModuleExamples("val", count=2),
                    every_n_steps=2)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path, ToyClassifier, (callback(), checkpoint), data=SplitData(), max_steps=4,
         enable_checkpointing=True, limit_val_batches=0)
    pl.seed_everything(0, verbose=False)
    resumed = callback()
    trainer = _trainer(tmp_path, (resumed,), max_steps=8, enable_checkpointing=True, limit_val_batches=0)
    trainer.fit(ToyClassifier(), SplitData(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    _ok(resumed, [2, 4, 6, 8])
