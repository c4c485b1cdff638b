"""Tuple audit and capacity model on data whose answers are known."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from harness.capacity.port_model import CapacityModel, reserved_in_range
from harness.report.hosts import HostSamples
from harness.scenario import ClosePolicy
from harness.summary import Kernel, Ports, TupleExample

from .tables import analyzed
from .tables import audit as audit_tuples
from .tables import connections_table as _table

S = 1_000_000_000


def test_clean_run_has_no_duplicates_and_counts_reuse() -> None:
    rows = [
        (0, 100, 40000, 0),
        (1 * S, 100, 40002, 0),
        (2 * S, 100, 40000, 0),  # 40000 again 2 s after it closed: out of TIME_WAIT
        (3 * S, 100, 40004, 99),  # failed: not part of the audit
        (70 * S, 100, 40002, 0),
    ]  # 69 s after: TIME_WAIT was over, not a reuse
    audit = audit_tuples(_table(rows))
    assert audit.distinct == 2  # 40000 and 40002; the failed attempt has no tuple
    assert audit.max_uses == 2
    assert audit.concurrent_duplicates == 0
    assert audit.reused_out_of_time_wait == 1
    ages, counts = audit.reuse_age_weights()  # in whole microseconds
    assert ages.tolist() == pytest.approx([2.0 - 100e-6]) and counts.tolist() == [1]


def test_planted_overlap_is_found_with_an_example() -> None:
    rows = [
        (0, 5_000_000, 40000, 0),  # open for 5 s
        (1 * S, 100, 40000, 0),  # same 4-tuple while the first is still open
        (2 * S, 100, 40002, 0),
    ]
    audit = audit_tuples(_table(rows))
    assert audit.concurrent_duplicates == 1
    assert audit.examples == [
        TupleExample(
            local_port=40000,
            remote_port=9000,
            first_start_ns=0,
            first_close_ns=5 * S,
            second_start_ns=1 * S,
        )
    ]
    assert audit.section().concurrent_duplicates == 1


def test_server_close_leaves_no_client_time_wait_to_reuse() -> None:
    rows = [(0, 100, 40000, 0), (1 * S, 100, 40000, 0)]
    assert audit_tuples(_table(rows, close="server")).reused_out_of_time_wait == 0
    assert audit_tuples(_table(rows, close="client")).reused_out_of_time_wait == 1


def test_million_connections_audit_is_vectorised() -> None:
    n = 1_000_000
    rng = np.random.default_rng(1)
    starts = np.sort(rng.integers(0, 60 * S, n))
    ports = 32768 + np.arange(n) % 28232
    table = _table(list(zip(starts.tolist(), [50] * n, ports.tolist(), [0] * n, strict=True)))
    audit = audit_tuples(table)
    assert audit.distinct == 28232
    assert audit.concurrent_duplicates == 0


@pytest.mark.parametrize(
    ("kwargs", "rate", "ports"),
    [
        # docs/kernel.md "Reuse": default range, 60 s of TIME_WAIT: about 470/s
        ({"port_range": [32768, 60999], "tw_reuse": 0}, 28232 / 60, 28232),
        # 100 ports, reuse on with timestamps, 1 s delay: 100/s; 100 ms: 1000/s
        ({"port_range": [40000, 40099], "tw_reuse": 1, "reuse_delay_ms": 1000}, 100.0, 100),
        ({"port_range": [40000, 40099], "tw_reuse": 1, "reuse_delay_ms": 100}, 1000.0, 100),
        # tw_reuse=2 is loopback only; without timestamps no reuse at all
        (
            {"port_range": [40000, 40099], "tw_reuse": 2, "destinations": ["10.0.0.1"]},
            100 / 60,
            100,
        ),
        ({"port_range": [40000, 40099], "tw_reuse": 2, "destinations": ["127.0.0.1"]}, 100.0, 100),
        ({"port_range": [40000, 40099], "tw_reuse": 1, "timestamps": 0}, 100 / 60, 100),
        # 2 destination ports x 2 destination IPs: 400 ports (docs/kernel.md "Reuse")
        (
            {
                "port_range": [40000, 40099],
                "tw_reuse": 0,
                "destinations": ["127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2"],
            },
            400 / 60,
            400,
        ),
        # reserved ports come out of the range
        (
            {"port_range": [40000, 40099], "tw_reuse": 0, "reserved": "40000-40009,50000"},
            90 / 60,
            90,
        ),
    ],
)
def test_model_matches_kernel_notes(kwargs: dict, rate: float, ports: int) -> None:  # type: ignore[type-arg]
    kwargs.setdefault("destinations", ["127.0.0.1"])
    model = CapacityModel.from_settings(**kwargs)
    assert model.ports == ports
    assert model.max_rate_per_s == pytest.approx(rate)


def test_no_client_limit_when_the_server_closes_or_resets() -> None:
    for close in (ClosePolicy.SERVER, ClosePolicy.RESET):
        model = CapacityModel.from_settings(port_range=[40000, 40099], close=close)
        assert model.max_rate_per_s is None
        assert model.time_to_exhaustion_s(1e6) is None


def test_lifetime_and_hosts_enter_the_model() -> None:
    # server close, connections held 30 s: 28,232 ports / 30 s per host
    model = CapacityModel.from_settings(
        port_range=[32768, 60999], close=ClosePolicy.SERVER, lifetime_s=30.0, hosts=2
    )
    assert model.hold_s is None and model.busy_s == 30.0
    assert model.max_rate_per_s == pytest.approx(2 * 28232 / 30)
    reuse = CapacityModel.from_settings(
        port_range=[40000, 40099], tw_reuse=1, reuse_delay_ms=200, lifetime_s=0.05
    )
    assert reuse.max_rate_per_s == pytest.approx(100 / 0.25)


def test_time_to_exhaustion() -> None:
    model = CapacityModel.from_settings(
        port_range=[40000, 40099], tw_reuse=0, destinations=["127.0.0.1"]
    )
    assert model.time_to_exhaustion_s(1000.0) == pytest.approx(0.1)
    assert model.time_to_exhaustion_s(1.0) is None  # under 100/60 per s: never


def test_reserved_in_range() -> None:
    assert reserved_in_range("", 1, 10) == 0
    assert reserved_in_range("5-20, 3", 1, 10) == 7


def test_port_allocation_parity_and_offsets() -> None:
    # even ports first, then odd (connect() prefers the low end's parity), 2 uses of 40000
    rows = [(i * S // 10, 100, 40000 + 2 * i, 0) for i in range(50)]
    rows += [(5 * S + i * S // 10, 100, 40001 + 2 * i, 0) for i in range(50)]
    rows += [(11 * S, 100, 40000, 0)]
    kernel = Kernel(ip_local_port_range=[40000, 40099])
    result = analyzed(_table(rows), kernel).ports
    assert result.distinct_used == 100  # what summarize found is kept
    assert result.first_odd_s == pytest.approx(5.0)
    assert result.max_uses_per_port == 2
    assert result.first_port_by_destination == {"127.0.0.1:9000": 40000}
    assert result.first_offset_by_destination == {"127.0.0.1:9000": 0}
    assert result.connect_ms_by_parity is not None
    assert result.connect_ms_by_parity.even is not None
    assert result.connect_ms_by_parity.even.p50 == pytest.approx(0.01)
    failed = analyzed(_table([(0, 100, 0, 99)]), kernel)  # nothing succeeded: nothing added
    assert failed.ports == Ports(range=[40000, 40099], distinct_used=0, even_fraction=None)


def test_host_sections_count_each_worker_on_its_own() -> None:
    a = _table([(i * 1_000_000, 100, 40000 + i, 0) for i in range(5)], host="w1")
    b = _table(
        [(i * 1_000_000, 100, 40000 + i % 3, 0 if i < 3 else 99) for i in range(4)], host="w2"
    )
    table = pa.concat_tables([a, b], promote_options="permissive").unify_dictionaries()
    kernel = Kernel(ip_local_port_range=[40000, 40099])
    hosts = [HostSamples(name, None, kernel) for name in ("w1", "w2")]
    summary = analyzed(table.sort_by("start_ns"), kernel, hosts)
    assert summary.hosts is not None
    w1, w2 = summary.hosts
    assert (w1.attempted, w1.succeeded, w1.distinct_ports) == (5, 5, 5)
    assert w1.first_exhaustion_s is None and w1.port_span == [40000, 40004]
    assert w1.port_range == [40000, 40099]
    assert (w2.attempted, w2.succeeded, w2.failed) == (4, 3, 1)
    assert w2.first_exhaustion_s == 0.003 and w2.source_addresses == ["127.0.0.1"]


def test_peaks_read_the_targets_scopes_and_the_kernels_counter() -> None:
    """Occupancy sums the ``to`` scopes per sample; TWRecycled comes from ``all``."""
    from harness.report.port_occupancy import IN_USE, peaks, scope_series

    times = [0, 0, 0, 1, 1, 1]
    scopes = ["all", "to a:1", "to b:1", "all", "to a:1", "to b:1"]
    time_wait = [500, 10, 20, 900, 30, 40]  # "all" counts other sockets too
    columns: dict[str, pa.Array] = {
        "t_ns": pa.array(times, pa.int64()),
        "scope": pa.array(scopes, pa.string()),
        "tw_recycled": pa.array([5.0, None, None, 12.0, None, None], pa.float64()),
    }
    for state in IN_USE:
        columns[state] = pa.array(time_wait if state == "time_wait" else [1] * 6, pa.int64())
    samples = pa.table(columns)
    t, tw = scope_series(samples, ("time_wait",))
    assert t.tolist() == [0, 1] and tw.tolist() == [30, 70]
    found = peaks(samples)
    assert found.time_wait == 70
    assert found.in_use == 70 + 2 * (len(IN_USE) - 1)
    assert found.tw_recycled == 7
    only_all = samples.filter(pa.array([s == "all" for s in scopes]))
    assert scope_series(only_all, ("time_wait",))[1].tolist() == [500, 900]


def test_the_latency_cliff_reads_occupancy_from_the_samples() -> None:
    """2,000 client-closed connections 1 ms apart over 2,000 ports: even ports first at
    10 us, then odd ones at 900 us; the collector sees one more port held per ms."""
    from harness.report.analysis import analyze
    from harness.report.port_occupancy import IN_USE
    from harness.report.scan import scan_records
    from harness.report.summarize import summarize
    from harness.scenario import parse_scenario

    n, ms = 2000, 1_000_000
    ports = [40000 + 2 * i for i in range(n // 2)] + [40001 + 2 * i for i in range(n // 2)]
    table = _table([(i * ms, 100, ports[i], 0) for i in range(n)])
    connect_us = pa.array([10] * (n // 2) + [900] * (n // 2), pa.uint32())
    table = table.set_column(table.schema.get_field_index("connect_us"), "connect_us", connect_us)
    times = np.arange(0, n + 1, 20) * ms  # a sample every 20 ms
    columns: dict[str, pa.Array] = {
        "t_ns": pa.array(times, pa.int64()),
        "scope": pa.array(["to 127.0.0.1:9000"] * len(times), pa.string()),
        "sample_ms": pa.array(np.ones(len(times))),
        "tw_recycled": pa.array(np.zeros(len(times))),
    }
    for state in IN_USE:
        held = times // ms if state == "time_wait" else np.zeros(len(times), np.int64)
        columns[state] = pa.array(held, pa.int64())
    kernel = Kernel(ip_local_port_range=[40000, 40000 + n - 1], tcp_tw_reuse=0)
    first = summarize(
        scan_records(table),
        scenario="cliff",
        started_at="-",
        duration_s=2.0,
        interrupted=False,
        kernel=kernel,
    )
    scenario = parse_scenario('name = "cliff"\n[target]\nendpoints = ["127.0.0.1:9000"]\n')
    cliff = analyze(table, pa.table(columns), scenario, first).latency_cliff
    assert cliff is not None and cliff.detected
    assert cliff.onset_occupancy == pytest.approx(0.5, abs=0.01)
    assert (cliff.before_p50_ms, cliff.after_p50_ms, cliff.ratio) == (0.01, 0.9, 90.0)
    assert cliff.onset_s == pytest.approx(1.0, abs=0.01)
    assert cliff.rate_before_per_s == pytest.approx(1000, rel=0.01)
