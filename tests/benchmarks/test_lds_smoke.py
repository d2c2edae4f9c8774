"""CI-sized checks of the LDS benchmark code (benchmarks/lds_digits.py): its pieces and one tiny run."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark
from scipy.stats import spearmanr

pytest.importorskip("sklearn")

lds_digits = load_benchmark("lds_digits")

TINY = lds_digits.Setup(n_train=60, n_probes=6, subsets=8, seeds=2, train_steps=60, hidden=6)


def test_spearman_matches_scipy() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 20, generator=gen), torch.randn(3, 20, generator=gen)
    ours = lds_digits.spearman(a, b)
    for row in range(3):
        assert float(ours[row]) == pytest.approx(spearmanr(a[row], b[row]).statistic, abs=1e-12)


def test_lds_sign_convention() -> None:
    """Scores are predicted loss contributions: summing them over a subset must rank its loss."""
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(30, 40, generator=gen) < 0.5
    contribution = torch.randn(5, 40, generator=gen)
    subset_losses = (masks.double() @ contribution.double().T)  # [M, P]: loss = sum of contributions
    assert lds_digits.lds(contribution, masks, subset_losses)[0] == pytest.approx(1.0)
    assert lds_digits.lds(-contribution, masks, subset_losses)[0] == pytest.approx(-1.0)


def test_stacked_training_equals_training_alone() -> None:
    data = lds_digits.load_split(TINY)
    index = torch.stack([m.nonzero().flatten() for m in data.masks[:3]])
    together = lds_digits.train_stacked(TINY, data.x_train[index], data.y_train[index], seed=1)
    alone = lds_digits.train_stacked(TINY, data.x_train[index[1:2]], data.y_train[index[1:2]], seed=1)
    for t, a in zip(together, alone, strict=True):
        torch.testing.assert_close(t[1], a[0], rtol=1e-4, atol=1e-5)


def test_gradients_and_hessian_match_autograd() -> None:
    data = lds_digits.load_split(TINY)
    model = lds_digits.full_model(TINY, data)
    flat, losses = lds_digits.flat_params(model.double())
    batch = [data.x_train.double(), data.y_train]

    def objective(w: torch.Tensor) -> torch.Tensor:
        return losses(w, batch).mean() + TINY.weight_decay / 2 * w.square().sum()

    reference = torch.autograd.functional.hessian(objective, flat)
    model.float()
    torch.testing.assert_close(lds_digits.objective_hessian(model, data, TINY.weight_decay, chunk=17), reference)
    grads = lds_digits.per_example_grads(model, data.x_probe, data.y_probe)
    for j in range(len(data.x_probe)):
        one = torch.func.grad(lambda w, j=j: losses(w, [data.x_probe[j:j + 1].double(), data.y_probe[j:j + 1]])[0])
        torch.testing.assert_close(grads[j], one(flat))


def test_tiny_benchmark_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lds_digits, "CACHE", tmp_path / "cache")
    out = tmp_path / "rows.json"
    argv = ["--n-train", "60", "--n-probes", "6", "--subsets", "8", "--seeds", "2", "--train-steps", "60",
            "--hidden", "6", "--bif", "chains=2,draws=20,burn_in=10,step_size=1e-6", "--out", str(out)]
    rows = lds_digits.main(argv)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # ground truth and baseline scores are cached
    names = [r.method for r in rows]
    assert names[0] == "gradient dot product" and names[-1].startswith("bif ")
    assert all(math.isfinite(r.lds) and -1 <= r.lds <= 1 for r in rows)
    saved = json.loads(out.read_text())
    assert saved["setup"]["subsets"] == 8 and len(saved["rows"]) == len(rows)
    assert saved["rows"][-1]["details"]["draws_total"] == 40
    again = lds_digits.main(argv)  # from the cache: the same ground truth, the same baseline rows
    assert [r.lds for r in again[:-1]] == [r.lds for r in rows[:-1]]
