"""Ours vs devinterp 2.0.1's ``bif()`` at the same settings: how reproducible each is, and why.

On ``bench_snapshot.py``'s ``mlp`` workload (modular addition; by default 64 tracked training
sequences, 32 probes, ε 1e-4, nβ 2048, γ 100, minibatch 32, 300 AdamW pre-training steps) every
variant is run at two sampler seeds and scored by

  seed r      Pearson r between the BIF matrices of the two seeds (reproducibility);
  split-half  r between the BIFs of the even and the odd chains of one run (mean over the seeds);
  r vs ref    r between the variant (seed A) and a long run of our sampler (the best estimate we have).

devinterp seeds chain c with ``init_seed + c`` (global RNG: its noise) and its data loader with
``init_seed`` (every chain the same minibatch order) — so seeds 1 and 2 share three of four chains'
noise streams. ``--devinterp-seeds`` picks the seeds; ``init_seed = seed × chains`` keeps them disjoint.

Usage (one torch thread; about a minute per variant on a shared 2-core CPU):
    python benchmarks/devinterp_parity.py --variants devinterp-overlapping devinterp ours ours-shared
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import WORKLOADS, build_model, make_data, pretrain, sequence_loss, token_losses

from lightning_bif import SGLDConfig, estimate_bif
from lightning_bif.estimation.sampler import SGLDSampler
from lightning_bif.example_sets import ExampleSet
from lightning_bif.functional import FunctionalModel


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))


def bif_from_traces(traces: torch.Tensor, n_train: int) -> torch.Tensor:
    """−Cov over all chains' draws of ``traces [C, D, N + P]``: ``[P, N]``."""
    flat = traces.reshape(-1, traces.shape[-1]).double()
    flat = flat - flat.mean(0)
    return -(flat[:, n_train:].T @ flat[:, :n_train]) / (len(flat) - 1)


def split_half(traces: torch.Tensor, n_train: int) -> float:
    return pearson(bif_from_traces(traces[0::2], n_train), bif_from_traces(traces[1::2], n_train))


def run_devinterp(model, data, train, probes, args, seed: int, match: bool) -> tuple[torch.Tensor, float, float]:
    """devinterp's ``sample`` + the pooled covariance; returns (BIF [P, N], split-half, CPU s)."""
    from datasets import Dataset as HFDataset
    from devinterp.slt.sampling import sample

    def hf(tokens: torch.Tensor) -> HFDataset:
        return HFDataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")

    m = args.batch_size
    start = time.process_time()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = sample(model=copy.deepcopy(model), dataset=hf(data),
                         observables={"a_train": (hf(train), len(train) // m),
                                      "b_probe": (hf(probes), len(probes) // m)},
                         lr=args.step_size, n_beta=args.nbeta, localization=args.localization,
                         num_chains=args.chains, num_draws=args.draws, batch_size=m, num_burnin_steps=0,
                         num_steps_bw_draws=1, num_init_loss_batches=1, init_seed=seed, device="cpu",
                         match_sampling_input_ids_across_chains=match, loss_fn=token_losses,
                         output_path=Path(tmp) / "samples.zarr")
        ds = samples.dataset
        parts = []
        for key, rows in (("a_train", train), ("b_probe", probes)):
            loss = torch.as_tensor(ds[f"loss_{key}"].values).mean(-1)  # [C, D, B]: sequence means
            ids = torch.as_tensor(ds[f"input_ids_{key}"].values)
            where = {tuple(s): i for i, s in enumerate(ids.tolist())}
            parts.append(loss[:, :, [where[tuple(s)] for s in rows.tolist()]])  # back to our row order
    traces = torch.cat(parts, -1)
    cpu = time.process_time() - start
    with torch.no_grad():
        at_center = token_losses(model, train).mean(-1).double()
    draw_loss = traces[..., :len(train)].double().mean(-1)
    return (bif_from_traces(traces, len(train)), split_half(traces, len(train)), cpu,
            rise_and_trend(draw_loss, at_center))


def rise_and_trend(draw_loss: torch.Tensor, at_center: torch.Tensor) -> tuple[float, float]:
    """Mean loss rise of the tracked examples over w*, and the change of the chains' mean draw loss from
    their first to their last quarter of draws (a trend: the chains are still moving away from w*)."""
    quarter = max(1, draw_loss.shape[1] // 4)
    trend = draw_loss[:, -quarter:].mean() - draw_loss[:, :quarter].mean()
    return float(draw_loss.mean() - at_center.mean()), float(trend)


def run_ours(model, data, train, probes, args, seed: int, **changes) -> tuple[torch.Tensor, float, float]:
    config = SGLDConfig(chains=args.chains, draws=args.draws, burn_in=0, thin=1, step_size=args.step_size,
                        nbeta=args.nbeta, localization=args.localization, batch_size=args.batch_size, seed=seed,
                        preconditioner="none", control_variates=False, target_split_half=None).replace(**changes)
    start = time.process_time()
    result = estimate_bif(model, sequence_loss, (train,), (probes,), data=(data,), config=config)
    cpu = time.process_time() - start
    return (result.influence.double(), float(result.diagnostics.split_half), cpu,
            rise_and_trend(result.diagnostics.draw_loss.double(), result.train_loss.double()))


def our_traces(model, data, train, probes, args, seed: int, shared: bool) -> tuple[torch.Tensor, float]:
    """Our sampler's draws, losses evaluated here: ``[C, D, N + P]`` (for estimators other than the pooled one)."""
    config = SGLDConfig(chains=args.chains, draws=args.draws, burn_in=0, thin=1, step_size=args.step_size,
                        nbeta=args.nbeta, localization=args.localization, batch_size=args.batch_size, seed=seed,
                        preconditioner="none", control_variates=False, shared_minibatch_order=shared,
                        target_split_half=None)
    start = time.process_time()
    fmodel = FunctionalModel(model, None, torch.device("cpu"))
    sampler = SGLDSampler(fmodel, ExampleSet((data,), "data"), sequence_loss, config, args.nbeta)
    buffers = fmodel.fresh_buffers()
    evaluated = [torch.cat([train, probes])]
    traces = torch.empty(args.chains, args.draws, len(evaluated[0]), dtype=torch.float64)
    chains = list(range(args.chains))
    for draw in sampler.run(chains, vectorized=True):
        traces[:, draw.index] = fmodel.batched_losses(draw.params, evaluated, len(evaluated[0]), sequence_loss,
                                                      buffers, "loss_fn", vectorized=True).double()
    return traces, time.process_time() - start


def centred_bif(traces: torch.Tensor, n_train: int, how: str) -> torch.Tensor:
    """−Cov after removing each chain's mean (``chain``) or, at every draw index, the mean over chains (``draw``)."""
    centred = traces - traces.mean(1 if how == "chain" else 0, keepdim=True)
    flat = centred.reshape(-1, traces.shape[-1])
    return -(flat[:, n_train:].T @ flat[:, :n_train]) / (len(flat) - 1)


def run_traces(model, data, train, probes, args, seed: int, shared: bool, how: str | None):
    traces, cpu = our_traces(model, data, train, probes, args, seed, shared)
    n = len(train)
    estimate = (lambda t: bif_from_traces(t, n)) if how is None else (lambda t: centred_bif(t, n, how))
    halves = pearson(estimate(traces[0::2]), estimate(traces[1::2]))
    with torch.no_grad():
        at_center = token_losses(model, train).mean(-1).double()
    return estimate(traces), halves, cpu, rise_and_trend(traces[..., :n].mean(-1), at_center)


VARIANTS = {
    # devinterp as bench_snapshot called it: seeds 1 and 2 (chains share noise streams across seeds)
    "devinterp-overlapping": lambda *a, seed: run_devinterp(*a, seed=seed, match=True),
    # devinterp with disjoint chain seeds (init_seed = seed × chains)
    "devinterp": lambda *a, seed: run_devinterp(*a, seed=seed, match=True),
    "devinterp-unmatched": lambda *a, seed: run_devinterp(*a, seed=seed, match=False),
    "ours": lambda *a, seed: run_ours(*a, seed=seed),
    "ours-shared": lambda *a, seed: run_ours(*a, seed=seed, shared_minibatch_order=True),
    # the same sampler, losses evaluated by this script, other estimators on the same draws
    "traces": lambda *a, seed: run_traces(*a, seed=seed, shared=False, how=None),
    "traces-chain-centred": lambda *a, seed: run_traces(*a, seed=seed, shared=False, how="chain"),
    "traces-shared": lambda *a, seed: run_traces(*a, seed=seed, shared=True, how=None),
    "traces-shared-chain-centred": lambda *a, seed: run_traces(*a, seed=seed, shared=True, how="chain"),
    "traces-shared-draw-centred": lambda *a, seed: run_traces(*a, seed=seed, shared=True, how="draw"),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--step-size", type=float, default=1e-4)
    parser.add_argument("--nbeta", type=float, default=2048.0)
    parser.add_argument("--localization", type=float, default=100.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pretrain", type=int, default=300)
    parser.add_argument("--seeds", default="1,2", help="two sampler seeds")
    parser.add_argument("--reference", default="64x400", help="chains x draws of our long reference run ('' = none)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    workload = replace(WORKLOADS["mlp"], train=args.train, probes=args.probes)
    torch.manual_seed(0)
    model = build_model(workload)
    data, train, probes = make_data(workload, 0)
    pretrain(model, data, args.pretrain, torch.device("cpu"), 0)
    model.eval()
    seeds = [int(s) for s in args.seeds.split(",")]
    reference = None
    if args.reference:
        chains, draws = (int(v) for v in args.reference.split("x"))
        reference, ref_half, ref_cpu, _ = run_ours(model, data, train, probes,
                                                replace_args(args, chains=chains, draws=draws), seed=12345)
        print(f"reference: ours {chains}x{draws} split-half {ref_half:.3f} ({ref_cpu:.1f} CPU s)", flush=True)
    rows = {}
    for name in args.variants:
        outs = []
        for seed in seeds:
            chain_seed = seed if name == "devinterp-overlapping" or not name.startswith("devinterp") else seed * 1000
            outs.append(VARIANTS[name](model, data, train, probes, args, seed=chain_seed))
        row = {"seed_r": pearson(outs[0][0], outs[1][0]), "split_half": sum(o[1] for o in outs) / len(outs),
               "cpu_s": sum(o[2] for o in outs) / len(outs),
               "r_vs_reference": pearson(outs[0][0], reference) if reference is not None else None,
               "scale": float(outs[0][0].abs().mean()),
               "loss_rise": sum(o[3][0] for o in outs) / len(outs), "trend": sum(o[3][1] for o in outs) / len(outs)}
        rows[name] = row
        ref = f"{row['r_vs_reference']:.3f}" if reference is not None else "-"
        print(f"{name:<22} seed r {row['seed_r']:6.3f}  split-half {row['split_half']:6.3f}  r vs ref {ref:>6}  "
              f"mean|BIF| {row['scale']:.3g}  rise {row['loss_rise']:.3f}  trend {row['trend']:+.3f}  "
              f"{row['cpu_s']:.1f} CPU s", flush=True)
        rows[name]["bif_seed_a"] = outs[0][0].tolist()
    if {"devinterp", "ours"} <= rows.keys():
        r = pearson(torch.tensor(rows["devinterp"]["bif_seed_a"]), torch.tensor(rows["ours"]["bif_seed_a"]))
        print(f"r(devinterp, ours) = {r:.3f}")
    report = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report))
    return report


def replace_args(args: argparse.Namespace, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


if __name__ == "__main__":
    main()
