"""The collector against ss, on the same sockets of a throwaway namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from harness.kernel.counters import read_counters
from harness.kernel.netns import Namespace
from harness.observe.collector import Collector

from .conftest import EPH, ROOT, out_rsts

pytestmark = pytest.mark.netns

# closes 300 connections (client first: TIME_WAIT here), holds 20 open, then waits
CLIENT = r"""
import socket, sys, time
held = []
for i in range(320):
    s = socket.create_connection(("127.0.0.1", 9000))
    if i < 300:
        s.close()
    else:
        held.append(s)
print("ready", flush=True)
time.sleep(60)
"""


def _ss_count(ns: Namespace, state: str) -> int:
    out = subprocess.run(
        ns.command(["ss", "-tanH", "state", state]), capture_output=True, text=True, check=True
    ).stdout
    return len([line for line in out.splitlines() if line.strip()])


def test_counts_equal_ss_and_targets_split_by_side(netns: Namespace) -> None:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    listener = subprocess.Popen(
        netns.command([*EPH, "listen", "--endpoint", "127.0.0.1:9000"]),
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert listener.stdout is not None
    listener.stdout.readline()
    client = subprocess.Popen(
        netns.command([sys.executable, "-c", CLIENT]), stdout=subprocess.PIPE, text=True
    )
    assert client.stdout is not None
    assert client.stdout.readline().strip() == "ready"
    time.sleep(0.2)  # let the listener see the last closes
    once = subprocess.run(
        netns.command([*EPH, "collect", "--once", "--target", "127.0.0.1:9000"]),
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    sample = json.loads(once.stdout)
    tw, established = _ss_count(netns, "time-wait"), _ss_count(netns, "established")
    resets = out_rsts(netns)
    for proc in (client, listener):
        proc.kill()
        proc.communicate()

    # equal to ss; up to 300: the kernel may hand a just-closed tuple out again (one
    # TIME_WAIT for two connections), and a reset from the server's side kills a
    # client's TIME_WAIT (every RST here is counted by Tcp OutRsts; docs/kernel.md)
    assert sample["tcp_states"]["TIME_WAIT"] == tw
    assert 300 - resets - 5 <= tw <= 300
    assert sample["tcp_states"]["ESTABLISHED"] == established == 40  # both ends of 20
    assert sample["tcp_states"]["LISTEN"] == 1
    assert sample["sockstat_tw"] == tw
    assert sample["targets"]["to 127.0.0.1:9000"] == {"TIME_WAIT": tw, "ESTABLISHED": 20}
    assert sample["targets"]["at 127.0.0.1:9000"] == {"ESTABLISHED": 20}
    assert sample["elapsed_ms"] > 0


def test_records_samples_on_its_own(netns: Namespace, tmp_path: Path) -> None:
    out = tmp_path / "c"
    result = subprocess.run(
        netns.command(
            [*EPH, "collect", "--out", str(out), "--duration", "1s", "--interval", "100ms"]
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
    )
    assert result.returncode == 0, result.stderr
    samples = pq.read_table(out / "samples.parquet")
    assert 8 <= samples.num_rows <= 11  # one "all" row per 100 ms for 1 s
    assert not (out / "samples.arrows").exists()
    meta = json.loads((out / "collector.json").read_text())
    assert meta["start"]["ip_local_port_range"] == [32768, 60999]  # a fresh namespace's own
    assert meta["end"]["netns"] == meta["start"]["netns"]


def test_sample_in_process_sees_own_sockets() -> None:
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        from harness.endpoints import Endpoint

        sample = Collector([Endpoint("127.0.0.1", port).resolve()]).sample()
        assert sample.states[f"to 127.0.0.1:{port}"]["established"] == 3
        assert sorted(sample.ports[f"to 127.0.0.1:{port}"].tolist()) == sorted(
            c.getsockname()[1] for c in clients
        )
    finally:
        for c in clients:
            c.close()
        server.close()


def test_counters_parse() -> None:
    counters = read_counters()
    for name in ("tw", "tw_recycled", "active_opens", "curr_estab", "sockstat_tw"):
        assert isinstance(counters[name], int), name


def test_ipv6_sockets_are_seen_when_present(netns: Namespace) -> None:
    """The IPv6 dump is skipped only when no IPv6 socket exists: one appears, it is counted."""
    script = (
        "import json, socket\n"
        "from harness.observe.collector import Collector\n"
        "before = Collector().sample().states['all']['listen']\n"
        "server = socket.create_server(('::1', 0), family=socket.AF_INET6)\n"
        "after = Collector().sample().states['all']['listen']\n"
        "print(json.dumps([before, after]))\n"
    )
    out = subprocess.run(
        netns.command([sys.executable, "-c", script]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == [0, 1]
