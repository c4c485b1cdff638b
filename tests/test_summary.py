"""summary.json figures from synthetic records whose answers are known."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from harness.records import CONNECTIONS_SCHEMA
from harness.report.scan import RecordScan, scan_records
from harness.report.summarize import summarize
from harness.summary import SCHEMA_VERSION, Kernel, Listener, Outage, Summary

KERNEL = Kernel(ip_local_port_range=[40000, 40099])


def _cols(errnos: list[int], ports: list[int], step_ns: int = 1_000_000) -> RecordScan:
    n = len(errnos)
    columns = {
        "start_ns": pa.array(np.arange(n, dtype=np.int64) * step_ns + 5_000_000_000),
        "connect_us": pa.array(np.full(n, 100, dtype=np.uint32)),
        "close_us": pa.array(np.full(n, 1000, dtype=np.uint32)),
        "local_port": pa.array(np.array(ports, dtype=np.uint16)),
        "errno": pa.array(np.array(errnos, dtype=np.uint16)),
        "io_errno": pa.array(np.zeros(n, dtype=np.uint16)),
    }
    schema = pa.schema([CONNECTIONS_SCHEMA.field(name) for name in columns])
    return scan_records(pa.table(columns, schema=schema))


def _summary(cols: RecordScan, **kw: object) -> Summary:
    args = {
        "scenario": "t",
        "started_at": "x",
        "duration_s": 1.0,
        "interrupted": False,
        "kernel": KERNEL,
    }
    args.update(kw)
    return summarize(cols, **args)  # type: ignore[arg-type]


def test_exhaustion_after_the_range() -> None:
    # 100 successes on even then odd ports, then EADDRNOTAVAIL (99) and one ECONNREFUSED
    ports = list(range(40000, 40100, 2)) + list(range(40001, 40100, 2))
    cols = _cols([0] * 100 + [99] * 20 + [111], ports + [0] * 21)
    summary = _summary(cols)
    assert summary.connections.attempted == 121
    assert summary.connections.succeeded == 100
    assert summary.connections.errors == {"EADDRNOTAVAIL": 20, "ECONNREFUSED": 1}
    assert summary.ports.distinct_used == 100
    assert summary.ports.even_fraction == 0.5
    exhaustion = summary.exhaustion
    assert exhaustion.exhausted is True
    assert exhaustion.errno == "EADDRNOTAVAIL"
    assert exhaustion.succeeded_before_first_failure == 100
    assert exhaustion.first_failure_s == 0.1  # 100 attempts 1 ms apart
    assert summary.exhausted_at == 0.1


def test_refused_is_not_exhaustion() -> None:
    summary = _summary(_cols([111] * 5, [0] * 5))
    assert summary.exhaustion.exhausted is False
    assert summary.exhausted_at is None


def test_rate_is_over_the_records_span() -> None:
    summary = _summary(_cols([0] * 101, list(range(101)), step_ns=10_000_000), duration_s=5.0)
    assert summary.connections.rate_per_s == 100.0


def test_conservation_mismatch_is_reported() -> None:
    cols = _cols([0] * 10, list(range(10)))
    ok = _summary(cols, listener=Listener(accepted=10), locust_requests=10).conservation
    assert ok.ok is True
    bad = _summary(cols, listener=Listener(accepted=9), locust_requests=11).conservation
    assert bad.ok is False
    assert bad.records_match_locust is False and bad.succeeded_match_listener is False


def test_over_a_lossy_link_the_listener_count_is_shown_not_judged() -> None:
    cols = _cols([0] * 10, list(range(1000, 1010)))
    listener = Listener(accepted=9)
    result = _summary(cols, listener=listener, locust_requests=10, lossy_link=True)
    conservation = result.conservation
    assert conservation.succeeded_match_listener is False
    assert conservation.listener_check is not None
    assert "loses packets" in conservation.listener_check
    assert conservation.ok is True
    wrong_count = _summary(cols, listener=listener, locust_requests=11, lossy_link=True)
    assert wrong_count.conservation.ok is False


def test_empty_run() -> None:
    summary = _summary(_cols([], []))
    assert summary.connections.attempted == 0
    assert summary.ports.even_fraction is None
    assert summary.connections.connect_ms is None


def test_written_keys_are_those_the_run_had() -> None:
    """Optional sections appear in the JSON only when set; required ones always do."""
    with_listener = _summary(_cols([0], [40000]), listener=Listener(accepted=1)).to_json()
    assert set(with_listener) == {
        "schema_version",
        "scenario",
        "interrupted",
        "started_at",
        "duration_s",
        "connections",
        "ports",
        "exhaustion",
        "outages",
        "kernel",
        "listener",
        "conservation",
    }
    assert with_listener["schema_version"] == SCHEMA_VERSION
    assert with_listener["listener"] == {"accepted": 1}
    assert set(with_listener["exhaustion"]) == {
        "exhausted",
        "first_failure_s",
        "succeeded_before_first_failure",
    }
    assert "listener" not in _summary(_cols([0], [40000])).to_json()


def test_outage_windows_from_failures_at_the_target() -> None:
    # 1 ms apart: 100 ok, 50 refused with exhaustion failures mixed in, 100 ok,
    # 3 refused (a blip), 10 ok, then 20 timeouts until the end
    errnos = [0] * 100 + [111, 99] * 25 + [0] * 100 + [111] * 3 + [0] * 10 + [110] * 20
    first, last = _summary(_cols(errnos, [40000] * len(errnos))).outages
    assert first == Outage(
        from_s=0.1, to_s=0.15, failures=25, errors={"ECONNREFUSED": 25}, recovered=True
    )  # to the next success
    assert last.errors == {"ETIMEDOUT": 20} and last.recovered is False
    assert last.to_s == round((len(errnos) - 1) / 1000, 4)


def test_no_outage_when_only_the_range_runs_out() -> None:
    summary = _summary(_cols([0] * 10 + [99] * 50, [40000] * 60))
    assert summary.outages == []
