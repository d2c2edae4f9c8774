"""examples/induction.py: the transition detector on known curves, and the whole pipeline shortened (--quick)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from lightning_bif import open_log

EXAMPLE = Path(__file__).parents[2] / "examples" / "induction.py"
LENGTH, PACKS, PROBES = 24, 2, 2  # --quick: 24-token sequences, 2 packs per group, 2 repeated + 2 random probes


def _example():
    spec = importlib.util.spec_from_file_location("induction_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_transition_is_the_midpoint_of_the_drop_with_a_bootstrap_error():
    example = _example()
    steps = np.arange(0, 1001, 10)
    rng = np.random.default_rng(0)
    # 400 sequences whose loss falls from 3.5 to 0.5 around step 600 (logistic, width 30 steps), plus noise.
    curve = 0.5 + 3.0 / (1 + np.exp((steps - 600) / 30))
    per_sequence = curve[:, None] + 0.3 * rng.standard_normal((len(steps), 400))
    found = example.transition(steps, per_sequence)
    assert abs(found.step - 600) < 5
    assert 0 < found.stderr < 5
    # 10 % and 90 % of a logistic drop: ± 30·ln 9 ≈ 66 steps around the midpoint.
    assert abs(found.start - 534) < 10 and abs(found.end - 666) < 10
    assert np.isnan(example.crossing(steps, np.full(len(steps), 2.0) + steps * 1e-4, 0.5))  # a rising curve


def test_token_classes_separate_first_occurrences_from_copyable_repeats():
    # "xabcabcyz" (r = 1, m = 3): targets 1..8 are a b c | a | b c | y z; loss index = target - 1.
    classes = _example().token_classes(torch.tensor([[1, 3], [0, 0]]), 9)
    assert np.flatnonzero(classes["first"][0]).tolist() == [1, 2]
    assert np.flatnonzero(classes["repeated"][0]).tolist() == [4, 5]
    assert not classes["first"][1].any() and not classes["repeated"][1].any()  # no repeat, no classes


def test_repeats_start_at_random_offsets_with_random_lengths_so_position_cannot_predict_the_copy():
    example = _example()
    ids, spans = example.sequences(2000, LENGTH, True, torch.Generator().manual_seed(0))
    for row, (r, m) in zip(ids.tolist(), spans.tolist(), strict=True):
        assert 6 <= m <= 11 and 0 <= r <= LENGTH - 2 * m and row[r + m:r + 2 * m] == row[r:r + m]
    # Offsets and lengths both vary, so neither where the copy starts nor how far back its source lies is fixed.
    assert len(set(spans[:, 0].tolist())) >= 10 and set(spans[:, 1].tolist()) == set(range(6, 12))
    ids, spans = example.sequences(5, LENGTH, False, torch.Generator().manual_seed(0))
    assert ids.shape == (5, LENGTH) and not spans.any()


def test_quick_run_logs_per_token_influence_measures_the_transition_and_writes_the_figures(tmp_path):
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--quick", "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    path = Path(re.search(r"Influence log: (\S+)", run.stdout).group(1))
    assert path == tmp_path / "induction" / "version_0" / "influence.h5"
    assert "Transition (held-out repeated-token loss" in run.stdout and "Classical IF" in run.stdout
    assert "pilot run without the callback gave the same held-out loss curve up to 0.0e+00" in run.stdout
    results = json.loads((path.parent / "results.json").read_text())
    with open_log(path) as log:
        assert len(log) == len(results["snapshot_steps"]) and (log.status == "ok").all()
        assert log.steps.tolist() == results["snapshot_steps"] == results["bif_steps"]
        assert log.token_influence.shape == (len(log), 2 * PROBES, LENGTH - 1, 2 * PACKS)
        assert np.isfinite(log.token_influence[:]).all() and (log.token_stderr[:] > 0).all()
        assert "".join(log.probe_tokens[0]).isalpha() and len(log.probe_tokens[0]) == LENGTH - 1
        assert log.train_groups.tolist() == ["repeat"] * PACKS + ["random"] * PACKS
        # The group curve is the mean of the log's entries over the repeat probes' copyable tokens.
        repeated = _example().token_classes(torch.tensor(results["probe_spans"]), LENGTH)["repeated"][:PROBES]
        expected = np.asarray(log.token_influence[:])[:, :PROBES][:, repeated][..., :PACKS].mean(axis=(1, 2))
    np.testing.assert_allclose(results["curves"]["repeat"]["repeated"], expected, rtol=1e-4,
                               atol=1e-4 * abs(expected).max())
    assert set(results["head_scores"]) >= {"previous_token", "prefix_matching"}
    assert set(results["change_in_se"]) == {"peak", "end"} and results["bif_peak_step"] in results["bif_steps"]
    classical = results["classical"]
    assert classical["steps"] == results["bif_steps"]
    assert all(np.isfinite(classical[g][c]).all() and np.any(classical[g][c]) for g in ("repeat", "random")
               for c in ("first", "repeated"))
    for name in ("induction_loss.png", "induction_tokens.png", "induction_groups.png", "tokens.html"):
        assert (path.parent / name).stat().st_size > 1000, name
