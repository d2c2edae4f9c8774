"""Wall time, FLOP/s, MFU and peak memory of one BIF snapshot: ours vs a plain loop vs devinterp.

The same BIF work (chains x draws of localized SGLD from the same weights, the per-sequence
losses of the tracked training sequences and the probes at every draw, then -Cov over all
draws) runs through

  ours        lightning_bif.estimate_bif (fp32; ``ours-bf16`` adds evaluation + gradients under
              bf16 autocast)
  reference   a plain loop in this file: one chain at a time, eager fp32, torch.autograd SGLD
  devinterp   devinterp 2.0.1's ``devinterp.slt.bif.bif`` (only when it is installed:
              ``pip install -e ".[bench]"``)

with the same chains, draws, step size, nβ, localization, minibatch size and evaluation set: equal work,
devinterp's arguments mapped onto ``SGLDConfig`` as docs/how-it-works.md ("Coming from devinterp") tabulates.
``ours`` and ``reference`` also draw the same minibatches and noise (per-chain generators seeded
by ``lightning_bif.estimation.sampler.chain_seed``), so their influence matrices agree up to float rounding.
devinterp draws its own: every chain its own minibatch order (``match_sampling_input_ids_across_chains=False``,
as ours; its default gives all chains one order) and chain c seeded ``init_seed + c`` with ``init_seed =
SEED · chains``. Its influence matrix is another Monte-Carlo draw of the same estimator, so its
``agreement_vs_devinterp`` is only as high as the workload's seed-to-seed agreement (benchmarks/README.md,
"Ours and devinterp at equal work").

Workloads (``benchmarks/workloads.py``): ``gpt-small`` (3.4M parameters, 64-token context),
``gpt-29m`` (vocab 4096, 8 layers, d=512, 128-token context), ``mlp`` (modular addition, CPU
sized). ``--smoke`` shrinks every workload so a CPU run takes seconds.

Usage:
    python benchmarks/bench_snapshot.py --workload mlp gpt-small --smoke
    python benchmarks/bench_snapshot.py --device cuda --workload gpt-small gpt-29m
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm: devinterp's progress bars

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import (
    WORKLOADS,
    Workload,
    build_model,
    flops,
    make_data,
    parameter_count,
    pretrain,
    sequence_loss,
    smoke,
    token_losses,
)

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.estimation.sampler import chain_seed

H100_BF16_DENSE_FLOPS = 989e12
SEED = 0
EVAL_BATCH = 1024


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator stats; the process's peak RSS on Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # no reset: the reported peak RSS is the process's peak so far


def peak_memory(device: torch.device) -> int:
    """Peak bytes since :func:`reset_peak_memory`: allocated tensors on CUDA, resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def config_for(workload: Workload, autocast: str | None = None) -> SGLDConfig:
    """The estimator configuration of a workload: no burn-in, thin 1, nβ = size of the SGLD data, one round."""
    return SGLDConfig(chains=workload.chains, draws=workload.draws, burn_in=0, thin=1,
                      step_size=workload.step_size, nbeta=float(workload.data),
                      localization=workload.localization, batch_size=workload.batch_size,
                      eval_batch_size=EVAL_BATCH, seed=SEED, autocast=autocast,
                      preconditioner="none", control_variates=False,  # the reference loop is plain SGLD
                      target_split_half=None)  # fixed work: exactly the workload's chains (no rounds)


def run_ours(model: nn.Module, workload: Workload, data: torch.Tensor, train: torch.Tensor,
             probes: torch.Tensor, device: torch.device, autocast: str | None = None) -> torch.Tensor:
    """``estimate_bif`` on the workload; returns the influence ``[P, N]``."""
    result = estimate_bif(model, sequence_loss, (train,), (probes,), data=(data,),
                          config=config_for(workload, autocast), device=device)
    return result.influence.double()


def run_reference(model: nn.Module, workload: Workload, data: torch.Tensor, train: torch.Tensor,
                  probes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The plain loop: one chain at a time, eager fp32 autograd, covariance at the end."""
    eps, gamma, nbeta = workload.step_size, workload.localization, float(workload.data)
    chains, draws, m = workload.chains, workload.draws, workload.batch_size
    evaluated = torch.cat([train, probes]).to(device)
    losses = torch.empty(chains, draws, len(evaluated), dtype=torch.float64)
    for c in range(chains):
        chain = copy.deepcopy(model)
        params = [p for p in chain.parameters() if p.requires_grad]
        center = [p.detach().clone() for p in params]
        sizes = [p.numel() for p in params]
        index_gen = torch.Generator().manual_seed(chain_seed(SEED, c))
        noise_gen = torch.Generator(device=device).manual_seed(chain_seed(SEED, c) + 1)
        for draw in range(draws):
            rows = data[torch.randint(len(data), (m,), generator=index_gen)].to(device)
            loss = sequence_loss(chain, [rows]).mean()
            grads = torch.autograd.grad(loss, params)
            noise = torch.randn(sum(sizes), generator=noise_gen, device=device).split(sizes)
            with torch.no_grad():
                for p, g, p0, z in zip(params, grads, center, noise, strict=True):
                    drift = nbeta * g + gamma * (p - p0)
                    p.add_(-eps / 2 * drift + math.sqrt(eps) * z.view_as(p))
                per_sequence = torch.cat([sequence_loss(chain, [b]) for b in evaluated.split(EVAL_BATCH)])
                losses[c, draw] = per_sequence.double().cpu()
    flat = losses.reshape(chains * draws, -1)
    flat = flat - flat.mean(dim=0)
    t, q = flat[:, :len(train)], flat[:, len(train):]
    return -(q.T @ t) / (chains * draws - 1)


def run_devinterp(model: nn.Module, workload: Workload, data: torch.Tensor, train: torch.Tensor,
                  probes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """devinterp 2.0.1 ``bif()`` on the same work, mapped back to our ``[P, N]`` order."""
    from datasets import Dataset as HFDataset
    from devinterp.slt.bif import bif

    def hf(tokens: torch.Tensor) -> HFDataset:
        return HFDataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")

    m = workload.batch_size
    if len(train) % m or len(probes) % m:
        raise ValueError("devinterp evaluates whole batches: train and probes must be multiples of batch_size.")
    output = Path(tempfile.mkdtemp(prefix="bench-devinterp-"))
    try:
        result = bif(
            model, hf(data),
            {"train": (hf(train), len(train) // m), "probes": (hf(probes), len(probes) // m)},
            lr=workload.step_size, n_beta=float(workload.data), localization=workload.localization,
            num_chains=workload.chains, num_draws=workload.draws, batch_size=m, num_burnin_steps=0,
            num_steps_bw_draws=1, num_init_loss_batches=1, init_seed=SEED * workload.chains,
            match_sampling_input_ids_across_chains=False, device=str(device),
            bif_device=str(device), correlation_method="sequence", compute_covariance=True,
            loss_fn=token_losses, output_path=output / "samples.zarr",
        )
        cov = torch.as_tensor(result["influences"].values, dtype=torch.float64)
        ids = torch.as_tensor(result["input_ids"].values)
    finally:
        shutil.rmtree(output, ignore_errors=True)
    order = {}
    for row, seq in enumerate(ids.tolist()):
        order.setdefault(tuple(seq), []).append(row)
    position = {key: rows[0] for key, rows in order.items()}
    probe_rows = [position[tuple(s)] for s in probes.tolist()]
    train_rows = [position[tuple(s)] for s in train.tolist()]
    return -cov[probe_rows][:, train_rows]


def measure(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float, int]:
    """Run ``fn`` once: its output, wall seconds and peak memory."""
    synchronize(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start, peak_memory(device)


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How close two influence matrices are: Pearson r and max |a - b| / max |b|."""
    a, b = a.flatten().double(), b.flatten().double()
    ac, bc = a - a.mean(), b - b.mean()
    r = float((ac * bc).sum() / (ac.norm() * bc.norm()).clamp_min(1e-300))
    return {"pearson_r": r, "max_rel_diff": float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))}


def bench_workload(workload: Workload, device: torch.device, methods: list[str], pretrain_steps: int,
                   peak_flops: float | None, warmup: bool) -> dict[str, object]:
    """Run every method on one workload and collect the numbers."""
    torch.manual_seed(SEED)
    model = build_model(workload).to(device)
    data, train, probes = make_data(workload, SEED)
    pretrain(model, data, pretrain_steps, device, SEED)
    model.eval()
    work = flops(workload)
    runners = {
        "ours": lambda wl, m: run_ours(m, wl, data, train, probes, device),
        "ours-bf16": lambda wl, m: run_ours(m, wl, data, train, probes, device, autocast="bf16"),
        "reference": lambda wl, m: run_reference(m, wl, data, train, probes, device),
        "devinterp": lambda wl, m: run_devinterp(m, wl, data, train, probes, device),
    }
    rows: dict[str, dict[str, object]] = {}
    outputs: dict[str, torch.Tensor] = {}
    for method in methods:
        if warmup:  # lazy initialisation (CUDA context, kernels, vmap) is not a snapshot's cost
            runners[method](replace(workload, draws=2), model)  # the fewest draws SGLDConfig accepts
        influence, seconds, memory = measure(lambda method=method: runners[method](workload, model), device)
        outputs[method] = influence
        rows[method] = {
            "wall_s": seconds,
            "flop_per_s": work["total"] / seconds,
            "mfu": work["total"] / seconds / peak_flops if peak_flops else None,
            "peak_memory_bytes": memory,
            "finite": bool(torch.isfinite(influence).all()),
        }
    for method, row in rows.items():
        for base in ("reference", "devinterp"):
            if base in rows and base != method:
                row[f"speedup_vs_{base}"] = rows[base]["wall_s"] / row["wall_s"]
        for base in ("reference", "devinterp"):
            if base in outputs and base != method:
                row[f"agreement_vs_{base}"] = agreement(outputs[method], outputs[base])
    return {
        "workload": workload.to_dict(),
        "parameters": parameter_count(model),
        "flops": work,
        "pretrain_steps": pretrain_steps,
        "methods": rows,
    }


def machine(device: torch.device, threads: int) -> dict[str, object]:
    """What the numbers were measured on."""
    info: dict[str, object] = {
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": threads,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_report(report: dict[str, object]) -> None:
    """One line per method: wall time, speed-ups, FLOP/s, MFU, peak memory, agreement."""
    wl = report["workload"]
    print(f"\n{wl['name']}: {report['parameters']:,} parameters, {wl['chains']} chains x {wl['draws']} draws, "
          f"batch {wl['batch_size']}, {wl['train']}+{wl['probes']} sequences per draw, "
          f"{report['flops']['total']:.3g} FLOP")
    header = (f"{'method':<10} {'wall s':>8} {'x ref':>7} {'x devi':>7} {'GFLOP/s':>9} {'MFU':>7} "
              f"{'peak MiB':>9} {'r vs ref':>8}")
    print(header)
    for method, row in report["methods"].items():
        def cell(key: str, fmt: str, row: dict = row) -> str:
            value = row.get(key)
            return format(value, fmt) if isinstance(value, float) else "-"
        ref_r = row.get("agreement_vs_reference", {}).get("pearson_r")
        print(f"{method:<10} {row['wall_s']:>8.3f} {cell('speedup_vs_reference', '7.2f'):>7} "
              f"{cell('speedup_vs_devinterp', '7.2f'):>7} {row['flop_per_s'] / 1e9:>9.2f} "
              f"{cell('mfu', '7.2%'):>7} {row['peak_memory_bytes'] / 2**20:>9.1f} "
              f"{format(ref_r, '8.4f') if ref_r is not None else '-':>8}")


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Parse arguments, run the workloads, print and write the reports."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=["mlp", "gpt-small"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", choices=["ours", "ours-bf16", "reference", "devinterp"],
                        help="default: ours, reference, devinterp when installed; ours-bf16 too on CUDA")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds on one CPU thread")
    parser.add_argument("--draws", type=int, default=None, help="override the draws per chain (FLOPs follow)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--pretrain", type=int, default=None,
                        help="AdamW steps before the snapshot (default 0 with --smoke, else 100)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help=f"device peak for MFU (default on CUDA: H100 bf16 dense {H100_BF16_DENSE_FLOPS:.3g})")
    parser.add_argument("--no-warmup", action="store_true", help="time the first call (default: warm up first)")
    parser.add_argument("--sync-debug", action="store_true",
                        help="CUDA: warn at every host synchronisation (torch.cuda.set_sync_debug_mode)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = args.methods
    if methods is None:
        methods = ["ours"] + (["ours-bf16"] if device.type == "cuda" else []) + ["reference"]
        if importlib.util.find_spec("devinterp") is not None:
            methods.append("devinterp")
    peak = args.peak_flops or (H100_BF16_DENSE_FLOPS if device.type == "cuda" else None)
    pretrain_steps = args.pretrain if args.pretrain is not None else (0 if args.smoke else 100)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sync_debug and device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
    reports = []
    for name in args.workload:
        workload = smoke(WORKLOADS[name]) if args.smoke else WORKLOADS[name]
        if args.draws is not None:
            workload = replace(workload, draws=args.draws)
        report = bench_workload(workload, device, methods, pretrain_steps, peak, warmup=not args.no_warmup)
        report.update(machine=machine(device, args.threads), smoke=args.smoke, peak_flops=peak,
                      created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        print_report(report)
        path = args.out / f"snapshot-{name}-{device.type}{'-smoke' if args.smoke else ''}.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
        reports.append(report)
    return reports


if __name__ == "__main__":
    main()
