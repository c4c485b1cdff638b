"""Shared fixtures. Capability checks live here, in one place."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.kernel.netns import Namespace, netns_available

ROOT = Path(__file__).resolve().parent.parent
EPH = [sys.executable, "-m", "harness"]
E2E_TIMEOUT = 120  # seconds for one eph subprocess, far above what any test needs
# make test (and CI) sets these: there, what make system-deps installs must be here,
# and a test that would skip for want of it fails instead
REQUIRED = "1" in (os.environ.get("EPH_REQUIRE_TOOLS"), os.environ.get("EPH_REQUIRE_BROWSER"))


def require(missing: str | None, install: str = "make system-deps") -> None:
    """The one capability check: ``missing`` says what this machine lacks (None: all is
    here). Under ``make test`` that fails the test; elsewhere it skips, naming the tool
    and how to install it."""
    if missing is None:
        return
    if REQUIRED:
        pytest.fail(f"{missing}; under make test nothing is skipped for it ({install})")
    pytest.skip(f"{missing} ({install})")


def require_tools(*tools: str, install: str = "make system-deps") -> None:
    absent = [tool for tool in tools if shutil.which(tool) is None]
    require(f"missing: {', '.join(absent)}" if absent else None, install)


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (a CI timeout, a kill) becomes KeyboardInterrupt, so that fixtures still
    # tear down and namespaces are deleted
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    # One load process per run where a scenario does not say: the suite runs three
    # tests side by side on two cores, and a process per CPU each made make test
    # 11.4 min instead of 9.5. tests/test_processes.py unsets it and tests the default.
    os.environ.setdefault("EPH_LOAD_PROCESSES", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # the modules that run eph or use namespaces first, whole and in their order, the
    # many quick ones after: side by side (make test), the quick ones fill the workers'
    # last minutes instead of one long test holding the phase open alone
    heavy = {item.module for item in items if {"e2e", "netns"} & set(item.keywords)}
    items.sort(key=lambda item: item.module not in heavy)
    problem = netns_available()
    if problem:
        for item in items:
            if "netns" in item.keywords:
                item.add_marker(pytest.mark.usefixtures("_netns_required"))


@pytest.fixture
def _netns_required() -> None:
    require(netns_available(), "run as root with iproute2: make system-deps")


@pytest.fixture
def netns() -> Iterator[Namespace]:
    """A fresh network namespace, deleted after the test whatever happens."""
    with Namespace(prefix="ephtest") as ns:
        yield ns


def write_scenario(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def eph(
    args: Sequence[str],
    *,
    cwd: Path,
    prefix: Sequence[str] = (),
    timeout: float = E2E_TIMEOUT,
    report: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``eph`` in a subprocess (optionally inside a namespace) and capture it.

    ``eph run`` and ``eph lab`` get ``--no-report`` unless ``report``: rendering the
    figures takes ~3 s of each run, and only the tests that read report.html ask."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = list(args)
    plain = "--" not in args and "--exec" not in args and "--cleanup" not in args
    if not report and args[:1] in (["run"], ["lab"], ["sweep"]) and plain:
        args.insert(1, "--no-report")
    return subprocess.run(
        [*prefix, *EPH, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def stop_process(proc: subprocess.Popen[Any] | None) -> None:
    """SIGTERM, 20 s to go, then SIGKILL; whatever it still had to say is read."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def lab_under_way(scenario: Path, out: Path) -> subprocess.Popen[str]:
    """``eph lab SCENARIO --out OUT`` in the background, returned once its load reports
    progress (at most 60 s) and one more second has passed."""
    proc = subprocess.Popen(
        [*EPH, "lab", str(scenario), "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((out / "progress").glob("*.json")):
        time.sleep(0.1)
    time.sleep(1.0)
    return proc


def run_dir_summary(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "summary.json").read_text()))


_OWN_ADDRESSES = itertools.count()


def own_loopback() -> str:
    """A loopback address no other test uses (127.<pid>.<n>). Counted by port alone,
    sockets of a port the kernel had given out before were counted too: another test's
    794 clients in TIME_WAIT toward an earlier listener on the same port number."""
    pid, n = os.getpid(), next(_OWN_ADDRESSES)
    return f"127.{(pid >> 8) & 255}.{pid & 255}.{n % 250 + 2}"


def tcp_states(port: int, host: str | None = None) -> dict[str, dict[str, int]]:
    """Kernel TCP sockets touching ``port`` (``host:port`` when given), by state:
    {"local": {...}, "remote": {...}}.

    ``local`` counts sockets whose own port is ``port`` (the listener's side),
    ``remote`` those connected to it (the clients' side). Read with ``ss``.
    """
    out = subprocess.run(
        ["ss", "-tanH", "state", "all"], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, dict[str, int]] = {"local": {}, "remote": {}}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        state, local, peer = fields[0], fields[3], fields[4]
        for side, address in (("local", local), ("remote", peer)):
            if address == f"{host}:{port}" if host else address.rsplit(":", 1)[-1] == str(port):
                result[side][state] = result[side].get(state, 0) + 1
    return result


def out_rsts(ns: Namespace) -> int:
    """Tcp OutRsts of a namespace: every reset sent, by either side. A reset that
    reaches a client in TIME_WAIT ends it early (docs/kernel.md, "TIME_WAIT")."""
    text = subprocess.run(
        ns.command(["cat", "/proc/net/snmp"]), capture_output=True, text=True, check=True
    ).stdout
    names, values = [line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")]
    return int(values[names.index("OutRsts")])
