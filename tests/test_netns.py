"""Namespaces: named uniquely, removed on every exit path, stale ones swept."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from harness.kernel.netns import Namespace, remove_stale, removed_namespaces, sweep_stale

pytestmark = pytest.mark.netns


def _exists(name: str) -> bool:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return any(line.split()[0] == name for line in out.stdout.splitlines() if line.strip())


RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def test_settings_stay_inside_and_the_namespace_goes() -> None:
    host = RANGE.read_text()
    with Namespace(prefix="ephtest") as ns:
        ns.set_sysctl("net.ipv4.ip_local_port_range", (40000, 40099))
        inside = subprocess.run(
            ns.command(["cat", "/proc/sys/net/ipv4/ip_local_port_range"]),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert inside.split() == ["40000", "40099"]
        assert RANGE.read_text() == host
        name = ns.name
        assert _exists(name)
    assert not _exists(name)


def test_removed_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError), Namespace(prefix="ephtest") as ns:
        name = ns.name
        raise RuntimeError("boom")
    assert not _exists(name)


def test_names_are_unique() -> None:
    with Namespace(prefix="ephtest") as a, Namespace(prefix="ephtest") as b:
        assert a.name != b.name


@pytest.mark.serial  # leaves a stale namespace on purpose: any eph starting beside it sweeps it
def test_stale_namespaces_of_dead_processes_are_swept() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"ephtest-{dead.pid}-1"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in remove_stale("ephtest")
        assert not _exists(stale)
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True, check=False)


def test_processes_left_inside_are_stopped() -> None:
    sleeper = None
    try:
        with Namespace(prefix="ephtest") as ns:
            sleeper = subprocess.Popen(ns.command(["sleep", "60"]))
            name = ns.name
            # inside before the namespace goes: `ip netns exec` enters it after Popen
            # returns, and a busy machine once left the sweep nothing to find
            deadline = time.monotonic() + 10
            while not _pids(name) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _pids(name), "the sleeper never entered the namespace"
        assert sleeper.wait(timeout=5) != 0  # killed, not left holding the namespace
        assert not _exists(name)
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def _pids(name: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return out.stdout.split()


@pytest.mark.serial  # leaves a stale namespace on purpose: any eph starting beside it sweeps it
def test_the_startup_sweep_takes_every_eph_prefix_and_spares_the_living() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"ephtest-{dead.pid}-9"
    with Namespace(prefix="ephtest") as alive:  # (its start sweeps too: made before the stale)
        subprocess.run(["ip", "netns", "add", stale], check=True)
        try:
            assert stale in sweep_stale()
            assert stale in removed_namespaces()
            assert not _exists(stale)
            assert _exists(alive.name)
            assert stale not in sweep_stale()
        finally:
            subprocess.run(["ip", "netns", "delete", stale], capture_output=True, check=False)
