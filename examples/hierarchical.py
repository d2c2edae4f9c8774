"""Influence that changes sign as a network learns a semantic hierarchy.

Eight items (dog, cat, sparrow, robin, rose, lily, oak, pine) have features at four levels of a
tree: one every item has ("grows"), one per kingdom (animal / plant), one per class (mammal, bird,
flower, tree) and one per item. A two-layer linear network maps the one-hot item to its features
and is trained with full-batch gradient descent from a small initialization. It then learns the
hierarchy one level at a time, in the order of the singular values of the input-output
correlation matrix (Saxe et al. 2019): the loss shows a plateau and a drop per level.

``BIFCallback`` logs the Bayesian influence of every item on every item's loss during training.
The influence between two items changes sign with the stages (Lee et al. 2025):

* dog → cat is helpful (negative) while the network learns what all animals share, and turns
  harmful (positive) during the stage that separates mammals from birds: once dog and cat get the
  same "mammal" prediction, all that is left to learn is what tells them apart, and a step that
  fits dog better fits cat worse. It fades once the item-specific features are learned.
* dog → sparrow turns harmful one level earlier: once animals are told from plants, dog and
  sparrow get the same blurred "animal" prediction and differ only on mammal vs bird features. The
  harm fades when the mammal/bird stage separates them.

Run it (about half a minute on one CPU core)::

    python examples/hierarchical.py                 # writes runs/hierarchical/
    tensorboard --logdir runs/hierarchical          # influence curves over training

It prints when each level is learned and where each pair's influence changes sign, and writes
``influence.csv`` (plus ``influence.png`` when matplotlib is installed).

The localization must keep the localized posterior proper at the plateaus, which are saddles:
along a direction that would learn the next level the loss curves downward by up to the largest
singular value σ₁ of the (per-example averaged) correlation matrix, so this example uses
``localization = nbeta`` (> nβ·σ₁ ≈ 0.48·nβ). With weaker localization the chains slide off the
saddle during sampling, and the estimate describes where training is going rather than where it is.

References:
    Saxe, McClelland & Ganguli 2019, "A mathematical theory of semantic development in deep neural
    networks", PNAS.
    Lee, Smith, Adam & Hoogland 2025, "Influence Dynamics and Stagewise Data Attribution",
    arXiv:2510.12071.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bif import BIFCallback, SGLDConfig, open_log
from lightning_bif.log.summaries import sign_changes

ITEMS = ("dog", "cat", "sparrow", "robin", "rose", "lily", "oak", "pine")
#: The tree over ITEMS, level by level: every node is a contiguous block of items with its own feature.
LEVELS = (
    ("living thing", ("grows",)),
    ("animal vs plant", ("moves", "has roots")),
    ("mammal vs bird, flower vs tree", ("has fur", "has wings", "has petals", "has bark")),
    ("item-specific", ("barks", "meows", "is brown", "has a red breast", "has thorns", "is white",
                       "has acorns", "has needles")),
)
#: The class of every item (the third level), used as train/probe groups in TensorBoard.
CLASSES = ("mammal", "mammal", "bird", "bird", "flower", "flower", "tree", "tree")
#: The pairs the example reports, as (train item, probe item).
PAIRS = (("dog", "cat"), ("dog", "sparrow"), ("dog", "lily"))

#: SGLD settings that resolve the sign changes at every snapshot (8 items, 368 weights): see the module docstring.
SGLD = SGLDConfig(chains=16, draws=60, burn_in=60, thin=1, step_size=2e-4, nbeta=1000.0, localization=1000.0,
                  batch_size=None)


def hierarchy() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The data set: one-hot items ``[8, 8]``, their features ``[8, 15]`` and the feature names."""
    columns, names = [], []
    for _, features in LEVELS:
        block = len(ITEMS) // len(features)
        for node, name in enumerate(features):
            columns.append([1.0 if item // block == node else 0.0 for item in range(len(ITEMS))])
            names.append(name)
    return torch.eye(len(ITEMS)), torch.tensor(columns).T.contiguous(), names


def modes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """The singular modes of the input-output correlation, grouped by level of the hierarchy.

    For a balanced tree the item-space singular vectors are Haar vectors: a node's items on one
    side of a split against those on the other. Returns the item-space vectors ``[M, 8]``, the
    feature-space vectors ``[M, 15]``, the singular values ``[M]`` of ``features.T @ inputs / 8``
    and the level of every mode ``[M]``.
    """
    inputs, features, _ = hierarchy()
    count = len(ITEMS)
    vectors, levels = [torch.full((count,), 1.0)], [0]
    for level in range(1, len(LEVELS)):
        block = count // len(LEVELS[level][1]) * 2  # a split halves the nodes of the level above
        for start in range(0, count, block):
            v = torch.zeros(count)
            v[start:start + block // 2], v[start + block // 2:start + block] = 1.0, -1.0
            vectors.append(v)
            levels.append(level)
    item_vectors = torch.stack([v / v.norm() for v in vectors])
    correlation = features.T @ inputs / count
    response = item_vectors @ correlation.T
    singular_values = response.norm(dim=1)
    return item_vectors, response / singular_values[:, None], singular_values, np.array(levels)


class HierarchyNet(L.LightningModule):
    """A two-layer linear network ``item → hidden → features`` with squared loss, full-batch GD.

    It records the loss and the strength of every learned mode (``u_kᵀ W₂W₁ v_k``, the singular
    value the network has learned for mode k) at every optimizer step in ``history``.

    Args:
        hidden: Width of the hidden layer.
        init_scale: Standard deviation of the initial weights; small values give long plateaus.
        lr: Learning rate of plain gradient descent.
    """

    def __init__(self, hidden: int = 16, init_scale: float = 1e-6, lr: float = 0.5) -> None:
        super().__init__()
        self.encoder = nn.Linear(len(ITEMS), hidden, bias=False)
        self.decoder = nn.Linear(hidden, len(hierarchy()[2]), bias=False)
        for weight in (self.encoder.weight, self.decoder.weight):
            nn.init.normal_(weight, std=init_scale)
        self.lr = lr
        item_vectors, feature_vectors, _, _ = modes()
        self.register_buffer("item_vectors", item_vectors, persistent=False)
        self.register_buffer("feature_vectors", feature_vectors, persistent=False)
        self.history: dict[str, list] = {"step": [], "loss": [], "strength": []}

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(items))

    def per_example_loss(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """Squared error of each item's features, ``[B]`` (what ``BIFCallback`` samples and tracks)."""
        items, features = batch
        return 0.5 * (self(items) - features).square().sum(dim=-1)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.per_example_loss(batch).mean()
        with torch.no_grad():
            product = self.decoder.weight @ self.encoder.weight
            strength = ((self.feature_vectors @ product) * self.item_vectors).sum(dim=1)
        self.history["step"].append(self.global_step)
        self.history["loss"].append(loss.item())
        self.history["strength"].append(strength.cpu().numpy())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@dataclass
class Stage:
    """When one level of the hierarchy is learned.

    Attributes:
        name: The level.
        singular_value: Its singular value (the largest of its modes): larger ones are learned first.
        start: First step at which 10 % of the level's share of the loss is gone.
        middle: First step at which 50 % of it is gone.
        end: First step at which 90 % of it is gone (``None``: not within training).
        loss_before: Training loss at ``start``.
        loss_after: Training loss at ``end``.
    """

    name: str
    singular_value: float
    start: int | None
    middle: int | None
    end: int | None
    loss_before: float
    loss_after: float


def find_stages(steps: np.ndarray, loss: np.ndarray, strength: np.ndarray) -> list[Stage]:
    """Locate the stages: the windows in which each level's share of the loss drops.

    With one-hot inputs the loss is ``||W₂W₁ - featuresᵀ||² / 16``; in the basis of the singular
    modes, level l accounts for ``Σ_{k∈l} (8σ_k - a_k)² / 16`` of it, where ``a_k`` is the learned
    strength of mode k (``strength[:, k]``, recorded over ``steps``). A stage spans the steps in
    which that share falls from 90 % to 10 % of its initial value. Sums over a level do not depend
    on the choice of basis among its equal singular values.
    """
    _, _, singular_values, levels = modes()
    target = singular_values.numpy() * len(ITEMS)  # W₂W₁ → featuresᵀ, whose strengths are 8·σ_k
    stages = []
    for level, (name, _) in enumerate(LEVELS):
        chosen = levels == level
        remaining = np.square(target[chosen] - strength[:, chosen]).sum(axis=1)
        gone = 1.0 - remaining / remaining[0]

        def first(threshold: float, gone: np.ndarray = gone) -> int | None:
            hits = np.flatnonzero(gone >= threshold)
            return int(steps[hits[0]]) if len(hits) else None

        start, middle, end = first(0.1), first(0.5), first(0.9)
        stages.append(Stage(
            name=name, singular_value=float(singular_values[chosen].max()), start=start, middle=middle, end=end,
            loss_before=float(np.interp(start if start is not None else steps[-1], steps, loss)),
            loss_after=float(np.interp(end if end is not None else steps[-1], steps, loss)),
        ))
    return stages


def sign_change(steps: np.ndarray, influence: np.ndarray, stderr: np.ndarray, z: float = 2.0) -> float | None:
    """The step at which an influence curve first turns from helpful to harmful, or ``None``.

    A turn is a snapshot significantly harmful (``influence > z·stderr``) after one significantly
    helpful (``influence < -z·stderr``); the step is where the curve crosses zero in between
    (see :func:`lightning_bif.log.summaries.sign_changes`, which does this for every pair of a log).
    """
    changes = sign_changes(steps, influence[:, None, None], stderr[:, None, None], z=z)
    return next((change.crossing for change in changes if change.turns == "harmful"), None)


@dataclass
class Run:
    """What one training run produced.

    Attributes:
        history_steps: Optimizer steps at which the loss was recorded, ``[T]``.
        loss: Full-batch training loss, ``[T]``.
        strength: Learned strength of every mode, ``[T, M]``.
        stages: The learned levels (see :func:`find_stages`).
        log_path: The influence log written by ``BIFCallback``.
    """

    history_steps: np.ndarray
    loss: np.ndarray
    strength: np.ndarray
    stages: list[Stage]
    log_path: Path


def train(out: Path, steps: int = 250, snapshot_steps: Sequence[int] | None = None,
          config: SGLDConfig = SGLD, seed: int = 0, tensorboard: bool = True) -> Run:
    """Train the network with ``BIFCallback`` attached and return its history.

    Args:
        out: Folder for ``influence.h5`` (overwritten) and the TensorBoard events.
        steps: Optimizer steps (full batch: one step per epoch).
        snapshot_steps: Steps at which to take a BIF snapshot; default every 10 steps from 0.
        config: The SGLD settings.
        seed: Seed of the initialization.
        tensorboard: Also write TensorBoard curves under ``out``.

    Returns:
        The :class:`Run`.
    """
    L.seed_everything(seed, verbose=False)
    inputs, features, _ = hierarchy()
    items = TensorDataset(inputs, features)
    model = HierarchyNet()
    snapshot_steps = range(0, steps + 1, 10) if snapshot_steps is None else snapshot_steps
    log_path = out / "influence.h5"
    # Probes and training examples are the same eight items: influence[probe, train] is item → item.
    bif = BIFCallback(train=items, probes=items, train_groups=CLASSES, probe_groups=CLASSES,
                      at_steps=[s for s in snapshot_steps if s > 0], at_fit_start=0 in snapshot_steps,
                      config=config, log_path=log_path, if_exists="overwrite", progress=False)
    trainer = L.Trainer(
        max_steps=steps, callbacks=[bif], accelerator="cpu", devices=1, deterministic=True,
        logger=TensorBoardLogger(out, name="tensorboard", version="") if tensorboard else False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(model, DataLoader(items, batch_size=len(items)))
    history_steps = np.array(model.history["step"])
    loss = np.array(model.history["loss"])
    strength = np.stack(model.history["strength"])
    return Run(history_steps, loss, strength, find_stages(history_steps, loss, strength), log_path)


def pair_curves(log_path: Path, pairs: Sequence[tuple[str, str]] = PAIRS) -> dict[str, np.ndarray]:
    """Steps and influence/stderr/correlation curves of ``pairs`` (train item, probe item) from the log."""
    curves: dict[str, np.ndarray] = {}
    with open_log(log_path) as log:
        curves["step"] = log.steps.copy()
        for source, target in pairs:
            curve = log.trajectory(probe=log.position(probe=ITEMS.index(target)),
                                   train=log.position(train=ITEMS.index(source)))
            key = f"{source}->{target}"
            curves[key], curves[f"{key} stderr"], curves[f"{key} corr"] = (
                curve.influence, curve.stderr, curve.correlation)
    return curves


def write_outputs(run: Run, curves: dict[str, np.ndarray], out: Path) -> list[Path]:
    """``influence.csv`` (always) and ``influence.png`` (when matplotlib is installed)."""
    loss_at = np.interp(curves["step"], run.history_steps, run.loss)
    header = ["step", "loss", *(key for key in curves if key != "step")]
    with open(out / "influence.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for row, step in enumerate(curves["step"]):
            writer.writerow([int(step), f"{loss_at[row]:.6g}",
                             *(f"{curves[key][row]:.6g}" for key in header[2:])])
    written = [out / "influence.csv"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    top.plot(run.history_steps, run.loss, color="black")
    top.set_ylabel("training loss")
    for axis in (top, bottom):
        for stage in run.stages:
            if stage.start is not None and stage.end is not None:
                axis.axvspan(stage.start, stage.end, alpha=0.12)
    for source, target in PAIRS:
        key = f"{source}->{target}"
        bottom.errorbar(curves["step"], curves[key], yerr=curves[f"{key} stderr"], label=f"{source} → {target}",
                        capsize=2)
    bottom.axhline(0, color="grey", lw=0.8)
    bottom.set_ylabel("BIF  (< 0 helps, > 0 hurts)")
    bottom.set_xlabel("training step")
    bottom.legend()
    figure.tight_layout()
    figure.savefig(out / "influence.png", dpi=120)
    written.append(out / "influence.png")
    return written


def stage_at(stages: Sequence[Stage], step: float) -> str:
    """Which stage window holds ``step`` (or which two stages it lies between)."""
    previous = None
    for stage in stages:
        if stage.start is None or step < stage.start:
            return f"between {previous} and {stage.name}" if previous else f"before {stage.name}"
        if stage.end is None or step <= stage.end:
            return f"during {stage.name}"
        previous = stage.name
    return f"after {previous}"


def _ranges(steps: np.ndarray, mask: np.ndarray) -> str:
    """Compress the snapshot steps where ``mask`` holds into runs: ``"50-120, 140"``."""
    runs: list[list[int]] = []
    for index in np.flatnonzero(mask):
        if runs and runs[-1][1] == index - 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    text = [f"{steps[a]}-{steps[b]}" if a != b else f"{steps[a]}" for a, b in runs]
    return ", ".join(text) or "none"


def main(argv: Sequence[str] | None = None) -> None:
    """Train, log the BIF over training, print stage times and sign changes, write the curves."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hierarchical"))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    run = train(args.out, steps=args.steps, seed=args.seed)
    curves = pair_curves(run.log_path)
    print(f"Trained {args.steps} steps with {len(curves['step'])} BIF snapshots in "
          f"{time.perf_counter() - start:.0f} s.\n")
    print("Stages (the loss a level accounts for falls from 90 % to 10 %):")
    for stage in run.stages:
        window = (f"steps {stage.start}-{stage.end} (half at {stage.middle})" if stage.end is not None
                  else "not learned yet")
        print(f"  σ={stage.singular_value:.3f}  {stage.name:32s} {window:30s} "
              f"loss {stage.loss_before:.3f} -> {stage.loss_after:.3f}")
    print("\nInfluence of the train item on the probe item's loss (< 0 helps, > 0 hurts; beyond 2 standard errors):")
    for source, target in PAIRS:
        key = f"{source}->{target}"
        values, errors = curves[key], curves[f"{key} stderr"]
        flip = sign_change(curves["step"], values, errors)
        change = (f"turns harmful at step {flip:.0f} ({stage_at(run.stages, flip)})" if flip is not None
                  else "no helpful-to-harmful sign change")
        print(f"  {source:>4s} -> {target:<8s} helps at steps {_ranges(curves['step'], values < -2 * errors)}; "
              f"hurts at steps {_ranges(curves['step'], values > 2 * errors)}; {change}")
    for path in write_outputs(run, curves, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
