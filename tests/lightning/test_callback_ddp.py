"""BIFCallback under 2-process DDP (gloo on CPU), run as a subprocess with a timeout so nothing hangs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from scripts.toy import ToyClassifier, class_losses, toy_dataset, tracked_sets

from lightning_bif import SGLDConfig, estimate_bif, open_log

SCRIPTS = Path(__file__).parents[1] / "scripts"


def logged_config(log) -> SGLDConfig:
    """The stored config with the last snapshot's horizon (H, η, μ) as the callback used it."""
    return SGLDConfig.from_dict(log.config["sgld"]).replace(
        horizon_steps=float(log.horizon_steps[-1]), learning_rate=float(log.learning_rate[-1]),
        momentum=float(log.momentum[-1]))


def test_ddp_ranks_share_the_chains_rank_zero_writes_and_the_result_matches_one_process(tmp_path):
    """Also: a snapshot that raises on rank 1 only is recorded as failed, and training goes on on both ranks;
    step-size calibration (rank 0, broadcast) leaves the ranks agreeing on the step size."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(SCRIPTS / "ddp_train.py"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["global_step"] for r in reports] == [4, 4]
    assert all(len(r["losses"]) == 4 and np.isfinite(r["losses"]).all() for r in reports)
    assert reports[0]["losses"] != reports[1]["losses"]  # each rank trained on its own shard
    assert [r["opened_log"] for r in reports] == [True, False]
    assert [r["tensorboard"] for r in reports] == [True, False]
    assert reports[0]["step_size"] == reports[1]["step_size"]
    assert [r["collectives"] for r in reports] == [[0, 2], [1, 2]]  # the snapshot unit ran on the DDP strategy
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["bif.h5", "tokens.h5"]
    # Rank 0 alone writes TensorBoard: its run and the run of the one train group ("all").
    tensorboard = tmp_path / "tb"
    events = sorted(str(p.parent.relative_to(tensorboard)) for p in tensorboard.rglob("events.out.tfevents.*"))
    assert events == ["version_0", "version_0/train_all"]

    with open_log(tmp_path / "bif.h5") as log:
        assert log.steps.tolist() == [0, 2, 4]
        assert log.status.tolist() == ["ok", "failed", "ok"]  # rank 1 failed at step 2: recorded, nobody hung
        assert "another rank" in log.message[1]
        influence, stderr, stored_step_size = log.influence[-1], log.stderr[-1], float(log.step_size[-1])
        assert log.calibration[0] is not None
        config = logged_config(log)
    assert config.chains == 4 and config.horizon_steps == 2  # the default horizon: to the end, 2 steps on

    # The last snapshot, recomputed in this one process from the same weights with all chains.
    model = ToyClassifier()
    model.load_state_dict(torch.load(tmp_path / "final.pt"))
    data = toy_dataset()
    train, probes = tracked_sets(data)
    single = estimate_bif(model, ToyClassifier.per_example_loss, train, probes, data=data, config=config)
    assert single.config.step_size == stored_step_size  # the horizon's ε (and γ) resolve alike on both sides
    np.testing.assert_allclose(influence, single.influence.numpy(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(stderr, single.stderr.numpy(), rtol=1e-4, atol=1e-9)

    # Per-token sums are merged across the ranks like the rest: the same token influence as one process.
    with open_log(tmp_path / "tokens.h5") as log:
        assert log.steps.tolist() == [4] and log.tokens == 3 and log.status.tolist() == ["ok"]
        token_influence, token_se = log.token_influence[-1], log.token_stderr[-1]
        config = logged_config(log)
    assert config.per_token and config.chains == 4 and config.horizon_steps == 4  # no earlier snapshot: from step 0
    single = estimate_bif(model, ToyClassifier.per_example_loss, train, probes, probe_fn=class_losses, data=data,
                          config=config)
    np.testing.assert_allclose(token_influence, single.token_influence.numpy(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(token_se, single.token_stderr.numpy(), rtol=1e-4, atol=1e-9)
