"""LDS set-up ``momentum-late``: momentum SGD late in training, where the gradient dot product is strong.

Issue 24's first case, as a protocol of ``lds_midtrain.py`` (its code and cache): another problem
(``--data-seed 2``), a tanh MLP 16-32-4 trained with heavy-ball SGD (lr 0.05, momentum 0.9,
weight decay 1e-3, minibatch 50) for 1500 steps, attributed at steps 750, 900, 1050, 1200 and 1350
against training continued (weights and momentum buffers) for H = 150 steps (to the next
checkpoint) on 100 half-subsets × 3 batch orders. Late in training the loss is small and the
gradients of different examples are nearly orthogonal, so the gradient dot product already ranks
well; a snapshot has to beat it there. The callback's default horizon is H = 150 with the
optimizer's (η, μ).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lds_midtrain

LATE = dict(data_seed=2, batch=50, weight_decay=1e-3, total_steps=1500, checkpoints=(750, 900, 1050, 1200, 1350))
TINY = dict(n_train=60, n_probes=6, hidden=6, total_steps=60, checkpoints=(30, 45), subsets=8, orders=2)


def setup(tiny: bool = False) -> lds_midtrain.Setup:
    """The set-up; ``tiny``: toy sizes for the smoke test."""
    return lds_midtrain.Setup(**{**LATE, **(TINY if tiny else {})})
