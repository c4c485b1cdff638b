"""CPU time per interval: what each load process spends, next to the attempts it made.

Port exhaustion shows first as system CPU: connect() walks the used part of the
range looking for a free port (``__inet_check_established``). So every load
process (a Locust process running the gevent engine, a uvloop engine child, and
the Locust process that drives such a child) reads its own user and system CPU
time (``getrusage(RUSAGE_SELF)``, every thread) at each records flush and writes
one row per interval: when it ended, how long it was, the CPU deltas, and the
attempts it recorded in it (zero for a driving Locust process, whose rows are
the child's). Nothing is done per connection: one ``getrusage`` and one small
Arrow batch every ``records.FLUSH_INTERVAL``.

The rows go to a part file of their own in ``parts/`` (an Arrow IPC stream like
the records', named ``cpu-*.arrows`` so that it ships with a distributed
worker's parts), and :func:`merge_cpu_parts` merges every part into
``cpu.parquet`` at the end: a few kilobytes a minute, whatever the rate.

Never imports locust.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from harness.files import atomic_path, read_stream
from harness.records import Part, host_name

__all__ = [
    "CPU_FILE",
    "CPU_PART_PREFIX",
    "CPU_REQUEST_TYPE",
    "CPU_SCHEMA",
    "CpuInterval",
    "CpuMeter",
    "cpu_part_path",
    "is_cpu_part",
    "merge_cpu_parts",
    "read_cpu_part",
]

logger = logging.getLogger(__name__)

CPU_FILE = "cpu.parquet"  # in the run directory, merged from the parts at the end
CPU_REQUEST_TYPE = "CPU"  # Locust's entries of CPU per connection (harness.load.stats)
CPU_PART_PREFIX = "cpu-"  # parts/cpu-<engine>-<pid>[-<test>].arrows, next to the records'

_PART_SCHEMA = pa.schema(
    [
        ("t_ns", pa.int64()),  # CLOCK_MONOTONIC at the end of the interval
        ("interval_ns", pa.int64()),  # the interval's length
        ("utime_us", pa.int64()),  # user CPU spent in it, every thread of the process
        ("stime_us", pa.int64()),  # system CPU spent in it
        ("attempts", pa.uint32()),  # attempts recorded in it (flushed rows)
        ("succeeded", pa.uint32()),  # of which connect() succeeded
    ]
)

_DICT = pa.dictionary(pa.int32(), pa.string())
CPU_SCHEMA = pa.schema(
    [
        *_PART_SCHEMA,
        ("engine", _DICT),  # locust (gevent), uvloop (the child), or uvloop-driver
        ("pid", pa.uint32()),
        ("host", _DICT),
    ]
)


class CpuInterval(NamedTuple):
    """One process's CPU over one interval, and what it recorded in it."""

    t_ns: int
    interval_ns: int
    utime_us: int
    stime_us: int
    attempts: int
    succeeded: int


def _usage() -> tuple[int, int, int]:
    """(monotonic ns, user µs, system µs) of this process now."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.monotonic_ns(), round(usage.ru_utime * 1e6), round(usage.ru_stime * 1e6)


def cpu_part_path(parts: Path, name: str) -> Path:
    """``parts/cpu-<name>.arrows``: ``name`` unique on this host (it holds a pid)."""
    return parts / f"{CPU_PART_PREFIX}{name}.arrows"


def is_cpu_part(path: Path) -> bool:
    return path.name.startswith(CPU_PART_PREFIX)


class CpuMeter:
    """Reads this process's CPU at each :meth:`tick` and streams the deltas to ``path``."""

    def __init__(self, path: Path, *, engine: str, pid: int | None = None) -> None:
        self.path = path
        meta = {
            "engine": engine,
            "pid": str(pid if pid is not None else os.getpid()),
            "host": host_name(),
        }
        self._schema = _PART_SCHEMA.with_metadata(meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = ipc.new_stream(self._sink, self._schema)
        self._last = _usage()
        self.error: OSError | None = None

    def tick(self, rows: np.ndarray | None = None) -> CpuInterval:
        """Close the interval: ``rows`` (``records.ROW_DTYPE``) are the attempts
        flushed in it (None: this process makes none)."""
        now = _usage()
        attempts = succeeded = 0
        if rows is not None and len(rows):
            attempts, succeeded = len(rows), int((rows["errno"] == 0).sum())
        last, self._last = self._last, now
        interval = CpuInterval(
            t_ns=now[0],
            interval_ns=now[0] - last[0],
            utime_us=now[1] - last[1],
            stime_us=now[2] - last[2],
            attempts=attempts,
            succeeded=succeeded,
        )
        self._write(interval)
        return interval

    def _write(self, interval: CpuInterval) -> None:
        if self.error is not None:
            return
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array([value], field.type)
                for value, field in zip(interval, _PART_SCHEMA, strict=True)
            ],
            schema=self._schema,
        )
        try:
            self._writer.write_batch(batch)
        except OSError as exc:  # a full disk: the records' writer says so too
            self.error = exc
            logger.error("cannot write CPU rows to %s (%s)", self.path, exc.strerror or exc)

    def close(self, rows: np.ndarray | None = None) -> CpuInterval:
        interval = self.tick(rows)
        for closing in (self._writer.close, self._sink.close):
            try:
                closing()
            except OSError as exc:
                self.error = self.error or exc
        return interval


@dataclass(frozen=True)
class _Read:
    table: pa.Table
    truncated: bool


def read_cpu_part(part: Part) -> _Read:
    """One CPU part up to its last whole batch, with engine, pid and host columns."""
    read = read_stream(part.path)
    if read.schema is None:
        return _Read(CPU_SCHEMA.empty_table(), truncated=True)
    meta = {k.decode(): v.decode() for k, v in (read.schema.metadata or {}).items()}
    table = read.table()
    n = table.num_rows
    t_ns = table.column("t_ns")
    if part.shift_ns:  # a worker host's clock onto the run's
        t_ns = pa.array(t_ns.to_numpy() + np.int64(part.shift_ns))
    columns = {name: table.column(name) for name in _PART_SCHEMA.names}
    columns["t_ns"] = t_ns
    columns["engine"] = _constant(n, meta.get("engine", ""))
    columns["pid"] = pa.array(np.full(n, int(meta.get("pid", 0)), dtype=np.uint32))
    columns["host"] = _constant(n, part.host or meta.get("host", ""))
    return _Read(pa.table(columns, schema=CPU_SCHEMA), read.truncated)


def _constant(n: int, value: str) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(n, np.int32), pa.int32()), pa.array([value], pa.string())
    )


def merge_cpu_parts(parts: Sequence[Part], out: Path) -> int:
    """Merge CPU parts into one Parquet file sorted by time; returns its row count."""
    tables = []
    for part in parts:
        read = read_cpu_part(part)
        if read.truncated:
            logger.warning("CPU part %s was truncated; kept its whole batches", part.path)
        tables.append(read.table)
    table = pa.concat_tables(tables).unify_dictionaries() if tables else CPU_SCHEMA.empty_table()
    table = table.combine_chunks().unify_dictionaries()
    if table.num_rows:
        table = table.sort_by("t_ns")
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return int(table.num_rows)
