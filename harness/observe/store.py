"""What ``eph observe`` keeps: one row per sample per kept path, one per sample for the host.

While observing, rows go to Arrow IPC streams (``paths.arrows``, ``host.arrows``),
one batch a sample, so a crash loses at most the sample being written. At the
end each stream becomes a Parquet file (``paths.parquet``, ``host.parquet``);
a stream cut by a crash keeps its whole batches (``harness.files.read_stream``).
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from harness.files import atomic_path, read_stream
from harness.observe.nat_pools import NatSnapshot
from harness.observe.outlook import Outlook
from harness.observe.paths import STATES, PathSnapshot

__all__ = ["HOST_SCHEMA", "PATHS_SCHEMA", "ObserveStore", "Retention", "finish_stream"]

STATE_COLUMNS = [s.name.lower() for s in STATES]
OWNER_TYPE = pa.struct(
    [
        ("pid", pa.int32()),
        ("comm", pa.string()),
        ("cgroup", pa.string()),
        ("container", pa.string()),
        ("ports", pa.int32()),
    ]
)
PATHS_SCHEMA = pa.schema(
    [
        ("time", pa.float64()),
        ("rank", pa.int16()),  # 0 = busiest; the ``other`` row is last
        ("label", pa.string()),
        ("protocol", pa.string()),
        ("local", pa.string()),
        ("remote", pa.string()),
        ("remote_port", pa.int32()),
        ("ports", pa.int32()),
        ("usable", pa.int32()),
        ("occupancy", pa.float32()),
        ("new", pa.int32()),
        ("new_per_s", pa.float32()),
        *((name, pa.int32()) for name in STATE_COLUMNS),
        ("hold_s", pa.float32()),
        ("lifetime_s", pa.float32()),
        ("sustainable_per_s", pa.float32()),
        ("time_to_exhaustion_s", pa.float32()),
        ("verdict", pa.string()),
        # who held the ports (most first, at most OWNERS_TOP), and the ports of sockets
        # with no owner known (TIME_WAIT); null where owners were not looked up
        ("owners", pa.list_(OWNER_TYPE)),
        ("unattributed", pa.int32()),
        # with --all-namespaces: the path's network namespace (its ip netns name, else
        # its first processes); null with one namespace
        ("netns", pa.string()),
    ]
)
NAT_TYPE = pa.struct(
    [
        ("destination", pa.string()),
        ("nat_address", pa.string()),
        ("in_use", pa.int32()),
        ("time_wait", pa.int32()),
        ("low_port", pa.int32()),
        ("high_port", pa.int32()),
        ("pool", pa.int32()),  # the NAT address's ports by the nftables rules; null: unknown
    ]
)
NAT_ROWS = 50  # destination and NAT address pairs kept per sample
# with --all-namespaces: the counters of each namespace (the host line's are eph's own)
NETNS_COLUMNS = (
    "active_opens", "attempt_fails", "tw_recycled", "timewait_overflow", "sockstat_tw",
    "curr_estab", "conntrack_count",
)  # fmt: skip
NETNS_TYPE = pa.struct(
    [("netns", pa.string()), ("inode", pa.int64())] + [(name, pa.int64()) for name in NETNS_COLUMNS]
)
HOST_SCHEMA = pa.schema(
    [
        ("time", pa.float64()),
        ("paths", pa.int32()),
        ("sockets", pa.int32()),
        ("usable", pa.int32()),
        ("tw", pa.int64()),
        ("tw_recycled", pa.int64()),
        ("timewait_overflow", pa.int64()),
        ("active_opens", pa.int64()),
        ("attempt_fails", pa.int64()),
        ("curr_estab", pa.int64()),
        ("sockstat_tw", pa.int64()),
        ("conntrack_count", pa.int64()),
        ("sample_ms", pa.float32()),
        # on a NAT router: each destination and NAT address's pool (most in use first,
        # at most NAT_ROWS), and conntrack's insert_failed and drop since the sample
        # before; null where there is no NAT view
        ("nat", pa.list_(NAT_TYPE)),
        ("nat_insert_failed", pa.int64()),
        ("nat_drop", pa.int64()),
        # with --all-namespaces: each namespace's counters (NETNS_COLUMNS), eph's own
        # first; null with one namespace
        ("netns", pa.list_(NETNS_TYPE)),
    ]
)


def paths_batch(snap: PathSnapshot, look: Outlook) -> pa.RecordBatch:
    n = len(snap)
    protocol = ["udp" if p == 17 else "tcp" if p == 6 else "" for p in snap.protocol.tolist()]
    columns: dict[str, Any] = {
        "time": np.full(n, snap.time),
        "rank": np.arange(n, dtype=np.int16),
        "label": [snap.label(i) for i in range(n)],
        "protocol": protocol,
        "local": snap.local,
        "remote": snap.remote,
        "remote_port": snap.remote_port.astype(np.int32),
        "ports": snap.ports.astype(np.int32),
        "usable": snap.usable.astype(np.int32),
        "netns": snap.netns if snap.netns is not None else [None] * n,
        "occupancy": snap.occupancy.astype(np.float32),
        "new": snap.new.astype(np.int32),
        "new_per_s": snap.new_per_s.astype(np.float32),
        **{name: snap.states[:, i].astype(np.int32) for i, name in enumerate(STATE_COLUMNS)},
        "hold_s": look.hold_s.astype(np.float32),
        "lifetime_s": look.lifetime_s.astype(np.float32),
        "sustainable_per_s": look.sustainable_per_s.astype(np.float32),
        "time_to_exhaustion_s": look.time_to_exhaustion_s.astype(np.float32),
        "verdict": [str(v) for v in look.verdicts],
        "owners": (
            [[o._asdict() for o in row] for row in snap.owners]
            if snap.owners is not None
            else [None] * n
        ),
        "unattributed": (
            snap.unattributed.astype(np.int32) if snap.unattributed is not None else [None] * n
        ),
    }
    return pa.RecordBatch.from_pydict(columns, schema=PATHS_SCHEMA)


def host_batch(
    snap: PathSnapshot,
    counters: dict[str, int | None],
    sample_ms: float,
    nat: NatSnapshot | None = None,
) -> pa.RecordBatch:
    row: dict[str, list[Any]] = {
        "time": [snap.time],
        "paths": [snap.paths_total],
        "sockets": [snap.sockets],
        "usable": [snap.host_usable],
        "sample_ms": [sample_ms],
        "nat": [None if nat is None else [r._asdict() for r in nat.rows[:NAT_ROWS]]],
        "nat_insert_failed": [None if nat is None else nat.insert_failed],
        "nat_drop": [None if nat is None else nat.drop],
        "netns": [
            None
            if snap.namespaces is None
            else [
                {"netns": ns.label, "inode": ns.inode}
                | {name: ns.counters.get(name) for name in NETNS_COLUMNS}
                for ns in snap.namespaces
            ]
        ],
    }
    for name in HOST_SCHEMA.names:
        if name not in row:
            row[name] = [counters.get(name)]
    return pa.RecordBatch.from_pydict(row, schema=HOST_SCHEMA)


@dataclass(frozen=True)
class Retention:
    """How an observation that runs for months keeps its disk bounded: a new part
    every ``rotate_s``, and finished parts dropped once older than ``keep_s`` or
    beyond ``keep_bytes`` in all (the newest kept first; the newest finished part
    always stays, so that the end's summary has the last samples)."""

    rotate_s: float = 3600.0
    keep_s: float | None = None
    keep_bytes: int | None = None


class ObserveStore:
    """The two streams of one observation, in ``out``.

    With a :class:`Retention`, the streams are parts under ``out/parts/``
    (``paths-<start>.arrows``); each finished part becomes Parquet there, readable
    while eph runs (``duckdb -c "select * from 'parts/paths-*.parquet'"``), and the
    oldest go as ``keep`` says. At the end the kept parts become ``paths.parquet``
    and ``host.parquet``, as without rotation.
    """

    def __init__(
        self,
        out: Path,
        retention: Retention | None = None,
        clock: Callable[[], float] = time.time,
        *,
        resume: bool = False,
    ) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.retention = retention
        self.clock = clock
        self.rotations = 0
        self.dropped = 0  # parts dropped by retention
        self.resumed = 0  # parts taken over from an earlier eph in this directory
        if resume and retention is not None:
            self._take_over()
        self._open(self.clock())

    def _take_over(self) -> None:
        """An earlier eph's samples in this directory become finished parts, so that a
        restarted agent goes on where it stopped and retention covers them too: its
        merged files (it stopped cleanly) or its parts (it was killed: each stream
        keeps its whole batches)."""
        self.parts.mkdir(exist_ok=True)
        for stream in sorted(self.parts.glob("*.arrows")):
            schema = PATHS_SCHEMA if stream.name.startswith("paths-") else HOST_SCHEMA
            finish_stream(stream, schema)
            self.resumed += 1
        for name in ("paths", "host"):
            merged = self.out / f"{name}.parquet"
            if not merged.exists():
                continue
            times = pq.read_table(merged, columns=["time"]).column("time").to_numpy()
            first = float(times.min()) if len(times) else self.clock()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(first))
            merged.rename(self.parts / f"{name}-{stamp}-resumed.parquet")
            self.resumed += 1

    @property
    def parts(self) -> Path:
        return self.out / "parts"

    def _stream(self, name: str) -> Path:
        if self.retention is None:
            return self.out / f"{name}.arrows"
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._started))
        return self.parts / f"{name}-{stamp}-{self.rotations:06d}.arrows"

    def _open(self, now: float) -> None:
        self._started = now
        if self.retention is not None:
            self.parts.mkdir(exist_ok=True)
        self._files = [pa.OSFile(str(self._stream(name)), "wb") for name in ("paths", "host")]
        self._paths = ipc.new_stream(self._files[0], PATHS_SCHEMA)
        self._host = ipc.new_stream(self._files[1], HOST_SCHEMA)

    def write(self, paths: pa.RecordBatch, host: pa.RecordBatch) -> None:
        now = self.clock()
        if self.retention is not None and now - self._started >= self.retention.rotate_s:
            self.rotate(now)
        self._paths.write_batch(paths)
        self._host.write_batch(host)
        for f in self._files:
            f.flush()

    def _finish_current(self) -> None:
        paths, host = self._stream("paths"), self._stream("host")
        for writer in (self._paths, self._host):
            writer.close()
        for f in self._files:
            f.close()
        finish_stream(paths, PATHS_SCHEMA)
        finish_stream(host, HOST_SCHEMA)

    def rotate(self, now: float | None = None) -> None:
        """Finish the current parts and start new ones (on schedule, or on SIGHUP);
        then drop what retention no longer keeps. Without retention: nothing."""
        if self.retention is None:
            return
        self._finish_current()
        self.rotations += 1
        self._open(self.clock() if now is None else now)
        self._prune()

    def _prune(self) -> None:
        assert self.retention is not None
        finished = sorted(self.parts.glob("paths-*.parquet"), reverse=True)  # newest first
        kept_bytes, now = 0, self.clock()
        for i, part in enumerate(finished):
            host = part.with_name("host" + part.name.removeprefix("paths"))
            size = part.stat().st_size + (host.stat().st_size if host.exists() else 0)
            kept_bytes += size
            # a part's data ends where the next (newer) one starts: the current part's
            # start for the newest
            ends = self._started if i == 0 else _part_start(finished[i - 1])
            too_old = self.retention.keep_s is not None and now - ends > self.retention.keep_s
            too_big = (
                self.retention.keep_bytes is not None and kept_bytes > self.retention.keep_bytes
            )
            if (too_old or too_big) and i > 0:  # the newest part stays, whatever the bound
                part.unlink()
                host.unlink(missing_ok=True)
                self.dropped += 1

    def close(self) -> tuple[int, int]:
        """Close the streams and turn them into Parquet; returns (path rows, samples)."""
        self._finish_current()
        if self.retention is None:
            return (
                _rows(self.out / "paths.parquet"),
                _rows(self.out / "host.parquet"),
            )
        self._prune()
        kept = sorted(self.parts.glob("*.parquet"))
        paths = [p for p in kept if p.name.startswith("paths-")]
        hosts = [p for p in kept if p.name.startswith("host-")]
        rows = (
            _concat(paths, self.out / "paths.parquet", PATHS_SCHEMA),
            _concat(hosts, self.out / "host.parquet", HOST_SCHEMA),
        )
        for part in kept:  # merged: the two files hold them now
            part.unlink()
        self.parts.rmdir()
        return rows


def _part_start(part: Path) -> float:
    stamp = part.name.split("-")[1]
    return calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%S"))


def _rows(path: Path) -> int:
    return int(pq.ParquetFile(path).metadata.num_rows) if path.exists() else 0


def _concat(parts: list[Path], out: Path, schema: pa.Schema) -> int:
    """The kept parts, oldest first, as one Parquet file (a part at a time)."""
    rows = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for part in parts:
            table = pq.read_table(part, schema=schema)
            writer.write_table(table)
            rows += table.num_rows
    return rows


def finish_stream(stream: Path, schema: pa.Schema) -> int:
    """``name.arrows`` (possibly cut by a crash) -> ``name.parquet``; the stream goes."""
    if not stream.exists():
        return 0
    table = read_stream(stream).table(schema)
    with atomic_path(stream.with_suffix(".parquet")) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    stream.unlink()
    return int(table.num_rows)
