"""Shared test settings: one intra-op thread keeps the suite fast on small, shared CI machines.

The tests run many tiny tensor ops, where a second OpenMP thread brings no speed-up and, on a
busy 2-core machine, spin-waiting threads made the SGLD tests ~10x slower in CPU time.
"""

import torch

torch.set_num_threads(1)
