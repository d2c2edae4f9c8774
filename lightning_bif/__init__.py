"""lightning-bif: Bayesian influence functions logged during PyTorch Lightning training."""

from typing import TYPE_CHECKING

from .config import SGLDConfig
from .log import DamagedLogError, open_log
from .schedule import LogSpaced, SnapshotSchedule
from .version import __version__ as __version__

if TYPE_CHECKING:
    from .estimation.result import BIFResult, Diagnostics
    from .lightning.callback import BIFCallback
    from .lightning.datamodule_examples import DataModuleExamples
    from .snapshot.estimate import estimate_bif


__all__ = [
    "BIFCallback",
    "BIFResult",
    "DamagedLogError",
    "DataModuleExamples",
    "Diagnostics",
    "LogSpaced",
    "SGLDConfig",
    "SnapshotSchedule",
    "estimate_bif",
    "open_log",
]


def __getattr__(name: str) -> object:
    # BIFCallback imports Lightning and the estimator torch (seconds); open_log and the CLI need neither.
    if name == "BIFCallback":
        from .lightning.callback import BIFCallback

        return BIFCallback
    if name in ("BIFResult", "Diagnostics"):
        from .estimation import result

        return getattr(result, name)
    if name == "estimate_bif":
        from .snapshot.estimate import estimate_bif

        return estimate_bif
    if name == "DataModuleExamples":
        from .lightning.datamodule_examples import DataModuleExamples

        return DataModuleExamples
    raise AttributeError(f"module 'lightning_bif' has no attribute {name!r}")
