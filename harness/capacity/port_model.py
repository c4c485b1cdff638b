"""The capacity model: what connection rate a client setup sustains before its ports run out.

Per (source address, destination address:port) the kernel can hand out each
usable port once per *busy* time: the connection's own lifetime, plus the
*hold* after it closes: 60 s of TIME_WAIT (TCP_TIMEWAIT_LEN) when the client
closes first, or ``tcp_tw_reuse_delay`` when TIME_WAIT reuse applies
(``tcp_tw_reuse`` = 1, or 2 toward loopback, with TCP timestamps on). So::

    max rate = (ports in range - reserved ports in range) x sources x destinations x hosts
               / (lifetime + hold)

A server-side close or a reset leaves no TIME_WAIT on the client (hold 0): only
the lifetime limits it, which for short connections is no practical limit: above
:data:`CONNECT_BOUND_PER_S` per host the model says "no client-side port limit",
since connect()'s own cost bounds the rate long before the ports do. At
a rate above the maximum, the ports run out after ``ports / rate`` seconds
(none has come back by then, since ``ports / rate < lifetime + hold``).

**The soft limit.** connect() hands out the range's low-parity half first; once
that half is held, every connect scans it before it tries the other half
(docs/kernel.md, "Parity"): connects slow down 10-100x, seconds before any
fails. That happens above::

    soft rate = (ports / 2) / (lifetime + hold)

after ``(ports / 2) / rate`` seconds. A random ``IP_LOCAL_PORT_RANGE`` window per
socket (``window``) bounds the scan to the window: no soft limit.

**tcp_max_tw_buckets** caps the TIME_WAIT sockets of a namespace (a host): past
it a closing socket skips TIME_WAIT, its port free at once. With fewer buckets
than a host's ports, TIME_WAIT alone never fills them: only the ports held
while connections live do, ``(ports - buckets) / lifetime``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from harness.scenario import ClosePolicy

__all__ = [
    "CONNECT_BOUND_PER_S",
    "DEFAULT_REUSE_DELAY_S",
    "TIME_WAIT_S",
    "CapacityModel",
    "merge_reserved",
    "reserved_in_range",
    "reserved_spans",
    "reuse_applies",
    "unreserved_in_range",
]

# no host makes a million connects a second: a lifetime-only bound above it is no limit
CONNECT_BOUND_PER_S = 1_000_000.0
TIME_WAIT_S = 60.0  # TCP_TIMEWAIT_LEN: fixed in the kernel, not tcp_fin_timeout
DEFAULT_REUSE_DELAY_S = 1.0  # before Linux 6.14 (no sysctl), and its default after


def reserved_spans(reserved: str) -> list[tuple[int, int]]:
    """``ip_local_reserved_ports`` text (``"a-b,c"``) as inclusive (first, last) spans."""
    spans = []
    for part in filter(None, (p.strip() for p in reserved.split(","))):
        first, _, last = part.partition("-")
        spans.append((int(first), int(last or first)))
    return spans


def merge_reserved(reserved: str, ports: Iterable[int]) -> str:
    """``ip_local_reserved_ports`` text with ``ports`` added, as sorted, merged spans."""
    spans = sorted([*reserved_spans(reserved), *((p, p) for p in ports)])
    merged: list[list[int]] = []
    for first, last in spans:
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in merged)


def unreserved_in_range(reserved: str, ports: Iterable[int], low: int, high: int) -> list[int]:
    """Those of ``ports`` inside [low, high] that ``reserved`` does not cover."""
    spans = reserved_spans(reserved)
    return sorted({p for p in ports if low <= p <= high and not any(a <= p <= b for a, b in spans)})


def reserved_in_range(reserved: str, low: int, high: int) -> int:
    """How many ports of ``ip_local_reserved_ports`` (``"a-b,c"``) fall in [low, high]."""
    return sum(max(0, min(b, high) - max(a, low) + 1) for a, b in reserved_spans(reserved))


@dataclass(frozen=True)
class CapacityModel:
    usable_ports: int  # per path
    paths: int  # source addresses x destinations
    hold_s: float | None  # how long a closed port stays unavailable; None: no client TIME_WAIT
    reuse: bool  # TIME_WAIT reuse applies
    lifetime_s: float = 0.0  # connect to close: the port is busy then too
    hosts: int = 1  # load-generator hosts, each with its own ports
    tw_buckets: int | None = None  # tcp_max_tw_buckets per host; None: unknown (no cap)
    window: int | None = None  # a random IP_LOCAL_PORT_RANGE window per socket, in ports

    @classmethod
    def from_settings(
        cls,
        *,
        port_range: Sequence[int],
        reserved: str = "",
        tw_reuse: int = 2,
        reuse_delay_ms: int | None = None,
        timestamps: int = 1,
        close: ClosePolicy = ClosePolicy.CLIENT,
        destinations: Sequence[str] = (),
        sources: int = 1,
        lifetime_s: float = 0.0,
        hosts: int = 1,
        tw_buckets: int | None = None,
        window: int | None = None,
    ) -> CapacityModel:
        low, high = int(port_range[0]), int(port_range[1])
        usable = max(0, high - low + 1 - reserved_in_range(reserved, low, high))
        paths = max(1, sources) * max(1, len(destinations))
        life, hosts = max(0.0, lifetime_s), max(1, hosts)
        given = {"tw_buckets": tw_buckets, "window": window}
        if close is not ClosePolicy.CLIENT:
            return cls(usable, paths, None, False, life, hosts, **given)
        loopback = bool(destinations) and all(_loopback(d) for d in destinations)
        reuse = reuse_applies(tw_reuse, timestamps, loopback)
        if reuse:
            delay = DEFAULT_REUSE_DELAY_S if reuse_delay_ms is None else reuse_delay_ms / 1000
            return cls(usable, paths, delay, True, life, hosts, **given)
        return cls(usable, paths, TIME_WAIT_S, False, life, hosts, **given)

    @property
    def ports(self) -> int:
        """Ports available across every path and host before the first failure."""
        return self.usable_ports * self.paths * self.hosts

    @property
    def busy_s(self) -> float:
        """How long one connection keeps its port from the next: lifetime + hold."""
        return self.lifetime_s + (self.hold_s or 0.0)

    @property
    def max_rate_per_s(self) -> float | None:
        """The sustainable rate; None when nothing holds a port (no TIME_WAIT, no lifetime)."""
        return self._rate_to_hold(self.ports)

    @property
    def soft_rate_per_s(self) -> float | None:
        """The rate at which the low-parity half fills (connects slow down from then on);
        None: it never fills (nothing holds a port, or a random window per socket)."""
        if self.window is not None:
            return None
        return self._rate_to_hold(self.ports / 2)

    def _rate_to_hold(self, held: float) -> float | None:
        """The rate at which ``held`` ports (across paths and hosts) stay busy."""
        if self.busy_s <= 0:
            return None
        per_host = held / self.hosts
        if self.hold_s and self.tw_buckets is not None and self.tw_buckets < per_host:
            # TIME_WAIT stops at the buckets; past them only lifetimes hold ports
            if self.lifetime_s <= 0:
                return None
            capped = (per_host - self.tw_buckets) / self.lifetime_s * self.hosts
            return _bounded(max(held / self.busy_s, capped), self.hosts)
        if not self.hold_s:
            return _bounded(held / self.busy_s, self.hosts)
        return held / self.busy_s

    def time_to_slow_s(self, rate: float) -> float | None:
        """At ``rate`` new connections/s, when connects start to slow down (None: never)."""
        limit = self.soft_rate_per_s
        if limit is None or rate <= limit or rate <= 0:
            return None
        return self.ports / 2 / rate

    def time_to_exhaustion_s(self, rate: float) -> float | None:
        """At ``rate`` new connections/s, when the first connect fails (None: never)."""
        limit = self.max_rate_per_s
        if limit is None or rate <= limit or rate <= 0:
            return None
        return self.ports / rate


def _bounded(rate: float, hosts: int) -> float | None:
    """A lifetime-only bound, or None where connect()'s cost comes first."""
    return None if rate > CONNECT_BOUND_PER_S * hosts else rate


def reuse_applies(tw_reuse: int, timestamps: int, loopback: bool) -> bool:
    """tcp_tw_reuse: 1 everywhere, 2 toward loopback only; either needs timestamps."""
    return bool(timestamps) and (tw_reuse == 1 or (tw_reuse == 2 and loopback))


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"
