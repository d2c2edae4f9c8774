"""Peer libraries on the digits LDS benchmark: kronfluence (EK-FAC, KFAC), TRAK, and devinterp's BIF.

Scores the same trained MLP, probes and retrained subsets as ``lds_digits.py`` (whose functions it
reuses; the cached ground truth must exist or is computed once), in one process on one thread, and
prints rows in the same format next to our BIF (``bif-fast``), timed in the same process. Every
peer is optional: a missing library skips its rows with the reason.

Sign conversions to our convention (*predicted change of probe j's loss from including example
i*, positive = harmful):

* kronfluence returns ∇φ_jᵀ(F + δ)⁻¹∇ℓ_i (F = its EK-FAC/KFAC Fisher averaged over the training
  examples, without the weight decay): positive = including z_i *lowers* the probe loss, so scores = −that;
* TRAK returns attributions "higher = example supports the probe" (a larger margin): scores = −that;
* devinterp's ``bif`` returns Cov(ℓ_i, φ_j) (or Pearson correlation) over the SGLD draws, while
  our BIF is −Cov: scores = −that.

A wrong sign shows up as a negative LDS. Timings are CPU seconds (``time.process_time``), including
each library's own disk I/O (all of them write their results to a temporary directory).

Run ``python benchmarks/lds_peers.py --help`` (``TQDM_DISABLE=1`` silences the peers' progress bars);
rows are also written as JSON to ``benchmarks/results/``.
The peer libraries are not in any extra of this package (they pull a different torch), install them
as ``benchmarks/README.md`` ("Peers on digits LDS", Reproduce) shows.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from lds_common import ClassificationLosses
from lds_digits import (
    BIF_SETTINGS,
    RESULTS,
    Digits,
    Row,
    Setup,
    full_model,
    ground_truth,
    lds,
    load_split,
    model_from_params,
    score_bif,
    seed_ceiling,
    train_stacked,
)
from torch import nn
from torch.nn import functional as F

from lightning_bif import SGLDConfig

PEERS = ("bif", "kronfluence", "trak", "devinterp")


def seed_models(setup: Setup, data: Digits, seeds: int) -> tuple[list[nn.Module], float]:
    """Full-data models of seeds 1..seeds-1 (seed 0 is the attributed model) and their training CPU s."""
    start = time.process_time()
    models = [model_from_params(setup, [p[0] for p in train_stacked(setup, data.x_train[None],
                                                                    data.y_train[None], seed=s)])
              for s in range(1, seeds)]
    return models, time.process_time() - start


# --- kronfluence ---------------------------------------------------------------------------

def score_kronfluence(model: nn.Module, data: Digits, truth: torch.Tensor, setup: Setup, seed: int,
                      empirical: bool) -> list[Row]:
    """EK-FAC and KFAC influence with kronfluence's default damping (1e-8), its heuristic, and δ = λ.

    Its default Fisher is the true Fisher (labels sampled from the model), so the scores depend on
    the torch seed, set to ``seed`` before each fit; with ``empirical`` also EK-FAC with the
    empirical Fisher (true labels, no randomness).
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    train = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    probes = torch.utils.data.TensorDataset(data.x_probe, data.y_probe)
    # None = kronfluence's heuristic 0.1 × mean eigenvalue; 1e-8 its default; λ makes F + δ the Fisher of
    # the training objective (mean cross-entropy + λ/2·||w||²).
    dampings: list[tuple[str, float | None]] = [("default 1e-8", 1e-8), ("heuristic", None),
                                                (f"= λ = {setup.weight_decay:g}", setup.weight_decay)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its GradScaler(...) calls, unused on CPU
        task = type("DigitsTask", (ClassificationLosses, Task), {})()
        analyzer = Analyzer(analysis_name="digits", model=prepare_model(copy.deepcopy(model), task), task=task,
                            cpu=True, disable_tqdm=True, output_dir=tmp)
        for strategy, empirical_fisher in (("ekfac", False), ("kfac", False), ("ekfac", True))[:3 if empirical else 2]:
            factors = f"{strategy}_{'empirical' if empirical_fisher else 'true'}"
            torch.manual_seed(seed)
            start = time.process_time()
            factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical_fisher)
            analyzer.fit_all_factors(factors_name=factors, dataset=train, per_device_batch_size=250,
                                     factor_args=factor_args)
            factor_s = time.process_time() - start
            for label, damping in dampings:
                name = f"{factors}_{damping}"
                start = time.process_time()
                analyzer.compute_pairwise_scores(scores_name=name, factors_name=factors, query_dataset=probes,
                                                 train_dataset=train, per_device_query_batch_size=100,
                                                 per_device_train_batch_size=250,
                                                 score_args=ScoreArguments(damping_factor=damping))
                raw = analyzer.load_pairwise_scores(name)["all_modules"]  # [P, N]: positive = helpful
                score_s = time.process_time() - start
                fisher = ", empirical F" if empirical_fisher else f", seed {seed}"
                rows.append(Row(f"kronfluence {strategy.upper()}{fisher}, δ {label}", *lds(-raw, data.masks, truth),
                                factor_s + score_s,
                                {"factors_cpu_s": factor_s, "scores_cpu_s": score_s, "damping_factor": damping,
                                 "seed": seed, "empirical_fisher": empirical_fisher,
                                 "lds_unflipped": lds(raw, data.masks, truth)[0]}))
    return rows


# --- TRAK ----------------------------------------------------------------------------------

def score_trak(models: list[nn.Module], data: Digits, truth: torch.Tensor, proj_dim: int, label: str,
               extra_cpu_s: float = 0.0) -> Row:
    """TRAK (image-classification margin output) with the CPU projector, averaged over ``models``."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    start = time.process_time()
    grad_dim = sum(p.numel() for p in models[0].parameters())
    with tempfile.TemporaryDirectory() as tmp:
        work = copy.deepcopy(models[0])
        projector = BasicProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.rademacher,
                                   device="cpu", dtype=torch.float32)
        traker = TRAKer(model=work, task="image_classification", train_set_size=len(data.x_train), save_dir=tmp,
                        device="cpu", projector=projector, proj_dim=proj_dim, use_half_precision=False,
                        logging_level=logging.WARNING)
        chunk = 100
        for model_id, model in enumerate(models):
            traker.load_checkpoint(model.state_dict(), model_id=model_id)
            for lo in range(0, len(data.x_train), chunk):
                batch = [data.x_train[lo:lo + chunk], data.y_train[lo:lo + chunk]]
                traker.featurize(batch=batch, num_samples=len(batch[0]))
        traker.finalize_features()
        for model_id, model in enumerate(models):
            traker.start_scoring_checkpoint(exp_name="probes", checkpoint=model.state_dict(), model_id=model_id,
                                            num_targets=len(data.x_probe))
            traker.score(batch=[data.x_probe, data.y_probe], num_samples=len(data.x_probe))
        raw = torch.as_tensor(traker.finalize_scores(exp_name="probes")).T.clone()  # [P, N]: positive = supports
    cpu_s = time.process_time() - start
    return Row(f"TRAK, {label}, proj_dim {proj_dim}", *lds(-raw, data.masks, truth), cpu_s + extra_cpu_s,
               {"models": len(models), "proj_dim": proj_dim, "scoring_cpu_s": cpu_s, "training_cpu_s": extra_cpu_s,
                "lds_unflipped": lds(raw, data.masks, truth)[0]})


# --- devinterp -----------------------------------------------------------------------------

def score_devinterp(model: nn.Module, data: Digits, truth: torch.Tensor, config: SGLDConfig) -> list[Row]:
    """devinterp's ``bif`` with our ``config``'s SGLD settings; its language-model interface is fed indices.

    devinterp wants a HuggingFace dataset of ``input_ids`` and a per-token loss ``(batch, seq-1)``:
    each example becomes the two "tokens" ``[row, label]`` (row < N: training example, else probe
    row - N) and the loss function looks the input up, giving one "token" loss per example. Full
    batch = one batch of N per step; observables are evaluated in batches of the sampling batch
    size, so the probes are tiled to N rows (duplicates get identical traces). Its update is
    Δw = -ε/2·(nβ·∇L + γ(w - w*) + λ_dev·w) + √ε·ξ, so our prior λ (inside the tempered likelihood,
    drift nβ·λ·w) is ``llc_weight_decay = nβ·λ``. Chain c is seeded with ``init_seed + c``, so
    ``init_seed = seed·chains`` keeps the chains of different seeds disjoint.
    """
    import devinterp.slt.sampler as devinterp_sampler
    from datasets import Dataset
    from devinterp.slt.bif import compute_bif
    from devinterp.slt.sampling import sample

    class TimedGC:
        """Times devinterp's gc.collect() before and after every chain (a full collection of this process's heap)."""

        cpu_s = 0.0

        def collect(self) -> None:
            start = time.process_time()
            gc.collect()
            TimedGC.cpu_s += time.process_time() - start

    inputs = torch.cat([data.x_train, data.x_probe])
    n = len(data.x_train)

    def loss_fn(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inputs[input_ids[:, 0]]), input_ids[:, 1], reduction="none")[:, None]

    def as_dataset(rows: torch.Tensor, labels: torch.Tensor) -> Dataset:
        return Dataset.from_dict({"input_ids": torch.stack([rows, labels], 1).tolist()}).with_format("torch")

    train = as_dataset(torch.arange(n), data.y_train)
    # Observables are evaluated in batches of the sampling batch size: tile the probes to fill one.
    tiles = -(-n // len(data.x_probe))
    probes = as_dataset((n + torch.arange(len(data.x_probe))).repeat(tiles)[:n], data.y_probe.repeat(tiles)[:n])
    rows = []
    devinterp_sampler.gc = TimedGC()
    start = time.process_time()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = sample(model=copy.deepcopy(model), dataset=train,
                         observables={"probe": (probes, 1), "train": (train, 1)},
                         lr=config.step_size, n_beta=config.nbeta, num_chains=config.chains, num_draws=config.draws,
                         num_steps_bw_draws=config.thin, num_burnin_steps=config.burn_in, batch_size=n,
                         num_init_loss_batches=1, localization=config.localization,
                         llc_weight_decay=config.nbeta * config.weight_decay, loss_fn=loss_fn, device="cpu",
                         init_seed=config.seed * config.chains, output_path=Path(tmp) / "samples.zarr")
        sample_s = time.process_time() - start
        devinterp_sampler.gc = gc
        for covariance in (True, False):
            start = time.process_time()
            result = compute_bif(samples, correlation_method="sequence", compute_covariance=covariance, device="cpu")
            matrix = torch.as_tensor(result["influences"].values, dtype=torch.float64)
            ids = torch.as_tensor(result["input_ids"].values)[:, 0]  # the observables' (shuffled) example rows
            probe_at, train_at = ids >= n, ids < n
            raw = torch.empty(len(data.x_probe), n, dtype=torch.float64)
            sub = matrix[probe_at][:, train_at]
            raw[(ids[probe_at] - n)[:, None], ids[train_at][None, :]] = sub  # +Cov(ℓ_i, φ_j); ours is −Cov
            cpu_s = sample_s + time.process_time() - start
            kind = "covariance" if covariance else "correlation"
            name = f"devinterp bif ({kind}), {config.chains}x{config.draws}, seed {config.seed}"
            rows.append(Row(name, *lds(-raw, data.masks, truth),
                            cpu_s, {"sampling_cpu_s": sample_s, "gc_collect_cpu_s": TimedGC.cpu_s,
                                    "lds_unflipped": lds(raw, data.masks, truth)[0],
                                    "llc_weight_decay": config.nbeta * config.weight_decay,
                                    "config": config.to_dict()}))
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--bif", default="bif-fast", choices=list(BIF_SETTINGS),
                        help="setting for our BIF and devinterp's (default bif-fast)")
    parser.add_argument("--trak-proj-dim", default="128,256,512,2048",
                        help="comma-separated projection dimensions (TRAK's default 2048 exceeds the 1000 training "
                             "examples, which makes its X^T X singular)")
    parser.add_argument("--trak-ensemble", type=int, default=3,
                        help="also score TRAK averaged over this many full-data models (seeds 0..k-1, trained like the "
                             "attributed one; their training CPU s is added to the row); 1 = skip")
    parser.add_argument("--sgld-seeds", default="0", help="comma-separated SGLD seeds for our BIF and devinterp's")
    parser.add_argument("--kronfluence-seeds", default="0",
                        help="comma-separated torch seeds for kronfluence's sampled-label Fisher")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    peers = args.peers.split(",")
    sgld_seeds = [int(seed) for seed in args.sgld_seeds.split(",")]

    setup = Setup()
    data = load_split(setup)
    record = ground_truth(setup, data)
    truth = record["losses"].mean(dim=1)
    ceiling = seed_ceiling(record["losses"])
    model = full_model(setup, data)
    config = SGLDConfig(**BIF_SETTINGS[args.bif])
    print(f"setup {setup.key()}; noise ceiling {ceiling['seed_vs_seed']:.3f}")
    print(f"{'method':<44} {'LDS':>6}   {'se':>5} {'CPU s':>8}")

    rows: list[Row] = []
    skipped: dict[str, str] = {}

    def report(new: list[Row]) -> None:
        for row in new:
            flipped = row.details.get("lds_unflipped")
            print(row.text(), f" (unflipped sign: {flipped:.3f})" if flipped is not None else "", flush=True)
            rows.append(row)

    for peer in peers:
        try:
            if peer == "bif":
                for seed in sgld_seeds:
                    report([score_bif(f"ours {args.bif}, seed {seed}", model, data, truth, config.replace(seed=seed))])
            elif peer == "kronfluence":
                for i, seed in enumerate(map(int, args.kronfluence_seeds.split(","))):
                    report(score_kronfluence(model, data, truth, setup, seed, empirical=i == 0))
            elif peer == "trak":
                others, train_s = seed_models(setup, data, args.trak_ensemble)
                for proj_dim in map(int, args.trak_proj_dim.split(",")):
                    report([score_trak([model], data, truth, proj_dim, "1 model")])
                    if others:
                        report([score_trak([model, *others], data, truth, proj_dim,
                                           f"{args.trak_ensemble} models", train_s)])
            elif peer == "devinterp":
                for seed in sgld_seeds:
                    report(score_devinterp(model, data, truth, config.replace(seed=seed)))
            else:
                parser.error(f"unknown peer {peer!r}")
        except ImportError as error:
            skipped[peer] = f"not importable: {error}"
            print(f"skipped {peer}: {skipped[peer]}", flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"lds_peers_{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({
        "setup": dataclasses.asdict(setup), "ceiling": ceiling, "skipped": skipped,
        "machine": f"{platform.machine()} {platform.processor()} threads={args.threads}",
        "python": sys.version.split()[0], "torch": torch.__version__,
        "rows": [dataclasses.asdict(r) for r in rows],
    }, indent=1, default=str))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
