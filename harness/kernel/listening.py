"""Who listens here: listening TCP and bound UDP sockets, with their processes.

Read with sock_diag (as the collector) and /proc/<pid>/fd (as ``ss -p``), in
the current network namespace. Also conntrack's fill, when the module is loaded.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from harness.kernel.sockdiag import TcpState, dump_sockets

__all__ = ["Listening", "holders", "listening_sockets", "read_conntrack", "socket_owners"]


@dataclass(frozen=True)
class Listening:
    protocol: str  # "tcp" or "udp"
    address: str
    port: int
    pid: int | None = None
    process: str | None = None


def socket_owners() -> dict[int, tuple[int, str]]:
    """Socket inode -> (pid, command name), from /proc/<pid>/fd (what ``ss -p`` does).

    Processes of other users are unreadable without privilege: their sockets stay
    unnamed, which the preflight says.
    """
    owners: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:["):
                owners.setdefault(int(link[8:-1]), (int(entry.name), name))
    return owners


def listening_sockets() -> list[Listening]:
    """Listening TCP and bound, unconnected UDP sockets of this network namespace."""
    owners = socket_owners()
    found = []
    for protocol, number, state in (
        ("tcp", socket.IPPROTO_TCP, TcpState.LISTEN),
        ("udp", socket.IPPROTO_UDP, TcpState.CLOSE),
    ):
        rows = dump_sockets(number, [state])
        for row in rows[rows["sport"] != 0]:
            family = socket.AF_INET if int(row["family"]) == socket.AF_INET else socket.AF_INET6
            raw = bytes(row["src"])[: 4 if family == socket.AF_INET else 16]
            pid, name = owners.get(int(row["inode"]), (None, None))
            found.append(
                Listening(protocol, socket.inet_ntop(family, raw), int(row["sport"]), pid, name)
            )
    return sorted(set(found), key=lambda s: (s.port, s.protocol, s.address))


def holders(port: int, protocol: str = "tcp") -> list[Listening]:
    """Who listens on (or is bound to) ``port`` here: for error messages."""
    return [s for s in listening_sockets() if s.port == port and s.protocol == protocol]


def read_conntrack(proc: Path = Path("/proc/sys/net/netfilter")) -> dict[str, int] | None:
    """conntrack's ``count`` and ``max``, or None when nf_conntrack is not loaded."""
    try:
        return {
            "max": int((proc / "nf_conntrack_max").read_text()),
            "count": int((proc / "nf_conntrack_count").read_text()),
        }
    except (OSError, ValueError):
        return None
