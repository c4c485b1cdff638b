"""One analysis for every size of run: hypothesis builds record sets (ties, outages,
exhaustion, slow and timed-out connects, resets after connecting), and each is
analysed held in memory as one batch and read from Parquet a few rows at a time, as
a run past two million records is. The summaries must be identical."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.records import CONNECTIONS_SCHEMA, application_zeros
from harness.report import ondisk
from harness.report.nat_section import scan_for_nat
from harness.report.ondisk import OnDisk, start_span
from harness.report.scan import scan_records
from harness.report.summarize import summarize
from harness.summary import Kernel

KERNEL = Kernel(ip_local_port_range=[40000, 40063], tcp_tw_reuse=0, tcp_timestamps=1)
ERRNOS = [0, 0, 0, 0, errno.EADDRNOTAVAIL, errno.ECONNREFUSED, errno.ETIMEDOUT]

rows = st.lists(
    st.tuples(
        st.integers(0, 3),  # ms after the previous start: 0 is a tie
        st.sampled_from(ERRNOS),
        st.integers(1, 2_500_000),  # connect, µs: some past a SYN retransmission
        st.integers(0, 90_000),  # held after connect, µs
        st.integers(0, 63),  # port offset
        st.booleans(),  # reset after connecting
    ),
    min_size=1,
    max_size=300,
)


def _table(
    drawn: list[tuple[int, int, int, int, int, bool]],
    exhaust_after: int = 0,
    outages: list[tuple[int, int]] = (),  # type: ignore[assignment]
) -> pa.Table:
    """The drawn rows; the range runs out only from row ``exhaust_after`` on (so that
    it does in a later batch), and each ``outages`` (first row, length) is a run of
    refusals (an outage from five on)."""
    n = len(drawn)
    gaps, errnos, connect, held, port, reset = (np.array(c) for c in zip(*drawn, strict=True))
    errnos[:exhaust_after][errnos[:exhaust_after] == errno.EADDRNOTAVAIL] = 0
    for first, length in outages:
        errnos[first : first + length] = errno.ECONNREFUSED
    ok = errnos == 0

    def const(value: str) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value]))

    return pa.table(
        {
            "start_ns": pa.array(np.cumsum(gaps).astype(np.int64) * 1_000_000 + 5 * 10**9),
            "connect_us": pa.array(connect.astype(np.uint32)),
            "close_us": pa.array((connect + held).astype(np.uint32)),
            "local_addr": const("127.0.0.1"),
            "local_port": pa.array(np.where(ok, 40000 + port, 0).astype(np.uint16)),
            "remote_addr": const("127.0.0.1"),
            "remote_port": pa.array(np.full(n, 9000, np.uint16)),
            "errno": pa.array(errnos.astype(np.uint16)),
            "io_errno": pa.array(np.where(ok & reset, errno.ECONNRESET, 0).astype(np.uint16)),
            "close": const("client"),
            "engine": const("locust"),
            "pid": pa.array(np.ones(n, np.uint32)),
            "host": const("localhost"),
            **application_zeros(n),
        },
        schema=CONNECTIONS_SCHEMA,
    )


def _summary(records: pa.Table | OnDisk) -> dict[str, object]:
    scan = scan_records(records)
    summary = summarize(
        scan,
        scenario="p",
        started_at="2026-12-05T00:00:00+00:00",
        duration_s=1.0,
        interrupted=False,
        kernel=KERNEL,
        http=scan.http.section(),
    )
    nat = scan_for_nat(records)
    return {
        "summary": summary.model_dump(),
        "span": start_span(records),
        "nat": (nat.slow, nat.timeouts, nat.first_hit_ns, list(nat.steps), nat.lifetime_s(0.0)),
    }


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    drawn=rows,
    batch_rows=st.integers(1, 40),
    exhaust_after=st.integers(0, 300),
    outages=st.lists(st.tuples(st.integers(0, 299), st.integers(1, 30)), max_size=4),
)
def test_one_batch_or_many_give_one_summary(
    drawn: list[tuple[int, int, int, int, int, bool]],
    batch_rows: int,
    exhaust_after: int,
    outages: list[tuple[int, int]],
) -> None:
    table = _table(drawn, exhaust_after, outages)
    held = _summary(table)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "connections.parquet"
        pq.write_table(table, path, row_group_size=batch_rows)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ondisk, "BATCH_ROWS", batch_rows)
            scanned = _summary(OnDisk(path, table.num_rows))
    assert scanned == held
