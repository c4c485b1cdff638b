"""The kernel's TCP counters for this network namespace, from /proc/net.

Which of them move for what, measured, is in docs/kernel.md ("Counters worth
sampling"); note that a connect() failing with EADDRNOTAVAIL moves none of them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["COUNTERS", "ipv6_sockets_unseen", "read_counters", "tcp6_inuse"]

# column name -> (file, section, field)
COUNTERS = {
    "tw": ("netstat", "TcpExt", "TW"),
    "tw_recycled": ("netstat", "TcpExt", "TWRecycled"),
    "tw_killed": ("netstat", "TcpExt", "TWKilled"),
    "timewait_overflow": ("netstat", "TcpExt", "TCPTimeWaitOverflow"),
    "listen_overflows": ("netstat", "TcpExt", "ListenOverflows"),
    "listen_drops": ("netstat", "TcpExt", "ListenDrops"),
    "active_opens": ("snmp", "Tcp", "ActiveOpens"),
    "passive_opens": ("snmp", "Tcp", "PassiveOpens"),
    "attempt_fails": ("snmp", "Tcp", "AttemptFails"),
    "curr_estab": ("snmp", "Tcp", "CurrEstab"),
}
SOCKSTAT = {"sockstat_tw": "tw", "sockstat_inuse": "inuse", "sockstat_orphan": "orphan"}


def _sections(path: Path) -> dict[str, dict[str, int]]:
    """``Section: names`` / ``Section: values`` line pairs (netstat, snmp)."""
    out: dict[str, dict[str, int]] = {}
    lines = path.read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        section, _, rest = names.partition(":")
        keys = rest.split()
        numbers = values.partition(":")[2].split()
        out[section] = {k: int(v) for k, v in zip(keys, numbers, strict=False)}
    return out


def _sockstat(path: Path) -> dict[str, int]:
    for line in path.read_text().splitlines():
        if line.startswith("TCP:"):
            words = line.split()[1:]
            return {k: int(v) for k, v in zip(words[::2], words[1::2], strict=False)}
    return {}


def read_counters(proc: Path = Path("/proc"), sysctls: Path | None = None) -> dict[str, int | None]:
    """Every counter above (None where this kernel has none), plus sockstat and conntrack.

    ``proc``'s ``net/`` names the namespace (``/proc/thread-self`` for a thread that
    entered another); ``sysctls`` is where its sysctls are, ``proc/sys`` unless given
    (``/proc/sys`` follows the reading thread's namespace, ``/proc/PID/sys`` does not).
    """
    files = {
        "netstat": _sections(proc / "net" / "netstat"),
        "snmp": _sections(proc / "net" / "snmp"),
    }
    result: dict[str, int | None] = {}
    for name, (file, section, field) in COUNTERS.items():
        result[name] = files[file].get(section, {}).get(field)
    sockstat = _sockstat(proc / "net" / "sockstat")
    for name, field in SOCKSTAT.items():
        result[name] = sockstat.get(field)
    try:
        netfilter = (sysctls or proc / "sys") / "net" / "netfilter"
        conntrack = (netfilter / "nf_conntrack_count").read_text()
        result["conntrack_count"] = int(conntrack)
    except (OSError, ValueError):
        result["conntrack_count"] = None
    return result


def tcp6_inuse(proc: Path = Path("/proc")) -> int | None:
    """sockstat6's ``TCP6: inuse`` (TIME_WAIT sockets not included), None if unreadable."""
    try:
        for line in (proc / "net" / "sockstat6").read_text().splitlines():
            if line.startswith("TCP6:"):
                return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        return None
    return None


def ipv6_sockets_unseen(
    ipv4_time_wait: int, sockstat_tw: int | None = None, proc: Path = Path("/proc")
) -> bool:
    """Whether an IPv6 sock_diag dump can find anything once the IPv4 one is done.

    Each family's dump walks the whole socket table, so the IPv6 one is skipped when
    the kernel's own counts say there is nothing: sockstat6 TCP6 inuse 0, and every
    TIME_WAIT socket of sockstat (which counts both families) seen in the IPv4 dump.
    ``sockstat_tw`` is read here unless the caller has it already.
    """
    if tcp6_inuse(proc) != 0:
        return True
    if sockstat_tw is None:
        try:
            sockstat_tw = _sockstat(proc / "net" / "sockstat").get("tw")
        except OSError:
            return True
    return sockstat_tw != ipv4_time_wait
