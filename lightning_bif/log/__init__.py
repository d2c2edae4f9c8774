"""The HDF5 influence log: one versioned schema, an append-only writer and a reader.

This package is the only code that knows the file layout: ``columns`` declares every per-snapshot
dataset once (name, dtype, shape, reader name, TensorBoard chart, format version), ``schema`` the rest
of the file; everything else goes through :class:`LogWriter` (``writer``) and :func:`open_log`
(``reader``). Layout (``S`` snapshots, ``P`` probes, ``N`` tracked training examples)::

    /                         attrs: format, format_version, package_version, created, config (JSON),
                                     chains, draws; tokens (T) in per-token runs; optional (version 2)
                                     train_group_names, probe_group_names: JSON [[label, name], ...]
    train_ids [N], probe_ids [P]            int64 dataset indices or fixed-length UTF-8 keys
    train_groups [N], probe_groups [P]      optional group labels (int64 or UTF-8)
    probe_tokens [P, T], train_text [N]     optional display strings (variable-length UTF-8; format 2)
    <column> [S, ...]                       one per entry of ``columns.COLUMNS`` (``step`` is written last:
                                            the commit marker)

Every per-snapshot dataset is resizable along its first axis and chunked one snapshot per chunk.
The writer works in HDF5's single-writer/multiple-reader (SWMR) mode and flushes after every
snapshot, so a reader in another process sees each completed snapshot and a crash loses at most
the snapshot in flight.
"""

from ..snapshot.record import SnapshotRecord as SnapshotRecord
from .reader import InfluenceLog as InfluenceLog
from .reader import RowView as RowView
from .reader import Snapshot as Snapshot
from .reader import TokenTrajectory as TokenTrajectory
from .reader import Trajectory as Trajectory
from .reader import open_log as open_log
from .recover import DamagedLogError as DamagedLogError
from .recover import SalvageReport as SalvageReport
from .recover import repair as repair
from .recover import salvage as salvage
from .schema import FORMAT as FORMAT
from .schema import FORMAT_VERSION as FORMAT_VERSION
from .schema import STATUSES as STATUSES
from .schema import PathLike as PathLike
from .schema import RunIdentity as RunIdentity
from .tables import UnknownIdError as UnknownIdError
from .writer import LogWriteError as LogWriteError
from .writer import LogWriter as LogWriter
from .writer import check_writable as check_writable
