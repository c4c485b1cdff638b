"""A run whose eph process died: how ``eph report`` tells it, and what it says of it.

``state.json`` (:mod:`harness.runstate`) says where the run stood. A run that
is not ``finished`` and whose process is gone crashed: its parts hold every row
flushed before the crash, and finalize merges them as it would have. A run whose
process still runs is refused: it is writing the directory.
"""

from __future__ import annotations

import datetime as dt
import logging

import pyarrow as pa
import pyarrow.compute as pc

from harness.errors import RunDirError
from harness.report.ondisk import Records, start_span
from harness.rundir import RunDir
from harness.runstate import Phase, RunState, read_state
from harness.summary import Crash

__all__ = ["crash_section", "crashed_state"]

logger = logging.getLogger(__name__)


def crashed_state(run: RunDir) -> RunState | None:
    """The state of ``run`` if it crashed; None if it finished (or predates ``state.json``).

    Raises :class:`RunDirError` while its eph process still runs on this host.
    """
    state = read_state(run.path)
    if state is None or state.phase is Phase.FINISHED:
        return None
    alive = state.alive()
    if alive:
        raise RunDirError(
            run.path,
            f"the run is still going (eph pid {state.pid}, {state.phase}): let it finish,"
            f" or stop it (Ctrl-C in its terminal, or kill {state.pid}), then report",
        )
    if alive is None:
        logger.warning(
            "%s: the run ran on %s and never finished; eph cannot see that host's"
            " processes: reporting it as crashed",
            run.path,
            state.host,
        )
    return state


def crash_section(state: RunState, records: Records, samples: pa.Table | None) -> Crash:
    """How far the records (of any size: held or on disk) and samples of a crashed run
    reach."""
    first, last = start_span(records)
    last_sample = _max(samples, "t_ns") if samples is not None else None
    origin = first if first is not None else (_min(samples, "t_ns") if samples else None)
    last_at = None
    if last is not None and state.clock_offset_ns is not None:
        wall = (last + state.clock_offset_ns) / 1e9
        last_at = dt.datetime.fromtimestamp(wall, dt.UTC).isoformat(timespec="milliseconds")
    return Crash(
        phase=state.phase.value,
        pid=state.pid,
        host=state.host,
        host_checked=state.alive() is not None,
        last_record_s=_seconds(last, origin),
        last_sample_s=_seconds(last_sample, origin),
        last_record_at=last_at,
        error=state.error,
    )


def _seconds(stamp: int | None, origin: int | None) -> float | None:
    if stamp is None or origin is None:
        return None
    return round((stamp - origin) / 1e9, 3)


def _min(table: pa.Table, column: str) -> int | None:
    value = pc.min(table.column(column)).as_py() if len(table) else None
    return int(value) if value is not None else None


def _max(table: pa.Table, column: str) -> int | None:
    value = pc.max(table.column(column)).as_py() if len(table) else None
    return int(value) if value is not None else None
