"""CI-sized checks of the LDS suite (benchmarks/lds_suite.py) and its new set-up (benchmarks/lds_markov.py)."""

import dataclasses
import json
import math
import sys

import pytest
import torch
from helpers import load_benchmark

from lightning_bif.tuning import locality, localization, minibatch

pytest.importorskip("sklearn")

lds_suite = load_benchmark("lds_suite")
# Kept here: other smoke tests drop their benchmark modules from sys.modules when they finish.
lds_markov, lds_midtrain = sys.modules["lds_markov"], sys.modules["lds_midtrain"]
lds_digits, lds_common = sys.modules["lds_digits"], sys.modules["lds_common"]

TINY = lds_markov.Setup(n_train=32, n_probes=6, steps=30, checkpoints=(10, 20), horizon=10, subsets=4, orders=2)


def test_the_default_set_ups_keep_the_cache_file_names_and_subsets_keep_half() -> None:
    """benchmarks/cache/ holds ground truths named by these keys: a changed key would recompute them (hours)."""
    keys = {module.__name__: module.Setup().key() for module in (lds_digits, lds_markov, lds_midtrain)}
    assert keys == {"lds_digits": "b87d3e104bde", "lds_markov": "592288cda40e", "lds_midtrain": "880d30db6cd3"}
    assert lds_markov.Setup(subsets=4).key() != keys["lds_markov"]
    masks = lds_common.subset_masks(5, 10, 0.5, torch.Generator().manual_seed(0))
    assert masks.shape == (5, 10) and masks.sum(1).tolist() == [5] * 5 and len({tuple(m.tolist()) for m in masks}) > 1


def test_recipes_are_typed_from_the_config_fields() -> None:
    name, fields = lds_suite.parse_recipe("fast=chains=32,step_size=2e-5,batch_size=None,preconditioner=lowrank")
    assert name == "fast"
    assert fields == {"chains": 32, "step_size": 2e-5, "batch_size": None, "preconditioner": "lowrank"}
    assert isinstance(fields["chains"], int)
    with pytest.raises(ValueError, match="not key=value with a field of SGLDConfig"):
        lds_suite.parse_recipe("bad=chain=3")
    with pytest.raises(ValueError, match="NAME=key=value"):
        lds_suite.parse_recipe("fast")
    with pytest.raises(ValueError, match="not key=value"):  # the name is missing: "chains" is taken for it
        lds_suite.parse_recipe("chains=3")
    with pytest.raises(ValueError, match="cannot read"):
        lds_suite.parse_recipe("bad=preconditioner=kfac")


def test_continuing_a_checkpoint_restores_weights_and_adam_moments(tmp_path, monkeypatch) -> None:
    """Continued on all data in the run's own batch order, checkpoint 10 reaches checkpoint 20 exactly."""
    monkeypatch.setattr(lds_markov, "CACHE", tmp_path)
    data = lds_markov.load_data(TINY)
    run = lds_markov.run_and_truth(TINY, data, log=lambda _: None)
    batches = lds_markov.batch_positions(TINY.n_train, TINY.steps, TINY, seed=99)
    end, _ = lds_markov.train_stacked(TINY, run["checkpoints"][10], data.train[None], batches[10:20])
    for name, value in end.items():
        torch.testing.assert_close(value, run["checkpoints"][20][0][name], rtol=0, atol=0)
    fresh = (run["checkpoints"][10][0], [{} for _ in run["checkpoints"][10][1]])
    without_moments, _ = lds_markov.train_stacked(TINY, fresh, data.train[None], batches[10:20])
    assert not torch.equal(without_moments["head.weight"], end["head.weight"])
    assert run["truth"][10].shape == (4, 2, 6)


def test_stacked_training_equals_each_model_alone() -> None:
    data = lds_markov.load_data(TINY)
    index = torch.stack([m.nonzero().flatten() for m in data.masks[:3]])
    params, _ = torch.func.stack_module_state([lds_markov.new_model(TINY)])
    start = ({k: v.detach() for k, v in params.items()}, [{} for _ in params])
    order = lds_markov.batch_positions(index.shape[1], 5, TINY, seed=5)
    together, _ = lds_markov.train_stacked(TINY, start, data.train[index], order)
    alone, _ = lds_markov.train_stacked(TINY, start, data.train[index[1:2]], order)
    for name, value in alone.items():
        torch.testing.assert_close(together[name][1], value[0], rtol=1e-4, atol=1e-6)


def test_default_config_is_the_callbacks(tmp_path, monkeypatch) -> None:
    """The default BIF reads λ and the horizon's (η, μ) from the optimizer as BIFCallback does."""
    monkeypatch.setattr(lds_markov, "CACHE", tmp_path)
    problem = lds_suite.markov_problems(TINY)[0]
    config = lds_suite.callback_config(problem)
    found = lds_suite.optimizer_step(problem.optimizer)
    assert config.weight_decay == TINY.weight_decay
    assert config.horizon_steps == TINY.horizon
    assert config.learning_rate == pytest.approx(found.learning_rate) and config.momentum == pytest.approx(0.9)
    problem.optimizer.param_groups[0]["lr"] = 0.0  # the end of a cosine schedule: no step, no horizon
    with pytest.warns(UserWarning, match="has no horizon"):
        assert lds_suite.callback_config(problem).horizon_steps is None


TINY_MIDTRAIN = dict(n_train=60, n_probes=6, hidden=6, total_steps=40, checkpoints=(0, 20), subsets=8, orders=2)


def test_tracin_is_minus_the_learning_rate_times_the_gradient_dot_product_summed(tmp_path, monkeypatch) -> None:
    """One step of TracIn is η × the gradient dot product's scores (same sign: positive = harmful)."""
    monkeypatch.setattr(lds_midtrain, "CACHE", tmp_path)
    setup = lds_midtrain.Setup(**TINY_MIDTRAIN)
    problem = lds_suite.midtrain_problems(setup, "midtrain")[1]
    grad_dot = lds_suite.classical_scores(problem)[0]
    assert grad_dot.method == lds_suite.GRAD_DOT
    steps = problem.continuation()
    assert len(steps) == setup.horizon(20, "interval") == 20 and {lr for _, lr in steps} == {setup.lr}
    # The continuation starts at the checkpoint's weights and follows the full-data run (its cached trajectory).
    run = lds_midtrain.run_and_truth(setup, lds_midtrain.load_data(setup))
    sizes = [p[0].numel() for p in run["checkpoints"][0][0]]
    for t in (0, 7, 19):
        at = lds_midtrain.as_module(setup, [w.view(1, *p.shape[1:]) for w, p in zip(
            run["trajectory"][20 + t].split(sizes), run["checkpoints"][0][0], strict=True)])
        torch.testing.assert_close(steps[t][0], torch.cat([p.detach().reshape(-1) for p in at.parameters()]))
    torch.testing.assert_close(steps[0][0], torch.cat([p.detach().reshape(-1) for p in problem.model.parameters()]))

    one_step = dataclasses.replace(problem, continuation=lambda: steps[:1])
    tracin = lds_suite.tracin_scores(one_step, every=1)
    torch.testing.assert_close(tracin.scores, setup.lr * grad_dot.scores)
    # One block of all 20 steps: the gradients at the checkpoint, weighted by Σ η_t.
    block = lds_suite.tracin_scores(problem, every=len(steps))
    torch.testing.assert_close(block.scores, 20 * setup.lr * grad_dot.scores)
    assert block.details["evaluated"] == 1
    truth = problem.losses.mean(1)
    full = lds_suite.tracin_scores(problem, every=1)
    assert lds_digits.lds(full.scores, problem.masks, truth)[0] > 0.3  # a flipped sign would score below 0


def test_tiny_suite_end_to_end(tmp_path) -> None:
    out = tmp_path / "rows.json"
    report = lds_suite.main(["--tiny", "--cache", str(tmp_path / "cache"), "--setups",
                             "digits,markov,midtrain,momentum-late,regression", "--no-kronfluence", "--default",
                             "chains=2,draws=8", "--bif", "two=chains=2,draws=4", "--seeds", "2", "--out", str(out)])
    assert json.loads(out.read_text())["roles"] == {"digits": "held out", "markov": "held out",
                                                    "midtrain": "development", "momentum-late": "held out",
                                                    "regression": "held out"}
    for setup in ("digits", "regression"):  # their cosine schedules end at lr 0: the run itself is the horizon
        (rows,) = report["setups"][setup].values()
        assert rows[lds_suite.DEFAULT]["details"]["config"]["horizon_source"].startswith("run damping 1/S")
    assert list(report["setups"]["midtrain"]) == [0, 20]
    for setup, checkpoints in report["setups"].items():
        for rows in checkpoints.values():
            for method in (lds_suite.DEFAULT, "BIF recipe two", lds_suite.GRAD_DOT, lds_suite.BEST_IF):
                assert math.isfinite(rows[method]["lds"]), (setup, method)
            assert rows["BIF recipe two"]["details"]["config"]["draws"] == 4
            per_seed = rows[lds_suite.DEFAULT]["details"]["lds_per_seed"]
            assert len(per_seed) == 2 and rows[lds_suite.DEFAULT]["lds"] == pytest.approx(sum(per_seed) / 2)
            # An attribution with the wrong sign or misaligned subsets would score near or below 0.
            assert rows[lds_suite.BEST_IF]["lds"] > 0.3, setup
        assert set(report["targets"][setup]) >= {"beats_gradient_dot", "split_half_min", "ratio_to_best_if_min"}
    assert report["setups"]["markov"][20][lds_suite.DEFAULT]["details"]["horizon_steps"] == 10
    # TracIn over the continuation: only where the ground truth continues training from a checkpoint.
    for setup in ("markov", "midtrain", "momentum-late"):
        for rows in report["setups"][setup].values():
            assert rows[lds_suite.TRACIN]["lds"] > 0, setup  # the gradient dot product's sign
            assert rows[lds_suite.TRACIN]["cpu_s"] > 0
        assert "at_least_tracin" in report["targets"][setup]
        assert report["targets"][setup]["margin_vs_tracin_min"] == pytest.approx(min(
            r[lds_suite.DEFAULT]["lds"] - r[lds_suite.TRACIN]["lds"] for r in report["setups"][setup].values()))
    for setup in ("digits", "regression"):
        (rows,) = report["setups"][setup].values()
        assert lds_suite.TRACIN not in rows and "at_least_tracin" not in report["targets"][setup]


def test_localization_sweep_runs_each_factor_and_restores_the_constant(tmp_path, monkeypatch) -> None:
    from lightning_bif.tuning import localization

    sweep = load_benchmark("localization_sweep")
    monkeypatch.setattr(lds_midtrain, "CACHE", tmp_path)
    before = localization.LOCALIZATION_FACTOR
    report = sweep.main(["--setup", "midtrain", "--tiny", "--factors", "0,30", "--seeds", "1",
                         "--out", str(tmp_path / "sweep.json")])
    assert localization.LOCALIZATION_FACTOR == before
    assert set(report["rows"]) == {"0", "30"}
    gammas = {c: [r["localization"] for r in row["checkpoints"].values()] for c, row in report["rows"].items()}
    assert all(high > low for low, high in zip(gammas["0"], gammas["30"], strict=True))  # c = 30 raises every γ
    assert all(math.isfinite(r["lds"]) for row in report["rows"].values() for r in row["checkpoints"].values())
    assert json.loads((tmp_path / "sweep.json").read_text())["setup"] == "midtrain"


def test_the_rule_sweep_runs_every_sweep_and_restores_the_constants(tmp_path, monkeypatch) -> None:
    rule_sweep = load_benchmark("rule_sweep")
    before = (locality.NONLINEARITY_LIMIT, minibatch.GRADIENT_NOISE_RATIO)
    rows = rule_sweep.main(["--setups", "midtrain", "--tiny", "--levers", "--multiples", "1,10", "--limits", "1e9,1e-3",
                            "--ratios", "0.1", "--factors", "1,3", "--before", "--out", str(tmp_path / "rows.json")])
    assert (locality.NONLINEARITY_LIMIT, minibatch.GRADIENT_NOISE_RATIO) == before
    assert localization.LOCALIZATION_FACTOR == 1.0
    assert len(rows) == 2 * (1 + 4 + 2 + 1 + 2) and json.loads((tmp_path / "rows.json").read_text()) == rows
    assert all(r["nbeta"] == r["n"] and r["batch_size"] == 64 for r in rows if r["sweep"] == "before")
    original, caps = rule_sweep.estimator_module.largest_minibatch, []
    score = rule_sweep.lds_suite.bif_score
    monkeypatch.setattr(rule_sweep.lds_suite, "bif_score", lambda *a: caps.append(
        rule_sweep.estimator_module.largest_minibatch(100, 1000)) or score(*a))
    capped = rule_sweep.main(["--setups", "midtrain", "--tiny", "--limits", "1e9", "--cap", "8"])
    assert caps == [8, 8] and all(r["cap"] == 8 for r in capped)  # every estimate ran with the cap
    assert rule_sweep.estimator_module.largest_minibatch is original  # restored
    levers = [r for r in rows if r["sweep"] == "levers"]
    assert {(r["multiple"], r["batch"]) for r in levers} == {(1.0, 64), (10.0, 64), (1.0, None), (10.0, None)}
    assert all(r["nbeta"] == r["multiple"] * r["n"] for r in levers)  # nβ given: the rule is off
    unlimited = [r for r in rows if r["sweep"] == "limit" and r["limit"] == 1e9]
    assert all(r["nbeta"] == r["n"] and r["nonlinearity"] is not None for r in unlimited)
    assert all(math.isfinite(r["lds"]) for r in rows)
