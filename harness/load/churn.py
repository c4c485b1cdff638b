"""What every churn engine does per connection, decided once per process.

A :class:`ChurnPlan` is the scenario's ``[target]`` and ``[load]`` with
endpoints resolved, bytes encoded and policies settled, so that the hot loops
of both engines only read attributes.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from harness.endpoints import ResolvedEndpoint
from harness.errors import ScenarioError
from harness.kernel.sysctls import read_kernel
from harness.load.http_client import HttpPlan, TlsPlan
from harness.scenario import ClosePolicy, Protocol, Reply, Scenario

__all__ = ["LINGER_RESET", "ChurnPlan", "PortWindow", "Target", "make_socket"]

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
IP_LOCAL_PORT_RANGE = 51  # Linux 6.3+; no Python constant: value (hi << 16) | lo
IPPROTO_IP = socket.IPPROTO_IP
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


UDP_PAYLOAD = b"eph\n"  # what a UDP attempt sends when load.send is empty


@dataclass(frozen=True, slots=True)
class Target:
    """One (endpoint, source address) pairing the engines cycle through."""

    index: int  # the endpoint's index in the plan (recorded per connection)
    endpoint: ResolvedEndpoint
    source: str | None  # bound with IP_BIND_ADDRESS_NO_PORT; None lets the kernel pick
    port_range: int = 0  # IP_LOCAL_PORT_RANGE value for each socket; 0 = the sysctl's
    window: PortWindow | None = None  # a random IP_LOCAL_PORT_RANGE window per socket

    @property
    def needs_socket_setup(self) -> bool:
        """Whether a socket must be prepared before connect() (bind, options)."""
        return self.source is not None or self.port_range != 0 or self.window is not None


@dataclass(frozen=True, slots=True)
class PortWindow:
    """``load.socket_port_window``: each socket gets one of ``count`` aligned windows of
    ``size`` ports from ``low``, at random, so connect() scans at most one window
    (Cloudflare's fix for the slow scan once half the range is held)."""

    low: int
    size: int
    count: int

    @classmethod
    def over(cls, low: int, high: int, size: int) -> PortWindow:
        size = min(size, high - low + 1)
        return cls(low, size, max(1, (high - low + 1) // size))

    def pick(self) -> int:
        """A random window as the option's value, ``(hi << 16) | lo``."""
        first = self.low + self.size * random.randrange(self.count)
        return ((first + self.size - 1) << 16) | first


@dataclass(frozen=True)
class ChurnPlan:
    endpoints: tuple[ResolvedEndpoint, ...]
    targets: tuple[Target, ...]
    close: ClosePolicy
    send: bytes
    reply: Reply
    hold: float
    connect_timeout: float
    io_timeout: float
    backoff: float
    rate: float  # new connections (HTTP: requests) per second for this process; 0 = no cap
    protocol: Protocol = Protocol.TCP
    http: HttpPlan | None = None  # [load.http]: requests and their responses
    tls: TlsPlan | None = None  # load.tls: a handshake after connect()

    @classmethod
    def from_scenario(
        cls,
        scenario: Scenario,
        *,
        rate_share: float = 1.0,
    ) -> ChurnPlan:
        load = scenario.load
        endpoints = tuple(e.resolve() for e in scenario.target.endpoints)
        packed = 0
        if load.socket_port_range is not None:
            low, high = load.socket_port_range
            packed = (high << 16) | low
        targets = tuple(_pair_targets(endpoints, load.source_addresses, packed, _window(scenario)))
        reply = Reply.EOF if load.close is ClosePolicy.SERVER else load.reply
        return cls(
            endpoints=endpoints,
            targets=targets,
            close=load.close,
            send=load.send.encode(),
            reply=reply,
            hold=load.hold,
            connect_timeout=load.connect_timeout,
            io_timeout=load.io_timeout,
            backoff=load.backoff,
            rate=load.rate * rate_share,
            protocol=load.protocol,
            http=HttpPlan.from_scenario(scenario, endpoints),
            tls=TlsPlan.from_scenario(scenario, endpoints),
        )

    @property
    def close_label(self) -> str:
        """The records' ``close`` column: the policy, or ``udp`` (no TIME_WAIT at all)."""
        return "udp" if self.protocol is Protocol.UDP else self.close.value

    @property
    def names(self) -> list[str]:
        """Locust's name for each endpoint: its address, or for HTTP the path (as an
        HttpUser names it), prefixed by the endpoint when there are several."""
        if self.http is None:
            return [str(e) for e in self.endpoints]
        if len(self.endpoints) == 1:
            return [self.http.path]
        return [f"{e}{self.http.path}" for e in self.endpoints]

    @property
    def request_type(self) -> str:
        """Locust's request type: ``TCP``/``UDP``, or the HTTP method."""
        return self.http.method if self.http is not None else "TCP"

    def cycle(self) -> Iterator[Target]:
        """Round-robin over every (endpoint, source) pairing."""
        return itertools.cycle(self.targets)


def _window(scenario: Scenario) -> PortWindow | None:
    """The random window, over socket_port_range or the namespace's range (read here,
    where the clients run)."""
    load = scenario.load
    if load.socket_port_window is None:
        return None
    span = load.socket_port_range or read_kernel().get("ip_local_port_range")
    if not isinstance(span, list | tuple) or len(span) != 2:
        raise ScenarioError(
            "socket_port_window needs the port range, which could not be read",
            key="load.socket_port_window",
            value=load.socket_port_window,
        )
    return PortWindow.over(int(span[0]), int(span[1]), load.socket_port_window)


def _pair_targets(
    endpoints: tuple[ResolvedEndpoint, ...],
    sources: list[str],
    port_range: int,
    window: PortWindow | None = None,
) -> Iterator[Target]:
    for index, endpoint in enumerate(endpoints):
        if not sources:
            yield Target(index, endpoint, None, port_range, window)
            continue
        family_sources = [s for s in sources if _family(s) == endpoint.family]
        if not family_sources:
            raise ScenarioError(
                f"no source address of the same IP version as endpoint {endpoint}",
                key="load.source_addresses",
                value=sources,
            )
        for source in family_sources:
            yield Target(index, endpoint, source, port_range, window)


def _family(address: str) -> socket.AddressFamily:
    version = ipaddress.ip_address(address).version
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def make_socket(
    target: Target,
    socket_class: type[socket.socket] = socket.socket,
    kind: socket.SocketKind = socket.SOCK_STREAM,
) -> socket.socket:
    """A non-blocking TCP (or UDP) socket, bound to the target's source address if any.

    The bind uses IP_BIND_ADDRESS_NO_PORT: the port is chosen at connect() time,
    per destination. A plain bind(ip, 0) would take a port from the range for
    every socket across *all* destinations (``docs/kernel.md``, port selection).
    """
    sock = socket_class(target.endpoint.family, kind)
    sock.setblocking(False)
    try:
        port_range = target.window.pick() if target.window is not None else target.port_range
        if port_range:
            # a u32: (hi << 16) | lo overflows the C int an integer argument becomes
            sock.setsockopt(IPPROTO_IP, IP_LOCAL_PORT_RANGE, struct.pack("=I", port_range))
        if target.source is not None:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((target.source, 0))
    except OSError:
        sock.close()
        raise
    return sock
