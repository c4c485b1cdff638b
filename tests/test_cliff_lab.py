"""The latency cliff on the real kernel, in throwaway namespaces (``eph lab``).

A 16,000-port range filled by the uvloop engine as fast as it goes, client
closing first: connect() hands out even ports first, and once those 8,000 are
in TIME_WAIT every connect scans them before an odd port (docs/kernel.md,
"Parity"). The random per-socket window and TIME_WAIT reuse each keep the scan
short.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.summary import Summary

from .conftest import eph, write_scenario

pytestmark = [pytest.mark.netns, pytest.mark.e2e]


def _cliff_lab(tmp_path: Path, *, load: str = "", tw_reuse: int = 0) -> Summary:
    scenario = write_scenario(
        tmp_path / "cliff.toml",
        f"""
name = "cliff-test"
description = "test"
duration = "3s"
[target]
endpoints = ["127.0.0.1:9000"]
[listener]
[load]
engine = "uvloop"
users = 32
spawn_rate = 1000
close = "client"
backoff = "20ms"
{load}
[kernel]
ip_local_port_range = [40000, 55999]
tcp_tw_reuse = {tw_reuse}
[collector]
interval = "20ms"
""",
    )
    out = tmp_path / "run"
    result = eph(["lab", str(scenario), "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return Summary.load(out / "summary.json")


def test_the_even_half_held_makes_connects_slow(tmp_path: Path) -> None:
    summary = _cliff_lab(tmp_path)
    cliff = summary.latency_cliff
    assert cliff is not None and cliff.detected, cliff
    assert cliff.onset_occupancy == pytest.approx(0.5, rel=0.05), cliff
    assert cliff.ratio is not None and cliff.ratio > 10, cliff
    assert cliff.rate_before_per_s and cliff.rate_after_per_s, cliff
    assert cliff.rate_after_per_s < cliff.rate_before_per_s / 5, cliff  # the churn collapses
    assert summary.capacity.model_soft_rate_per_s == pytest.approx(8000 / 60, rel=0.01)


def test_a_random_window_per_socket_keeps_connects_fast(tmp_path: Path) -> None:
    """Each socket scans 64 ports at most: no step at the even half. Windows fill
    unevenly, so failures (and a small rise) come before the range is full."""
    summary = _cliff_lab(tmp_path, load="socket_port_window = 64")
    cliff = summary.latency_cliff
    assert cliff is not None, summary
    if cliff.detected:  # measured: a 3-4x rise past 0.9 occupancy, never at the half
        assert cliff.onset_occupancy is not None and cliff.onset_occupancy > 0.6, cliff
        assert cliff.ratio is not None and cliff.ratio < 10, cliff
    assert summary.ports.even_fraction == pytest.approx(0.5, abs=0.05)  # both halves at once
    assert summary.capacity.model_soft_rate_per_s is None


def test_reuse_keeps_connects_fast(tmp_path: Path) -> None:
    """Reuse hands out TIME_WAIT even ports a second old: the odd half is never needed."""
    summary = _cliff_lab(tmp_path, tw_reuse=1)
    cliff = summary.latency_cliff
    assert cliff is not None and not cliff.detected, cliff
    assert summary.connections.failed == 0
    assert summary.time_wait is not None and summary.time_wait.reused_connections > 0
