"""report.html renders from stored columns, with and without an embedded listener."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.report import findings, render_report, time_bins
from harness.summary import Columns, summarize


def _cols(n: int, fail_from: int) -> Columns:
    errno = np.zeros(n, dtype=np.uint16)
    errno[fail_from:] = 99
    ports = np.where(errno == 0, 40000 + np.arange(n) % 100, 0).astype(np.uint16)
    return Columns(
        start_ns=np.arange(n, dtype=np.int64) * 1_000_000,
        connect_us=np.full(n, 50, dtype=np.uint32),
        local_port=ports,
        errno=errno,
        io_errno=np.zeros(n, dtype=np.uint16),
    )


@pytest.mark.parametrize("listener", [None, {"accepted": 100}])
@pytest.mark.parametrize("n", [0, 300, 60_000])
def test_renders_self_contained(tmp_path: Path, listener: dict | None, n: int) -> None:  # type: ignore[type-arg]
    cols = _cols(n, fail_from=min(n, 100))
    summary = summarize(
        cols,
        scenario="r",
        started_at="t",
        duration_s=1.0,
        interrupted=n == 0,
        kernel={"ip_local_port_range": [40000, 40099]},
        listener=listener,
    )
    path = tmp_path / "report.html"
    render_report(path, cols, summary, {"name": "r", "description": "d <b>escaped</b>"})
    html = path.read_text()
    assert html.count("data:image/png;base64,") == 2
    assert "http://" not in html and "https://" not in html  # nothing fetched when opened
    assert "d &lt;b&gt;escaped&lt;/b&gt;" in html
    if n:
        assert "Exhausted after" in html


def test_findings_name_the_mismatch() -> None:
    cols = _cols(10, fail_from=10)
    summary = summarize(
        cols,
        scenario="r",
        started_at="t",
        duration_s=1.0,
        interrupted=False,
        kernel={},
        listener={"accepted": 9},
        locust_requests=10,
    )
    text = " ".join(findings(summary))
    assert "differ from the listener's accepts (9)" in text


def test_findings_speak_for_the_kernel() -> None:
    cols = _cols(10, fail_from=10)
    summary = summarize(
        cols, scenario="r", started_at="t", duration_s=1.0, interrupted=False, kernel={}
    )
    summary["tuples"] = {"distinct": 10, "max_uses": 1, "concurrent_duplicates": 2}
    summary["time_wait"] = {"reused_connections": 412, "kernel_tw_recycled": 412}
    summary["capacity"] = {
        "model_max_rate_per_s": 100.0,
        "model_ports": 100,
        "model_hold_s": 1.0,
        "measured_rate_per_s": 98.0,
    }
    text = " ".join(findings(summary))
    assert "4-tuples NOT unique: 2 connections" in text
    assert "Reuse out of TIME_WAIT: 412 connections, kernel TWRecycled 412." in text
    assert "at most 100 new connections/s (100 ports / 1 s); measured 98.0/s" in text


def test_time_bins_have_no_partial_tail() -> None:
    edges, width = time_bins(np.array([0.0, 3.55]))
    assert width == 0.1
    assert edges[-1] == pytest.approx(3.5)
