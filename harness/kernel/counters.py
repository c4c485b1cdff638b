"""The kernel's TCP counters for this network namespace, from /proc/net.

Which of them move for what, measured, is in docs/kernel.md ("Counters worth
sampling"); note that a connect() failing with EADDRNOTAVAIL moves none of them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["COUNTERS", "read_counters"]

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


def read_counters(proc: Path = Path("/proc")) -> dict[str, int | None]:
    """Every counter above (None where this kernel has none), plus sockstat and conntrack."""
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
        conntrack = (proc / "sys" / "net" / "netfilter" / "nf_conntrack_count").read_text()
        result["conntrack_count"] = int(conntrack)
    except (OSError, ValueError):
        result["conntrack_count"] = None
    return result
