"""lightning-bif: Bayesian influence functions logged during PyTorch Lightning training."""

from .config import SGLDConfig
from .estimator import BIFResult, Diagnostics, estimate_bif
from .log import open_log

__version__ = "0.1.0"

__all__ = [
    "BIFResult",
    "Diagnostics",
    "SGLDConfig",
    "estimate_bif",
    "open_log",
]
