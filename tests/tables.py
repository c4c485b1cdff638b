"""Connection tables and summaries whose answers are known, for analysis and report tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from harness.observe.nat_collector import NAT_SCHEMA
from harness.records import CONNECTIONS_SCHEMA, application_zeros
from harness.report.analysis import analyze
from harness.report.hosts import HostSamples
from harness.report.ondisk import Held
from harness.report.scan import scan_records
from harness.report.summarize import summarize
from harness.report.tuples import TupleAudit
from harness.report.tuples_on_disk import CycleCount, audit_on_disk
from harness.scenario import parse_scenario
from harness.summary import Capacity, Connections, Conservation, Exhaustion, Kernel, Ports, Summary

NAT = "198.51.100.1"


def connections_table(
    rows: list[tuple[int, int, int, int]], close: str = "client", host: str = "localhost"
) -> pa.Table:
    """rows: (start_ns, close_us, local_port, errno) toward one destination."""
    n = len(rows)

    def const(value: str) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value]))

    return pa.table(
        {
            "start_ns": pa.array([r[0] for r in rows], pa.int64()),
            "connect_us": pa.array([10] * n, pa.uint32()),
            "close_us": pa.array([r[1] for r in rows], pa.uint32()),
            "local_addr": const("127.0.0.1"),
            "local_port": pa.array([r[2] for r in rows], pa.uint16()),
            "remote_addr": const("127.0.0.1"),
            "remote_port": pa.array([9000] * n, pa.uint16()),
            "errno": pa.array([r[3] for r in rows], pa.uint16()),
            "io_errno": pa.array([0] * n, pa.uint16()),
            "close": const(close),
            "engine": const("locust"),
            "pid": pa.array([1] * n, pa.uint32()),
            "host": const(host),
            **application_zeros(n),
        },
        schema=CONNECTIONS_SCHEMA,
    )


def exhausted_summary(**capacity: object) -> Summary:
    """200 attempts over a 100-port range: 100 succeeded, then EADDRNOTAVAIL at 0.5 s."""
    return Summary(
        scenario="r",
        interrupted=False,
        started_at="t",
        duration_s=1.0,
        connections=Connections(
            attempted=200,
            succeeded=100,
            failed=100,
            errors={"EADDRNOTAVAIL": 100},
            io_errors={},
            rate_per_s=200.0,
            connect_ms=None,
        ),
        ports=Ports(range=[40000, 40099], distinct_used=100, even_fraction=0.5),
        exhaustion=Exhaustion(
            exhausted=True,
            errno="EADDRNOTAVAIL",
            first_failure_s=0.5,
            succeeded_before_first_failure=100,
        ),
        outages=[],
        kernel=Kernel(ip_local_port_range=[40000, 40099], tcp_tw_reuse=0, tcp_timestamps=1),
        conservation=Conservation(records=200, ok=True),
        capacity=Capacity.model_validate(capacity),
    )


def write_nat(
    run: Path, t_ns: list[int], in_use: list[int], dropped: list[int], pool: int = 4
) -> pa.Table:
    """A NAT collector's ``router/nat.parquet`` and ``nat.json`` in ``run``: a pool of
    ``pool`` ports at one address toward 127.0.0.1:9000, ``in_use[k]`` of them held by
    open flows at sample ``k``, and conntrack's drop counters at ``dropped[k]``."""
    rows: list[dict[str, object]] = []
    for t, used, drops in zip(t_ns, in_use, dropped, strict=True):
        rows.append({"t_ns": t, "destination": "all", "nat_address": "", "drop": drops})
        rows[-1].update(insert_failed=drops, entries=used)
        counts = {"live": used, "time_wait": 0, "held": 0, "in_use": used}
        rows.append({"t_ns": t, "destination": "127.0.0.1:9000", "nat_address": NAT, **counts})
    table = pa.Table.from_pylist(rows, schema=NAT_SCHEMA)
    (run / "router").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, run / "router" / "nat.parquet")
    meta = {"addresses": [NAT], "ports": [20000, 20000 + pool - 1], "hold": False}
    (run / "router" / "nat.json").write_text(json.dumps(meta))
    return table


def audit(table: pa.Table) -> TupleAudit:
    """The run's tuple audit of ``table``, as the analysis makes it (one partition)."""
    return audit_on_disk(Held(table), CycleCount(after_ns=None))


def analyzed(table: pa.Table, kernel: Kernel, hosts: Sequence[HostSamples] = ()) -> Summary:
    """``table``'s summary through the one analysis: summarize, then analyze."""
    first = summarize(
        scan_records(table),
        scenario="t",
        started_at="-",
        duration_s=1.0,
        interrupted=False,
        kernel=kernel,
    )
    scenario = parse_scenario('name = "t"\n[target]\nendpoints = ["127.0.0.1:9000"]\n')
    return analyze(table, None, scenario, first, hosts=hosts)
