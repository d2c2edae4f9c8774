"""lightning-bif: Bayesian influence functions logged during PyTorch Lightning training."""

from typing import TYPE_CHECKING

from .config import SGLDConfig
from .log import DamagedLogError, open_log
from .schedule import LogSpaced

if TYPE_CHECKING:
    from .callback import BIFCallback
    from .datamodule_source import DataModuleExamples
    from .estimator import BIFResult, Diagnostics, estimate_bif

__version__ = "0.1.0"

__all__ = [
    "BIFCallback",
    "BIFResult",
    "DamagedLogError",
    "DataModuleExamples",
    "Diagnostics",
    "LogSpaced",
    "SGLDConfig",
    "estimate_bif",
    "open_log",
]


def __getattr__(name: str) -> object:
    # BIFCallback imports Lightning and the estimator torch (seconds); open_log and the CLI need neither.
    if name == "BIFCallback":
        from .callback import BIFCallback

        return BIFCallback
    if name in ("BIFResult", "Diagnostics", "estimate_bif"):
        from . import estimator

        return getattr(estimator, name)
    if name == "DataModuleExamples":
        from .datamodule_source import DataModuleExamples

        return DataModuleExamples
    raise AttributeError(f"module 'lightning_bif' has no attribute {name!r}")
