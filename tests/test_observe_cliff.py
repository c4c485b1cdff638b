"""The latency cliff found for a client eph did not write, from the kernel's own rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import eph, write_scenario
from .test_bpf import _require_recorder

pytestmark = [pytest.mark.netns, pytest.mark.e2e, pytest.mark.serial]

# 8,192 ports, no reuse: the client closes first, so every port it used sits in TIME_WAIT
LAB = """
name = "observed-cliff"
duration = "40s"
[target]
endpoints = ["127.0.0.1:9000"]
[listener]
close = "wait"
[kernel]
ip_local_port_range = [40000, 48191]
tcp_tw_reuse = 0
[collector]
interval = "50ms"
"""

# a plain client: 7,000 sequential connections, about 4,000 a second, each closed at once
CLIENT = r"""
import os, socket, time
host, port = os.environ["EPH_TARGET"].rsplit(":", 1)
ok = 0
began = time.monotonic()
for i in range(7000):
    s = socket.create_connection((host, int(port)))
    s.close()
    ok += 1
    ahead = began + (i + 1) / 4000 - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
print(ok)
"""


def test_observe_trace_finds_the_parity_cliff_of_a_plain_client(tmp_path: Path) -> None:
    _require_recorder()
    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    scenario = write_scenario(tmp_path / "lab.toml", LAB)
    out = tmp_path / "lab"
    result = eph(
        ["lab", str(scenario), "--exec", f"{sys.executable} {client}", "--trace",
         "--out", str(out)],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "exec.stdout").read_text().strip() == "7000"
    summary = json.loads((out / "summary.json").read_text())
    traced = summary["traced"]
    # every connection has its row: the client's own count, exactly
    kernel = json.loads((out / "kernel.json").read_text())
    assert kernel["lost_events"] == kernel["missed_events"] == 0, kernel
    assert traced["connections"] == 7000
    assert traced["failed"] == 0
    rows = pq.read_table(out / "connections.parquet", columns=["local_port", "remote_port"])
    assert set(rows.column("remote_port").to_pylist()) == {9000}  # no server socket
    assert 9000 not in set(rows.column("local_port").to_pylist())
    assert traced["path"] == "127.0.0.1 -> 127.0.0.1:9000"
    assert traced["tuples"]["concurrent_duplicates"] == 0
    cliff = traced["latency_cliff"]
    assert cliff["detected"] is True, cliff
    assert 0.475 <= cliff["onset_occupancy"] <= 0.525, cliff  # within 5% of the even half
    assert cliff["ratio"] > 5, cliff
    assert "slowed down" in result.stderr
