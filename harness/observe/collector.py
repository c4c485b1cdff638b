"""The collector: the kernel's view of the sockets while the load runs.

Every interval it dumps TCP sockets (``harness.kernel.sockdiag``), counts them by state
in total and toward / at each target endpoint, keeps the ephemeral ports in use
toward each target, and reads the TCP counters. Each sample is appended to an
Arrow IPC stream at once (a crash loses at most one interval) and the stream
becomes ``samples.parquet`` when the collector stops. It runs in a process of
its own and never imports locust.

One row per (sample, scope): scope ``all``; ``to HOST:PORT`` (sockets whose peer
is the target: the client side); ``at HOST:PORT`` (sockets whose own address is
the target: the server side, e.g. when ``eph collect`` runs on the staging host).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from harness.endpoints import ResolvedEndpoint
from harness.files import atomic_path, read_stream
from harness.kernel.counters import COUNTERS, SOCKSTAT, ipv6_sockets_unseen, read_counters
from harness.kernel.parent_death import die_with_parent
from harness.kernel.sockdiag import TcpState, dump_sockets, dump_tcp
from harness.kernel.sysctls import read_kernel

__all__ = ["SAMPLES_SCHEMA", "Collector", "Sample", "collect_command", "finish_samples"]

logger = logging.getLogger(__name__)

STATES = [s.name.lower() for s in TcpState]
_COUNTER_NAMES = [*COUNTERS, *SOCKSTAT, "conntrack_count"]
SAMPLES_SCHEMA = pa.schema(
    [
        ("t_ns", pa.int64()),  # CLOCK_MONOTONIC, comparable with the records' start_ns
        ("scope", pa.string()),
        *[(state, pa.uint32()) for state in STATES],
        ("ports", pa.list_(pa.uint16())),  # ephemeral ports in use (to/at scopes)
        ("sample_ms", pa.float32()),
        *[(name, pa.int64()) for name in _COUNTER_NAMES],
    ]
)


@dataclass(frozen=True)
class _Target:
    name: str
    family: int
    address: bytes  # 16 bytes, IPv4 padded with zeros as the kernel does
    port: int

    @classmethod
    def of(cls, endpoint: ResolvedEndpoint) -> _Target:
        packed = socket.inet_pton(endpoint.family, endpoint.address)
        return cls(str(endpoint), int(endpoint.family), packed.ljust(16, b"\0"), endpoint.port)


@dataclass(frozen=True)
class Sample:
    t_ns: int
    sample_ms: float
    states: dict[str, dict[str, int]]  # scope -> state name -> count
    ports: dict[str, np.ndarray]  # scope -> ephemeral ports
    counters: dict[str, int | None]

    def to_json(self) -> dict[str, Any]:
        return {
            "tcp_states": {k.upper(): v for k, v in self.states["all"].items()},
            "sockstat_tw": self.counters.get("sockstat_tw"),
            "elapsed_ms": round(self.sample_ms, 3),
            "counters": self.counters,
            "targets": {
                scope: {k.upper(): v for k, v in counts.items() if v}
                for scope, counts in self.states.items()
                if scope != "all"
            },
        }


class Collector:
    """Samples TCP sockets; with ``udp``, the target scopes count connected UDP
    sockets instead (a UDP client holds its port from connect() to close())."""

    def __init__(self, targets: Sequence[ResolvedEndpoint] = (), *, udp: bool = False) -> None:
        self._targets = [_Target.of(t) for t in targets]
        self._udp = udp

    def sample(self) -> Sample:
        started = time.perf_counter()
        t_ns = time.monotonic_ns()
        rows = dump_tcp(families=[socket.AF_INET])
        # the dump reads each socket as it walks the table: it is stamped with its middle
        t_ns = (t_ns + time.monotonic_ns()) // 2
        counters = read_counters()
        if self._needs_ipv6(rows, counters):
            rows = np.concatenate([rows, dump_tcp(families=[socket.AF_INET6])])
        states = {"all": _count(rows["state"])}
        ports: dict[str, np.ndarray] = {}
        if self._udp:
            rows = dump_sockets(socket.IPPROTO_UDP, [TcpState.ESTABLISHED])
        if self._targets and len(rows):
            dst, src = rows["dst"].view("S16"), rows["src"].view("S16")
            for target in self._targets:
                family = rows["family"] == target.family
                to = family & (rows["dport"] == target.port) & (dst == target.address)
                at = family & (rows["sport"] == target.port) & (src == target.address)
                at &= rows["state"] != TcpState.LISTEN  # the listening socket is no connection
                states[f"to {target.name}"] = _count(rows["state"][to])
                ports[f"to {target.name}"] = rows["sport"][to].astype(np.uint16)
                states[f"at {target.name}"] = _count(rows["state"][at])
                ports[f"at {target.name}"] = rows["dport"][at].astype(np.uint16)
        else:
            for target in self._targets:
                for scope in (f"to {target.name}", f"at {target.name}"):
                    states[scope] = _count(np.zeros(0, np.uint8))
                    ports[scope] = np.zeros(0, np.uint16)
        return Sample(t_ns, (time.perf_counter() - started) * 1000, states, ports, counters)

    def record(
        self, out: Path, *, interval: float, duration: float, stop: list[bool] | None = None
    ) -> int:
        """Sample every ``interval`` for at most ``duration`` (or until ``stop[0]``)."""
        out.mkdir(parents=True, exist_ok=True)
        (out / "collector.json").write_text(json.dumps({"start": read_kernel()}, indent=2))
        stream = out / "samples.arrows"
        count = overruns = 0
        stop = stop if stop is not None else [False]
        with pa.OSFile(str(stream), "wb") as sink, ipc.new_stream(sink, SAMPLES_SCHEMA) as writer:
            start = time.monotonic()
            next_tick = start
            while not stop[0] and time.monotonic() - start < duration:
                writer.write_batch(_batch(self.sample()))
                count += 1
                next_tick += interval
                delay = next_tick - time.monotonic()
                if delay < 0:  # a slow sample: skip the ticks it ate, do not burst
                    overruns += 1
                    next_tick = time.monotonic()
                    delay = 0
                time.sleep(delay)
            if stop[0]:
                # told to stop: the load has ended, so one last sample closes the
                # counters' deltas after the last connection (the kernel check needs it)
                writer.write_batch(_batch(self.sample()))
                count += 1
        meta = json.loads((out / "collector.json").read_text())
        meta.update(end=read_kernel(), samples=count, overruns=overruns, interval_s=interval)
        (out / "collector.json").write_text(json.dumps(meta, indent=2))
        finish_samples(out)
        return count

    def _needs_ipv6(self, ipv4: np.ndarray, counters: dict[str, int | None]) -> bool:
        """Whether an IPv6 dump can find anything: an IPv6 target, or what
        :func:`harness.kernel.counters.ipv6_sockets_unseen` says."""
        if any(t.family == socket.AF_INET6 for t in self._targets):
            return True
        ipv4_tw = int((ipv4["state"] == TcpState.TIME_WAIT).sum())
        return ipv6_sockets_unseen(ipv4_tw, counters.get("sockstat_tw"))


def _count(states: np.ndarray) -> dict[str, int]:
    counts = np.bincount(states, minlength=len(TcpState) + 1)
    return {state.name.lower(): int(counts[state]) for state in TcpState}


def _batch(sample: Sample) -> pa.RecordBatch:
    scopes = list(sample.states)
    n = len(scopes)
    columns: dict[str, Any] = {
        "t_ns": pa.array([sample.t_ns] * n, pa.int64()),
        "scope": pa.array(scopes, pa.string()),
    }
    for state in STATES:
        columns[state] = pa.array([sample.states[s][state] for s in scopes], pa.uint32())
    columns["ports"] = pa.array(
        [sample.ports.get(s, np.zeros(0, np.uint16)) if s != "all" else None for s in scopes],
        pa.list_(pa.uint16()),
    )
    columns["sample_ms"] = pa.array([sample.sample_ms] + [None] * (n - 1), pa.float32())
    for name in _COUNTER_NAMES:
        columns[name] = pa.array([sample.counters.get(name)] + [None] * (n - 1), pa.int64())
    return pa.RecordBatch.from_pydict(columns, schema=SAMPLES_SCHEMA)


def finish_samples(out: Path) -> int:
    """``samples.arrows`` (possibly truncated by a crash) -> ``samples.parquet``."""
    stream = out / "samples.arrows"
    if not stream.exists():
        return 0
    table = read_stream(stream).table(SAMPLES_SCHEMA)  # a truncation is logged with its size
    with atomic_path(out / "samples.parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    stream.unlink()
    return int(table.num_rows)


def run_collector(
    out: Path,
    targets: Sequence[ResolvedEndpoint],
    *,
    interval: float,
    duration: float,
    udp: bool = False,
) -> int:
    """The collector process: record until ``duration`` or SIGINT/SIGTERM."""
    stop = [False]

    def handle(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    die_with_parent(signal.SIGTERM)  # a killed eph run or worker: finish and stop
    return Collector(targets, udp=udp).record(out, interval=interval, duration=duration, stop=stop)


def collect_command(
    out: Path, interval: str, bound_s: float, targets: Sequence[object], udp: bool = False
) -> list[str]:
    """``eph collect`` into ``out`` as a child process: the command line."""
    args = [
        sys.executable,
        "-m",
        "harness",
        "collect",
        "--out",
        str(out),
        "--in-run",  # a directory the run made for it
        "--interval",
        interval,
        "--duration",
        f"{math.ceil(bound_s)}s",
    ]
    for target in targets:
        args += ["--target", str(target)]
    return [*args, "--udp"] if udp else args
