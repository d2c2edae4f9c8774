"""The HDF5 influence log (being split into schema, writer and reader)."""

from .writer import FORMAT as FORMAT
from .writer import FORMAT_VERSION as FORMAT_VERSION
from .writer import STATUSES as STATUSES
from .writer import InfluenceLog as InfluenceLog
from .writer import LogWriter as LogWriter
from .writer import PathLike as PathLike
from .writer import RowView as RowView
from .writer import RunIdentity as RunIdentity
from .writer import Snapshot as Snapshot
from .writer import SnapshotRecord as SnapshotRecord
from .writer import TokenTrajectory as TokenTrajectory
from .writer import Trajectory as Trajectory
from .writer import check_writable as check_writable
from .writer import open_log as open_log
