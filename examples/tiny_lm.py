"""Per-token influence on a tiny GPT-2 trained on the docstrings of Python's own standard library.

A Hugging Face ``GPT2LMHeadModel`` built from a ``GPT2Config`` (2 layers, width 64, random init,
nothing downloaded) learns characters from the docstrings of a fixed list of standard-library
modules, read from their source files on disk. ``BIFCallback`` with ``SGLDConfig(per_token=True)``
tracks 6 training sequences per module and three probe sentences written in the style of three of
those modules, and logs the influence of every tracked sequence on every token of every probe at
log-spaced steps. The token strings and the sequences' text go into the log, so the token view
needs nothing else:

    python examples/tiny_lm.py                 # about 2-3 minutes on a laptop CPU (pip install "lightning-bif[lm]")
    lightning-bif tokens runs/tiny_lm/version_0/influence.h5 --probe 0 --group heapq
    lightning-bif tokens runs/tiny_lm/version_0/influence.h5 --probe 2 --html tokens.html

The example writes ``tokens.html`` next to the log: the probes' tokens coloured by influence
(blue helps, red harms), with a snapshot slider and the most helpful and harmful training
sequences as text.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_bif import BIFCallback, LogSpaced, SGLDConfig, open_log
from lightning_bif.viewers.tokens import format_view, token_view, write_html

# Pure-Python modules whose docstrings are the corpus: a fixed selection, read from disk in this order.
MODULES = ("heapq", "bisect", "textwrap", "calendar", "random", "statistics", "fractions", "shutil")
# Probes in the style of three of the modules (not copied from them): which sequences help which tokens?
# Each starts with a space, the context of its first token, so that the tokens spell the whole sentence.
PROBES = {
    "heapq": " Pop and return the smallest item from the heap, then push the new item onto it.",
    "textwrap": " Wrap a single paragraph of text so that every line is at most width characters.",
    "statistics": " Return the sample standard deviation of the data, a sequence of real numbers.",
}
# Characters: printable ASCII and one stand-in for anything else (docstrings are whitespace-normalised).
VOCAB = [chr(code) for code in range(32, 127)] + ["\N{REPLACEMENT CHARACTER}"]
INDEX = {char: i for i, char in enumerate(VOCAB)}
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def docstrings(module_name: str) -> str:
    """The docstrings of a standard-library module's source file, whitespace-normalised, in source order."""
    path = Path(inspect.getsourcefile(importlib.import_module(module_name)))
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = sorted((node for node in ast.walk(tree) if isinstance(node, _DOCUMENTED)),
                   key=lambda node: getattr(node, "lineno", 0))
    return " ".join(" ".join(doc.split()) for doc in map(ast.get_docstring, nodes) if doc)


def encode(text: str) -> torch.Tensor:
    """Character ids of ``text`` (unknown characters map to the last id)."""
    return torch.tensor([INDEX.get(char, len(VOCAB) - 1) for char in text], dtype=torch.long)


def corpus(context: int) -> tuple[TensorDataset, np.ndarray]:
    """Non-overlapping sequences of ``context + 1`` characters from every module, and each one's module index."""
    sequences, modules = [], []
    for index, name in enumerate(MODULES):
        ids = encode(docstrings(name))
        count = (len(ids) - 1) // context
        sequences += [ids[i * context: i * context + context + 1] for i in range(count)]
        modules += [index] * count
    return TensorDataset(torch.stack(sequences)), np.array(modules)


def evenly_spaced(modules: np.ndarray, count: int) -> list[int]:
    """``count`` sequence indices per module, spread evenly over its docstrings (first and last included)."""
    picked = []
    for module in range(len(MODULES)):
        members = np.flatnonzero(modules == module)
        picked += members[np.linspace(0, len(members) - 1, count).round().astype(int)].tolist()
    return picked


class TinyGPT(pl.LightningModule):
    """A character-level GPT-2 from a config (random init) with per-token and per-example losses."""

    def __init__(self, context: int, width: int = 64, layers: int = 2, heads: int = 4, lr: float = 3e-3,
                 weight_decay: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        # No dropout: SGLD evaluates the model in eval mode, and training should optimise the same function.
        config = GPT2Config(vocab_size=len(VOCAB), n_positions=context, n_embd=width, n_layer=layers, n_head=heads,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                            use_cache=False)
        self.gpt = GPT2LMHeadModel(config)

    def token_losses(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """Next-character cross-entropy at every position, ``[B, T]``, of sequences ``[B, T + 1]``."""
        sequence = batch[0]
        logits = self.gpt(input_ids=sequence[:, :-1]).logits
        return F.cross_entropy(logits.transpose(1, 2), sequence[:, 1:], reduction="none")

    def per_example_loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """The mean token loss of each sequence, ``[B]``: what SGLD samples and the training influence uses."""
        return self.token_losses(batch).mean(dim=1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.per_example_loss(batch).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def token_losses(model: TinyGPT, batch: list[torch.Tensor]) -> torch.Tensor:
    """The probe observable: per-token losses ``[B, T]`` (``SGLDConfig(per_token=True)``)."""
    return model.token_losses(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--snapshots", type=int, default=6, help="log-spaced BIF snapshots")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=30, help="draws per chain and snapshot")
    parser.add_argument("--per-module", type=int, default=6, help="tracked training sequences per module")
    parser.add_argument("--context", type=int, default=64, help="characters per sequence (the probes' T)")
    parser.add_argument("--root", default="runs", help="directory for TensorBoard runs and the log")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give on a busy CPU
    start = time.perf_counter()

    pl.seed_everything(0)
    train, modules = corpus(args.context)
    tracked_ids = evenly_spaced(modules, args.per_module)
    tracked = Subset(train, tracked_ids)
    probe_text = [text[:args.context + 1] for text in PROBES.values()]
    probes = TensorDataset(torch.stack([encode(text) for text in probe_text]))
    bif = BIFCallback(
        train=tracked,
        probes=probes,
        probe_fn=token_losses,
        train_groups=[MODULES[m] for m in modules[tracked_ids]],
        probe_groups=list(PROBES),
        # The token strings: probe p's loss at position t predicts character t + 1 of its text.
        probe_tokens=[list(text[1:]) for text in probe_text],
        train_text=["".join(VOCAB[i] for i in train[i][0].tolist()) for i in tracked_ids],
        log_spaced=LogSpaced(args.snapshots, first=min(10, args.steps)),
        # nβ = the number of training tokens: the likelihood is a sum over tokens, and per_example_loss a mean.
        config=SGLDConfig(chains=args.chains, draws=args.draws, burn_in=10, thin=2, step_size=4e-7,
                          nbeta=float(train.tensors[0].numel() - len(train)), localization=1e4, batch_size=16,
                          per_token=True),
    )
    logger = TensorBoardLogger(args.root, name="tiny_lm")
    trainer = pl.Trainer(max_steps=args.steps, callbacks=[bif], logger=logger, log_every_n_steps=10,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    model = TinyGPT(args.context)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True))
    print(f"\nTrained a {sum(p.numel() for p in model.parameters()):,}-parameter GPT-2 on {len(train)} sequences "
          f"of {args.context + 1} characters from {len(MODULES)} modules' docstrings: {trainer.global_step} steps "
          f"in {time.perf_counter() - start:.1f} s.")

    path = bif.resolved_log_path
    with open_log(path) as log:
        print(f"Influence log: {path} ({len(log)} snapshots at steps {log.steps.tolist()}, status "
              f"{sorted(set(log.status.tolist()))})\n")
        print("Mean BIF of a tracked sequence on each probe's mean token loss, from the probe's own module vs. "
              "from the other modules (negative = helpful):")
        for p, name in enumerate(PROBES):
            own = log.train_groups == name
            influence = log.influence[:, p]
            curve = "  ".join(f"{int(step)}: {mine:+.2g} / {others:+.2g}" for step, mine, others in
                              zip(log.steps, influence[:, own].mean(axis=1), influence[:, ~own].mean(axis=1),
                                  strict=True))
            print(f"  probe {p} ({name}), step: own / others   {curve}")
        print()
        print(format_view(token_view(log, 0, group=MODULES[0]), color=sys.stdout.isatty()))
        html = write_html(Path(path).parent / "tokens.html", log, probe=0, group=MODULES[0])
    print(f"Token view (HTML): {html}")
    print(f"In a terminal:     lightning-bif tokens {path} --probe 0 --group {MODULES[0]}")
    print(f"TensorBoard:       tensorboard --logdir {args.root}")


if __name__ == "__main__":
    main()
