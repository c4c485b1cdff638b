"""report.html and the comparison page render from stored columns, every figure in them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.observe.collector import SAMPLES_SCHEMA, STATES
from harness.report.figures import FIGURES, NAT_FIGURE, RunData, time_bins
from harness.report.figures.nat_figure import nat_pool
from harness.report.html import findings, recommendations, render_comparison, render_report
from harness.report.nat_section import nat_section
from harness.report.port_occupancy import IN_USE
from harness.report.scan import scan_records
from harness.report.summarize import summarize
from harness.scenario import Scenario
from harness.summary import (
    Capacity,
    Kernel,
    LatencyCliff,
    Listener,
    Occupancy,
    Startup,
    Summary,
    TimeWait,
    Tuples,
)

from .tables import connections_table, write_nat

MS = 1_000_000


def _run(n: int, fail_from: int, listener: Listener | None = None) -> RunData:
    """n attempts 1 ms apart over a 100-port range; from ``fail_from`` on, EADDRNOTAVAIL."""
    rows = [
        (i * MS, 200, 40000 + i % 100 if i < fail_from else 0, 0 if i < fail_from else 99)
        for i in range(n)
    ]
    table = connections_table(rows)
    summary = summarize(
        scan_records(table),
        scenario="r",
        started_at="t",
        duration_s=max(n, 1) / 1000,
        interrupted=n == 0,
        kernel=Kernel(
            ip_local_port_range=[40000, 40099],
            ip_local_reserved_ports="40010-40019",
            tcp_tw_reuse=0,
        ),
        listener=listener,
    )
    summary.capacity = Capacity(
        model_ports=90,
        model_max_rate_per_s=1.5,
        model_hold_s=60.0,
        model_lifetime_s=0.0002,
        offered_rate_per_s=1000.0,
        measured_rate_per_s=100.0,
    )
    scenario = {
        "name": "r",
        "description": "d <b>escaped</b>",
        "target": {"endpoints": ["127.0.0.1:9000"]},
        "load": {"close": "client"},
    }
    return RunData(table, None, summary, scenario)


@pytest.mark.parametrize("listener", [None, Listener(accepted=100)])
@pytest.mark.parametrize("n", [0, 300, 60_000])
def test_renders_every_figure_self_contained(
    tmp_path: Path, listener: Listener | None, n: int
) -> None:
    data = _run(n, fail_from=min(n, 100), listener=listener)
    path = tmp_path / "report.html"
    render_report(path, data)
    html = path.read_text()
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(pngs) == len(FIGURES) == 9
    assert all(len(png) > 5_000 for png in pngs)  # a drawn figure, not an empty canvas
    assert "http://" not in html and "https://" not in html  # nothing fetched when opened
    assert "d &lt;b&gt;escaped&lt;/b&gt;" in html
    for title, _, _ in FIGURES:
        assert title in html
    assert "NAT pool" not in html  # no NAT collector in this run: no NAT figure
    if n:
        assert "Exhausted after" in html
        assert "Recommendations" in html and "keep-alive or pooling" in html
    assert ("listener accepted" in html) == (listener is not None)
    assert "<th>ip_local_reserved_ports</th><td>40010-40019</td>" in html


def test_recommendations_come_from_the_model() -> None:
    data = _run(300, 100)
    lines = recommendations(data.summary, data.setup)
    assert lines[0].startswith("To sustain the offered 1,000/s")
    assert any("[code] keep-alive or pooling" in line for line in lines)
    unknown = data.summary.model_copy(update={"capacity": Capacity()})
    assert not recommendations(unknown, Scenario.model_validate(data.scenario))


def test_comparison_puts_runs_side_by_side(tmp_path: Path) -> None:
    path = tmp_path / "compare.html"
    render_comparison(path, [("before", _run(300, 100)), ("after", _run(300, 300))])
    html = path.read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "<th>before</th><th>after</th>" in html
    row = re.search(r"<th>failed</th>(.*?)</tr>", html, re.S)
    assert row is not None and re.findall(r">(\d+)<", row.group(1)) == ["200", "0"]


def test_findings_name_the_mismatch() -> None:
    cols = scan_records(connections_table([(i * MS, 10, 40000 + i, 0) for i in range(10)]))
    summary = summarize(
        cols,
        scenario="r",
        started_at="t",
        duration_s=1.0,
        interrupted=False,
        kernel=Kernel(),
        listener=Listener(accepted=9),
        locust_requests=10,
    )
    text = " ".join(findings(summary))
    assert "differ from the listener's accepts (9)" in text


def test_findings_speak_for_the_kernel() -> None:
    summary = _run(20, 10).summary  # 10 successes, then EADDRNOTAVAIL
    summary.tuples = Tuples(
        distinct=10, max_uses=1, concurrent_duplicates=2, examples=[], reuse_distance_median=None
    )
    summary.time_wait = TimeWait(
        peak=98,
        reused_connections=412,
        kernel_tw_recycled=412,
        reused_minus_kernel=0,
        reuse_age_s=None,
    )
    summary.occupancy = Occupancy(
        peak_ports=100, usable_ports=100, peak_fraction=1.0, connect_ms_by_occupancy=[]
    )
    summary.capacity = Capacity(
        model_max_rate_per_s=100.0,
        model_ports=100,
        model_hold_s=1.0,
        measured_rate_per_s=98.0,
        measured_sustained_rate_per_s=95.0,
    )
    # the run went on 5 s after its first failure: ports held 1 s have come back since
    summary.duration_s = (summary.exhaustion.first_failure_s or 0.0) + 5.0
    text = " ".join(findings(summary))
    assert "at the peak 100 of 100 usable ports toward the targets were held, 98 of them" in text
    assert "4-tuples NOT unique: 2 connections" in text
    assert "Reuse out of TIME_WAIT: 412 connections, kernel TWRecycled 412." in text
    assert "at most 100 new connections/s (100 ports / (1 s hold)); measured 98.0/s" in text
    assert "settled at 95/s, -5.0% against the model" in text


CLIFF = LatencyCliff(
    detected=True,
    onset_occupancy=0.5,
    onset_s=0.165,
    before_p50_ms=0.009,
    after_p50_ms=0.907,
    before_p99_ms=0.038,
    after_p99_ms=5.24,
    ratio=100.8,
    rate_before_per_s=48741.7,
    rate_after_per_s=876.7,
)


def _no_failures(n: int = 10) -> Summary:
    cols = scan_records(connections_table([(i * MS, 10, 40000 + i, 0) for i in range(n)]))
    return summarize(
        cols, scenario="r", started_at="t", duration_s=1.0, interrupted=False, kernel=Kernel()
    )


def test_a_run_that_never_attempted_says_why_with_the_time_locust_had() -> None:
    """A distributed master's workers that had not started by the end, say: no silent
    "0 attempted", but what happened and how long the engines had."""
    summary = _no_failures(0)
    summary.startup = Startup(launched_to_first_attempt_s=None, launched_to_end_s=0.42)
    said = " ".join(findings(summary))
    assert "No connection was attempted: the load lasted 1 s" in said
    assert "(Locust was launched 0.42 s before the end)" in said
    summary.interrupted = True  # an interrupted run says that instead
    assert not any("No connection was attempted" in text for text in findings(summary))


def test_a_cliff_is_the_first_finding_and_no_run_that_slowed_reads_no_failures() -> None:
    summary = _no_failures()
    assert findings(summary)[0] == "No failures: 10 connections succeeded."
    summary.latency_cliff = CLIFF
    summary.capacity = Capacity(model_soft_rate_per_s=133.33)
    found = findings(summary)
    assert found[0].startswith("Connects slowed down 101x once 50% of the usable ports were held")
    assert "the even half" in found[0]
    assert "p50 0.009 ms -> 0.907 ms, p99 0.038 -> 5.24 ms" in found[0]
    assert "fell from 48,742 to 877" in found[0]
    assert "soft limit here: above 133/s the even half fills" in found[0]
    assert not any(text.startswith("No failures") for text in found)
    assert "but connects slowed down" in found[1]


def test_no_cliff_no_cliff_finding() -> None:
    summary = _no_failures()
    summary.latency_cliff = LatencyCliff(detected=False)
    assert not any("slowed" in text for text in findings(summary))


def test_a_time_wait_overflow_is_a_finding() -> None:
    summary = _no_failures()
    summary.kernel = Kernel(tcp_max_tw_buckets=10)
    summary.time_wait = TimeWait(
        peak=10,
        reused_connections=0,
        kernel_tw_recycled=0,
        reused_minus_kernel=0,
        reuse_age_s=None,
        kernel_timewait_overflow=20,
    )
    text = " ".join(findings(summary))
    assert "TIME_WAIT overflow: 20 closes skipped TIME_WAIT" in text
    assert "tcp_max_tw_buckets (10)" in text


def test_the_latency_figure_marks_the_onset() -> None:
    from harness.report.figures.occupancy_figure import latency_vs_occupancy

    data = _run(300, 300)
    data.summary.latency_cliff = CLIFF
    data.summary.capacity = Capacity(model_ports=100)
    t = data.table.column("start_ns").to_numpy()
    data.samples = pa.table(
        {
            "t_ns": pa.array([int(t.min()), int(t.max())], pa.int64()),
            "scope": pa.array(["to 127.0.0.1:9000"] * 2),
            **{state: pa.array([0, 100], pa.int64()) for state in IN_USE},
        }
    )
    fig = latency_vs_occupancy(data)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "cliff at 50% (101x p50)" in labels


def _nat_run(tmp_path: Path) -> RunData:
    """300 attempts 1 ms apart, from the 100th on timing out (a NAT dropping their SYNs),
    a 4-port NAT pool full from 60 ms and the client's range at 4 of 90 ports."""
    rows = [
        (i * MS, 200, 40000 + i % 4 if i < 100 else 0, 0 if i < 100 else 110) for i in range(300)
    ]
    table = connections_table(rows)
    t_ns = [k * 30 * MS for k in range(11)]
    write_nat(tmp_path, t_ns, [0, 2, 4, *[4] * 8], [0, 0, 0, *range(5, 45, 5)])
    base = _run(300, 300)
    base.summary.nat = nat_section(tmp_path, table)
    sockets = {state: 4 if state == "established" else 0 for state in STATES}
    rows = [
        row
        for t in t_ns
        for row in (
            {"t_ns": t, "scope": "all", **dict.fromkeys(STATES, 0), "sockstat_tw": 0},
            {"t_ns": t, "scope": "to 127.0.0.1:9000", **sockets},
        )
    ]
    samples = pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)
    nat = pq.read_table(tmp_path / "router" / "nat.parquet")
    return RunData(table, samples, base.summary, base.scenario, nat_samples=nat)


def test_a_nat_run_draws_its_pool_beside_the_client_range(tmp_path: Path) -> None:
    data = _nat_run(tmp_path)
    fig = nat_pool(data)
    labels = [label for ax in fig.axes for label in ax.get_legend_handles_labels()[1]]
    assert "pool per destination (4 ports)" in labels
    assert "insert_failed = drop (40 SYNs dropped)" in labels  # one line for both counters
    assert "usable ports (90)" in labels
    assert "connects timed out (200)" in labels
    assert "NAT exhausted at 0.1 s" in labels
    assert len(fig.axes) == 4  # pool and client, each with a twin axis
    path = tmp_path / "report.html"
    render_report(path, data)
    html = path.read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES) + 1
    titles = [title for title, _, _ in FIGURES]
    order = [html.index(t) for t in (titles[0], "NAT pool against the client", titles[1])]
    assert order == sorted(order)  # right after the client's occupancy
    assert NAT_FIGURE[2].split("'")[-1] in html  # its caption


def test_time_bins_have_no_partial_tail() -> None:
    edges, width = time_bins(np.array([0.0, 3.55]))
    assert width == 0.1
    assert edges[-1] == pytest.approx(3.5)


def test_report_and_capacity_never_import_locust() -> None:
    """Every module of report/ and capacity/ imports without locust, gevent or pyplot."""
    import subprocess
    import sys

    from .conftest import ROOT

    code = (
        "import sys, pkgutil, importlib, harness.report, harness.capacity\n"
        "for pkg in (harness.report, harness.capacity):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(m for m in ('locust', 'gevent', 'matplotlib.pyplot') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_http_and_tls_findings_say_the_statuses_handshakes_and_failures_after_connect() -> None:
    from harness.report.http_section import http_findings
    from harness.summary import Http, Latency

    http = Http(
        requests=900,
        connections_with_requests=300,
        requests_per_connection=3.0,
        statuses={"200": 290, "503": 10},
        response_bytes=90_000,
        tls_handshakes=300,
        tls_handshake_ms=Latency(p50=1.2, p90=2.0, p99=3.5, max=9.0),
        locust_requests=910,
    )
    text = " ".join(http_findings(http, {"HTTP_503": 10, "TLS_VERIFY": 4}))
    assert "900 responses over 300 connections (3 each)" in text
    assert "final statuses 200 290, 503 10" in text
    assert "300 handshakes, 1.2 ms median, 3.5 ms p99" in text
    assert "HTTP_503 10" in text and "TLS_VERIFY 4 (the server's certificate" in text
    assert http_findings(None, {}) == []
