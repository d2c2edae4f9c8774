"""The hierarchical example: influence between items changes sign with the stages of learning.

Trains the two-layer linear network of ``examples/hierarchical.py`` with ``BIFCallback`` through
the first three stages (living thing, animal vs plant, mammal vs bird) and checks the BIF read
back from the log against the stages found from the learned singular values.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_bif import open_log

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hierarchical.py"
#: Dense around the mammal/bird stage (steps ~114-130 for seed 0) so the sign change is located to 5 steps.
SNAPSHOTS = (90, 100, 110, 115, 120, 125, 130, 135, 140, 160)


def _load_example():
    spec = importlib.util.spec_from_file_location("hierarchical_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _load_example()


@pytest.fixture(scope="module")
def run(example, tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("hierarchical")
        result = example.train(out, steps=max(SNAPSHOTS), snapshot_steps=SNAPSHOTS, tensorboard=False)
    finally:
        torch.set_num_threads(threads)
    return result, example.pair_curves(result.log_path)


def _between(curves, name, first, last):
    """Influence and stderr of pair ``name`` at the snapshots with ``first <= step <= last``."""
    chosen = (curves["step"] >= first) & (curves["step"] <= last)
    assert chosen.any(), f"no snapshot between steps {first} and {last}"
    return curves[name][chosen], curves[f"{name} stderr"][chosen]


def test_modes_are_the_singular_modes_of_the_data(example):
    inputs, features, _ = example.hierarchy()
    item_vectors, feature_vectors, singular_values, levels = example.modes()
    correlation = features.T @ inputs / len(example.ITEMS)
    # u_kᵀ Σ v_l = σ_k δ_kl: the Haar vectors diagonalize the input-output correlation.
    projected = feature_vectors @ correlation @ item_vectors.T
    np.testing.assert_allclose(projected.numpy(), np.diag(singular_values.numpy()), atol=1e-6)
    per_level = [singular_values[levels == level].max().item() for level in range(len(example.LEVELS))]
    assert per_level == sorted(per_level, reverse=True)


def test_levels_are_learned_in_order_of_singular_value(run):
    result, _ = run
    living, kingdom, klass = result.stages[:3]
    assert living.end < kingdom.start and kingdom.end < klass.start, "stages overlap"
    for stage in (living, kingdom, klass):
        assert stage.start < stage.middle < stage.end
        assert stage.loss_after < stage.loss_before - 0.2, f"no loss drop during {stage.name}"
    assert result.stages[3].end is None, "item-specific features are learned after the run ends"


def test_dog_to_cat_turns_harmful_during_the_mammal_bird_stage(example, run):
    result, curves = run
    _, kingdom, klass = result.stages[:3]
    # While the network tells animals from plants, training on dog helps cat (negative BIF) ...
    before, before_se = _between(curves, "dog->cat", kingdom.end, klass.start)
    assert (before < -2 * before_se).all(), before / before_se
    # ... once mammals are told from birds, all dog and cat still differ on is what tells them apart.
    after, after_se = _between(curves, "dog->cat", klass.end, max(SNAPSHOTS))
    assert (after > 2 * after_se).all(), after / after_se
    flip = example.sign_change(curves["step"], curves["dog->cat"], curves["dog->cat stderr"])
    assert flip is not None and klass.start <= flip <= klass.end, (flip, klass)
    # The log finds the same turn among all 64 pairs.
    with open_log(result.log_path) as log:
        dog, cat = log.position(train=example.ITEMS.index("dog")), log.position(probe=example.ITEMS.index("cat"))
        turns = [c for c in log.sign_changes(z=2) if (c.train, c.probe, c.turns) == (dog, cat, "harmful")]
    assert [c.crossing for c in turns] == [flip]
    assert turns[0].z_before < -2 and turns[0].z_after > 2


def test_dog_to_sparrow_is_harmful_between_the_kingdom_and_class_stages(run):
    result, curves = run
    _, kingdom, klass = result.stages[:3]
    between, between_se = _between(curves, "dog->sparrow", kingdom.end, klass.start)
    assert (between > 2 * between_se).all(), between / between_se
    # Once the mammal/bird stage separates them most of the harm is gone.
    after, _ = _between(curves, "dog->sparrow", klass.end, max(SNAPSHOTS))
    assert after.max() < 0.5 * between.min(), (after, between)
