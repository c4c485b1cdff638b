"""Target-free path sampling against ss, on sockets made by a plain Python client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from harness.kernel.netns import Namespace
from harness.kernel.sockdiag import DIAG_DTYPE, TcpState
from harness.observe.paths import PathSampler, usable_ports

from .conftest import ROOT

pytestmark = pytest.mark.netns

# A client eph did not write: connections to three destinations, client closes first
# (TIME_WAIT here), some held open, connected UDP, IPv6; then eph's sampler looks,
# before and after 25 more connections to one path.
SCRIPT = r"""
import json, socket, subprocess, sys
from pathlib import Path
Path("/proc/sys/net/ipv4/ip_local_port_range").write_text("40000 40999")
Path("/proc/sys/net/ipv4/ip_local_reserved_ports").write_text("40100-40109")
from harness.observe.paths import PathSampler
listeners = []
for port in (7000, 7001, 40500):  # 40500: a listener inside the range
    s = socket.socket(); s.bind(("0.0.0.0", port)); s.listen(1024); listeners.append(s)
six = socket.socket(socket.AF_INET6); six.bind(("::1", 7002)); six.listen(64)
udp_server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp_server.bind(("127.0.0.1", 7003))

def churn(address, port, closed, held, server, family=socket.AF_INET):
    kept = []
    for i in range(closed + held):
        c = socket.socket(family); c.connect((address, port)); a, _ = server.accept()
        if i < closed:
            c.close(); a.close()
        else:
            kept.append((c, a))
    return kept

keep = churn("127.0.0.1", 7000, 120, 5, listeners[0])
keep += churn("127.0.0.2", 7000, 60, 0, listeners[0])
keep += churn("127.0.0.1", 7001, 30, 3, listeners[1])
keep += churn("::1", 7002, 7, 0, six, socket.AF_INET6)
udp = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
for u in udp:
    u.connect(("127.0.0.1", 7003))
sampler = PathSampler((40000, 40999), [(40100, 40109)], top=int(sys.argv[1]))
first = sampler.sample()
keep += churn("127.0.0.1", 7001, 25, 0, listeners[1])
second = sampler.sample()
ss = subprocess.run(["ss", "-tuanH"], capture_output=True, text=True, check=True).stdout

def dump(s):
    return {"labels": [s.label(i) for i in range(len(s))], "ports": s.ports.tolist(),
            "states": s.states.tolist(), "new": s.new.tolist(), "usable": s.host_usable,
            "usable_per_path": s.usable.tolist(),
            "paths_total": s.paths_total, "sockets": s.sockets, "other": s.other,
            "interval": s.interval_s}
print(json.dumps({"first": dump(first), "second": dump(second), "ss": ss}))
"""


def _sample(ns: Namespace, top: int) -> dict[str, object]:
    out = subprocess.run(
        ns.command([sys.executable, "-c", SCRIPT, str(top)]),
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def _ss_paths(text: str) -> Counter[str]:
    """Client-side sockets per path as ss shows them (local port inside 40000-40999)."""
    paths: Counter[str] = Counter()
    for line in text.splitlines():
        proto, state, _, _, local, peer = line.split()[:6]
        address, _, port = local.rpartition(":")
        if state == "LISTEN" or not 40000 <= int(port) <= 40999 or port == "40500":
            continue
        if proto == "udp" and state != "ESTAB":
            continue
        label = f"{'udp ' if proto == 'udp' else ''}{address.strip('[]')} -> {peer}"
        paths[label] += 1
    return paths


def test_every_path_matches_ss_and_new_connections_are_counted(netns: Namespace) -> None:
    result = _sample(netns, top=20)
    second = result["second"]
    assert isinstance(second, dict)
    ours = dict(zip(second["labels"], second["ports"], strict=True))
    assert ours == dict(_ss_paths(str(result["ss"])))
    assert ours["127.0.0.1 -> 127.0.0.1:7000"] == 125
    assert ours["::1 -> [::1]:7002"] == 7
    assert ours["udp 127.0.0.1 -> 127.0.0.1:7003"] == 4
    # 1,000 ports, 10 reserved, one listener inside the range
    assert second["usable"] == 989
    assert set(second["usable_per_path"]) == {989}  # one namespace: every path's
    new = dict(zip(second["labels"], second["new"], strict=True))
    assert new.pop("127.0.0.1 -> 127.0.0.1:7001") == 25
    assert set(new.values()) == {0}
    first = result["first"]
    assert isinstance(first, dict)
    assert set(first["new"]) == {0} and first["interval"] is None
    states = dict(zip(second["labels"], second["states"], strict=True))
    # STATES order: SYN_SENT, ESTABLISHED, ..., TIME_WAIT (index 5)
    assert states["127.0.0.1 -> 127.0.0.1:7000"][1] == 5
    assert states["127.0.0.1 -> 127.0.0.1:7000"][5] == 120


def test_top_n_keeps_the_busiest_and_sums_the_rest(netns: Namespace) -> None:
    second = _sample(netns, top=2)["second"]
    assert isinstance(second, dict)
    assert second["labels"] == [
        "127.0.0.1 -> 127.0.0.1:7000",
        "127.0.0.1 -> 127.0.0.2:7000",
        "other",
    ]
    assert second["paths_total"] == 5
    assert second["ports"][:2] == [125, 60]
    other_sockets = sum(second["states"][-1])
    assert other_sockets == second["sockets"] - 185 == 58 + 7 + 4
    assert second["ports"][-1] == 58  # the busiest of the rest


def test_usable_ports_subtracts_reserved_and_listening_inside_the_range() -> None:
    listening = np.array([22, 40005, 40006, 41000], dtype=np.uint16)
    # 6 reserved (40005 also listens) and 40006 listening: 7 of 1,000 taken
    assert usable_ports(40000, 40999, [(40000, 40004), (40005, 40005)], listening) == 993
    assert usable_ports(40000, 40009, [], np.zeros(0, np.uint16)) == 10


def _rows(cookies: list[int], port: int = 40_000) -> np.ndarray:
    rows = np.zeros(len(cookies), DIAG_DTYPE)
    rows["family"], rows["state"] = socket.AF_INET, TcpState.TIME_WAIT
    rows["sport"] = np.arange(port, port + len(cookies))
    rows["dport"] = 7000
    rows["src"] = rows["dst"] = socket.inet_aton("127.0.0.1") + bytes(12)
    rows["cookie"] = cookies
    return rows


def test_a_socket_one_dump_skipped_is_not_counted_new_again() -> None:
    """A sock_diag dump is not atomic: a socket can slip past its cursor while its
    bucket changes. Seen once in 450 connections under churn; it came back as new."""
    sampler = PathSampler((40_000, 40_999))
    new = []
    for cookies in ([1, 2, 3], [1, 3, 4], [1, 2, 3, 4, 5], [5, 6]):  # 2 skipped once
        snapshot = sampler.from_rows(_rows(cookies), None, now=float(len(new)))
        new.append(int(snapshot.new.sum()))
    assert new == [0, 1, 1, 1]  # 4, then 5, then 6: each once
