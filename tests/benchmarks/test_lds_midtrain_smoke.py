"""CI-sized checks of the time-resolved LDS benchmark (benchmarks/lds_midtrain.py): its pieces and one tiny run."""

import math

import pytest
import torch
from helpers import load_benchmark

pytest.importorskip("sklearn")

lds_midtrain = load_benchmark("lds_midtrain")

TINY = lds_midtrain.Setup(n_train=60, n_probes=6, hidden=6, total_steps=40, checkpoints=(0, 20), subsets=8, orders=2)
ARGV = ["--n-train", "60", "--n-probes", "6", "--hidden", "6", "--total-steps", "40", "--checkpoints", "0,20",
        "--subsets", "8", "--orders", "2", "--bif", "chains=2,draws=10,burn_in=5", "--no-peers"]


def test_horizons_tile_the_run() -> None:
    assert [TINY.horizon(t, "interval") for t in TINY.checkpoints] == [20, 20]
    assert [TINY.horizon(t, "rest") for t in TINY.checkpoints] == [40, 20]


def test_continuing_from_a_checkpoint_restores_weights_and_momentum(tmp_path, monkeypatch) -> None:
    """Continued on all the data in the run's own batch order, a checkpoint reaches the next one exactly."""
    monkeypatch.setattr(lds_midtrain, "CACHE", tmp_path)
    data = lds_midtrain.load_data(TINY)
    run = lds_midtrain.run_and_truth(TINY, data, log=lambda _: None)
    weights, momentum = run["checkpoints"][20]
    assert momentum is not None and all(b.abs().sum() > 0 for b in momentum)
    batches = lds_midtrain.positions(TINY.n_train, TINY.total_steps, TINY.batch, seed=99)
    end, _, _ = lds_midtrain.train(TINY, weights, momentum, data.x_train[None], data.y_train[None], batches[20:])
    for a, b in zip(end, run["checkpoints"][40][0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    without_momentum, _, _ = lds_midtrain.train(TINY, weights, None, data.x_train[None], data.y_train[None],
                                                batches[20:])
    assert not torch.equal(without_momentum[0], end[0])
    assert run["truth"]["interval"][0].shape == (8, 2, 6) and run["truth"]["rest"][20] is run["truth"]["interval"][20]


def test_stacked_continuation_equals_each_model_alone() -> None:
    data = lds_midtrain.load_data(TINY)
    params = [p.expand(3, *p.shape[1:]) for p in lds_midtrain.init_params(TINY)]
    index = torch.stack([m.nonzero().flatten() for m in data.masks[:3]])
    order = lds_midtrain.positions(index.shape[1], 10, TINY.batch, seed=5)
    together, _, _ = lds_midtrain.train(TINY, params, None, data.x_train[index], data.y_train[index], order)
    alone, _, _ = lds_midtrain.train(TINY, [p[1:2] for p in params], None, data.x_train[index[1:2]],
                                     data.y_train[index[1:2]], order)
    for t, a in zip(together, alone, strict=True):
        torch.testing.assert_close(t[1], a[0], rtol=1e-5, atol=1e-6)


def test_tiny_benchmark_end_to_end(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(lds_midtrain, "CACHE", tmp_path / "cache")
    report = lds_midtrain.main([*ARGV, "--out", str(tmp_path / "rows.json")])
    assert len(list((tmp_path / "cache").iterdir())) == 1
    table = report["table"]
    bif = table["BIF, callback defaults, horizon interval"]
    assert bif[0]["details"]["horizon_steps"] == 20
    assert bif[20]["details"]["damping"] == pytest.approx((1 - 0.9) / (0.05 * 20))
    for method, entry in table.items():
        if not method.startswith("ceiling"):
            assert all(math.isfinite(entry[s]["lds"]["interval"]) for s in TINY.checkpoints), method
    assert table["TracIn over the continuation (oracle), interval"][0]["lds"]["interval"] > 0.3
    assert (tmp_path / "rows.json").exists()
