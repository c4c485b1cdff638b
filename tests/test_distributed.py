"""Locust master/worker mode: `eph run --master` and `eph worker` across namespaces.

Four namespaces on one bridge stand for four hosts: the master, a listener, and
two workers, each worker with its own source address and its own 100-port
range. Both workers exhaust their range; the master's run directory must hold
every connection of both, with each host's ports and occupancy.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest

from harness.errors import RunDirError
from harness.kernel.netns import Namespace, run_checked
from harness.load.distributed import Receiver, ship
from harness.load.shipping import announce
from harness.run.leftovers import collect, missing_workers

from .conftest import EPH, ROOT, eph, run_dir_summary, stop_process, write_scenario
from .test_crash import _part_rows

NET = "198.18.0"
MASTER, LISTENER, WORKERS = f"{NET}.1", f"{NET}.2", {"w1": f"{NET}.11", "w2": f"{NET}.12"}


@contextlib.contextmanager
def _star(names: list[str]) -> Iterator[dict[str, Namespace]]:
    """A namespace per name, each with eth0 on one bridge in a hub namespace."""
    with contextlib.ExitStack() as stack:
        hub = stack.enter_context(Namespace(prefix="ephdist"))
        run_checked(["ip", "-n", hub.name, "link", "add", "br0", "type", "bridge"])
        run_checked(["ip", "-n", hub.name, "link", "set", "br0", "up"])
        nodes = {}
        for n, name in enumerate(names):
            node = stack.enter_context(Namespace(prefix="ephdist"))
            port = f"p{n}"
            run_checked(
                ["ip", "-n", hub.name, "link", "add", port, "type", "veth", "peer", "name",
                 "eth0", "netns", node.name]
            )  # fmt: skip
            run_checked(["ip", "-n", hub.name, "link", "set", port, "master", "br0", "up"])
            nodes[name] = node
        yield nodes


def _address(node: Namespace, address: str) -> None:
    run_checked(["ip", "-n", node.name, "addr", "add", f"{address}/24", "dev", "eth0"])
    run_checked(["ip", "-n", node.name, "link", "set", "eth0", "up"])


def _spawn(node: Namespace, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as sink:
        return subprocess.Popen(
            node.command([*EPH, *args]), stdout=sink, stderr=subprocess.STDOUT, env=env
        )


def _pids(node: Namespace) -> list[int]:
    out = subprocess.run(
        ["ip", "netns", "pids", node.name], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]


@dataclass
class _Outcome:
    run: Path
    summary: dict[str, Any]
    accepted: int
    worker_codes: dict[str, int]


def _locust_worker_pid(node: Namespace) -> int:
    for pid in _pids(node):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"locust" in cmdline and b"--worker" in cmdline:
            return pid
    raise AssertionError("no Locust worker process in the namespace")


def _distributed_run(tmp_path: Path, *, duration: str, kill: str | None = None) -> _Outcome:
    """Master, listener and two workers in namespaces; ``kill`` names a worker whose
    Locust process is killed (SIGKILL) a second into the test."""
    scenario = write_scenario(
        tmp_path / "dist.toml",
        f"""
name = "distributed"
description = "two workers, 100 ports each"
duration = "{duration}"
[target]
endpoints = ["{LISTENER}:9000"]
[load]
users = 4
spawn_rate = 100
backoff = "20ms"
connect_timeout = "1s"
""",
    )
    run = tmp_path / "run"
    with _star(["master", "listener", *WORKERS]) as nodes:
        _address(nodes["master"], MASTER)
        _address(nodes["listener"], LISTENER)
        for name, address in WORKERS.items():
            _address(nodes[name], address)
            nodes[name].set_sysctl("net.ipv4.ip_local_port_range", [40000, 40099])
            nodes[name].set_sysctl("net.ipv4.tcp_tw_reuse", 0)
        procs = []
        try:
            listener = subprocess.Popen(
                nodes["listener"].command([*EPH, "listen", "--endpoint", f"{LISTENER}:9000"]),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            procs.append(listener)
            assert listener.stdout is not None
            assert json.loads(listener.stdout.readline())["event"] == "listening"
            master = _spawn(
                nodes["master"],
                ["run", str(scenario), "--out", str(run), "--master", "--expect-workers", "2",
                 "--master-bind-host", MASTER, "--wait-workers", "60s"],
                tmp_path / "master.log",
            )  # fmt: skip
            procs.append(master)
            workers = {
                name: _spawn(
                    nodes[name],
                    [
                        "worker",
                        "--master-host",
                        MASTER,
                        "--name",
                        name,
                        "--out",
                        str(tmp_path / name),
                        "--max-time",
                        "120s",
                    ],
                    tmp_path / f"{name}.log",
                )
                for name in WORKERS
            }
            procs += workers.values()
            if kill is not None:
                deadline = time.monotonic() + 60
                # the test started, and the worker told the master where it records
                while not list((tmp_path / kill).glob("*/worker.json")):
                    assert time.monotonic() < deadline, "the test never started"
                    time.sleep(0.05)
                time.sleep(1.0)
                os.kill(_locust_worker_pid(nodes[kill]), signal.SIGKILL)
            assert master.wait(timeout=120) == 0, (tmp_path / "master.log").read_text()[-3000:]
            codes = {name: worker.wait(timeout=60) for name, worker in workers.items()}
            listener.terminate()
            listener.wait(timeout=20)
            stopped = json.loads(listener.stdout.read().decode().strip().splitlines()[-1])
        finally:
            for proc in procs:
                stop_process(proc)
                if proc.stdout is not None:
                    proc.stdout.close()
        leftovers = {name: _pids(node) for name, node in nodes.items() if _pids(node)}
        assert not leftovers, f"processes left in the namespaces: {leftovers}"
    return _Outcome(run, run_dir_summary(run), int(stopped["accepted"]), codes)


@pytest.mark.netns
@pytest.mark.e2e
def test_master_and_two_workers_in_namespaces(tmp_path: Path) -> None:
    outcome = _distributed_run(tmp_path, duration="3s")
    run, summary = outcome.run, outcome.summary
    assert outcome.worker_codes == {"w1": 0, "w2": 0}
    hosts = {h["host"]: h for h in summary["hosts"]}
    assert sorted(hosts) == ["w1", "w2"]
    for name, address in WORKERS.items():
        host = hosts[name]
        assert host["source_addresses"] == [address]
        assert host["port_range"] == [40000, 40099]
        # its own 100 ports, all used, then EADDRNOTAVAIL
        assert host["distinct_ports"] == 100
        assert host["port_span"] == [40000, 40099]
        assert host["first_exhaustion_s"] is not None
        assert 90 <= host["peak_in_use"] <= 100
    table = pq.read_table(run / "connections.parquet")
    assert sorted(set(table.column("host").to_pylist())) == ["w1", "w2"]
    assert summary["connections"]["errors"].get("EADDRNOTAVAIL", 0) > 0
    # every record reached the master, as Locust counted them; the listener saw each success
    assert summary["conservation"]["records"] == summary["conservation"]["locust_requests"]
    assert outcome.accepted == summary["connections"]["succeeded"]
    assert summary["distributed"] == {
        "expected_workers": 2,
        "hosts_shipped": ["w1", "w2"],
        "missing_workers": 0,
    }
    assert summary["capacity"]["model_ports"] == 200  # two hosts of 100 ports
    assert not list(run.glob("hosts/*/parts/*.arrows")), "host parts were merged"
    assert "Load-generator hosts" in (run / "report.html").read_text()


@pytest.mark.netns
@pytest.mark.e2e
def test_a_worker_dying_mid_run_the_others_go_on_and_the_report_says_so(
    tmp_path: Path,
) -> None:
    outcome = _distributed_run(tmp_path, duration="5s", kill="w2")
    summary = outcome.summary
    assert outcome.worker_codes["w1"] == 0 and outcome.worker_codes["w2"] != 0
    assert [h["host"] for h in summary["hosts"]] == ["w1"]
    assert summary["distributed"]["missing_workers"] == 1
    assert summary["hosts"][0]["distinct_ports"] == 100, "the survivor went on"
    cons = summary["conservation"]
    # w2's connections never arrived (Locust has what it reported before dying, if
    # it lived to its first report): the run is not conserved, and says so
    assert cons["locust_requests"] >= cons["records"] and cons["ok"] is False
    html = (outcome.run / "report.html").read_text()
    assert "workers never shipped their records" in html
    # it said where its records stayed: its own run directory under `eph worker --out`
    (kept,) = {path.parent.resolve() for path in (tmp_path / "w2").glob("*/worker.json")}
    where = {"name": "w2", "hostname": socket.gethostname(), "run_dir": str(kept)}
    assert summary["distributed"]["missing"] == [where]
    assert f"--collect-from {kept}" in html
    rows = _part_rows(kept / "parts")[0]
    assert rows > 0, "the dead worker had flushed nothing in a second"
    done = eph(["report", str(outcome.run), "--collect-from", str(kept)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    collected = run_dir_summary(outcome.run)
    assert collected["distributed"] == {
        "expected_workers": 2,
        "hosts_shipped": ["w1", "w2"],
        "missing_workers": 0,
    }
    assert collected["conservation"]["records"] == cons["records"] + rows
    assert sorted(h["host"] for h in collected["hosts"]) == ["w1", "w2"]
    by_host = pq.read_table(outcome.run / "connections.parquet").column("host").to_pylist()
    assert by_host.count("w2") == rows
    assert "never shipped" not in (outcome.run / "report.html").read_text()
    again = eph(["report", str(outcome.run), "--collect-from", str(kept)], cwd=tmp_path)
    assert again.returncode != 0 and "already holds worker w2" in again.stderr + again.stdout


def test_ship_and_receive_round_trip(tmp_path: Path) -> None:
    """Files cross in chunks, names collide into name-2, and odd paths are refused."""
    worker = tmp_path / "worker"
    (worker / "parts").mkdir(parents=True)
    (worker / "logs").mkdir()
    big = os.urandom(int(2.5 * (1 << 20)))
    (worker / "parts" / "a.arrows").write_bytes(big)
    (worker / "samples.parquet").write_bytes(b"")
    (worker / "logs" / "collector.log").write_text("ok\n")
    (worker / "summary.json").write_text("{}")  # not shipped
    receiver = Receiver(tmp_path / "master")
    messages: list[tuple[str, dict]] = []  # type: ignore[type-arg]

    def send_as(client: str):  # type: ignore[no-untyped-def]
        def send(kind: str, data: dict) -> None:  # type: ignore[type-arg]
            messages.append((kind, data))
            handler = receiver.on_file if kind == "eph_file" else receiver.on_host
            handler(msg=SimpleNamespace(data=data, node_id=client))

        return send

    sent = ship(send_as("c1"), worker, "vm")
    ship(send_as("c2"), worker, "vm")
    assert sent["files"] == 3 and sent["bytes"] == len(big) + 3
    assert sum(kind == "eph_file" for kind, _ in messages) == 2 * (3 + 2)  # 3 chunks of a.arrows
    for name in ("vm", "vm-2"):
        root = tmp_path / "master" / "hosts" / name
        assert (root / "parts" / "a.arrows").read_bytes() == big
        assert (root / "logs" / "collector.log").read_text() == "ok\n"
        assert not (root / "summary.json").exists()
        host = json.loads((root / "host.json").read_text())
        assert abs(host["clock_shift_ns"]) < 10**9
    receiver.on_file(
        msg=SimpleNamespace(
            data={"name": "vm", "path": "../../etc/x.log", "data": b"x", "first": True},
            node_id="c1",
        )
    )
    assert not (tmp_path / "etc").exists()
    assert not list((tmp_path / "master").rglob("x.log"))


def test_workers_announce_where_they_record_and_strangers_are_not_collected(
    tmp_path: Path,
) -> None:
    master = tmp_path / "master"
    master.mkdir()
    receiver = Receiver(master)
    dirs = {client: tmp_path / client for client in ("c1", "c2", "c3")}
    for directory in dirs.values():
        directory.mkdir()
    for client in ("c1", "c2"):  # one host name twice: vm, vm-2
        receiver.on_worker(msg=SimpleNamespace(data=announce(dirs[client], "vm"), node_id=client))
    assert [(m.name, m.run_dir) for m in missing_workers(master, ["vm"])] == [
        ("vm-2", str(dirs["c2"]))
    ]
    assert missing_workers(master, ["vm", "vm-2"]) == []
    with pytest.raises(RunDirError, match="not an eph worker's run directory"):
        collect(master, tmp_path)
    announce(dirs["c3"], "vm")  # a worker of another run
    with pytest.raises(RunDirError, match="not one of this run's workers"):
        collect(master, dirs["c3"])
    assert collect(master, dirs["c2"]) == "vm-2"
    assert json.loads((master / "hosts" / "vm-2" / "host.json").read_text())["files"] == 0
    with pytest.raises(RunDirError, match="already holds worker vm-2"):
        collect(master, dirs["c2"])
