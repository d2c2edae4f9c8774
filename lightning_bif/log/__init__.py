"""The HDF5 influence log: one versioned schema, an append-only writer and a reader.

This package is the only code that knows the file layout: ``schema`` describes it, everything
else goes through :class:`LogWriter` (``writer``) and :func:`open_log` (``reader``). Layout
(``S`` snapshots, ``P`` probes, ``N`` tracked training examples, ``C`` chains, ``D`` draws per chain)::

    /                         attrs: format, format_version, package_version, created, config (JSON),
                                     chains, draws; optional (version 2) train_group_names,
                                     probe_group_names: JSON [[label, name], ...]
    train_ids [N], probe_ids [P]            int64 dataset indices or fixed-length UTF-8 keys
    train_groups [N], probe_groups [P]      optional group labels (int64 or UTF-8)
    probe_tokens [P, T], train_text [N]     optional display strings (variable-length UTF-8; format 2)
    step [S]                                training step of each snapshot (written last: the commit marker)
    epoch [S], wall_time [S], duration_s [S], status [S], message [S]
    influence [S, P, N], correlation [S, P, N], stderr [S, P, N]     float32
    train_loss [S, N], probe_loss [S, P]                             losses at w*
    split_half [S], loss_rise [S], ess [S], nbeta [S], step_size [S]      step_size: the ε that snapshot used
    calibration [S]                         JSON evidence of a step-size calibration run before that snapshot, or ""
    diagnostics/sampling_loss [S, C, D], diagnostics/draw_loss [S, C, D], diagnostics/diverged [S, C]
    token_influence [S, P, T, N], token_influence_se [S, P, T, N]    float32; only in logs of per-token runs,
                                     whose root attrs also hold tokens (T)

Every per-snapshot dataset is resizable along its first axis and chunked one snapshot per chunk.
The writer works in HDF5's single-writer/multiple-reader (SWMR) mode and flushes after every
snapshot, so a reader in another process sees each completed snapshot and a crash loses at most
the snapshot in flight.
"""

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
from .schema import SnapshotRecord as SnapshotRecord
from .tables import UnknownIdError as UnknownIdError
from .writer import LogWriteError as LogWriteError
from .writer import LogWriter as LogWriter
from .writer import check_writable as check_writable
