"""examples/analyze_digits.py on a shortened examples/digits.py run: the printed analysis, its numbers and figures."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_bif import open_log

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture
def examples(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # analyze_digits imports the digits example's data split
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything in digits.main sets it; restored after the test
    yield importlib.import_module("digits"), importlib.import_module("analyze_digits")
    for name in ("digits", "analyze_digits"):  # generic module names: leave none behind for other tests
        sys.modules.pop(name, None)


def test_analysis_of_a_short_digits_run(examples, tmp_path: Path, capsys) -> None:
    digits, analyze = examples
    digits.main(["--epochs", "1", "--snapshots", "3", "--root", str(tmp_path)])
    path = tmp_path / "digits" / "version_0" / "influence.h5"
    capsys.readouterr()

    out = tmp_path / "figures"
    analyze.main(["--root", str(tmp_path), "--out", str(out), "--z", "1", "--probe-class", "3", "--top", "4"])
    printed = capsys.readouterr().out
    assert printed.startswith(f"{path}: 4 snapshots at steps [0, 4, 10, 24], 4 ok; 50 probes, 200 tracked")
    changes = int(re.search(r"(\d+) sign change\(s\) at \|BIF\| > 1 standard errors", printed).group(1))
    assert changes > 0
    for name in ("sign_changes.png", "sign_change_pairs.png", "top_examples_3.png"):
        assert (out / name).stat().st_size > 10_000, name
    helpful = re.search(r"most helpful: (.*)", printed).group(1)

    with open_log(path) as log:
        # The ranking is the influence on the digit-3 probes at the last step, summed over those probes.
        totals = log.influence[-1][log.probe_groups == 3].sum(axis=0)
        order = np.argsort(totals, kind="stable")
        expected = ", ".join(f"id {log.train_ids[i]} (digit_{log.train_groups[i]}) {totals[i]:+.2e}" for i in order[:4])
        assert helpful == expected
        ranking, probes = analyze.rank_training_examples(log, 3, int(log.steps[-1]))
        assert probes == 5 and ranking.index.tolist() == log.train_ids[order].tolist()
        np.testing.assert_allclose(ranking.total.to_numpy(), totals[order], rtol=1e-5, atol=1e-9)
        first = log.sign_changes(z=1)[0]  # listed by id with group names, earliest first
        assert (f"probe id {first.probe_id} (digit_{log.probe_groups[first.probe]}) <- train id {first.train_id} "
                f"(digit_{log.train_groups[first.train]}) turns {first.turns}") in printed

        figure = analyze.plot_examples(log, ranking, 3, 4, int(log.steps[-1]), tmp_path / "top.png")
        rows = [ax.get_ylabel() for ax in figure.axes if ax.get_ylabel()]
        assert rows == ["probes: digit_3", "most helpful", "most harmful"]
        images = [ax for ax in figure.axes if ax.get_images()]
        assert len(images) == 5 + 4 + 4  # the five digit-3 probes, four helpful and four harmful digits
        train, _ = digits.digits()
        first_helpful = images[5].get_images()[0].get_array()
        np.testing.assert_array_equal(first_helpful, train.tensors[0][log.train_ids[order[0]]].numpy().reshape(8, 8))
