"""Preflight: the port range as it stands, before any load (``eph preflight``).

What it looks at, all read-only:

- the ephemeral range, its size, and where it sits among IANA's ranges
  (well-known 0-1023, registered 1024-49151, dynamic/private 49152-65535);
- the ends' parity (the kernel docs advise different parity: connect() walks
  one parity first), the reserved ports, tcp_tw_reuse and tcp_timestamps;
- RLIMIT_NOFILE against the sockets the scenario will hold open at once;
- conntrack's table, when the module is loaded;
- every local listening TCP socket and bound UDP socket (sock_diag, as the
  collector), with the process that holds it where /proc shows it. Each one
  inside the ephemeral range and not reserved is a conflict waiting to happen:
  a client may hold that port the moment the service restarts, and its bind()
  fails with EADDRINUSE.

It runs in the current network namespace: on the host for ``eph run``, inside
the lab for ``eph lab``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from harness.capacity.port_model import reserved_in_range, reserved_spans
from harness.kernel.listening import Listening, listening_sockets, read_conntrack
from harness.kernel.sysctls import read_kernel
from harness.scenario import Scenario

__all__ = [
    "IANA_RANGES",
    "Listening",
    "listening_ports",
    "listening_sockets",
    "preflight",
    "render_text",
]

IANA_RANGES = (
    ("well-known", 0, 1023),
    ("registered", 1024, 49151),
    ("dynamic/private", 49152, 65535),
)
LINUX_DEFAULT_RANGE = (32768, 60999)
SPARE_FDS = 64  # files a load process holds besides its sockets (logs, parts, Python)


def _iana(low: int, high: int) -> list[dict[str, Any]]:
    out = []
    for name, first, last in IANA_RANGES:
        overlap = min(high, last) - max(low, first) + 1
        if overlap > 0:
            out.append({"name": name, "from": first, "to": last, "ports": overlap})
    return out


def _planned_sockets(scenario: Scenario | None) -> int | None:
    """Sockets one load process (or its uvloop child) holds open at once: one per user,
    each user having one connection in flight; the embedded listener holds as many."""
    if scenario is None:
        return None
    return -(-scenario.load.users // scenario.load.process_count)


def preflight(
    scenario: Scenario | None = None,
    kernel: dict[str, Any] | None = None,
    listening: Iterable[Listening] | None = None,
) -> dict[str, Any]:
    """The preflight report as a JSON-able dict; ``warnings`` says what to look at."""
    kernel = kernel if kernel is not None else read_kernel()
    sockets = list(listening) if listening is not None else listening_sockets()
    low, high = kernel.get("ip_local_port_range", LINUX_DEFAULT_RANGE)
    reserved = str(kernel.get("ip_local_reserved_ports") or "")
    size = high - low + 1
    usable = size - reserved_in_range(reserved, low, high)
    report: dict[str, Any] = {
        "port_range": [low, high],
        "size": size,
        "usable": usable,
        "iana": _iana(low, high),
        "linux_default": list(LINUX_DEFAULT_RANGE),
        "same_parity": low % 2 == high % 2,
        "reserved": reserved,
        "reserved_in_range": size - usable,
        "tcp_tw_reuse": kernel.get("tcp_tw_reuse"),
        "tcp_timestamps": kernel.get("tcp_timestamps"),
        "rlimit_nofile": kernel.get("rlimit_nofile"),
        "netns": kernel.get("netns"),
        "conntrack": read_conntrack(),
    }
    planned = _planned_sockets(scenario)
    if planned is not None:
        report["planned_sockets_per_process"] = planned
    report["listening"] = _listening_entries(sockets, low, high, reserved)
    report["conflicts"] = [e for e in report["listening"] if e["in_range"] and not e["reserved"]]
    report["warnings"] = [
        *_range_warnings(low, high, kernel),
        *_nofile_warnings(planned, kernel.get("rlimit_nofile")),
        *_conntrack_warnings(report["conntrack"]),
        *(_conflict_warning(conflict) for conflict in report["conflicts"]),
        *_embedded_listener_warnings(scenario),
    ]
    return report


def _range_warnings(low: int, high: int, kernel: dict[str, Any]) -> list[str]:
    warnings = []
    if low % 2 == high % 2:
        warnings.append(
            f"ip_local_port_range {low}-{high}: both ends are {'even' if low % 2 == 0 else 'odd'};"
            " the kernel docs advise different parity (connect() walks one parity first)"
        )
    if low < 1024:
        warnings.append(
            f"ip_local_port_range starts at {low}, among the well-known ports (0-1023):"
            " clients may take ports that services expect to bind"
        )
    if kernel.get("tcp_tw_reuse") and not kernel.get("tcp_timestamps"):
        warnings.append("tcp_tw_reuse needs tcp_timestamps = 1 to reuse TIME_WAIT ports")
    return warnings


def _nofile_warnings(planned: int | None, nofile: object) -> list[str]:
    if planned is None or not isinstance(nofile, list) or nofile[0] >= planned + SPARE_FDS:
        return []
    return [
        f"RLIMIT_NOFILE is {nofile[0]} (hard {nofile[1]}) for {planned} sockets at"
        f" once in one process: raise it (ulimit -n {planned + SPARE_FDS}) or fewer users"
    ]


def _conntrack_warnings(conntrack: dict[str, int] | None) -> list[str]:
    if not conntrack or conntrack["count"] <= 0.8 * conntrack["max"]:
        return []
    return [
        f"conntrack holds {conntrack['count']} of {conntrack['max']} entries: new"
        " connections are dropped when it is full"
    ]


def _listening_entries(
    sockets: Iterable[Listening], low: int, high: int, reserved: str
) -> list[dict[str, Any]]:
    spans = reserved_spans(reserved)
    return [
        {
            **asdict(s),
            "in_range": low <= s.port <= high,
            "reserved": any(a <= s.port <= b for a, b in spans),
        }
        for s in sockets
    ]


def _conflict_warning(conflict: dict[str, Any]) -> str:
    owner = (
        f"{conflict['process']} (pid {conflict['pid']})"
        if conflict["pid"]
        else "a process this user cannot see"
    )
    return (
        f"{conflict['protocol'].upper()} port {conflict['port']} ({conflict['address']},"
        f" {owner}) listens inside the ephemeral range and is not reserved: if it"
        " restarts while a client holds that port, its bind() fails with EADDRINUSE;"
        f" reserve it: net.ipv4.ip_local_reserved_ports = {conflict['port']}"
    )


def _embedded_listener_warnings(scenario: Scenario | None) -> list[str]:
    if scenario is None or scenario.listener is None:
        return []
    if not any(e.port == 0 for e in scenario.target.endpoints):
        return []
    return [
        "the embedded listener binds port 0: the kernel picks its port from the"
        " ephemeral range, one port fewer for connections (give it a port outside"
        " the range to keep them all)"
    ]


def render_text(report: dict[str, Any]) -> str:
    """The report for a person: a few lines, then the warnings."""
    low, high = report["port_range"]
    iana = ", ".join(f"{part['ports']} {part['name']}" for part in report["iana"])
    lines = [
        f"ephemeral range {low}-{high}: {report['size']:,} ports ({iana});"
        f" {report['usable']:,} usable after {report['reserved_in_range']} reserved",
        f"tcp_tw_reuse {report['tcp_tw_reuse']}, tcp_timestamps {report['tcp_timestamps']},"
        f" RLIMIT_NOFILE {report['rlimit_nofile']}"
        + (
            f", conntrack {report['conntrack']['count']}/{report['conntrack']['max']}"
            if report["conntrack"]
            else ""
        ),
        f"listening here: {len(report['listening'])} sockets,"
        f" {len(report['conflicts'])} inside the range and not reserved",
    ]
    lines += [f"warning: {text}" for text in report["warnings"]]
    return "\n".join(lines) + "\n"


def listening_ports(report: dict[str, Any]) -> list[int]:
    return sorted({int(e["port"]) for e in report["listening"]})
