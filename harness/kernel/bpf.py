"""The eBPF connection recorder: what the kernel saw of every client TCP connection.

The recorder follows sockets on ``sock:inet_sock_set_state``, filtered to one network
namespace (the socket's ``skc_net`` inode, read once per socket at its SYN) and to
client sockets (those that pass CLOSE -> SYN_SENT). A connection that reaches CLOSE
becomes a key of one BPF hash map, which :mod:`harness.kernel.bpfmap` drains from
outside every :data:`DRAIN_S`, thousands of keys per syscall; what closed after its
last drain the recorder prints as text at exit. Nothing is kept per connection in
Python.

Two recorders share that protocol. eph's own (``connections.bpf.c``, built by ``make
setup``, loaded by :mod:`harness.kernel.recorder`) is two programs on the raw
tracepoint, so that a state change the kernel skips for one (it was interrupted by
its own tracepoint) the other takes: it misses nothing (docs/kernel.md, "The
recorder's misses"). bpftrace's (``connections.bt``) is the fallback where the
program is not built, or with ``EPH_RECORDER=bpftrace``: a classic tracepoint, whose
skips are counted.

This module knows no run: it says whether the recorder can run here
(:func:`unavailable`), builds its command (:func:`recorder_command`), and turns
its output into Arrow batches in bulk (:func:`read_trace`, :func:`convert`):
``pyarrow.csv`` reads the text a block at a time; addresses, durations and the
close side are numpy operations over whole columns. Starting and stopping the
process is the caller's (through the supervisor).

Columns are those of :data:`~harness.records.CONNECTIONS_SCHEMA` (``engine`` is
``"kernel"``; ``close`` is who sent the first FIN: ``client`` for this side,
``server`` for the peer, ``reset`` when the connection ended from ESTABLISHED
with no FIN; ``errno`` is ECONNABORTED for a socket its process closed while it
was still connecting) plus ``comm``, ``time_wait_ns`` (when the socket went on as a
timewait socket holding its port, 0 if it did not: TIME_WAIT, or FIN_WAIT2 when
this side had closed and the peer not yet; ``ss`` shows the latter as
FIN-WAIT-2) and ``time_wait_end_ns`` (TIME_WAIT's end:
60 s later, or sooner when the same 4-tuple was reused). IPv4 only.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from harness.files import atomic_path, atomic_write_json, merge_sorted_files
from harness.kernel.fdinfo import fdinfo

__all__ = [
    "KERNEL_CONNECTIONS_SCHEMA",
    "KEY_SIZE",
    "LATENCY_BUCKETS_S",
    "READY_LINE",
    "TIME_WAIT_NS",
    "ConnectTally",
    "RowWriter",
    "TraceRead",
    "bpftrace_unavailable",
    "convert",
    "drain_command",
    "key_rows",
    "lost_events",
    "missed_events",
    "program",
    "read_trace",
    "recorder_command",
    "unavailable",
]

READY_LINE = "eph-bpf ready"  # printed once every probe is attached
TIME_WAIT_NS = 60_000_000_000  # TCP_TIMEWAIT_LEN: fixed in the kernel
MAP_KEYS_MAX = 262_144  # connections open at once that the program can follow
TRACEFS = Path("/sys/kernel/tracing")
BTF = Path("/sys/kernel/btf/vmlinux")
READ_BLOCK = 1 << 22  # bytes of text per parsed block
FLUSH_MS = 100  # the program says it is ready this long after it attached
DRAIN_S = 0.1  # the map is drained this often

_FIELDS = (
    ("syn_ns", pa.uint64()),
    ("est_ns", pa.uint64()),
    ("close_ns", pa.uint64()),
    ("state", pa.uint64()),  # last_state | first_fin << 8 | err << 16
    ("addrs", pa.uint64()),  # saddr << 32 | daddr, each a network-order u32
    ("ports", pa.uint64()),  # sport << 16 | dport
    ("pid", pa.uint32()),
    ("comm", pa.string()),
)
# the map @r's key as bpftrace lays it out: every integer 8 bytes, comm 16 bytes
KEY_DTYPE = np.dtype([(name, "<u8") for name, _ in _FIELDS[:-1]] + [("comm", "S16")])
KEY_SIZE = KEY_DTYPE.itemsize
_FIN_WAIT2, _CLOSING, _ESTABLISHED = 5, 11, 1
ECONNABORTED = errno.ECONNABORTED  # closed by its process before it connected, with no error
_CLOSE_SIDE = ["", "client", "server", "reset"]  # first_fin 1: this side; 2: the peer

_DICT = pa.dictionary(pa.int32(), pa.string())
# the records' columns first (harness.records, a floor above: kernel/ cannot import it;
# tests/test_bpf.py checks the two agree), then the kernel's own
KERNEL_CONNECTIONS_SCHEMA = pa.schema(
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
        ("host", _DICT),
        ("comm", _DICT),
        ("time_wait_ns", pa.int64()),
        ("time_wait_end_ns", pa.int64()),
    ]
)


def program(flush_ms: int = FLUSH_MS) -> str:
    """The bpftrace program's text."""
    text = resources.files(__package__).joinpath("connections.bt").read_text(encoding="utf-8")
    return text.replace("FLUSH_MS", str(int(flush_ms)))


def unavailable(bpftrace: str = "bpftrace", own: bool | None = None) -> str | None:
    """Why the recorder cannot run here, in one line; ``None`` when it can.

    The recorder is eph's own loader when ``make setup`` built its program
    (``own``, by default :func:`loader_built`), else bpftrace's
    (:func:`bpftrace_unavailable`).
    """
    if os.geteuid() != 0:
        return "kernel tracing needs root (eBPF)"
    if not BTF.exists():
        return f"kernel tracing needs BTF ({BTF} is missing)"
    if loader_built() if own is None else own:
        return None
    return bpftrace_unavailable(bpftrace)


def bpftrace_unavailable(bpftrace: str = "bpftrace") -> str | None:
    """Why bpftrace's recorder cannot run here; mounts tracefs when it is not."""
    if shutil.which(bpftrace) is None:
        return (
            "kernel tracing needs its program built (make setup: clang and libbpf-dev)"
            " or bpftrace (apt-get install bpftrace)"
        )
    if not (TRACEFS / "events").is_dir():
        mounted = subprocess.run(
            ["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True, text=True
        )
        if mounted.returncode != 0:
            return f"kernel tracing needs tracefs at {TRACEFS}: {mounted.stderr.strip()}"
    if not (TRACEFS / "events/sock/inet_sock_set_state").is_dir():
        return "kernel tracing needs the tracepoint sock:inet_sock_set_state"
    return None


def loader_built() -> bool:
    """Whether eph's own recorder can load: its program built, and libbpf here."""
    if os.environ.get("EPH_RECORDER") == "bpftrace":  # the fallback, on purpose
        return False
    built = Path(
        os.environ.get("EPH_RECORDER_OBJECT")
        or str(resources.files(__package__).joinpath("connections.bpf.o"))
    ).exists()
    return built and ctypes.util.find_library("bpf") is not None


def netns_inode(path: Path = Path("/proc/self/ns/net")) -> int:
    """The inode of a network namespace (a ``/proc/PID/ns/net`` or ``/run/netns/NAME``)."""
    return os.stat(path).st_ino


def recorder_command(netns: int, bpftrace: str = "bpftrace", own: bool | None = None) -> list[str]:
    """The recorder of the client connections of namespace ``netns``, printing to its
    stdout (a file: ``-o`` would buffer bpftrace's whole): eph's own loader
    (:mod:`harness.kernel.recorder`) where it is built (or ``own``), else bpftrace.

    Line-buffered: each line is written whole, so what a killed recorder leaves is
    whole lines.
    """
    if loader_built() if own is None else own:
        return [sys.executable, "-m", "harness.kernel.recorder", str(netns)]
    return [bpftrace, "-B", "line", "-e", program(), str(netns)]


def recorder_env() -> dict[str, str]:
    return {**os.environ, "BPFTRACE_MAP_KEYS_MAX": str(MAP_KEYS_MAX)}


def ready(out: Path) -> bool:
    """Whether the recorder at ``out`` has every probe attached."""
    try:
        with open(out, "rb") as text:
            return READY_LINE.encode() in text.read(4096)
    except OSError:
        return False


_LOST = re.compile(r"Lost (\d+) events")
_INSERTED = re.compile(rb"^@inserted: (\d+)$", re.MULTILINE)
_MISSED = re.compile(rb"^@missed: (\d+)$", re.MULTILINE)
_RESCUED = re.compile(rb"^@rescued: (\d+)$", re.MULTILINE)


def lost_events(stderr_text: str) -> int:
    """Events bpftrace says it lost (its perf buffer was full)."""
    return sum(int(n) for n in _LOST.findall(stderr_text))


@dataclass
class TraceRead:
    """What :func:`convert` got out of one recorder's output."""

    connections: int = 0
    skipped_lines: int = 0  # lines that were not a connection (banners, a cut last line)
    inserted: int = 0  # rows the program made, by its own count at exit (0: it was killed)
    # state changes the recorder did not see, by its own count at exit (eph's loader);
    # None where it does not say (bpftrace: its programs' fdinfo says, while it runs)
    missed: int | None = None
    rescued: int | None = None  # eph's loader: changes its second program took

    @property
    def lost(self) -> int:
        """Rows the program counted that never reached a table (the map @r was full:
        its drainer lagged by :data:`MAP_KEYS_MAX` rows)."""
        return max(0, self.inserted - self.connections)


def read_trace(path: Path, host: str, read: TraceRead | None = None) -> Iterator[pa.RecordBatch]:
    """The recorder's text as batches in :data:`KERNEL_CONNECTIONS_SCHEMA` (TIME_WAIT's
    end is filled in by :func:`convert`, which sees every connection).

    A block of whole lines at a time: bpftrace's map lines
    (``@r[1, 2, ..., comm]: 1``) become tab-separated rows with three replaces over
    the block, then ``pyarrow.csv`` parses them; other lines are skipped and counted.
    """
    read = read if read is not None else TraceRead()

    def skip(_row: object) -> str:
        read.skipped_lines += 1
        return "skip"

    names = [name for name, _ in _FIELDS]
    options = (
        csv.ReadOptions(column_names=names),
        csv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=skip),
        csv.ConvertOptions(column_types=dict(_FIELDS)),
    )
    for block in _blocks(path):
        read.inserted += sum(int(n) for n in _INSERTED.findall(block))
        for n in _MISSED.findall(block):
            read.missed = (read.missed or 0) + int(n)
        for n in _RESCUED.findall(block):
            read.rescued = (read.rescued or 0) + int(n)
        block = block.replace(b"@r[", b"").replace(b"]: 1\n", b"\n").replace(b", ", b"\t")
        table = csv.read_csv(pa.py_buffer(block), *options)
        for batch in table.to_batches():
            if batch.num_rows:
                read.connections += batch.num_rows
                yield _text_rows(batch, host)


def _blocks(path: Path) -> Iterator[bytes]:
    """``path`` in blocks of about ``READ_BLOCK`` bytes, each ending at a line's end."""
    rest = b""
    with open(path, "rb") as text:
        while chunk := text.read(READ_BLOCK):
            chunk = rest + chunk
            cut = chunk.rfind(b"\n") + 1
            rest = chunk[cut:]
            if cut:
                yield chunk[:cut]
    if rest:
        yield rest + b"\n"


def key_rows(keys: np.ndarray, host: str) -> pa.RecordBatch:
    """Raw keys of the map @r (``n`` rows of :data:`KEY_SIZE` bytes) as a batch."""
    fields = np.ascontiguousarray(keys).view(KEY_DTYPE).reshape(-1)
    col = {name: fields[name] for name, _ in _FIELDS[:-1]}
    names, index = np.unique(fields["comm"], return_inverse=True)
    comm = _dict(index.astype(np.int32), [name.decode(errors="replace") for name in names])
    return _rows(col, comm, host)


def _text_rows(batch: pa.RecordBatch, host: str) -> pa.RecordBatch:
    col = {name: batch.column(name).to_numpy(zero_copy_only=False) for name, _ in _FIELDS[:-1]}
    return _rows(col, pc.dictionary_encode(batch.column("comm")).cast(_DICT), host)


def _rows(col: dict[str, np.ndarray], comm: pa.Array, host: str) -> pa.RecordBatch:
    n = len(col["syn_ns"])
    syn = col["syn_ns"].astype(np.int64)
    est = col["est_ns"].astype(np.int64)
    close = col["close_ns"].astype(np.int64)
    state = col["state"].astype(np.int64)
    last_state, first_fin, err = state & 0xFF, (state >> 8) & 0xFF, state >> 16
    addrs, ports = col["addrs"], col["ports"]
    saddr, daddr = (addrs >> 32).astype(np.uint32), (addrs & 0xFFFFFFFF).astype(np.uint32)
    sport, dport = (ports >> 16).astype(np.uint16), (ports & 0xFFFF).astype(np.uint16)
    connected = est > 0
    failed = ~connected
    connect_us = np.where(connected, est - syn, close - syn) // 1000
    failure = np.where(err > 0, err, ECONNABORTED)
    side = np.where(connected, np.where(first_fin > 0, first_fin, 3), 0)
    went_tw = connected & (err == 0) & np.isin(last_state, (_FIN_WAIT2, _CLOSING)) & (side == 1)
    columns = {
        "start_ns": pa.array(syn),
        "connect_us": pa.array(np.clip(connect_us, 0, 2**32 - 1).astype(np.uint32)),
        "close_us": pa.array(np.clip((close - syn) // 1000, 0, 2**32 - 1).astype(np.uint32)),
        "local_addr": _addresses(saddr),
        "local_port": pa.array(sport),
        "remote_addr": _addresses(daddr),
        "remote_port": pa.array(dport),
        "errno": pa.array(np.where(failed, failure, 0).astype(np.uint16)),
        "io_errno": pa.array(np.where(connected, err, 0).astype(np.uint16)),
        "close": _dict(side.astype(np.int32), _CLOSE_SIDE),
        "engine": _dict(np.zeros(n, np.int32), ["kernel"]),
        "pid": pa.array(col["pid"].astype(np.uint32)),
        "host": _dict(np.zeros(n, np.int32), [host]),
        "comm": comm,
        "time_wait_ns": pa.array(np.where(went_tw, close, 0)),
        "time_wait_end_ns": pa.array(np.zeros(n, np.int64)),
    }
    return pa.RecordBatch.from_pydict(columns, schema=KERNEL_CONNECTIONS_SCHEMA)


def _addresses(raw: np.ndarray) -> pa.DictionaryArray:
    """Network-order u32 IPv4 addresses to dotted strings, formatted once per distinct one."""
    unique, index = np.unique(raw.astype(np.uint32), return_inverse=True)
    octets = unique.astype("<u4").view(np.uint8).reshape(-1, 4)  # network order in memory
    dotted = [".".join(str(b) for b in row) for row in octets]
    return _dict(index.astype(np.int32), dotted)


def _dict(indices: np.ndarray, values: list[str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(
        pa.array(indices, pa.int32()), pa.array(values, pa.string())
    )


# connect latency buckets (seconds, upper bounds) of the live histogram: loopback's
# tens of microseconds up to the SYN retransmissions at 1, 3 and 7 s
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass
class ConnectTally:
    """What the drained rows add up to per destination (``address:port``), for live
    metrics: failed connects by errno, and the connect latency of those that connected
    as histogram counts per :data:`LATENCY_BUCKETS_S` bucket (the last one: above).
    Kept by the drainer in bulk per drain, written as JSON (``tally.json``)."""

    destinations: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: int = 0

    def add(self, batch: pa.RecordBatch) -> None:
        remote = batch.column("remote_addr")
        names = remote.dictionary.to_pylist()
        key = (remote.indices.to_numpy().astype(np.int64) << 16) | batch.column(
            "remote_port"
        ).to_numpy().astype(np.int64)
        err = batch.column("errno").to_numpy().astype(np.int64)
        seconds = batch.column("connect_us").to_numpy() / 1e6
        bucket = np.searchsorted(LATENCY_BUCKETS_S, seconds, side="left")  # le: at or below
        destinations, which = np.unique(key, return_inverse=True)
        for n, found in enumerate(destinations):
            rows = which == n
            label = f"{names[int(found) >> 16]}:{int(found) & 0xFFFF}"
            entry = self.destinations.setdefault(
                label,
                {"failed": {}, "connected": 0, "sum_s": 0.0,
                 "buckets": [0] * (len(LATENCY_BUCKETS_S) + 1)},
            )  # fmt: skip
            codes, counts = np.unique(err[rows & (err > 0)], return_counts=True)
            for code, count in zip(codes.tolist(), counts.tolist(), strict=True):
                entry["failed"][str(code)] = entry["failed"].get(str(code), 0) + count
            ok = rows & (err == 0)
            entry["connected"] += int(ok.sum())
            entry["sum_s"] += float(seconds[ok].sum())
            more = np.bincount(bucket[ok], minlength=len(LATENCY_BUCKETS_S) + 1)
            entry["buckets"] = [a + int(b) for a, b in zip(entry["buckets"], more, strict=True)]
        self.rows += batch.num_rows

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "buckets_s": list(LATENCY_BUCKETS_S),
                "destinations": self.destinations}  # fmt: skip


class RowWriter:
    """Drained keys of the map @r, appended to an Arrow IPC stream as they come; with
    ``tally``, their :class:`ConnectTally` rewritten there after each drain."""

    def __init__(self, path: Path, host: str, tally: Path | None = None) -> None:
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = ipc.new_stream(self._sink, KERNEL_CONNECTIONS_SCHEMA)
        self.host = host
        self.rows = 0
        self._tally_path = tally
        self.tally = ConnectTally()
        if tally is not None:
            atomic_write_json(tally, self.tally.to_json())

    def write(self, keys: np.ndarray) -> None:
        if len(keys):
            batch = key_rows(keys, self.host)
            self._writer.write_batch(batch)
            self._sink.flush()
            self.rows += len(keys)
            if self._tally_path is not None:
                self.tally.add(batch)
                atomic_write_json(self._tally_path, self.tally.to_json())

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.close()
        self._sink.close()


def _drained(path: Path) -> Iterator[pa.RecordBatch]:
    """The whole batches of a drained stream (a killed drainer may cut its last one)."""
    if not path.exists() or not path.stat().st_size:
        return
    with pa.OSFile(str(path)) as source:
        try:
            reader = ipc.open_stream(source)
            while True:
                yield reader.read_next_batch()
        except (StopIteration, pa.ArrowInvalid, OSError):
            return


def convert(text: Path, drained: Path, out: Path, host: str) -> TraceRead:
    """The rows drained from the map (``drained``) and those bpftrace printed at exit
    (``text``) to ``out`` (Parquet, sorted by start), each TIME_WAIT's end filled in.

    In bounded memory: a trace of more than :data:`PARTITION_ROWS` rows (estimated
    from the two files' sizes) is spread over partitions by local port, so every use
    of a 4-tuple lands in one, as TIME_WAIT's end needs; each partition is sorted on
    its own and the sorted partitions are merged a batch of each at a time.
    """
    read = TraceRead()

    def rows() -> Iterator[pa.RecordBatch]:
        for batch in _drained(drained):
            read.connections += batch.num_rows
            yield batch
        if text.exists() and text.stat().st_size:
            yield from read_trace(text, host, read)

    parts = _partitions(text, drained)
    if parts == 1:
        _write_sorted(pa.Table.from_batches(list(rows()), KERNEL_CONNECTIONS_SCHEMA), out)
        return read
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as scratch:
        spilled = [Path(scratch) / f"{n}.arrows" for n in range(parts)]
        with contextlib.ExitStack() as stack:
            writers = [
                stack.enter_context(ipc.new_stream(str(path), KERNEL_CONNECTIONS_SCHEMA))
                for path in spilled
            ]
            for batch in rows():
                which = _partition_of(batch, parts)
                for n, writer in enumerate(writers):
                    if (chosen := batch.filter(pa.array(which == n))).num_rows:
                        writer.write_batch(chosen)
        sorted_parts = []
        for n, path in enumerate(spilled):
            with pa.OSFile(str(path)) as source:
                table = ipc.open_stream(source).read_all()
            path.unlink()
            sorted_parts.append(Path(scratch) / f"{n}.parquet")
            _write_sorted(table, sorted_parts[-1])
            del table
        merge_sorted_files(sorted_parts, out, "start_ns")
    return read


PARTITION_ROWS = 2_000_000  # rows whose TIME_WAIT ends are found in memory at once
_TEXT_ROW_BYTES = 90  # a printed row: eight numbers and a name (at least)
_DRAINED_ROW_BYTES = 64  # a drained row in the Arrow stream (at least)


def _partitions(text: Path, drained: Path) -> int:
    """How many partitions a conversion needs: an over-estimate of its rows (every row
    at its smallest size) over :data:`PARTITION_ROWS`."""
    size = {path: path.stat().st_size if path.exists() else 0 for path in (text, drained)}
    rows = size[text] // _TEXT_ROW_BYTES + size[drained] // _DRAINED_ROW_BYTES
    return max(1, -(-rows // PARTITION_ROWS))


def _partition_of(batch: pa.RecordBatch, parts: int) -> np.ndarray:
    """Each row's partition: by local port, so a 4-tuple's uses stay together; a
    failure with no port (EADDRNOTAVAIL) has no TIME_WAIT and goes anywhere."""
    port = batch.column("local_port").to_numpy().astype(np.int64)
    spread = np.arange(len(port)) % parts
    return np.where(port > 0, port % parts, spread)


def _write_sorted(table: pa.Table, out: Path) -> None:
    """``table`` sorted by start, with TIME_WAIT's ends, to the Parquet file ``out``."""
    table = table.combine_chunks().unify_dictionaries()
    if table.num_rows:
        table = table.sort_by("start_ns")
        table = table.set_column(
            table.schema.get_field_index("time_wait_end_ns"),
            "time_wait_end_ns",
            pa.array(time_wait_end(table)),
        )
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def missed_events(pid: int) -> int:
    """Events the kernel skipped instead of running process ``pid``'s BPF programs: the
    sum of their ``recursion_misses`` (``/proc/PID/fdinfo``). bpftrace's tracepoint
    program does not run while its CPU is inside it, another program or a map syscall
    (docs/kernel.md, "The recorder's misses")."""
    fields = (fdinfo(entry) for entry in Path(f"/proc/{pid}/fdinfo").glob("*"))
    return sum(int(f["recursion_misses"]) for f in fields if "recursion_misses" in f)


def drain_command(pid: int, out: Path, host: str, tally: Path | None = None) -> list[str]:
    """The drainer of recorder ``pid``'s map into ``out`` (:mod:`harness.kernel.bpfmap`),
    keeping a :class:`ConnectTally` in ``tally`` when given."""
    return [
        sys.executable, "-m", "harness.kernel.bpfmap", str(pid), str(KEY_SIZE), str(out),
        "--host", host, "--interval", str(DRAIN_S),
        *(["--tally", str(tally)] if tally is not None else []),
    ]  # fmt: skip


def time_wait_end(table: pa.Table) -> np.ndarray:
    """When each TIME_WAIT ended: ``TIME_WAIT_NS`` after it began, or the next SYN_SENT
    of the same 4-tuple before that (tcp_tw_reuse took it over); 0 where none."""
    start = table.column("time_wait_ns").to_numpy()
    syn = table.column("start_ns").to_numpy()
    key = _tuple_key(table)
    order = np.lexsort((syn, key))
    end = np.where(start > 0, start + TIME_WAIT_NS, 0)
    k, s, e = key[order], syn[order], end[order]
    nxt = np.append(s[1:], 0)
    same = np.append(k[1:] == k[:-1], False)
    reused = same & (e > 0) & (nxt < e) & (nxt >= start[order])
    e = np.where(reused, nxt, e)
    result = np.empty_like(end)
    result[order] = e
    return result


def _tuple_key(table: pa.Table) -> np.ndarray:
    """One int per 4-tuple (address dictionary codes and ports), for sorting."""
    key = np.zeros(table.num_rows, np.int64)
    for name, bits in (("local_addr", 16), ("local_port", 16), ("remote_addr", 16)):
        column = table.column(name).combine_chunks()
        values = column.indices if pa.types.is_dictionary(column.type) else column
        key = (key + values.to_numpy().astype(np.int64)) << bits
    key += table.column("remote_port").to_numpy().astype(np.int64)
    return key
