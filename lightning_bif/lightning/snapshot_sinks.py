"""Rank 0's destinations of snapshot records for one fit: the HDF5 log, opened or resumed, and the viewers.

A write that fails is counted and warned about once; training goes on, and the end of the fit says how
many snapshots the log lacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..log import LogWriteError, LogWriter, RunIdentity
from ..snapshot.record import SnapshotRecord
from ..snapshot.snapshotter import SnapshotSink


class SnapshotSinks:
    """The sinks a fit hands each snapshot record to: the log and viewers such as TensorBoard (none off rank 0).

    Args:
        path: The log's path (for messages).
        sinks: The open log (:meth:`open_log`) and the viewers.
    """

    def __init__(self, path: Path | None = None, sinks: Sequence[SnapshotSink] = ()) -> None:
        self.path = path
        self.sinks = list(sinks)
        self.log = next((sink for sink in self.sinks if isinstance(sink, LogWriter)), None)
        self.lost: list[int] = []  # steps of snapshots that could not be written to the log
        self.first_error = ""

    @staticmethod
    def open_log(path: Path, identity: RunIdentity, if_exists: str, resumed_after: int | None) -> LogWriter:
        """Open the log of a fit; a resumed fit's (``resumed_after``: its checkpoint's last snapshot) is cut there.

        Raises:
            ValueError: The log cannot be used, with a message that says what to do.
        """
        if resumed_after is not None and resumed_after >= 0 and if_exists == "resume" and not path.exists():
            raise ValueError(
                f"BIFCallback: resuming a run whose influence log {path} is missing (the checkpoint has snapshots "
                f"up to step {resumed_after}). Put the log back (or a repaired copy: lightning-bif repair), or pass "
                "BIFCallback(if_exists='overwrite') to start a new log from this step.")
        try:
            log = LogWriter(path, identity, if_exists=if_exists)
        except (OSError, ValueError) as error:
            raise ValueError(f"BIFCallback cannot use log_path={str(path)!r}: {error}") from error
        if log.recovered is not None:
            rank_zero_info(f"BIFCallback: the previous run writing {path} was killed; recovered its log: "
                           f"{log.recovered}")
        if resumed_after is not None and if_exists == "resume":
            dropped = log.truncate_after(resumed_after)
            if dropped:
                rank_zero_info(f"BIFCallback: resumed; removed {dropped} snapshot(s) after step {resumed_after} "
                               "written after the checkpoint.")
        return log

    @property
    def last_step(self) -> int:
        """The step of the log's last snapshot; -1 when it has none (or there is no log here)."""
        return int(self.log.steps[-1]) if self.log is not None and len(self.log.steps) else -1

    def write(self, record: SnapshotRecord) -> bool:
        """Hand the record to every sink; ``False`` when one could not take it (warned once per fit)."""
        written = True
        for sink in self.sinks:
            try:
                sink.write(record)
            except LogWriteError as error:
                if written:
                    self.lost.append(record.step)
                written = False
                if not self.first_error:
                    self.first_error = str(error)
                    rank_zero_warn(f"BIFCallback: {error}. Training goes on; later snapshots are tried again and "
                                   "the end of the fit says how many were lost. (Shown once.)")
        return written

    def close(self) -> None:
        """Close every sink (a sink that fails to flush is warned about); later writes go nowhere."""
        sinks, self.sinks, self.log = self.sinks, [], None
        for sink in sinks:
            try:
                sink.close()
            except LogWriteError as error:
                rank_zero_warn(f"BIFCallback: {error}. Check the log with `lightning-bif summary {self.path}`.")

    def report_lost(self) -> None:
        """Say at the end of a fit how many snapshots could not be written to the log, and why."""
        if self.lost:
            steps = ", ".join(map(str, self.lost[:10])) + (", ..." if len(self.lost) > 10 else "")
            rank_zero_warn(
                f"BIFCallback: {len(self.lost)} snapshot(s) of this fit could not be written to the influence log "
                f"{self.path} (steps {steps}); first error: {self.first_error}. They are not in "
                "the log; every other snapshot is."
            )
            self.lost = []
