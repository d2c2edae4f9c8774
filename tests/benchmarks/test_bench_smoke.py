"""The snapshot benchmark's smoke mode runs end to end and reports sane numbers (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def threads() -> list[str]:
    """Keep the suite's thread count (the benchmark sets its own)."""
    return ["--threads", str(torch.get_num_threads())]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("bench_snapshot", BENCHMARKS / "bench_snapshot.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_smoke_run_writes_a_report_where_ours_matches_the_reference_loop(bench, tmp_path: Path) -> None:
    methods = ["ours", "reference"]
    if importlib.util.find_spec("devinterp") is not None:
        methods.append("devinterp")
    reports = bench.main(["--smoke", "--no-warmup", "--device", "cpu", "--workload", "mlp", "gpt-small",
                          "--methods", *methods, "--out", str(tmp_path), *threads()])
    assert [r["workload"]["name"] for r in reports] == ["mlp", "gpt-small"]
    for report in reports:
        path = tmp_path / f"snapshot-{report['workload']['name']}-cpu-smoke.json"
        assert json.loads(path.read_text())["methods"].keys() == set(methods)
        assert report["flops"]["total"] == report["flops"]["sgld"] + report["flops"]["evaluation"] > 0
        ours = report["methods"]["ours"]
        assert ours["finite"] and ours["wall_s"] > 0 and ours["peak_memory_bytes"] > 0
        assert ours["mfu"] is None  # no peak given on CPU
        assert ours["speedup_vs_reference"] > 0
        # Same per-chain minibatches and noise: the fast path reproduces the plain loop.
        assert ours["agreement_vs_reference"]["max_rel_diff"] < 1e-3


def test_flop_count_matches_the_textbook_formula(bench) -> None:
    from workloads import WORKLOADS, build_model, flops, matmul_params, parameter_count

    gpt = WORKLOADS["gpt-small"]
    assert 3.3e6 < parameter_count(build_model(gpt)) < 3.5e6
    assert 28e6 < parameter_count(build_model(WORKLOADS["gpt-29m"])) < 30e6
    n = matmul_params(gpt)
    per_token = 2 * n + 4 * gpt.layers * gpt.context * gpt.width
    expected_sgld = 4 * 100 * 3 * per_token * 32 * 64
    expected_eval = 4 * 100 * per_token * 320 * 64
    work = flops(gpt)
    assert work["sgld"] == expected_sgld and work["evaluation"] == expected_eval


def test_peak_flops_gives_an_mfu(bench, tmp_path: Path) -> None:
    (report,) = bench.main(["--smoke", "--no-warmup", "--device", "cpu", "--workload", "mlp", "--methods", "ours",
                            "--peak-flops", "1e12", "--out", str(tmp_path), *threads()])
    ours = report["methods"]["ours"]
    assert ours["mfu"] == pytest.approx(ours["flop_per_s"] / 1e12)
