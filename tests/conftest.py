"""Shared test settings: small thread counts keep the suite fast on 2-core CI machines."""

import torch

torch.set_num_threads(2)
