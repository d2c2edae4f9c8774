"""Which of the trainer's loggers get the BIF charts, and a sink for each: ``BIFCallback(loggers=...)``.

A ``TensorBoardLogger`` gets :class:`~lightning_bif.viewers.tensorboard.TensorBoardSink` (a run per train
group); every other logger a :class:`~lightning_bif.viewers.metrics.MetricsSink` through ``log_metrics``, with
figures through its own image API where it has one (W&B, MLflow). No logger package is imported here: the
logger classes are Lightning's, which import their package when the user creates one.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from ..log import RunIdentity
from ..snapshot.snapshotter import SnapshotSink
from ..viewers.metrics import ImageWriter, MetricsSink
from ..viewers.tensorboard import TensorBoardSink

#: The names ``BIFCallback(loggers=[...])`` takes, and the logger type each stands for.
LOGGER_NAMES: dict[str, type[Logger]] = {
    "tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MLFlowLogger, "csv": CSVLogger,
}

LoggerChoice = str | type[Logger]


def check_loggers(loggers: Any) -> tuple[type[Logger], ...] | None:
    """The logger types ``BIFCallback(loggers=...)`` chooses; ``None`` (every logger of the trainer) stays ``None``.

    Takes names of :data:`LOGGER_NAMES`, ``Logger`` subclasses, or a list of both (``[]``: none).

    Raises:
        ValueError: An unknown name, or something that is not a ``Logger`` subclass.
    """
    if loggers is None:
        return None
    if isinstance(loggers, (str, type)):
        loggers = [loggers]
    if not isinstance(loggers, Sequence):
        raise ValueError(f"BIFCallback(loggers={loggers!r}) takes None (all of the trainer's loggers) or a list of "
                         f"names ({', '.join(map(repr, LOGGER_NAMES))}) or Logger classes.")
    chosen = []
    for entry in loggers:
        if isinstance(entry, str):
            if entry.lower() not in LOGGER_NAMES:
                raise ValueError(f"BIFCallback(loggers=...): unknown logger name {entry!r}; use "
                                 f"{', '.join(map(repr, LOGGER_NAMES))}, or a Logger class such as CometLogger.")
            chosen.append(LOGGER_NAMES[entry.lower()])
        elif isinstance(entry, type) and issubclass(entry, Logger):
            chosen.append(entry)
        else:
            raise ValueError(f"BIFCallback(loggers=...): {entry!r} is neither a logger name "
                             f"({', '.join(map(repr, LOGGER_NAMES))}) nor a subclass of "
                             "lightning.pytorch.loggers.Logger (pass the class, not an instance).")
    return tuple(chosen)


def chosen_loggers(loggers: Sequence[Logger], chosen: tuple[type[Logger], ...] | None) -> tuple[list[Logger], list]:
    """The trainer's loggers that ``chosen`` picks, and the chosen types no logger of the trainer is."""
    if chosen is None:
        return list(loggers), []
    picked = [logger for logger in loggers if isinstance(logger, chosen)]
    missing = [kind for kind in chosen if not any(isinstance(logger, kind) for logger in loggers)]
    return picked, missing


def image_writer(logger: Logger) -> ImageWriter | None:
    """How ``logger`` takes an RGB image at a step, through its own API; ``None`` for a logger without images."""
    if isinstance(logger, WandbLogger):
        return lambda tag, image, step: logger.log_image(key=tag, images=[image], step=step)
    if isinstance(logger, MLFlowLogger):
        # MLflow keeps images as artifacts: one PNG per snapshot, named by its step.
        return lambda tag, image, step: logger.experiment.log_image(logger.run_id, image,
                                                                    f"{tag}/step_{step:08d}.png")
    return None


def logger_sinks(
    loggers: Sequence[Logger],
    identity: RunIdentity,
    train_group_names: Mapping[Any, str] | None,
    probe_group_names: Mapping[Any, str] | None,
    charts: bool | Collection[str],
    log_path: Path,
) -> list[SnapshotSink]:
    """A sink per logger: TensorBoard's own for a ``TensorBoardLogger``, ``log_metrics`` for the others."""
    sinks: list[SnapshotSink] = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            sinks.append(TensorBoardSink(logger.experiment, identity, train_group_names, probe_group_names, charts,
                                         log_path=log_path))
        else:
            sinks.append(MetricsSink(logger, identity, train_group_names, probe_group_names, charts,
                                     log_path=log_path, write_image=image_writer(logger)))
    return sinks
