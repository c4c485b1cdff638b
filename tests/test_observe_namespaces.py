"""``eph observe --all-namespaces``: every network namespace of the host, from the root one."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.kernel.namespaces import NamespaceThread, host_namespaces
from harness.kernel.netns import Namespace
from harness.observe.paths import dump_here

from .conftest import EPH, ROOT
from .test_observe import _promtool_accepts

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

# a listener on 7000 and `count` connections to it, held open until stdin closes
HOLDER = r"""
import socket, sys
count = int(sys.argv[1])
server = socket.socket(); server.bind(("127.0.0.1", 7000)); server.listen(512)
held = [socket.create_connection(("127.0.0.1", 7000)) for _ in range(count)]
accepted = [server.accept()[0] for _ in range(count)]
print(" ".join(str(c.getsockname()[1]) for c in held), flush=True)
sys.stdin.read()
"""

# (range, connections held): a different range and count in each namespace
SHAPES = [((40000, 40099), 10), ((41000, 41199), 20), ((42000, 42299), 30)]


@contextlib.contextmanager
def _three_clients() -> Iterator[list[tuple[Namespace, int, list[int]]]]:
    """Three namespaces, each with its range and a client holding its connections:
    (namespace, the client's pid, its local ports)."""
    with contextlib.ExitStack() as stack:
        found = []
        for (low, high), count in SHAPES:
            ns = stack.enter_context(Namespace(prefix="ephtest"))
            subprocess.run(ns.command(["ip", "link", "set", "lo", "up"]), check=True)
            ns.set_sysctl("net.ipv4.ip_local_port_range", f"{low} {high}")
            proc = subprocess.Popen(
                ns.command([sys.executable, "-c", HOLDER, str(count)]),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            stack.enter_context(proc)  # its pipes closed, and waited for, once killed
            stack.callback(proc.kill)
            assert proc.stdout is not None
            ports = [int(p) for p in proc.stdout.readline().split()]
            assert len(ports) == count and all(low <= p <= high for p in ports)
            found.append((ns, proc.pid, ports))
        yield found


def test_the_helper_thread_reads_each_namespace_and_leaves_eph_where_it_was() -> None:
    own = os.stat("/proc/self/ns/net").st_ino
    with _three_clients() as clients, NamespaceThread() as inside:
        names = {ns.name for ns, _, _ in clients}
        namespaces = {n.name: n for n in host_namespaces() if n.name in names}
        assert set(namespaces) == names
        for (ns, pid, ports), ((low, high), _count) in zip(clients, SHAPES, strict=True):
            found = namespaces[ns.name]
            assert found.label == ns.name and pid in [p for p, _ in found.processes]
            dump = inside.call(found.path, dump_here)
            assert dump.port_range == (low, high)
            mine = dump.tcp[(dump.tcp["sport"] >= low) & (dump.tcp["sport"] <= high)]
            assert sorted(mine["sport"].tolist()) == sorted(ports)
        # init's namespace (this one, here) is "host"
        assert host_namespaces()[0].label == "host"
        # errors come back to the caller; the thread goes on
        with pytest.raises(FileNotFoundError):
            inside.call(Path("/proc/no-such-pid/ns/net"), dump_here)
        assert inside.call(namespaces[clients[0][0].name].path, lambda: 1) == 1
        assert os.stat("/proc/self/ns/net").st_ino == own
        assert os.stat("/proc/thread-self/ns/net").st_ino == own
        assert threading.current_thread() is threading.main_thread()


CHURN = 50  # connections opened and closed in the first namespace while observed
CHURNER = r"""
import socket, sys
for _ in range(int(sys.argv[1])):
    socket.create_connection(("127.0.0.1", 7000)).close()
"""


def _scrape(url: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            [sys.executable, "-c", "import sys, urllib.request; sys.stdout.write("
             f"urllib.request.urlopen('{url}').read().decode())"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    return ""


def _counter(scrape: str, name: str, netns: str) -> float | None:
    found = re.search(rf'^{name}{{inode="\d+",netns="{re.escape(netns)}"}} (\S+)$', scrape, re.M)
    return float(found.group(1)) if found else None


def test_every_namespace_is_seen_from_the_root_one_with_its_range_and_owner(
    tmp_path: Path,
) -> None:
    out = tmp_path / "obs"
    args = [*EPH, "observe", "--all-namespaces", "--interval", "250ms",
            "--top", "1000", "--out", str(out), "--keep", "1h", "--plain",
            "--prometheus", "127.0.0.1:0"]  # fmt: skip
    with _three_clients() as clients:
        observer = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        try:
            assert observer.stderr is not None
            url = re.search(r"(http://127\.0\.0\.1:\d+/metrics)", observer.stderr.readline())
            assert url
            scrape, deadline = "", time.monotonic() + 60
            while not all(ns.name in scrape for ns, _, _ in clients):
                assert observer.poll() is None and time.monotonic() < deadline, scrape
                scrape = _scrape(url.group(1))
            # while observed, the first namespace's client churns: its namespace's
            # counters move, the others' do not
            first = clients[0][0]
            subprocess.run(first.command([sys.executable, "-c", CHURNER, str(CHURN)]), check=True)
            before = scrape
            opens = SHAPES[0][1] + CHURN
            while _counter(scrape, "eph_netns_active_opens_total", first.name) != opens:
                assert observer.poll() is None and time.monotonic() < deadline, scrape
                scrape = _scrape(url.group(1))
        finally:
            observer.terminate()  # no --duration: it runs until told to stop
            stdout, stderr = observer.communicate(timeout=60)
    assert observer.returncode == 0, stderr
    rows = pq.read_table(out / "paths.parquet").to_pylist()
    summary = json.loads((out / "summary.json").read_text())
    totals = {t["netns"]: t for t in summary["namespaces"]}
    for (ns, pid, _ports), ((low, high), count) in zip(clients, SHAPES, strict=True):
        usable = high - low + 1  # the listener's 7000 is outside every range
        # --out: each sample's row for the path carries its namespace, its range's
        # usable ports, and who holds them; the views' label names the namespace
        churned = CHURN if ns is clients[0][0] else 0  # in TIME_WAIT once churned
        mine = [r for r in rows if r["netns"] == ns.name and r["remote_port"] == 7000]
        held = {(r["ports"], r["usable"]) for r in mine}
        assert (
            mine
            and (count, usable) in held
            and held <= {(count + churned, usable), (count, usable)}
        )
        assert {r["label"] for r in mine} == {f"{ns.name}: 127.0.0.1 -> 127.0.0.1:7000"}
        assert {(o["pid"], o["ports"]) for r in mine for o in r["owners"]} == {(pid, count)}
        # Prometheus: the same, labelled with the namespace (before the churn)
        labels = f'local="127.0.0.1",netns="{ns.name}",protocol="tcp",remote="127.0.0.1:7000"'
        assert f"eph_path_ports_in_use{{{labels}}} {count}.0" in before, before
        assert f"eph_path_usable_ports{{{labels}}} {usable}.0" in before
        # each namespace's own counters: a fresh namespace has made its client's
        # connects and no other (the root one's are the host's, far more)
        assert _counter(before, "eph_netns_active_opens_total", ns.name) == count, before
        assert _counter(scrape, "eph_netns_active_opens_total", ns.name) == count + churned
        assert _counter(scrape, "eph_netns_time_wait_sockets", ns.name) == churned
        assert totals[ns.name]["active_opens"] == churned, totals
        assert totals[ns.name]["time_wait_peak"] == churned, totals
    _promtool_accepts(scrape)  # the eph_netns_* series too
    # the plain view: under the host's line, one of counters per namespace, the busiest
    # first, at most its 5 rows (other tests' namespaces may be there), then how many more
    block = stdout.split("\n", 1)[1].split("\n  netns: ", 1)[0] + "\n"
    named = re.findall(
        r"^  netns (\S+): ActiveOpens \d+/s, AttemptFails \d+/s, TIME_WAIT", block, re.M
    )
    more = re.search(r"^  netns: (\d+) more$", stdout, re.M)
    assert len(named) + (int(more.group(1)) if more else 0) >= 4, stdout  # host and ours
    assert len(named) == 5 if more else len(named) >= 4, stdout


def test_all_namespaces_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(cli, ["observe", "--all-namespaces", "--duration", "1s"])
    assert result.exit_code == 2
    assert "--all-namespaces enters each namespace (setns): it needs root" in result.output
