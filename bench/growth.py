"""How the end of a run grows with its size: merge and report of synthetic runs.

A synthetic run directory holds what a run at 20,000 connections/s over the
default 28,232-port range leaves behind (5% EADDRNOTAVAIL, two load processes'
record parts, a collector sample every 100 ms with its port lists). Everything
is written in chunks, so 100 million connections are made in bounded memory
too. The merge (the parts into ``connections.parquet``) and ``eph report`` each
run in a child process of their own, timed, with that child's peak RSS.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RATE = 20_000  # connections per second
RANGE = (32768, 60999)
KERNEL = {"ip_local_port_range": list(RANGE), "tcp_tw_reuse": 1, "tcp_timestamps": 1}
SCENARIO = 'name = "b"\n[target]\nendpoints = ["127.0.0.1:9000"]\n'
CHUNK = 1_000_000  # rows made at once
BATCH = RATE // 2  # rows per flush: FLUSH_INTERVAL at RATE
SAMPLE_NS = 100_000_000

# a child's own peak: the wrapper's only child is the command measured
_MEASURE = (
    "import resource, subprocess, sys\n"
    "subprocess.run(sys.argv[1:], check=True, capture_output=True)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def chunk_rows(first: int, n: int) -> np.ndarray:
    """Rows ``first`` to ``first + n`` of the synthetic run, as the engines flush them."""
    from harness.records import ROW_DTYPE

    i = np.arange(first, first + n, dtype=np.int64)
    rng = np.random.default_rng(first)
    size = RANGE[1] - RANGE[0] + 1
    ports = RANGE[0] + (i * 2 + (i // (size // 2)) % 2) % size
    errno = np.where(rng.random(n) < 0.05, 99, 0).astype(np.uint16)
    rows = np.zeros(n, dtype=ROW_DTYPE)
    rows["start_ns"] = i * (1_000_000_000 // RATE)
    rows["connect_us"] = rng.integers(20, 2000, n)
    rows["close_us"] = rng.integers(30, 3000, n)
    rows["local_addr"] = 1
    rows["local_port"] = np.where(errno == 0, ports, 0)
    rows["errno"] = errno
    return rows


def write_parts(parts: Path, connections: int, processes: int = 2) -> None:
    """Record parts as ``processes`` load processes write them: flush by flush, in turn."""
    from harness.endpoints import ResolvedEndpoint
    from harness.records import RecordWriter

    target = [ResolvedEndpoint(socket.AF_INET, "127.0.0.1", 9000)]
    writers = [
        RecordWriter(parts / f"p{n}.arrows", endpoints=target, close="client", engine="uvloop")
        for n in range(processes)
    ]
    for writer in writers:
        writer.address_id("127.0.0.1")
    flushes = 0
    for first in range(0, connections, CHUNK):
        rows = chunk_rows(first, min(CHUNK, connections - first))
        for at in range(0, len(rows), BATCH):
            writers[flushes % processes].write(rows[at : at + BATCH])
            flushes += 1
    for writer in writers:
        writer.close()


def _sample_chunks(connections: int) -> Iterator[pa.Table]:
    from harness.observe.collector import SAMPLES_SCHEMA, STATES

    count = connections * (1_000_000_000 // RATE) // SAMPLE_NS
    full = np.arange(RANGE[0], RANGE[1] + 1, dtype=np.uint16)
    for first in range(0, count, 1000):
        i = np.arange(first, min(first + 1000, count))
        in_use = np.minimum(len(full), RATE * (i + 1) // 10)  # fills in 1.4 s, then stays
        columns: dict[str, Any] = {"t_ns": np.repeat(i * SAMPLE_NS, 2)}
        columns["scope"] = np.tile(["all", "to 127.0.0.1:9000"], len(i))
        for state in STATES:
            value = in_use - 20 if state == "time_wait" else 20 if state == "established" else 0
            columns[state] = np.repeat(np.broadcast_to(value, len(i)), 2)
        offsets = np.zeros(2 * len(i) + 1, np.int32)
        offsets[2::2] = np.cumsum(in_use)
        offsets[1::2] = offsets[0:-1:2]
        values = np.concatenate([full[:k] for k in in_use])
        columns["ports"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        counter = np.repeat(i * 100, 2)
        on_scope_all = np.tile([False, True], len(i))  # counters are the namespace's
        for name in SAMPLES_SCHEMA.names[len(STATES) + 3 :]:
            columns[name] = pa.array(counter, mask=on_scope_all).cast(
                SAMPLES_SCHEMA.field(name).type
            )
        yield pa.table(columns).cast(SAMPLES_SCHEMA)


def synthetic_run(run: Path, connections: int) -> None:
    """A run directory with parts not yet merged, as a run leaves it."""
    from harness.observe.collector import SAMPLES_SCHEMA
    from harness.scenario import parse_scenario

    write_parts(run / "parts", connections)
    with pq.ParquetWriter(run / "samples.parquet", SAMPLES_SCHEMA) as writer:
        for table in _sample_chunks(connections):
            writer.write_table(table)
    (run / "scenario.json").write_text(json.dumps(parse_scenario(SCENARIO).to_json()))
    summary = {"kernel": KERNEL, "duration_s": connections / RATE, "interrupted": False}
    (run / "summary.json").write_text(json.dumps(summary))


def measured(command: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of ``command`` run in a child process."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command], check=True, capture_output=True, text=True
    )
    return time.perf_counter() - started, int(done.stdout.split()[-1]) / 1024


def growth(connections: int, workdir: Path) -> dict[str, Any]:
    """Merge, then ``eph report``, of a synthetic run of ``connections``."""
    run = workdir / f"run-{connections}"
    started = time.perf_counter()
    synthetic_run(run, connections)
    made = time.perf_counter() - started
    parts = sum(p.stat().st_size for p in (run / "parts").iterdir())
    merge = (
        "import sys; from pathlib import Path; from harness.run.merge import merge_parts;"
        " merge_parts(sorted(Path(sys.argv[1]).glob('*.arrows')), Path(sys.argv[2]))"
    )
    merge_s, merge_mib = measured(
        [sys.executable, "-c", merge, str(run / "parts"), str(run / "connections.parquet")]
    )
    for part in (run / "parts").iterdir():
        part.unlink()  # as finalize does once the merge wrote its file
    report_s, report_mib = measured([sys.executable, "-m", "harness", "report", str(run)])
    return {
        "connections": connections,
        "generate_s": round(made, 1),
        "parts_mib": round(parts / 2**20),
        "parquet_mib": round((run / "connections.parquet").stat().st_size / 2**20),
        "merge_s": round(merge_s, 1),
        "merge_peak_mib": round(merge_mib),
        "report_s": round(report_s, 1),
        "report_peak_mib": round(report_mib),
        "report_html_mib": round((run / "report.html").stat().st_size / 2**20, 2),
    }
