"""`eph observe` on a namespace where a client eph did not write churns connections."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from harness.kernel import bpf
from harness.kernel.netns import Namespace
from harness.report import ondisk
from harness.report.observation import summarize_observation
from harness.report.observation_report import owner_series

from .conftest import EPH, ROOT, out_rsts, require, require_tools

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}

# A plain client: a new connection per request, the client closes first (TIME_WAIT
# here), toward two destinations; it stops after `count` connections per destination.
CLIENT = r"""
import socket, sys, threading, time
count = int(sys.argv[1])
servers = []
for port in (7000, 7001):
    s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen(512); servers.append(s)
def serve(s):
    while True:
        a, _ = s.accept()
        a.recv(1)  # wait for the client's close: the client closes first
        a.close()
for s in servers:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
sys.stdin.readline()  # go
for i in range(count):
    for port, share in ((7000, 1), (7001, 3)):
        if i % share == 0:
            c = socket.create_connection(("127.0.0.1", port)); c.close()
    time.sleep(0.004)
print("done", flush=True)
time.sleep(30)
"""


def _ss_client_paths(ns: Namespace) -> dict[str, int]:
    out = subprocess.run(
        ns.command(["ss", "-tanH", "state", "all"]), capture_output=True, text=True, check=True
    ).stdout
    paths: dict[str, int] = {}
    for line in out.splitlines():
        state, _, _, local, peer = line.split()[:5]
        port = int(local.rsplit(":", 1)[1])
        if state != "LISTEN" and 40000 <= port <= 40599 and peer.endswith((":7000", ":7001")):
            paths[peer] = paths.get(peer, 0) + 1
    return paths


def _promtool_accepts(scrape: str) -> None:
    """Prometheus' own linter: names, units, counters, help texts."""
    require_tools("promtool")
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_observe_sees_each_path_as_ss_does_and_serves_prometheus(
    netns: Namespace, tmp_path: Path
) -> None:
    for name, value in (("ip_local_port_range", "40000 40599"), ("tcp_tw_reuse", "0")):
        subprocess.run(netns.command(["sysctl", "-qw", f"net.ipv4.{name}={value}"]), check=True)
    out = tmp_path / "observed"
    client = subprocess.Popen(
        netns.command([sys.executable, "-c", CLIENT, "450"]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    observer = subprocess.Popen(
        netns.command(
            [*EPH, "observe", "--duration", "6s", "--interval", "250ms", "--out", str(out),
             "--prometheus", "127.0.0.1:9465"]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )  # fmt: skip
    try:
        assert observer.stderr is not None and client.stdout is not None
        announced = observer.stderr.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", announced)
        assert found, announced
        time.sleep(0.8)  # the first samples: a baseline before the client starts
        assert client.stdin is not None
        client.stdin.write("go\n")
        client.stdin.close()
        assert client.stdout.readline().strip() == "done"
        time.sleep(0.6)  # a sample after the last connection
        scrape = subprocess.run(
            netns.command(
                [sys.executable, "-c",
                 "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                 f"'http://127.0.0.1:{found.group(1)}/metrics').read().decode())"]
            ),
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
        ss = _ss_client_paths(netns)
        resets = out_rsts(netns)
        stdout, stderr = observer.communicate(timeout=30)
    finally:
        for proc in (observer, client):
            proc.kill()
            proc.wait(timeout=10)
        for stream in (client.stdout, observer.stdout, observer.stderr):
            if stream is not None:
                stream.close()
    assert observer.returncode == 0, stderr
    assert "stopped by duration" in stderr
    # every connection left a TIME_WAIT here, but for those a reset ended early
    made = {"127.0.0.1:7000": 450, "127.0.0.1:7001": 150}
    assert set(ss) == set(made)
    assert all(made[k] - resets <= ss[k] <= made[k] for k in made), (ss, resets)
    held = ss["127.0.0.1:7000"]
    path = 'local="127.0.0.1",protocol="tcp",remote="127.0.0.1:7000"'
    assert f"eph_path_ports_in_use{{{path}}} {held}.0" in scrape
    assert f"eph_path_usable_ports{{{path}}} 600.0" in scrape
    assert f"eph_path_time_wait_sockets{{{path}}} {held}.0" in scrape
    assert re.search(r"^eph_build_info\{.*version=", scrape, re.M), scrape
    # the namespace's own counter, as a counter: the client's 600 connects (and the
    # scrape's own, when a sample fell between its connect and the answer)
    opens = re.search(r"^eph_host_active_opens_total (\S+)$", scrape, re.M)
    assert opens and float(opens.group(1)) in (600.0, 601.0), scrape
    _promtool_accepts(scrape)
    # without a terminal: plain lines naming the busiest path first
    assert "127.0.0.1 -> 127.0.0.1:7000: " in stdout

    paths = pq.read_table(out / "paths.parquet").to_pylist()
    last: dict[str, int] = {}
    peak: dict[str, int] = {}
    for row in paths:  # in sample order
        key = f"{row['remote']}:{row['remote_port']}"
        last[key] = row["ports"]
        peak[key] = max(peak.get(key, 0), row["ports"])
    # after the churn nothing changes for 60 s: eph's last sample is what ss counts
    assert {k: v for k, v in last.items() if k in made} == ss
    assert all(ss[k] <= peak[k] <= made[k] for k in made)
    host = pq.read_table(out / "host.parquet")
    assert host.num_rows >= 20  # 6 s at 250 ms
    # every new connection counted once by cookie: the client closes first, so each
    # one sits in TIME_WAIT until the next sample sees it
    new_7000 = sum(r["new"] for r in paths if r["remote_port"] == 7000)
    assert 450 - resets <= new_7000 <= 450


def test_curl_against_nginx_exhausts_a_small_range_and_the_report_names_the_path(
    netns: Namespace, tmp_path: Path
) -> None:
    """A new curl process per request (HTTP/1.1: curl closes first, so TIME_WAIT sits
    here) against nginx, with 200 ports: 200 succeed, then connects fail; eph observe
    alone says which path ran out."""
    from .servers import nginx

    for name, value in (("ip_local_port_range", "40000 40199"), ("tcp_tw_reuse", "0")):
        subprocess.run(netns.command(["sysctl", "-qw", f"net.ipv4.{name}={value}"]), check=True)
    out = tmp_path / "observed"
    loop = (
        "ok=0; failed=0; for i in $(seq 260); do"
        " if curl -s -o /dev/null --max-time 2 http://127.0.0.1:8080/; then ok=$((ok+1));"
        " else failed=$((failed+1)); fi; done; echo $ok $failed"
    )
    with nginx(netns, tmp_path / "nginx", "127.0.0.1:8080"):
        observer = subprocess.Popen(
            netns.command([*EPH, "observe", "--duration", "60s", "--interval", "200ms",
                           "--out", str(out)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
        )  # fmt: skip
        try:
            time.sleep(1.0)  # eph is sampling before the first request
            counts = subprocess.run(
                netns.command(["bash", "-c", loop]), capture_output=True, text=True, timeout=120
            ).stdout.split()
            time.sleep(0.5)
            observer.send_signal(signal.SIGINT)  # Ctrl-C keeps what was seen
            _, stderr = observer.communicate(timeout=60)
        finally:
            if observer.poll() is None:
                observer.kill()
                observer.wait(timeout=10)
    assert observer.returncode == 0, stderr
    assert "stopped by SIGINT" in stderr
    ok, failed = (int(c) for c in counts)
    # 200 ports; a few more succeed when a reset ends a TIME_WAIT early (docs/kernel.md)
    assert 200 <= ok <= 205 and ok + failed == 260
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "observe"
    assert summary["exhaustion"]["exhausted"] is True
    assert summary["exhaustion"]["path"] == "127.0.0.1 -> 127.0.0.1:8080"
    top = summary["paths"][0]
    assert top["remote"] == "127.0.0.1:8080" and top["local_addr"] == "127.0.0.1"
    assert top["peak_ports"] == top["usable_ports"] == 200
    assert top["peak_fraction"] == 1.0
    # every port held, by TIME_WAIT: curl runs one request at a time, so a sample can
    # catch at most one connection still open (199 + 1 established was seen once)
    states = top["states_at_peak"]
    assert sum(states.values()) == 200 and states["time_wait"] >= 199, states
    assert summary["exhaustion"]["first_full_s"] > 0
    page = (out / "report.html").read_text()
    assert "Ports exhausted on 127.0.0.1 -&gt; 127.0.0.1:8080" in page
    assert page.count("data:image/png") == 5

    # the directory alone is enough: re-render it, and plan from it
    from .conftest import eph

    again = eph(["report", str(out)], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Ports exhausted on 127.0.0.1 -> 127.0.0.1:8080" in again.stderr
    assert json.loads((out / "summary.json").read_text()) == summary
    planned = eph(["plan", "--from", str(out), "--json"], cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["measured"]["usable ports of the path"] == {"model": 200, "measured": 200}
    assert plan["hold_s"] == 60  # the path showed TIME_WAIT: curl closes first
    assert plan["meets_goal"] is False
    assert any("keep-alive" in lever["name"] for lever in plan["levers"])


def _agent(
    out: Path,
    args: list[str],
    ready: Callable[[], bool],
    meanwhile: Callable[[subprocess.Popen[str]], None],
) -> str:
    """``eph observe ARGS --out OUT`` with no --duration, as an agent runs: once
    ``ready()``, ``meanwhile(it)``, then SIGTERM. Its stderr; it must exit 0."""
    observer = subprocess.Popen(
        [*EPH, "-v", "observe", "--interval", "100ms", "--plain", "--no-report", *args,
         "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30  # a bound on the test, not on eph
        while not ready():
            assert observer.poll() is None and time.monotonic() < deadline, observer.stderr
            time.sleep(0.1)
        meanwhile(observer)
        assert observer.poll() is None, "stopped before SIGTERM"
        observer.send_signal(signal.SIGTERM)
        _, stderr = observer.communicate(timeout=30)
    finally:
        if observer.poll() is None:
            observer.kill()
            observer.communicate()
    assert observer.returncode == 0, stderr
    return stderr


def test_without_duration_it_runs_until_sigterm_and_keeps_what_it_saw(tmp_path: Path) -> None:
    """The agent's way (deploy/): no --duration, stopped by the service manager."""
    out = tmp_path / "agent"
    meta = out / "observe.json"
    stderr = _agent(
        out,
        [],
        lambda: meta.exists() and json.loads(meta.read_text())["stop_reason"] == "running",
        lambda _: time.sleep(3.0),  # ~30 samples: past any duration a default could hide
    )
    assert "stopped by SIGTERM" in stderr
    kept = json.loads(meta.read_text())
    assert kept["stop_reason"] == "SIGTERM" and kept["samples"] >= 10, kept
    assert pq.read_table(out / "host.parquet").num_rows == kept["samples"]


# Two programs in one namespace: curl churning toward :7000 (each connection left in
# TIME_WAIT on curl's side: the server answers with keep-alive and waits for curl to
# close), and a Python client holding 120 connections toward :7001.
SERVERS = r"""
import socket, threading
def listen(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(512)
    return s
def serve(s, answer):
    while True:
        a, _ = s.accept()
        threading.Thread(target=talk, args=(a, answer), daemon=True).start()
def talk(a, answer):
    if answer:
        a.recv(4096)
        a.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    while a.recv(4096):  # until the client closes first
        pass
    a.close()
web, plain = listen(7000), listen(7001)
threading.Thread(target=serve, args=(plain, False), daemon=True).start()
print("ready", flush=True)
serve(web, True)
"""
HOLDER = r"""
import socket, sys
held = [socket.create_connection(("127.0.0.1", 7001)) for _ in range(120)]
print("held", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("trace", [False, True], ids=["sampled", "traced"])
def test_two_programs_each_path_names_who_holds_its_ports(
    netns: Namespace, tmp_path: Path, trace: bool
) -> None:
    require_tools("curl")
    if trace:
        require(bpf.unavailable())
    subprocess.run(netns.command(["ip", "link", "set", "lo", "up"]), check=True)
    out = tmp_path / "observed"
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    servers = subprocess.Popen(netns.command([sys.executable, "-c", SERVERS]), **pipes)
    holder: subprocess.Popen[str] | None = None
    observer = subprocess.Popen(
        netns.command(
            [*EPH, "observe", "--duration", "12s", "--interval", "250ms", "--out", str(out),
             "--plain", "--prometheus", "127.0.0.1:9465", *(["--trace"] if trace else [])]
        ),
        env=ENV, **pipes,
    )  # fmt: skip
    try:
        assert servers.stdout is not None and observer.stderr is not None
        assert servers.stdout.readline().strip() == "ready", servers.communicate()
        holder = subprocess.Popen(
            netns.command([sys.executable, "-c", HOLDER]), stdin=subprocess.PIPE, **pipes
        )
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held", holder.communicate()
        comm = Path(f"/proc/{holder.pid}/comm").read_text().strip()  # the kernel's name for it
        deadline = time.monotonic() + 60  # the first sample: the recorder is attached by then
        while not ((out / "host.arrows").exists() and (out / "host.arrows").stat().st_size):
            assert observer.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        churn = "for i in $(seq 150); do curl -s -o /dev/null http://127.0.0.1:7000/; done"
        subprocess.run(netns.command(["sh", "-c", churn]), check=True, timeout=60)
        time.sleep(1.0)  # samples of both paths at their height
        scrape = subprocess.run(
            netns.command(["curl", "-sf", "http://127.0.0.1:9465/metrics"]),
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
        stdout, stderr = observer.communicate(timeout=60)
    finally:
        for proc in (observer, holder, servers):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()
    assert observer.returncode == 0, stderr
    paths = {p["remote"]: p for p in json.loads((out / "summary.json").read_text())["paths"]}
    held, churned = paths["127.0.0.1:7001"], paths["127.0.0.1:7000"]
    assert held["owners"] == [
        {"comm": comm, "pid": holder.pid, "cgroup": held["owners"][0]["cgroup"],
         "container": None, "ports": 120}
    ], held  # fmt: skip
    assert held["unattributed_ports"] == 0
    # curl's are TIME_WAIT (and the curl of the moment, one at a time at most)
    assert churned["states_at_peak"].get("time_wait", 0) >= 145, churned
    assert churned["unattributed_ports"] >= 145 and len(churned["owners"]) <= 1, churned
    assert f"{comm}[{holder.pid}] 120" in stdout
    assert "unattributed (TIME_WAIT has no owner" in stdout
    page = (out / "report.html").read_text()
    assert f"{comm} (pid {holder.pid}): 120" in page
    assert "Who held the ports" in page
    series = owner_series(pq.read_table(out / "paths.parquet"), held["label"], 0.0)
    assert series is not None and series[1][f"{comm}[{holder.pid}]"].max() == 120
    if not trace:
        assert churned["opened_by"] == []
        assert f"{churned['unattributed_ports']:,} unattributed" in page
    else:  # the kernel saw curl open each one: 150 processes, a port each
        opener = churned["opened_by"][0]
        assert opener["comm"] == "curl" and 145 <= opener["ports"] <= 150, churned
        assert opener["processes"] == opener["ports"], opener
        assert held["opened_by"] == []  # nothing of the holder's is in TIME_WAIT
        assert f"TIME_WAIT opened by curl ({opener['ports']} ports" in page
        # a trace too large to hold is read from disk a few rows at a time, the busiest
        # path's rows apart: the same summary as held
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ondisk, "IN_MEMORY_ROWS", 10)
            patch.setattr(ondisk, "BATCH_ROWS", 7)
            on_disk = summarize_observation(out)
        assert on_disk.traced is not None and on_disk.traced.connections >= 145  # closed ones
        assert on_disk == summarize_observation(out)
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no scratch left
    owner = f'eph_path_owner_ports{{comm="{comm}",local="127.0.0.1",pid="{holder.pid}"'
    assert owner in scrape and 'remote="127.0.0.1:7001"} 120.0' in scrape, scrape
    _promtool_accepts(scrape)


def test_keep_rotates_parts_drops_the_oldest_and_sighup_starts_a_new_one(tmp_path: Path) -> None:
    out = tmp_path / "agent"
    parts = out / "parts"

    def finished() -> list[str]:
        return sorted(p.name for p in parts.glob("paths-*.parquet"))

    def rotate_then_hup(observer: subprocess.Popen[str]) -> None:
        time.sleep(2.0)
        assert 1 <= len(finished()) <= 3, finished()  # 2 s of 1 s parts: the older ones went
        observer.send_signal(signal.SIGHUP)
        time.sleep(1.0)

    keep = ["--keep", "2s", "--rotate", "1s"]
    stderr = _agent(out, keep, lambda: len(finished()) >= 2, rotate_then_hup)
    assert "SIGHUP: new parts in" in stderr
    kept = json.loads((out / "observe.json").read_text())
    host = pq.read_table(out / "host.parquet").column("time").to_pylist()
    assert len(host) < kept["samples"], (len(host), kept)  # the oldest went
    assert host == sorted(host) and host[-1] - host[0] <= 2.0 + 2 * 1.0 + 0.5, host
    assert not parts.exists()


def test_an_agent_restarted_on_its_directory_goes_on_with_what_it_kept(tmp_path: Path) -> None:
    out = tmp_path / "agent"

    def run_for_a_second() -> str:
        writing = lambda: bool(list((out / "parts").glob("host-*.arrows")))  # noqa: E731
        return _agent(out, ["--keep", "1m"], writing, lambda _: time.sleep(1.0))

    run_for_a_second()
    first = pq.read_table(out / "host.parquet").column("time").to_pylist()
    stderr = run_for_a_second()  # no --force: --keep goes on, never claims it anew
    assert "went on with 2 parts of an earlier eph" in stderr
    both = pq.read_table(out / "host.parquet").column("time").to_pylist()
    assert both[: len(first)] == first and len(both) >= len(first) + 5, (len(first), len(both))


EXHAUSTER = r"""
import errno, json, socket, sys
server = socket.socket(); server.bind(("127.0.0.1", 7100)); server.listen(1024)
print("ready", flush=True); sys.stdin.readline()
counts = {"ok": 0, "EADDRNOTAVAIL": 0, "other": 0}
for _ in range(int(sys.argv[1])):
    client = socket.socket()
    try:
        client.connect(("127.0.0.1", 7100))
        counts["ok"] += 1
    except OSError as exc:
        counts["EADDRNOTAVAIL" if exc.errno == errno.EADDRNOTAVAIL else "other"] += 1
    client.close()  # the client first: TIME_WAIT holds the port
print(json.dumps(counts), flush=True)
"""


def test_traced_failures_and_latency_are_prometheus_counters_equal_to_the_clients(
    netns: Namespace, tmp_path: Path
) -> None:
    """A plain client makes 200 connects through a 60-port range: 60 connect, then
    EADDRNOTAVAIL. eph observe --trace serves the kernel's count of each, live, as a
    counter per errno and a latency histogram, equal to the client's own counts."""
    require(bpf.unavailable())
    for name, value in (("ip_local_port_range", "40000 40059"), ("tcp_tw_reuse", "0")):
        subprocess.run(netns.command(["sysctl", "-qw", f"net.ipv4.{name}={value}"]), check=True)
    subprocess.run(netns.command(["ip", "link", "set", "lo", "up"]), check=True)
    out = tmp_path / "observed"
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    client = subprocess.Popen(
        netns.command([sys.executable, "-c", EXHAUSTER, "200"]), stdin=subprocess.PIPE, **pipes
    )
    observer = subprocess.Popen(
        netns.command(
            [*EPH, "observe", "--interval", "250ms", "--out", str(out), "--plain",
             "--trace", "--prometheus", "127.0.0.1:9466", "--no-report"]
        ),
        env=ENV, **pipes,
    )  # fmt: skip
    try:
        assert client.stdin is not None and client.stdout is not None
        assert client.stdout.readline().strip() == "ready", client.communicate()
        deadline = time.monotonic() + 60  # the first sample: the recorder is attached by then
        while not ((out / "host.arrows").exists() and (out / "host.arrows").stat().st_size):
            assert observer.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        client.stdin.write("go\n")
        client.stdin.flush()
        counts = json.loads(client.stdout.readline())
        remote = 'remote="127.0.0.1:7100"'
        failures = f'eph_connect_failures_total{{errno="EADDRNOTAVAIL",{remote}}}'  # sorted
        deadline = time.monotonic() + 10  # the drainer's next drain (every 0.1 s)
        while True:
            scrape = subprocess.run(
                netns.command(["curl", "-sf", "http://127.0.0.1:9466/metrics"]),
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout  # fmt: skip
            values = _metric_values(scrape, "eph_connect_")
            if values.get(failures) == counts["EADDRNOTAVAIL"] or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        observer.send_signal(signal.SIGTERM)
        observer.communicate(timeout=60)
    finally:
        for proc in (observer, client):
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert counts == {"ok": 60, "EADDRNOTAVAIL": 140, "other": 0}
    assert values.get(failures) == 140, scrape
    assert values[f"eph_connect_duration_seconds_count{{{remote}}}"] == 60
    assert values[f'eph_connect_duration_seconds_bucket{{le="+Inf",{remote}}}'] == 60
    assert 0 < values[f"eph_connect_duration_seconds_sum{{{remote}}}"] < 60 * 0.1
    _promtool_accepts(scrape)


def _metric_values(scrape: str, prefix: str) -> dict[str, float]:
    """``name{labels}`` -> value, for the exposition's samples that start with ``prefix``."""
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in scrape.splitlines() if line.startswith(prefix)
    }  # fmt: skip
