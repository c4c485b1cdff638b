"""The supervisor: children stop in stage order, and none outlives a killed eph.

Real processes throughout. The end-to-end tests mark an ``eph`` with an
environment variable of their own, which every process it starts inherits
(through ``ip netns exec`` and ``unshare`` too), ``kill -9`` it mid-load, and
look in /proc for what is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.kernel.netns import Namespace, remove_stale
from harness.supervisor import Stage, Supervisor

from .conftest import EPH, ROOT, eph, tcp_states, write_scenario

MARK = "EPH_TEST_RUN"
GONE_WITHIN = 2.0  # seconds from kill -9 to no process of the run left

# a child that reports each stop request in a file, then exits
_STOPPABLE = """
import signal, sys, time
def stop(*_):
    with open(sys.argv[1], "a") as out:
        out.write(sys.argv[2] + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(30)
"""


def _python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *args]


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (it holds no socket and runs no code)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wait_gone(pids: list[int], timeout: float = 5.0) -> float:
    """Seconds until every pid is gone (``inf`` if some are not within ``timeout``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if all(_gone(pid) for pid in pids):
            return time.monotonic() - start
        time.sleep(0.02)
    return float("inf")


def _marked(mark: str) -> dict[int, str]:
    """Live processes whose environment carries ``MARK=mark``: pid -> command line."""
    found = {}
    needle = f"{MARK}={mark}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and not _gone(int(entry.name)):
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def _wait_unmarked(mark: str, timeout: float = 5.0) -> tuple[float, dict[int, str]]:
    """Seconds until no process carries ``mark``, and what was left if some still do."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        left = _marked(mark)
        if not left:
            return time.monotonic() - start, {}
        time.sleep(0.05)
    return float("inf"), _marked(mark)


# ----------------------------------------------------------------- the class itself


def test_close_stops_children_stage_by_stage_in_order(tmp_path: Path) -> None:
    log = tmp_path / "stops"
    with Supervisor() as children:
        for stage in reversed(Stage):  # started last-to-stop first: the order is the stage's
            child = children.start(
                stage.name, _python(_STOPPABLE, str(log), stage.name), stage=stage,
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert child.proc.stdout is not None
            assert child.proc.stdout.readline().strip() == "ready"
        children.close()
        assert not children.running
    assert log.read_text().split() == ["LOAD", "OBSERVE", "TARGET", "LINK"]


def test_a_child_deaf_to_sigterm_is_killed_after_its_grace() -> None:
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(30)"  # noqa: E501
    with Supervisor() as children:
        child = children.start("deaf", _python(deaf), stage=Stage.LOAD, stdout=subprocess.PIPE)
        assert child.proc.stdout is not None
        child.proc.stdout.readline()
        start = time.monotonic()
        children.stop(child, grace=0.3)
        took = time.monotonic() - start
    assert child.returncode == -signal.SIGKILL
    assert 0.3 <= took < 3.0


def test_the_stop_kills_what_the_child_left_in_its_process_group() -> None:
    leaver = """
    import signal, subprocess, sys
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    left = subprocess.Popen(["sleep", "30"])
    print(left.pid, flush=True)
    signal.pause()
    """
    with Supervisor() as children:
        child = children.start("leaver", _python(leaver), stage=Stage.LOAD,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert child.proc.stdout is not None
        grandchild = int(child.proc.stdout.readline())
        children.stop(child)
    assert child.returncode == 0
    assert _wait_gone([grandchild], timeout=2.0) < 2.0


def test_poll_leaves_the_exit_for_the_stop_to_reap() -> None:
    with Supervisor() as children:
        child = children.start("quick", _python("raise SystemExit(3)"), stage=Stage.OBSERVE)
        deadline = time.monotonic() + 10
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert child.poll() == 3
        assert Path(f"/proc/{child.pid}").exists(), "reaped before its group was checked"
        children.stop(child)
        assert child.returncode == 3
    assert not Path(f"/proc/{child.pid}").exists()


# a stand-in for eph: a supervisor's children of each kind, a forked worker, a grandchild
_PARENT = """
import os, signal, sys, time
from harness.kernel.parent_death import die_with_parent_after_fork
from harness.supervisor import Stage, Supervisor

sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
# a child that starts a grandchild through a supervisor of its own (Locust's uvloop engines)
nested = [sys.executable, "-c",
          "import sys, time; from harness.supervisor import Stage, Supervisor; "
          "s = Supervisor(); c = s.start('g', sys.argv[1:], stage=Stage.LOAD); "
          "print(c.pid, flush=True); time.sleep(60)", *sleep]
children = Supervisor()
pids = []
unshare = ["unshare", "--user", "--map-root-user", "--net", "--"]
nsenter = ["nsenter", f"--net=/run/netns/{sys.argv[1]}", "--"]
for prefix in [[], unshare, ["ip", "netns", "exec", sys.argv[1]], nsenter]:
    pids.append(children.start("sleep", [*prefix, *sleep], stage=Stage.LOAD).pid)
term = children.start("sigterm", sleep, stage=Stage.OBSERVE, death_signal=signal.SIGTERM)
pids.append(term.pid)
parent = children.start("nested", nested, stage=Stage.LOAD, stdout=-1, text=True)
pids += [parent.pid, int(parent.proc.stdout.readline())]
die_with_parent_after_fork(signal.SIGKILL)  # Locust's --processes workers
worker = os.fork()
if worker == 0:
    time.sleep(60)
    os._exit(0)
pids.append(worker)
print(" ".join(map(str, pids)), flush=True)
time.sleep(60)
"""


@pytest.mark.netns
def test_every_kind_of_child_dies_with_a_parent_killed_with_sigkill(netns: Namespace) -> None:
    """Plain, in `unshare`, `ip netns exec` or `nsenter` (as root), SIGTERM-asking, nested
    through a second supervisor, forked without exec: all gone within GONE_WITHIN seconds."""
    parent = subprocess.Popen(
        _python(_PARENT, netns.name),
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 8 and not any(_gone(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    assert _wait_gone(pids) <= GONE_WITHIN


# ----------------------------------------------------------------- kill -9 of eph itself


class _CountingServer:
    """A target of the test's own: counts the connections it accepts, closes each."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self.accepts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> _CountingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        deadline = time.monotonic() + 120  # bounded, whatever the test does
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.accepts += 1
            conn.close()


@contextlib.contextmanager
def _marked_eph(
    args: list[str], tmp_path: Path, mark: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``eph ARGS`` carrying ``mark``; whatever the test does, nothing of it outlives
    the block (neither processes nor, through the sweep, namespaces)."""
    with open(tmp_path / "eph.log", "wb") as log:
        proc = subprocess.Popen(
            [*EPH, *args],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), MARK: mark, **(env or {})},
        )
    try:
        yield proc
    except BaseException:
        _kill_marked(proc, mark)
        if os.geteuid() == 0:
            remove_stale("eph")  # a failed test's lab namespaces (a passing one checks them)
        raise
    _kill_marked(proc, mark)


def _kill_marked(proc: subprocess.Popen[bytes], mark: str) -> None:
    proc.kill()
    proc.wait()
    for pid in _marked(mark):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_for_load(
    out: Path, proc: subprocess.Popen[bytes], tmp_path: Path, busy: Callable[[], bool]
) -> None:
    """Until the load runs and ``busy()`` says connections are coming (bounded)."""
    deadline = time.monotonic() + 60
    while not (list((out / "progress").glob("*.json")) and busy()):
        assert proc.poll() is None, (tmp_path / "eph.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the load never got going"
        time.sleep(0.1)
    time.sleep(0.5)  # every process up and churning


def _kill_and_measure(proc: subprocess.Popen[bytes], mark: str) -> float:
    assert len(_marked(mark)) >= 3, _marked(mark)  # eph and its children
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    took, left = _wait_unmarked(mark)
    assert not left, f"left running after kill -9: {left}"
    return took


def _churn(tmp_path: Path, target: str, listener: bool, engine: str, processes: int) -> Path:
    return write_scenario(
        tmp_path / "s.toml",
        f"""
name = "killed"
duration = "60s"
[target]
endpoints = ["{target}"]
{"[listener]" if listener else ""}
[load]
engine = "{engine}"
processes = {processes}
users = 4
spawn_rate = 100
rate = 300
connect_timeout = "1s"
io_timeout = "1s"
""",
    )


@pytest.mark.e2e
@pytest.mark.parametrize(("engine", "processes"), [("uvloop", 2), ("locust", 1)])
def test_kill_9_of_eph_run_stops_every_process_and_the_load(
    tmp_path: Path, engine: str, processes: int
) -> None:
    """Locust (and its forked workers, and their uvloop engines) and the collector go
    with eph: the test's own target sees no connection after."""
    mark, out = uuid.uuid4().hex, tmp_path / "run"
    with _CountingServer() as target:
        scenario = _churn(tmp_path, f"127.0.0.1:{target.port}", False, engine, processes)
        with _marked_eph(["run", str(scenario), "--out", str(out)], tmp_path, mark) as proc:
            _wait_for_load(out, proc, tmp_path, lambda: target.accepts > 50)
            took = _kill_and_measure(proc, mark)
            time.sleep(0.2)  # what was already in the accept queue
            before = target.accepts
            time.sleep(1.0)
            assert target.accepts == before, "connections kept coming after eph was killed"
    print(f"kill -9 to no process left: {took:.2f} s")
    assert took <= GONE_WITHIN


@pytest.mark.e2e
def test_kill_9_of_eph_run_frees_the_embedded_listeners_port(tmp_path: Path) -> None:
    mark, out = uuid.uuid4().hex, tmp_path / "run"
    scenario = _churn(tmp_path, "127.0.0.1:0", True, "locust", 1)
    with _marked_eph(["run", str(scenario), "--out", str(out)], tmp_path, mark) as proc:
        _wait_for_load(out, proc, tmp_path, lambda: True)
        endpoint = json.loads((out / "scenario.json").read_text())["target"]["endpoints"][0]
        port = int(endpoint.rsplit(":", 1)[1])
        took = _kill_and_measure(proc, mark)
    states = tcp_states(port)
    assert "LISTEN" not in states["local"], states
    assert not states["remote"].get("ESTAB"), states
    print(f"kill -9 to no process left: {took:.2f} s")
    assert took <= GONE_WITHIN


def _namespaces() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def _tcp_opens(namespace: str) -> tuple[int, int]:
    """The namespace's TCP ActiveOpens and PassiveOpens (its connection attempts)."""
    snmp = subprocess.run(
        ["ip", "netns", "exec", namespace, "cat", "/proc/net/snmp"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    names, values = [line.split() for line in snmp if line.startswith("Tcp:")][:2]
    row = dict(zip(names, values, strict=True))
    return int(row["ActiveOpens"]), int(row["PassiveOpens"])


def _lab_busy(out: Path) -> bool:
    """Its namespaces made and connections coming (the unnamed one: the load started)."""
    if not (out / "lab.json").exists():
        return False
    named = set(json.loads((out / "lab.json").read_text())["namespaces"]) & _namespaces()
    return all(sum(_tcp_opens(name)) > 50 for name in named)


@pytest.mark.netns
@pytest.mark.e2e
@pytest.mark.serial  # leaves a stale namespace on purpose: any eph starting beside it sweeps it
@pytest.mark.parametrize("lab", ["single", "pair-relay", "user-namespace"])
def test_kill_9_of_eph_lab_stops_everything_and_the_next_eph_removes_the_namespace(
    tmp_path: Path, lab: str
) -> None:
    mark, out = uuid.uuid4().hex, tmp_path / "run"
    table = {
        "single": "",
        "pair-relay": 'topology = "pair"\ndelay = "1ms"\nemulation = "relay"',
        "user-namespace": "",
    }[lab]
    scenario = write_scenario(
        tmp_path / "lab.toml",
        f"""
name = "killed-lab"
duration = "60s"
[target]
endpoints = ["127.0.0.1:9000"]
[listener]
[load]
users = 4
rate = 300
connect_timeout = "1s"
io_timeout = "1s"
[kernel]
ip_local_port_range = [40000, 40999]
[lab]
{table}
""",
    )
    env = {"EPH_LAB_USERNS": "1"} if lab == "user-namespace" else {}
    with _marked_eph(["lab", str(scenario), "--out", str(out)], tmp_path, mark, env) as proc:
        _wait_for_load(out, proc, tmp_path, lambda: _lab_busy(out))
        listed = json.loads((out / "lab.json").read_text())["namespaces"]
        named = [n for n in listed if n in _namespaces()]
        assert bool(named) == (lab != "user-namespace")
        took = _kill_and_measure(proc, mark)
        for name in named:
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                  text=True, check=True).stdout.split()  # fmt: skip
            assert not pids, f"still in {name}: {pids}"
        opens = [_tcp_opens(name) for name in named]
        time.sleep(1.0)
        assert [_tcp_opens(name) for name in named] == opens, "connections after the kill"
        assert set(named) <= _namespaces(), "a SIGKILL leaves them (nobody to delete them)"
    try:
        result = eph(["validate", str(scenario)], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert not set(named) & _namespaces(), "the next eph command removes them"
    finally:
        remove_stale("eph")
    print(f"kill -9 to no process left: {took:.2f} s")
    assert took <= GONE_WITHIN


@pytest.mark.netns
@pytest.mark.e2e
@pytest.mark.serial  # leaves a stale namespace on purpose: any eph starting beside it sweeps it
def test_lab_cleanup_removes_namespaces_of_dead_ephs_and_says_which(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"eph-{dead.pid}-1"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        result = eph(["lab", "--cleanup"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"removed {stale}" in result.stdout.splitlines()
        assert stale not in _namespaces()
        again = eph(["lab", "--cleanup"], cwd=tmp_path)
        assert stale not in again.stdout
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True, check=False)


# an exit handler of the C library that aborts, as pyarrow's thread pool does when
# one of its threads is still joinable at exit ("terminate called without an active
# exception": seen once in about 100 `eph observe --trace` stops)
_ABORT_AT_C_EXIT = """
import ctypes, sys, threading, time, atexit
libc = ctypes.CDLL(None)
libc.on_exit(libc.abort, None)
done = []
threading.Thread(target=lambda: (time.sleep(0.2), done.append(1))).start()
atexit.register(lambda: print("atexit ran, thread done:", done, flush=True))
"""


@pytest.mark.parametrize(
    ("leave", "code"),
    [("sys.exit(3)", -signal.SIGABRT), ("run_and_exit(lambda: sys.exit(3))", 3),
     ("run_and_exit(lambda: 3)", 3), ("run_and_exit(lambda: None)", 0)],
)  # fmt: skip
def test_eph_processes_leave_before_native_destructors_can_abort_them(
    leave: str, code: int
) -> None:
    script = f"{_ABORT_AT_C_EXIT}\nfrom harness.kernel.exit import run_and_exit\n{leave}\n"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert done.returncode == code, done.stderr
    # Python's own exit work still happens: threads joined, atexit functions run
    assert done.stdout == "atexit ran, thread done: [1]\n"


# a program that takes the first SIGTERM and goes on, as bpftrace 0.17 now and then
# does (seen: its thread back in epoll_wait, the signal caught, no exit)
_MISSES_ONE_TERM = """
import signal, sys, time
seen = []
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0) if seen else seen.append(1))
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("again", [None, 0.3])
def test_a_child_that_misses_a_sigterm_gets_another(again: float | None) -> None:
    with Supervisor() as children:
        child = children.start(
            "misses one", [sys.executable, "-c", _MISSES_ONE_TERM], stage=Stage.OBSERVE,
            grace=3.0, term_again_s=again, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert child.proc.stdout is not None and child.proc.stdout.readline() == "ready\n"
        began = time.monotonic()
        children.stop(child)
        took = time.monotonic() - began
    if again is None:  # the grace ran out and SIGKILL ended it
        assert child.returncode == -signal.SIGKILL and took >= 3.0
    else:  # the second SIGTERM, `again` after the first, ended it in its own way
        assert child.returncode == 0 and again <= took < 3.0
