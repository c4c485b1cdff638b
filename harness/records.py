"""Per-connection records: staged on the hot path, streamed to disk in bulk.

The hot path appends one tuple of raw stamps per attempt (a bound list
append); durations are computed at flush, in bulk. Every ``FLUSH_INTERVAL``
the staged rows become one numpy array (24 bytes a row) and
one Arrow record batch appended to this process's part file, an Arrow IPC
*stream*: a crash loses at most the rows of one interval, and a truncated part
still reads up to its last whole batch. At the end of a run the parts of every
process merge into ``connections.parquet`` (``harness.run.merge.merge_parts``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from harness.endpoints import ResolvedEndpoint
from harness.errors import HTTP_STATUS
from harness.files import read_stream

__all__ = [
    "APPLICATION_COLUMNS",
    "CONNECTIONS_SCHEMA",
    "CORE_SCHEMA",
    "FLUSH_INTERVAL",
    "NO_APPLICATION",
    "ROW_DTYPE",
    "STAGE_DTYPE",
    "Part",
    "PartReadResult",
    "RecordWriter",
    "application_zeros",
    "expand_rows",
    "host_name",
    "read_part",
    "request_events",
]

logger = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.5  # seconds between flushes of staged rows

# What the hot path appends, in this order: raw CLOCK_MONOTONIC stamps and ids.
STAGE_DTYPE = np.dtype(
    [
        ("start_ns", "<i8"),  # when the attempt began
        ("connected_ns", "<i8"),  # when connect() answered (success or failure)
        ("closed_ns", "<i8"),  # when the socket was closed
        ("local_addr", "u1"),
        ("local_port", "<u2"),
        ("endpoint", "u1"),
        ("errno", "<u2"),
        ("io_errno", "<u2"),
        ("tls_ns", "<i8"),  # when the TLS handshake finished (0: no TLS)
        ("requests", "<u2"),  # HTTP responses read whole (0: not HTTP)
        ("status", "<u2"),  # the last HTTP status, or the first unexpected one (0: none)
        ("rx_bytes", "<u4"),  # HTTP response bytes, headers included
    ]
)
NO_APPLICATION = (0, 0, 0, 0)  # the last four staged fields of a connection without HTTP/TLS

# One flushed row: what part files, frames and summaries hold.
ROW_DTYPE = np.dtype(
    [
        ("start_ns", "<i8"),  # CLOCK_MONOTONIC when the attempt began
        ("connect_us", "<u4"),  # until connect() succeeded or failed
        ("close_us", "<u4"),  # until the socket was closed, from start
        ("local_addr", "u1"),  # index into the writer's address table (0: none)
        ("local_port", "<u2"),  # the ephemeral port the kernel gave (0: none)
        ("endpoint", "u1"),  # index into the run's target endpoints
        ("errno", "<u2"),  # of connect(); 0 = connected
        ("io_errno", "<u2"),  # of send/receive/close after connecting; 0 = clean
        ("tls_us", "<u4"),  # until the TLS handshake finished, from start (0: no TLS)
        ("requests", "<u2"),  # HTTP responses read whole over the connection
        ("status", "<u2"),  # the last HTTP status, or the first unexpected one (0: none)
        ("rx_bytes", "<u4"),  # HTTP response bytes, headers included
    ]
)
APPLICATION_COLUMNS = ("tls_us", "requests", "status", "rx_bytes")

_PART_SCHEMA = pa.schema(
    [
        ("start_ns", pa.int64()),
        ("connect_us", pa.uint32()),
        ("close_us", pa.uint32()),
        ("local_addr", pa.uint8()),
        ("local_port", pa.uint16()),
        ("endpoint", pa.uint8()),
        ("errno", pa.uint16()),
        ("io_errno", pa.uint16()),
        ("tls_us", pa.uint32()),
        ("requests", pa.uint16()),
        ("status", pa.uint16()),
        ("rx_bytes", pa.uint32()),
    ]
)

_DICT = pa.dictionary(pa.int32(), pa.string())
CONNECTIONS_SCHEMA = pa.schema(
    [
        ("start_ns", pa.int64()),
        ("connect_us", pa.uint32()),
        ("close_us", pa.uint32()),
        ("local_addr", _DICT),
        ("local_port", pa.uint16()),
        ("remote_addr", _DICT),
        ("remote_port", pa.uint16()),
        ("errno", pa.uint16()),
        ("io_errno", pa.uint16()),
        ("close", _DICT),
        ("engine", _DICT),
        ("pid", pa.uint32()),
        ("host", _DICT),  # the load generator: this host, or a distributed run's worker
    ]
)
# what the kernel's recorder shares with the records (harness.kernel.bpf); the
# application's columns follow: HTTP and TLS, zero for plain connections
CORE_SCHEMA = CONNECTIONS_SCHEMA
CONNECTIONS_SCHEMA = pa.schema(
    [
        *CORE_SCHEMA,
        ("tls_us", pa.uint32()),
        ("requests", pa.uint16()),
        ("status", pa.uint16()),
        ("rx_bytes", pa.uint32()),
    ]
)


def application_zeros(n: int) -> dict[str, pa.Array]:
    """The application's columns of ``n`` plain connections (no HTTP, no TLS)."""
    return {
        field.name: pa.array(np.zeros(n, field.type.to_pandas_dtype()))
        for field in CONNECTIONS_SCHEMA
        if field.name in APPLICATION_COLUMNS
    }


def host_name() -> str:
    """This load generator's name in records: ``EPH_HOST_NAME`` (``eph worker --name``)
    or the host name."""
    return os.environ.get("EPH_HOST_NAME") or socket.gethostname()


def to_rows(staged: np.ndarray) -> np.ndarray:
    """Staged stamps to flushed rows: durations in microseconds from the start."""
    rows = np.empty(len(staged), dtype=ROW_DTYPE)
    start = staged["start_ns"]
    rows["start_ns"] = start
    rows["connect_us"] = (staged["connected_ns"] - start) // 1000
    rows["close_us"] = (staged["closed_ns"] - start) // 1000
    for name in ("local_addr", "local_port", "endpoint", "errno", "io_errno"):
        rows[name] = staged[name]
    tls = staged["tls_ns"]
    rows["tls_us"] = np.where(tls != 0, (tls - start) // 1000, 0)
    for name in ("requests", "status", "rx_bytes"):
        rows[name] = staged[name]
    return rows


class RecordWriter:
    """Stages rows for one process and streams them to ``path`` (an Arrow IPC stream).

    The hot path calls ``add(row)`` with a tuple in ``STAGE_DTYPE`` order, getting
    ``local_addr`` from :meth:`address_id`.
    """

    def __init__(
        self,
        path: Path,
        *,
        endpoints: Sequence[ResolvedEndpoint],
        close: str,
        engine: str,
        pid: int | None = None,
    ) -> None:
        if len(endpoints) > 255:
            raise ValueError("at most 255 target endpoints per run")
        self.path = path
        self._rows: list[tuple[int, ...]] = []
        self.add = self._rows.append
        self._addresses: dict[str, int] = {"": 0}
        meta = {
            "endpoints": json.dumps([[e.address, e.port] for e in endpoints]),
            "close": close,
            "engine": engine,
            "pid": str(pid if pid is not None else os.getpid()),
            "host": host_name(),
        }
        self._schema = _PART_SCHEMA.with_metadata(meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = ipc.new_stream(self._sink, self._schema)
        self.written = 0
        self.dropped = 0  # rows that could not be written (self.error says why)
        self.error: OSError | None = None

    def address_id(self, address: str) -> int:
        """A small id for a local address; new addresses are rare (one per source/route)."""
        found = self._addresses.get(address)
        if found is None:
            if len(self._addresses) >= 256:
                raise ValueError("more than 255 distinct local addresses in one process")
            found = self._addresses[address] = len(self._addresses)
        return found

    @property
    def staged(self) -> int:
        return len(self._rows)

    def flush(self) -> np.ndarray:
        """Write the staged rows as one batch; return them (possibly empty) as an array."""
        staged = np.array(self._rows, dtype=STAGE_DTYPE)
        self._rows.clear()
        rows = to_rows(staged)
        self.write(rows)
        return rows

    def write(self, rows: np.ndarray) -> None:
        """Write rows already in ``ROW_DTYPE`` as one batch (synthetic runs for benchmarks)."""
        if len(rows):
            self._write(rows)

    def _write(self, rows: np.ndarray) -> None:
        if self.error is not None:
            self.dropped += len(rows)
            return
        arrays = [pa.array(rows[name]) for name in ROW_DTYPE.names or ()]
        batch = pa.RecordBatch.from_arrays(arrays, schema=self._schema)
        try:
            # the address table goes along with each batch's metadata: small, and
            # a truncated stream still maps every id it holds.
            self._writer.write_batch(
                batch, custom_metadata={"addresses": json.dumps(list(self._addresses))}
            )
        except OSError as exc:
            # a full disk: what is written stays readable up to its last whole batch;
            # later rows are counted, not kept, and the load goes on (eph run stops it)
            self.error = exc
            self.dropped += len(rows)
            logger.error(
                "cannot write records to %s (%s): later rows are counted, not kept",
                self.path,
                exc.strerror or exc,
            )
            return
        self.written += len(rows)

    def close(self) -> np.ndarray:
        rows = self.flush()
        for closing in (self._writer.close, self._sink.close):
            try:
                closing()
            except OSError as exc:
                self.error = self.error or exc
        return rows


@dataclass(frozen=True)
class Part:
    """A part file and where it was recorded.

    ``shift_ns`` moves a worker host's CLOCK_MONOTONIC stamps onto the run's clock
    (the master's): both hosts' wall clocks are assumed in step (NTP).
    """

    path: Path
    host: str = ""
    shift_ns: int = 0


@dataclass(frozen=True)
class PartReadResult:
    table: pa.Table
    truncated: bool


def read_part(path: Path, host: str = "", shift_ns: int = 0) -> PartReadResult:
    """Read one part file up to its last whole batch, expanded to ``CONNECTIONS_SCHEMA``."""
    read = read_stream(path)
    if read.schema is None:  # the process died before its first flush
        return PartReadResult(CONNECTIONS_SCHEMA.empty_table(), truncated=True)
    meta = {k.decode(): v.decode() for k, v in (read.schema.metadata or {}).items()}
    addresses: list[str] = [""]
    for custom in read.custom:
        if custom is not None and b"addresses" in custom:
            addresses = json.loads(custom[b"addresses"])
    expanded = _expand(read.table(), meta, addresses, Part(path, host, shift_ns))
    return PartReadResult(expanded, read.truncated)


# a dictionary column from its codes and values: per part (``_dict``), or recoded
# against the whole file's dictionaries (the merge's)
Encoder = Callable[[str, np.ndarray, Sequence[str]], pa.DictionaryArray]


def _dict(name: str, indices: np.ndarray, values: Sequence[str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(
        pa.array(indices, pa.int32()), pa.array(values, pa.string())
    )


def _expand(
    table: pa.Table,
    meta: dict[str, str],
    addresses: list[str],
    part: Part,
    encode: Encoder = _dict,
) -> pa.Table:
    n = table.num_rows
    start = table.column("start_ns")
    if part.shift_ns:
        start = pa.array(start.to_numpy() + np.int64(part.shift_ns))
    endpoints = json.loads(meta.get("endpoints", "[]")) or [["", 0]]
    index = table.column("endpoint").to_numpy().astype(np.int32)
    remote_ports = np.array([port for _, port in endpoints], dtype=np.uint16)
    zeros = np.zeros(n, np.int32)
    local = table.column("local_addr").to_numpy().astype(np.int32)
    columns: dict[str, Any] = {
        "start_ns": start,
        "connect_us": table.column("connect_us"),
        "close_us": table.column("close_us"),
        "local_addr": encode("local_addr", local, addresses),
        "local_port": table.column("local_port"),
        "remote_addr": encode("remote_addr", index, [address for address, _ in endpoints]),
        "remote_port": pa.array(remote_ports[index] if n else np.zeros(0, np.uint16)),
        "errno": table.column("errno"),
        "io_errno": table.column("io_errno"),
        "close": encode("close", zeros, [meta.get("close", "")]),
        "engine": encode("engine", zeros, [meta.get("engine", "")]),
        "pid": pa.array(np.full(n, int(meta.get("pid", 0)), dtype=np.uint32)),
        "host": encode("host", zeros, [part.host or meta.get("host", "")]),
        **{name: table.column(name) for name in APPLICATION_COLUMNS},
    }
    return pa.table(columns, schema=CONNECTIONS_SCHEMA)


def expand_rows(
    table: pa.Table, meta: dict[str, str], addresses: list[str], part: Part, encode: Encoder
) -> pa.Table:
    """Rows of a part file (its schema, its metadata ``meta``), expanded to
    ``CONNECTIONS_SCHEMA`` with dictionaries made by ``encode``."""
    return _expand(table, meta, addresses, part, encode)


def request_events(rows: np.ndarray) -> np.ndarray:
    """How many of Locust's requests each HTTP row stands for: its whole responses, one
    more if it failed for another reason than a response's status (that response is the
    failure), and at least one. A plain row is one."""
    io_errno = rows["io_errno"]
    status_failed = (io_errno >= HTTP_STATUS) & (io_errno < HTTP_STATUS + 1000)
    failed = ((rows["errno"] != 0) | (io_errno != 0)) & ~status_failed
    events: np.ndarray = np.maximum(rows["requests"].astype(np.int64) + failed, 1)
    return events
