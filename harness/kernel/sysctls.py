"""Reading the kernel's settings for the current network namespace (never writing them)."""

from __future__ import annotations

import contextlib
import platform
import resource
from pathlib import Path
from typing import Any

__all__ = ["SYSCTLS", "read_kernel"]

# sysctl name -> path under /proc/sys; per network namespace unless noted
SYSCTLS = {
    "ip_local_port_range": "net/ipv4/ip_local_port_range",
    "ip_local_reserved_ports": "net/ipv4/ip_local_reserved_ports",
    "tcp_tw_reuse": "net/ipv4/tcp_tw_reuse",
    "tcp_tw_reuse_delay_ms": "net/ipv4/tcp_tw_reuse_delay",  # Linux 6.14+
    "tcp_timestamps": "net/ipv4/tcp_timestamps",
    "tcp_fin_timeout": "net/ipv4/tcp_fin_timeout",
    "tcp_max_tw_buckets": "net/ipv4/tcp_max_tw_buckets",
    "somaxconn": "net/core/somaxconn",
}


def _value(text: str) -> Any:
    parts = text.split()
    if len(parts) > 1 and all(p.lstrip("-").isdigit() for p in parts):
        return [int(p) for p in parts]
    if len(parts) == 1 and parts[0].lstrip("-").isdigit():
        return int(parts[0])
    return text.strip()


def read_kernel(proc: Path = Path("/proc/sys")) -> dict[str, Any]:
    """The sysctls above (absent ones left out), the kernel release and RLIMIT_NOFILE."""
    found: dict[str, Any] = {"release": platform.release()}
    for name, rel in SYSCTLS.items():
        try:
            found[name] = _value((proc / rel).read_text())
        except OSError:
            continue
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    found["rlimit_nofile"] = [soft, hard]
    with contextlib.suppress(OSError):
        found["netns"] = Path("/proc/self/ns/net").readlink().name
    return found
