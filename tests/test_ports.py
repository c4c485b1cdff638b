"""Port-range hygiene in namespaces: the preflight finds services inside the range,
eph plan keeps them out of it, and bind errors say who holds a port and why."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from harness.capacity.preflight import IANA_RANGES, preflight
from harness.kernel.netns import Namespace

from .conftest import EPH, ROOT, eph
from .unprivileged import eph_as_nobody

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
UDP_SERVICE = (
    "import socket, sys, time\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "print('bound', flush=True)\n"
    "time.sleep(120)\n"
)


@contextmanager
def _service(ns: Namespace, args: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        ns.command(args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline(), "the service did not start"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _json(ns: Namespace, args: list[str], tmp_path: Path) -> dict:  # type: ignore[type-arg]
    result = eph(args, cwd=tmp_path, prefix=ns.command([]))
    assert result.returncode == 0, result.stderr[-2000:]
    return dict(json.loads(result.stdout))


@pytest.mark.netns
def test_preflight_names_services_inside_the_range_and_plan_reserves_them(
    tmp_path: Path, netns: Namespace
) -> None:
    netns.set_sysctl("net.ipv4.ip_local_port_range", [40000, 40099])
    netns.set_sysctl("net.ipv4.ip_local_reserved_ports", "40080")
    netns.set_sysctl("net.ipv4.tcp_tw_reuse", 0)
    tcp = [*EPH, "listen", "--endpoint", "127.0.0.1:40050"]
    udp = [shutil.which("python3") or "python3", "-c", UDP_SERVICE, "40060"]
    reserved = [*EPH, "listen", "--endpoint", "127.0.0.1:40080"]
    outside = [*EPH, "listen", "--endpoint", "127.0.0.1:9000"]
    with (
        _service(netns, tcp) as tcp_proc,
        _service(netns, udp) as udp_proc,
        _service(netns, reserved),
        _service(netns, outside),
    ):
        report = _json(netns, ["preflight", "--json"], tmp_path)
        conflicts = {(c["protocol"], c["port"]): c for c in report["conflicts"]}
        assert set(conflicts) == {("tcp", 40050), ("udp", 40060)}
        assert conflicts[("tcp", 40050)]["pid"] == tcp_proc.pid
        assert conflicts[("udp", 40060)]["pid"] == udp_proc.pid
        assert conflicts[("tcp", 40050)]["process"].startswith("python")
        listed = {(e["protocol"], e["port"]): e for e in report["listening"]}
        assert listed[("tcp", 40080)]["reserved"] is True
        assert listed[("tcp", 9000)]["in_range"] is False
        assert report["usable"] == 99 and report["same_parity"] is False
        assert any("40050" in w and "EADDRINUSE" in w for w in report["warnings"])

        plan = _json(netns, ["plan", "--rate", "5000", "--keep-port", "40070", "--json"], tmp_path)
    wider = next(lever for lever in plan["levers"] if lever["name"] == "wider ip_local_port_range")
    kept = wider["sysctls"]["net.ipv4.ip_local_reserved_ports"].split(",")
    # found listening (TCP, UDP, the already reserved one, 9000 inside a wider range)
    # and given by --keep-port: all out of the clients' reach
    assert {"40050", "40060", "40070", "40080", "9000"} <= set(kept)
    assert "net.ipv4.ip_local_reserved_ports = " in plan["sysctl_snippet"]
    assert "40050" in plan["sysctl_snippet"]


def test_preflight_places_the_range_among_iana_ranges() -> None:
    kernel = {
        "ip_local_port_range": [1000, 50001],
        "ip_local_reserved_ports": "",
        "tcp_tw_reuse": 1,
        "tcp_timestamps": 0,
        "rlimit_nofile": [256, 1024],
    }
    from harness.scenario import load_scenario

    scenario = load_scenario(ROOT / "scenarios" / "default.toml", ["load.users=500"])
    report = preflight(scenario, kernel=kernel, listening=[])
    assert [part["name"] for part in report["iana"]] == [name for name, _, _ in IANA_RANGES]
    assert [part["ports"] for part in report["iana"]] == [24, 48128, 850]
    warnings = " ".join(report["warnings"])
    assert "well-known" in warnings  # starts below 1024
    assert "tcp_timestamps" in warnings  # reuse without timestamps
    assert "RLIMIT_NOFILE is 256" in warnings  # 500 users
    assert "parity" not in warnings  # 1000 and 50001 differ


@pytest.mark.netns
def test_a_busy_port_names_the_clients_holding_it(tmp_path: Path, netns: Namespace) -> None:
    """The port conflict: a client took the port a service wants."""
    netns.set_sysctl("net.ipv4.ip_local_port_range", [40000, 40009])
    code = (
        "import socket, subprocess, sys\n"
        "server = socket.create_server(('127.0.0.1', 9000))\n"
        "clients = [socket.create_connection(('127.0.0.1', 9000)) for _ in range(10)]\n"
        "result = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(result.returncode, result.stderr)\n"
    )
    out = subprocess.run(
        netns.command(
            [sys.executable, "-c", code, *EPH, "listen", "--endpoint", "127.0.0.1:40005"]
        ),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    code_text, _, stderr = out.stdout.partition(" ")
    assert code_text == "2", out.stdout + out.stderr
    assert "cannot listen on 127.0.0.1:40005: address already in use" in stderr
    assert "1 connection(s) use port 40005 as their local port (ESTABLISHED)" in stderr
    assert "ip_local_reserved_ports" in stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to user nobody: needs root")
def test_a_privileged_port_as_an_unprivileged_user_teaches(tmp_path: Path) -> None:
    result = eph_as_nobody(["listen", "--endpoint", "127.0.0.1:80"], root=ROOT, env=ENV)
    assert result.returncode == 2, result.stderr
    assert "cannot listen on 127.0.0.1:80: permission denied" in result.stderr
    assert "ip_unprivileged_port_start" in result.stderr
    assert "CAP_NET_BIND_SERVICE" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.netns
@pytest.mark.e2e
@pytest.mark.parametrize("reserved", [False, True])
def test_port_conflict_lab_breaks_the_service_and_the_reservation_fixes_it(
    tmp_path: Path, reserved: bool
) -> None:
    out = tmp_path / "run"
    args = ["lab", str(ROOT / "scenarios" / "port-conflict.toml"), "--out", str(out)]
    if reserved:
        args += ["--set", 'kernel.ip_local_reserved_ports="40050"']
    result = eph(args, cwd=tmp_path, report=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    service = summary["service"]
    assert service["port"] == 40050 and 0.9 <= service["stopped_at_s"] <= 1.5
    report = (out / "report.html").read_text()
    if reserved:
        assert service["failed_binds"] == 0 and service["rebound"] is True
        assert summary["ports"]["distinct_used"] == 99  # the clients never had 40050
    else:
        # the clients took 40050 while it was free; TIME_WAIT (no reuse) holds it 60 s
        assert service["errors"] == ["EADDRINUSE"] and service["rebound"] is False
        held = service["attempts"][-1]["held_by"]
        assert set(held) <= {"ESTABLISHED", "TIME_WAIT", "FIN_WAIT2", "SYN_SENT"} and held
        assert "Port conflict: the service on port 40050" in report
        assert "net.ipv4.ip_local_reserved_ports = 40050" in report


def test_udp_listener_counts_and_answers_datagrams() -> None:
    import asyncio

    from harness.endpoints import Endpoint
    from harness.target.listener import Listener

    async def exchange() -> tuple[bytes, int]:
        listener = Listener([Endpoint("127.0.0.1", 0)], response=b"pong", udp=True)
        await listener.start()
        try:
            (bound,) = listener.bound
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.connect((bound.host, bound.port))
                client.setblocking(False)
                client.send(b"ping")
                loop = asyncio.get_running_loop()
                reply = await asyncio.wait_for(loop.sock_recv(client, 100), 5)
            return reply, listener.stats().total
        finally:
            await listener.close()

    assert asyncio.run(exchange()) == (b"pong", 1)


@pytest.mark.netns
@pytest.mark.e2e
@pytest.mark.parametrize("engine", ["locust", "uvloop"])
def test_udp_churn_exhausts_with_eagain_and_recovers_at_once(tmp_path: Path, engine: str) -> None:
    out = tmp_path / "run"
    scenario = str(ROOT / "scenarios" / "udp-churn.toml")
    args = ["lab", scenario, "--out", str(out), "--set", f'load.engine="{engine}"']
    result = eph(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    conns = summary["connections"]
    # 20 users, 10 ports held 200 ms each: the range runs out, and UDP says EAGAIN
    assert set(conns["errors"]) == {"EAGAIN"} and conns["errors"]["EAGAIN"] > 20
    assert summary["exhaustion"]["errno"] == "EAGAIN"
    assert summary["ports"]["distinct_used"] == 10
    assert conns["io_errors"] == {}, "every datagram was answered"
    # no TIME_WAIT: a closed socket's port is handed out again at once, so 10 ports
    # carry ~50 sockets/s (TCP without reuse would stop at 10 in 60 s)
    assert conns["succeeded"] >= 5 * 10 * 2
    table = pq.read_table(out / "connections.parquet")
    ok = table.filter(pc.equal(table.column("errno"), 0)).sort_by(
        [("local_port", "ascending"), ("start_ns", "ascending")]
    )
    port = ok.column("local_port").to_numpy()
    start = ok.column("start_ns").to_numpy()
    end = start + ok.column("close_us").to_numpy().astype("int64") * 1000
    same = port[1:] == port[:-1]
    gaps_ms = (start[1:] - end[:-1])[same] / 1e6
    assert np.median(gaps_ms) < 60, "a port is used again within milliseconds of its close"
    assert summary["capacity"]["model_hold_s"] is None  # the model knows: no TIME_WAIT
    # the collector counts connected UDP sockets toward the target: at most the 10 ports
    assert 5 <= summary["occupancy"]["peak_ports"] <= 10
    assert summary["conservation"]["records_match_locust"] is True


def test_udp_scenarios_refuse_what_needs_a_stream() -> None:
    from harness.errors import ScenarioError
    from harness.scenario import load_scenario

    path = ROOT / "scenarios" / "udp-churn.toml"
    for override in ('load.reply="eof"', 'load.close="server"'):
        with pytest.raises(ScenarioError, match=r"udp.*no end of stream"):
            load_scenario(path, [override])


def test_preflight_text_names_the_range_and_every_warning() -> None:
    from harness.capacity.preflight import Listening, render_text

    kernel = {"ip_local_port_range": [32768, 60999], "tcp_tw_reuse": 2, "tcp_timestamps": 1}
    report = preflight(kernel=kernel, listening=[Listening("tcp", "0.0.0.0", 50000, 42, "nginx")])
    text = render_text(report)
    assert text.startswith("ephemeral range 32768-60999: 28,232 ports")
    assert "16384 registered, 11848 dynamic/private" in text
    assert "1 inside the range and not reserved" in text
    assert "warning: TCP port 50000 (0.0.0.0, nginx (pid 42))" in text
