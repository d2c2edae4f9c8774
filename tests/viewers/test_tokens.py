"""The token view: token strings and texts in the log (format 2), the view, its terminal text, HTML and CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_bif import BIFCallback, BIFResult, Diagnostics, SGLDConfig, open_log
from lightning_bif.log import FORMAT_VERSION, LogWriter, RunIdentity, SnapshotRecord
from lightning_bif.viewers import tokens as token_module
from lightning_bif.viewers.cli import main as cli_main
from lightning_bif.viewers.tokens import format_view, render_html, token_view

P, T, N, C, D = 2, 5, 4, 2, 3
TOKENS = [["Th", "e", " h", "eap", "."], ["α", "<b>", "</script>", " ", "\n"]]
TEXTS = ["heap push", "heap pop", "wrap text", "x" * 2000]
GROUPS = ["heapq", "heapq", "textwrap", "textwrap"]


def result(seed: int) -> BIFResult:
    """A per-token result whose entries are known: token_influence[p, t, i] = (seed + 1)·(t - 2)·(i + 1)·(-1)^p."""
    t = torch.arange(T, dtype=torch.float32)[None, :, None] - 2
    i = torch.arange(N, dtype=torch.float32)[None, None, :] + 1
    sign = torch.tensor([1.0, -1.0])[:, None, None]
    token = (seed + 1) * t * i * sign * 1e-3
    token_se = torch.full((P, T, N), 1e-4)
    diagnostics = Diagnostics(sampling_loss=torch.zeros(C, D), draw_loss=torch.zeros(C, D),
                              diverged=torch.zeros(C, dtype=torch.bool), loss_rise=0.0, split_half=0.9, ess=5.0,
                              vectorized=False, nbeta=10.0, duration_s=1.0)
    mean = token.mean(dim=1) + torch.tensor([-1.0, 0.5, 2.0, -3.0]) * 1e-3  # a ranking of its own
    return BIFResult(influence=mean, correlation=mean.tanh(), stderr=torch.full((P, N), 2e-4),
                     train_loss=torch.ones(N), probe_loss=torch.ones(P), diagnostics=diagnostics,
                     config=SGLDConfig(chains=C, draws=D, per_token=True), token_influence=token, token_stderr=token_se)


def identity(**changes: object) -> RunIdentity:
    values = dict(config={"sgld": SGLDConfig(chains=C, draws=D, per_token=True).to_dict()},
                  train_ids=np.array([10, 11, 12, 13]), probe_ids=np.array([0, 1]), train_groups=GROUPS,
                  chains=C, draws=D, tokens=T, probe_tokens=TOKENS, train_text=TEXTS)
    values.update(changes)
    return RunIdentity(**values)


def write_log(path: Path, **changes: object) -> Path:
    with LogWriter(path, identity(**changes)) as writer:
        for step, seed in ((0, 0), (10, 1)):
            writer.append(SnapshotRecord(step=step, epoch=0, wall_time=0.0, duration_s=1.0, status="ok",
                                         result=result(seed)))
        writer.append(SnapshotRecord(step=20, epoch=0, wall_time=0.0, duration_s=1.0, status="failed", result=None,
                                     message="boom"))
    return path


def test_log_stores_token_strings_and_training_text(tmp_path):
    path = write_log(tmp_path / "bif.h5")

    with open_log(path) as log:
        assert log.format_version == FORMAT_VERSION == 3
        assert log.probe_tokens == TOKENS
        assert log.train_text[:3] == TEXTS[:3] and log.train_text[3] == "x" * 1024  # cut to 1024 bytes
    with pytest.raises(ValueError, match="differs from the logged one in probe_tokens"):
        LogWriter(path, identity(probe_tokens=[["a"] * T, ["b"] * T]), if_exists="resume")
    with pytest.raises(ValueError, match="train_text"):
        LogWriter(path, identity(train_text=None), if_exists="resume")
    LogWriter(path, identity(), if_exists="resume").close()


def test_identity_checks_the_shape_of_token_strings():
    with pytest.raises(ValueError, match=r"probe_tokens must have shape \[2, 5\], got \[2, 4\]"):
        identity(probe_tokens=[row[:4] for row in TOKENS])
    with pytest.raises(ValueError, match=r"probe_tokens must have shape \[2, 5\], got \[2\]"):
        identity(probe_tokens=[TOKENS[0], TOKENS[1][:3]])
    with pytest.raises(ValueError, match="needs a token axis"):
        identity(tokens=None)
    with pytest.raises(TypeError, match="strings only"):
        identity(probe_tokens=[[1, 2, 3, 4, 5], TOKENS[1]])
    with pytest.raises(ValueError, match=r"train_text must have shape \[4\]"):
        identity(train_text=TEXTS[:3])


def test_a_version_1_log_opens_without_token_strings(tmp_path, capsys):
    path = write_log(tmp_path / "v1.h5", probe_tokens=None, train_text=None)
    with h5py.File(path, "r+") as file:
        file.attrs["format_version"] = 1
        assert "probe_tokens" not in file and "train_text" not in file

    with open_log(path) as log:
        assert log.format_version == 1 and log.probe_tokens is None and log.train_text is None
        view = token_view(log, 0)
    assert view.tokens == [f"<{t}>" for t in range(T)]
    assert view.helpful[0].text is None
    assert cli_main(["tokens", str(path), "--color", "never"]) == 0
    assert "<0><1>" in capsys.readouterr().out


def test_token_view_sums_the_selection_and_ranks_examples_on_the_probe(tmp_path):
    with open_log(write_log(tmp_path / "bif.h5")) as log:
        token = log.token_influence[1]
        everything = token_view(log, 1)  # the last usable snapshot: step 10 (step 20 failed)
        group = token_view(log, 0, group="textwrap", step=3)
        one = token_view(log, 0, train=2, step=14)

        with pytest.raises(ValueError, match="not both"):
            token_view(log, 0, train=1, group="heapq")
        with pytest.raises(IndexError, match="probe position 2 out of range"):
            token_view(log, 2)

    assert (everything.step, everything.status, everything.probe_id) == (10, "ok", 1)
    assert everything.selection == "sum over all 4 tracked examples"
    np.testing.assert_allclose(everything.influence, token[1].sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(everything.stderr, 4e-4, rtol=1e-6)  # the bound: sum of the standard errors
    assert group.step == 0 and group.selection == "sum over group textwrap (2 examples)"
    np.testing.assert_allclose(group.influence, result(0).token_influence[0][:, 2:].sum(dim=1).numpy(), rtol=1e-6)
    assert one.step == 10 and one.selection == "train 12 (textwrap)" and one.tokens == TOKENS[0]
    np.testing.assert_allclose(one.influence, token[0][:, 2], rtol=1e-6)
    # Probe 0 at step 10: token means are 0, so the ranking is that of the added [-1, 0.5, 2, -3]e-3.
    assert [e.id for e in one.helpful] == [13, 10] and [e.id for e in one.harmful] == [12, 11]
    assert one.helpful[0].text == "x" * 1024 and one.harmful[0].group == "textwrap"
    assert one.helpful[0].influence == pytest.approx(-3e-3, rel=1e-5) and one.helpful[0].stderr == pytest.approx(2e-4)


def test_terminal_text_marks_significant_tokens_or_colours_them(tmp_path):
    with open_log(write_log(tmp_path / "bif.h5")) as log:
        view = token_view(log, 0, train=0, step=0)  # values (t - 2)·1e-3 ± 1e-4: tokens 0, 1 help, 3, 4 harm

    plain = format_view(view, color=False)
    assert "[-The-] h{+eap.+}" in plain
    assert "\x1b[" not in plain
    assert "2 of 5" not in plain and "4 of 5 tokens beyond 2 standard errors" in plain
    assert "    0  'Th'         -0.002 ± 0.0001" in plain
    assert "(within noise)" in plain  # token 2 is exactly 0
    assert "+0.002 ± 0.0002  train 12 (textwrap): 'wrap text'" in plain
    coloured = format_view(view, color=True)
    assert "\x1b[97;48;5;27mTh\x1b[0m" in coloured  # the strongest helpful token: full blue
    assert "\x1b[97;48;5;196m.\x1b[0m" in coloured  # the strongest harmful token: full red


def test_html_page_embeds_the_data_and_escapes_the_text(tmp_path, monkeypatch):
    with open_log(write_log(tmp_path / "bif.h5")) as log:
        page = render_html(log, probe=1, group="heapq", step=0)
        monkeypatch.setattr(token_module, "MAX_HTML_ENTRIES", T * N)
        small = render_html(log, probe=1, step=0)

    assert page.startswith("<!DOCTYPE html>") and "http" not in page.lower().replace("http-equiv", "")
    assert page.count("</script>") == 2 and "\\u003c/script>" in page  # the token "</script>" is escaped
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert data["steps"] == [0, 10] and data["status"] == ["ok", "ok"]  # the failed snapshot is left out
    assert data["probes"][1]["tokens"] == TOKENS[1] and data["train"][2]["text"] == "wrap text"
    assert data["initial"] == {"probe": 1, "row": 0, "selection": "group:0"} and data["groups"] == ["heapq", "textwrap"]
    assert data["token"][1][0][3][2] == pytest.approx(2 * 1 * 3 * 1e-3, rel=1e-3)  # step 10, probe 0, t = 3, i = 2
    assert data["token_se"][0][1][4][0] == pytest.approx(1e-4) and data["partial"] == ""
    small_data = json.loads(re.search(r'type="application/json">(.*?)</script>', small, re.S).group(1))
    assert len(small_data["probes"]) == 1 and small_data["steps"] == [0]
    assert small_data["partial"].startswith("showing 1 of 2 probes and 1 of 2 usable snapshots")


def test_tokens_command_prints_the_view_and_writes_html(tmp_path, capsys):
    path = write_log(tmp_path / "bif.h5")
    html = tmp_path / "out" / "view.html"

    assert cli_main(["tokens", str(path), "--probe", "1", "--train", "11", "--step", "0", "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("probe 1 at step 0 (ok): per-token BIF of the train 11 (heapq)")
    assert "[-...-] helps" in out and "\x1b[" not in out  # not a terminal: markers, no colour
    assert f"wrote the HTML token view to {html}" in out and "<!DOCTYPE html>" in html.read_text()
    assert cli_main(["tokens", str(path), "--group", "textwrap", "--color", "always"]) == 0
    assert "sum over group textwrap" in (out := capsys.readouterr().out) and "\x1b[" in out
    assert cli_main(["tokens", str(path), "--train", "99"]) == 1
    assert "No train with id '99'" in capsys.readouterr().err
    assert cli_main(["tokens", str(path), "--group", "nope"]) == 1
    assert "its groups are heapq, textwrap" in capsys.readouterr().err


def test_tokens_command_refuses_a_log_without_a_token_axis(tmp_path, capsys):
    plain = result(0)
    plain.token_influence = plain.token_stderr = None
    with LogWriter(tmp_path / "flat.h5", identity(tokens=None, probe_tokens=None)) as writer:
        writer.append(SnapshotRecord(step=0, epoch=0, wall_time=0.0, duration_s=1.0, status="ok", result=plain))
    assert cli_main(["tokens", str(tmp_path / "flat.h5")]) == 1
    assert "no per-token influence" in capsys.readouterr().err


class CharModel(pl.LightningModule):
    """Next character from the current one; ``token_losses`` is ``[B, T]``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(4, 4), nn.Linear(4, 4)

    def token_losses(self, batch) -> torch.Tensor:
        chars = batch[0]
        return F.cross_entropy(self.head(self.embed(chars[:, :-1])).transpose(1, 2), chars[:, 1:], reduction="none")

    def per_example_loss(self, batch) -> torch.Tensor:
        return self.token_losses(batch).mean(dim=1)

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def token_losses(model: CharModel, batch) -> torch.Tensor:
    return model.token_losses(batch)


def test_callback_stores_token_strings_and_checks_them_before_training(tmp_path):
    data = TensorDataset(torch.randint(4, (16, T + 1), generator=torch.Generator().manual_seed(0)))
    probes = TensorDataset(data.tensors[0][:P])
    strings = [["abcd"[int(c)] for c in row[1:]] for row in probes.tensors[0]]
    config = SGLDConfig(chains=2, draws=3, burn_in=2, thin=1, step_size=1e-4, batch_size=8, per_token=True,
                        target_split_half=None)  # one round: this test is about the token strings

    def fit(name: str, **kwargs: object) -> Path:
        pl.seed_everything(0)
        kwargs = {"probe_fn": token_losses, "config": config, **kwargs}
        callback = BIFCallback(data, probes, every_n_steps=2, log_path=tmp_path / name, tensorboard=False,
                               progress=False, min_split_half=None, **kwargs)
        model = CharModel()
        trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback])
        trainer.fit(model, DataLoader(data, batch_size=8))
        return tmp_path / name

    with open_log(fit("ok.h5", probe_tokens=strings, train_text=[f"seq {i}" for i in range(16)])) as log:
        assert log.probe_tokens == strings and log.train_text[3] == "seq 3" and (log.status == "ok").all()
    with pytest.raises(MisconfigurationException, match=r"rows of length 4, but probe_fn returns T = 5"):
        fit("short.h5", probe_tokens=[row[:4] for row in strings])
    with pytest.raises(MisconfigurationException, match=r"needs per-token probe losses: set SGLDConfig\(per_token"):
        fit("flat.h5", probe_fn=None, config=config.replace(per_token=False), probe_tokens=strings)
    assert not any((tmp_path / name).exists() for name in ("short.h5", "flat.h5"))
    with pytest.raises(MisconfigurationException, match=r"probe_tokens=\.\.\.\) needs a list of token strings "
                                                        r"for each of the 2 examples"):
        BIFCallback(data, probes, probe_tokens=strings[:1], every_n_steps=1)
    with pytest.raises(MisconfigurationException, match=r"train_text=\.\.\.\) needs a str for each of the 16"):
        BIFCallback(data, probes, train_text="one string", every_n_steps=1)
