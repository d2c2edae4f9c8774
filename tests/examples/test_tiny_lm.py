"""examples/tiny_lm.py (a Hugging Face GPT-2 from a config) runs shortened: its log, token strings, HTML, CLI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from lightning_bif import open_log
from lightning_bif.viewers.cli import main as cli_main

EXAMPLE = Path(__file__).parents[2] / "examples" / "tiny_lm.py"
CONTEXT, PER_MODULE, MODULES = 32, 2, 8


def test_tiny_lm_example_logs_per_token_influence_with_its_tokens_and_writes_the_token_view(tmp_path, capsys):
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "12", "--snapshots", "1", "--chains", "2", "--draws", "4",
         "--per-module", str(PER_MODULE), "--context", str(CONTEXT), "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    path = Path(re.search(r"Influence log: (\S+)", run.stdout).group(1))
    assert path == tmp_path / "tiny_lm" / "version_0" / "influence.h5"
    assert "per-token BIF of the sum over group heapq" in run.stdout
    with open_log(path) as log:
        assert len(log) == 1 and (log.status == "ok").all() and log.format_version == 3
        assert log.tokens == CONTEXT and log.token_influence.shape == (1, 3, CONTEXT, MODULES * PER_MODULE)
        assert np.isfinite(log.token_influence[0]).all() and (log.token_stderr[0] > 0).all()
        texts = ["".join(tokens) for tokens in log.probe_tokens]
        assert texts[0].startswith("Pop and return") and texts[2].startswith("Return the sample")
        assert all(len(tokens) == CONTEXT for tokens in log.probe_tokens)
        assert len(log.train_text) == MODULES * PER_MODULE and {len(t) for t in log.train_text} == {CONTEXT + 1}
        assert log.probe_groups.tolist() == ["heapq", "textwrap", "statistics"]
        first_textwrap = str(log.train_ids[int(np.flatnonzero(log.train_groups == "textwrap")[0])])

    html = (path.parent / "tokens.html").read_text()
    data = json.loads(re.search(r'type="application/json">(.*?)</script>', html, re.S).group(1))
    assert data["probes"][1]["tokens"] == list(texts[1]) and len(data["train"]) == MODULES * PER_MODULE

    view = tmp_path / "view.html"
    assert cli_main(["tokens", str(path), "--probe", "1", "--train", first_textwrap, "--html", str(view)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"probe 1 at step {data['steps'][0]} (ok): per-token BIF of the train {first_textwrap} "
                          "(textwrap)")
    assert "[-...-] helps" in out and "strongest tokens" in out and "most helpful tracked examples" in out
    assert '"W","r","a","p"' in view.read_text()
