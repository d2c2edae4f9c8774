"""Train a model with a compiled submodule, with and without BIF snapshots; print the largest weight difference.

docs/lightning.md, "torch.compile": snapshots run compiled modules eagerly, so the two runs end
bitwise equal (``max |dw| = 0``). Run from the repository root::

    python benchmarks/compile_bitwise.py --backend inductor --steps 8
    python benchmarks/compile_bitwise.py --smoke    # eager backend, 2 steps: what the test suite runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from scripts.toy import FAST, ToyClassifier, loader, toy_dataset, tracked_sets

from lightning_bif import BIFCallback


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--vectorize", choices=["auto", "true", "false"], default="true")
    parser.add_argument("--smoke", action="store_true", help="--backend eager --steps 2 (seconds, no compiler)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backend, args.steps = "eager", 2
    data = toy_dataset()
    train, probes = tracked_sets(data)
    vectorize = {"auto": "auto", "true": True, "false": False}[args.vectorize]

    def run(snapshots: bool, root: str) -> ToyClassifier:
        pl.seed_everything(0, verbose=False)
        model = ToyClassifier()
        model.net = torch.compile(model.net, backend=args.backend)
        callbacks = [BIFCallback(train, probes, every_n_steps=2, config=FAST.replace(vectorize=vectorize),
                                 log_path=Path(root) / "influence.h5", min_split_half=None)] if snapshots else []
        trainer = pl.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                             default_root_dir=root)
        trainer.fit(model, loader(data))
        return model

    with tempfile.TemporaryDirectory() as root:
        plain = run(False, root)
        with_bif = run(True, root)
    difference = max((a - b).abs().max().item()
                     for a, b in zip(plain.state_dict().values(), with_bif.state_dict().values(), strict=True))
    print(f"backend={args.backend} steps={args.steps} vectorize={args.vectorize}: max |dw| = {difference:.3g}")
    return difference


if __name__ == "__main__":
    main()
