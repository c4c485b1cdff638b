"""What ``eph observe`` keeps: one row per sample per kept path, one per sample for the host.

While observing, rows go to Arrow IPC streams (``paths.arrows``, ``host.arrows``),
one batch a sample, so a crash loses at most the sample being written. At the
end each stream becomes a Parquet file (``paths.parquet``, ``host.parquet``);
a stream cut by a crash keeps its whole batches (``harness.files.read_stream``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from harness.files import atomic_path, read_stream
from harness.observe.outlook import Outlook
from harness.observe.paths import STATES, PathSnapshot

__all__ = ["HOST_SCHEMA", "PATHS_SCHEMA", "ObserveStore", "finish_stream"]

STATE_COLUMNS = [s.name.lower() for s in STATES]
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
    ]
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
        "usable": np.full(n, snap.usable, np.int32),
        "occupancy": snap.occupancy.astype(np.float32),
        "new": snap.new.astype(np.int32),
        "new_per_s": snap.new_per_s.astype(np.float32),
        **{name: snap.states[:, i].astype(np.int32) for i, name in enumerate(STATE_COLUMNS)},
        "hold_s": look.hold_s.astype(np.float32),
        "lifetime_s": look.lifetime_s.astype(np.float32),
        "sustainable_per_s": look.sustainable_per_s.astype(np.float32),
        "time_to_exhaustion_s": look.time_to_exhaustion_s.astype(np.float32),
        "verdict": [str(v) for v in look.verdicts],
    }
    return pa.RecordBatch.from_pydict(columns, schema=PATHS_SCHEMA)


def host_batch(
    snap: PathSnapshot, counters: dict[str, int | None], sample_ms: float
) -> pa.RecordBatch:
    row: dict[str, list[Any]] = {
        "time": [snap.time],
        "paths": [snap.paths_total],
        "sockets": [snap.sockets],
        "usable": [snap.usable],
        "sample_ms": [sample_ms],
    }
    for name in HOST_SCHEMA.names:
        if name not in row:
            row[name] = [counters.get(name)]
    return pa.RecordBatch.from_pydict(row, schema=HOST_SCHEMA)


class ObserveStore:
    """The two streams of one observation, in ``out``."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self._files = [pa.OSFile(str(out / f"{name}.arrows"), "wb") for name in ("paths", "host")]
        self._paths = ipc.new_stream(self._files[0], PATHS_SCHEMA)
        self._host = ipc.new_stream(self._files[1], HOST_SCHEMA)

    def write(self, paths: pa.RecordBatch, host: pa.RecordBatch) -> None:
        self._paths.write_batch(paths)
        self._host.write_batch(host)
        for f in self._files:
            f.flush()

    def close(self) -> tuple[int, int]:
        """Close the streams and turn them into Parquet; returns (path rows, samples)."""
        for writer in (self._paths, self._host):
            writer.close()
        for f in self._files:
            f.close()
        return (
            finish_stream(self.out / "paths.arrows", PATHS_SCHEMA),
            finish_stream(self.out / "host.arrows", HOST_SCHEMA),
        )


def finish_stream(stream: Path, schema: pa.Schema) -> int:
    """``name.arrows`` (possibly cut by a crash) -> ``name.parquet``; the stream goes."""
    if not stream.exists():
        return 0
    table = read_stream(stream).table(schema)
    with atomic_path(stream.with_suffix(".parquet")) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    stream.unlink()
    return int(table.num_rows)
