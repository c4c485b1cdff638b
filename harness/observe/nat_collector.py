"""The NAT collector: the router's view of its SNAT pool while the load runs.

Every interval it dumps conntrack (``harness.kernel.conntrack``) and counts, per
destination and NAT address, the pool's ports in use: flows still open (``live``),
entries in TIME_WAIT or CLOSE (``time_wait``) and, for a lab NAT that holds TIME_WAIT
as the clouds do, ports held after their flow closed (``held``, from the lab's
nftables set). ``in_use`` is the union: the ports a new flow to that destination
cannot take. A row ``all`` carries conntrack's statistics (``insert_failed``,
``drop``, ``early_drop``, ``search_restart``, ``clash_resolve``), the lab's
``held_drops`` counter and the table's size. Each sample is appended to an Arrow IPC
stream at once and the stream becomes ``nat.parquet`` when the collector stops.

It runs inside the router's namespace (``eph lab``'s nat topology) or on a real
router or Kubernetes node, in a process of its own, and never imports locust.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from harness.endpoints import Endpoint
from harness.files import atomic_path, read_stream
from harness.kernel.conntrack import IPS_SRC_NAT, CtState, dump_conntrack, read_conntrack_stats
from harness.kernel.exit import run_and_exit
from harness.kernel.parent_death import die_with_parent

__all__ = ["NAT_SCHEMA", "STAT_NAMES", "PoolSampler", "finish_nat", "nat_command"]

logger = logging.getLogger(__name__)

STAT_NAMES = ["insert_failed", "drop", "early_drop", "search_restart", "clash_resolve"]
_CLOSED = [CtState.TIME_WAIT, CtState.CLOSE]
NAT_SCHEMA = pa.schema(
    [
        ("t_ns", pa.int64()),  # CLOCK_MONOTONIC, comparable with the records' start_ns
        ("destination", pa.string()),  # "HOST:PORT", or "all" for the statistics row
        ("nat_address", pa.string()),
        ("live", pa.uint32()),
        ("time_wait", pa.uint32()),
        ("held", pa.uint32()),
        ("in_use", pa.uint32()),
        ("sample_ms", pa.float32()),
        *[(name, pa.int64()) for name in [*STAT_NAMES, "held_drops", "entries"]],
    ]
)


@dataclass
class _Counts:
    live: int = 0
    time_wait: int = 0
    held: int = 0
    in_use: int = 0


@dataclass
class NatSample:
    t_ns: int
    sample_ms: float
    pools: dict[tuple[str, str], _Counts]  # (destination, NAT address) -> counts
    stats: dict[str, int | None] = field(default_factory=dict)


class PoolSampler:
    """Samples the SNAT pool toward ``destinations``; with ``hold_table``, the lab's
    ``held`` set in that nftables table counts too."""

    def __init__(
        self,
        destinations: Sequence[Endpoint],
        addresses: Sequence[str],
        hold_table: str | None = None,
    ) -> None:
        self.destinations = list(destinations)
        self.addresses = list(addresses)
        self.hold_table = hold_table
        self._warned = False

    def sample(self) -> NatSample:
        started = time.perf_counter()
        t_ns = time.monotonic_ns()
        rows = dump_conntrack()
        rows = rows[(rows["status"] & IPS_SRC_NAT) != 0]
        held, held_drops = self._held() if self.hold_table else ({}, None)
        pools = {}
        for dest in self.destinations:
            to = (rows["orig_dport"] == dest.port) & _is(rows["orig_dst"], dest.host)
            for address in self.addresses:
                mine = rows[to & _is(rows["reply_dst"], address)]
                closed = np.isin(mine["state"], _CLOSED)
                kept = held.get((address, str(dest)), np.zeros(0, np.int64))
                ports = np.union1d(mine["reply_dport"].astype(np.int64), kept)
                pools[(str(dest), address)] = _Counts(
                    int((~closed).sum()), int(closed.sum()), len(kept), len(ports)
                )
        stats: dict[str, int | None] = dict.fromkeys([*STAT_NAMES, "entries"])
        stats.update({k: v for k, v in read_conntrack_stats().items() if k in stats})
        stats["held_drops"] = held_drops
        return NatSample(t_ns, (time.perf_counter() - started) * 1000, pools, stats)

    def _held(self) -> tuple[dict[tuple[str, str], np.ndarray], int | None]:
        """The ``busy`` set's ports per (NAT address, destination), and the drop counter
        (``harness.lab.nat_router``: each element is destination . port . mark, the mark
        being the address's index << 16 | the port). One ``nft`` run a sample that lists
        the set and the counter only: the table's one rule a pool port would make
        ``list table`` grow with the pool. The commands go on the command line: nft
        1.0.6 prints no JSON for commands read from stdin."""
        table = self.hold_table
        commands = f"list set ip {table} busy; list counter ip {table} held_drops"
        result = subprocess.run(
            ["nft", "-j", commands], capture_output=True, text=True, timeout=10, check=False
        )
        items = [
            item
            for line in result.stdout.splitlines()
            if line.strip()
            for item in json.loads(line).get("nftables", [])
        ]
        if result.returncode != 0 or not any("set" in item for item in items):
            if not self._warned:
                logger.warning("cannot read the busy set of %s: %s", table, result.stderr.strip())
                self._warned = True
            return {}, None
        ports: dict[tuple[str, str], list[int]] = {}
        drops = None
        for item in items:
            if item.get("counter", {}).get("name") == "held_drops":
                drops = int(item["counter"]["packets"])
            for element in item.get("set", {}).get("elem", []):
                value = element.get("elem", {}).get("val", element)
                dest, dport, mark = value["concat"]
                address = self.addresses[int(mark) >> 16]
                ports.setdefault((address, f"{dest}:{dport}"), []).append(int(mark) & 0xFFFF)
        return {k: np.unique(np.array(v, np.int64)) for k, v in ports.items()}, drops

    def record(
        self, out: Path, *, interval: float, duration: float, stop: list[bool] | None = None
    ) -> int:
        """Sample every ``interval`` for at most ``duration`` (or until ``stop[0]``)."""
        out.mkdir(parents=True, exist_ok=True)
        stream = out / "nat.arrows"
        count = 0
        stop = stop if stop is not None else [False]
        with pa.OSFile(str(stream), "wb") as sink, ipc.new_stream(sink, NAT_SCHEMA) as writer:
            start = next_tick = time.monotonic()
            while not stop[0] and time.monotonic() - start < duration:
                writer.write_batch(_batch(self.sample()))
                count += 1
                next_tick = max(next_tick + interval, time.monotonic())
                time.sleep(max(0.0, next_tick - time.monotonic()))
            if stop[0]:  # the load ended: one last sample closes the counters' deltas
                writer.write_batch(_batch(self.sample()))
                count += 1
        finish_nat(out)
        return count


def _is(column: np.ndarray, host: str) -> np.ndarray:
    """``column == host`` for conntrack's address columns, whichever way they are kept."""
    address = ipaddress.ip_address(host)
    if column.dtype.kind in "ui":
        same: np.ndarray = column == int(address)
        return same
    packed = address.packed.ljust(column.dtype.itemsize, b"\0")
    keys = np.ascontiguousarray(column).view(f"S{column.dtype.itemsize}").ravel()
    equal: np.ndarray = keys == packed
    return equal


def _batch(sample: NatSample) -> pa.RecordBatch:
    keys = list(sample.pools)
    n = len(keys) + 1
    counts = [sample.pools[k] for k in keys]
    columns: dict[str, Any] = {
        "t_ns": [sample.t_ns] * n,
        "destination": ["all", *(k[0] for k in keys)],
        "nat_address": ["", *(k[1] for k in keys)],
        "sample_ms": [sample.sample_ms] + [None] * (n - 1),
    }
    for name in ("live", "time_wait", "held", "in_use"):
        columns[name] = [None, *(getattr(c, name) for c in counts)]
    for name in [*STAT_NAMES, "held_drops", "entries"]:
        columns[name] = [sample.stats.get(name)] + [None] * (n - 1)
    return pa.RecordBatch.from_pydict(columns, schema=NAT_SCHEMA)


def finish_nat(out: Path) -> int:
    """``nat.arrows`` (possibly truncated by a crash) -> ``nat.parquet``."""
    stream = out / "nat.arrows"
    if not stream.exists():
        return 0
    table = read_stream(stream).table(NAT_SCHEMA)
    with atomic_path(out / "nat.parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    stream.unlink()
    return int(table.num_rows)


def nat_command(
    out: Path,
    interval: float,
    bound_s: float,
    targets: Sequence[Endpoint],
    pool: Sequence[str],
) -> list[str]:
    """The NAT collector as a child process: its command line (``pool`` from
    :func:`harness.lab.nat_router.pool_arguments`)."""
    import sys

    args = [sys.executable, "-m", "harness.observe.nat_collector", "--out", str(out)]
    args += ["--interval", f"{interval:g}", "--duration", f"{bound_s:g}"]
    for target in targets:
        args += ["--target", str(target)]
    return [*args, *pool]


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--interval", type=float, default=0.1, show_default=True, help="Seconds.")
@click.option("--duration", type=float, required=True, help="Seconds at most.")
@click.option("--target", "targets", multiple=True, required=True, metavar="HOST:PORT")
@click.option("--nat-addresses", required=True, help="The pool's addresses, comma-separated.")
@click.option("--nat-ports", required=True, help="LO-HI: the pool's ports.")
@click.option("--hold", "hold_table", default=None, help="nftables table with a held set.")
def main(
    out: Path,
    interval: float,
    duration: float,
    targets: Sequence[str],
    nat_addresses: str,
    nat_ports: str,
    hold_table: str | None,
) -> None:
    """Record the SNAT pool's occupancy into OUT/nat.parquet until SIGTERM or DURATION."""
    stop = [False]

    def handle(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    die_with_parent(signal.SIGTERM)
    addresses = nat_addresses.split(",")
    lo, _, hi = nat_ports.partition("-")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"addresses": addresses, "ports": [int(lo), int(hi)], "hold": hold_table is not None}
    (out / "nat.json").write_text(json.dumps({**meta, "interval_s": interval}, indent=2))
    sampler = PoolSampler([Endpoint.parse(t) for t in targets], addresses, hold_table)
    sampler.record(out, interval=interval, duration=duration, stop=stop)


if __name__ == "__main__":
    run_and_exit(main)
