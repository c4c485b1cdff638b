"""The target listener: an asyncio Protocol server, run on uvloop.

Protocol-based on purpose: the streams API accepted about half as fast when
measured here (``make bench`` prints this listener's accept rate). This module
never imports locust, so its process is never monkey-patched by gevent.

It speaks raw TCP (bytes in, ``response`` out), HTTP/1.1 (``http``: each request
parsed in C by httptools, one parser per connection, answered with a 200 built
once), or either over TLS (``tls``: an ``ssl.SSLContext``, see
:mod:`harness.target.tls`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import ssl
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.endpoints import Endpoint
from harness.errors import ListenerError
from harness.scenario import ListenerClose
from harness.target.http_server import (
    EndpointCounter,
    HttpConnection,
    close_with_reset,
    http_replies,
)

__all__ = ["Listener", "ListenerStats", "serve_forever"]

logger = logging.getLogger(__name__)

DRAIN_QUIET = 0.1  # seconds with no new accept before a stopping listener closes
DRAIN_LIMIT = 2.0  # at most this long
LOGGED_ERRORS = 5


@dataclass
class ListenerStats:
    """What a listener saw, per endpoint it served."""

    accepted: dict[str, int] = field(default_factory=dict)
    loop_errors: int = 0  # unhandled exceptions in callbacks: should stay 0
    requests: dict[str, int] = field(default_factory=dict)  # HTTP requests answered (200)
    bad_requests: dict[str, int] = field(default_factory=dict)  # did not parse: a 400

    @property
    def total(self) -> int:
        return sum(self.accepted.values())

    def to_json(self) -> dict[str, object]:
        return {
            "accepted": self.total,
            "endpoints": dict(self.accepted),
            "loop_errors": self.loop_errors,
            "requests": sum(self.requests.values()),
            "bad_requests": sum(self.bad_requests.values()),
        }


class _Connection(asyncio.Protocol):
    __slots__ = ("_again", "_close", "_read", "_response", "_transport")

    def __init__(
        self,
        counter: EndpointCounter,
        close: ListenerClose,
        response: bytes,
        read: bool,
        again: bool,
    ) -> None:
        counter.accepted += 1
        self._close = close
        self._response = response
        self._read = read
        self._again = again  # keep-alive: answer every request, not only the first
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike
        transport = typing.cast(asyncio.Transport, transport)
        self._transport = transport
        if not self._read:
            self._answer(transport)

    def data_received(self, data: bytes) -> None:
        if self._read and self._transport is not None:
            self._read = self._again
            self._answer(self._transport)

    def eof_received(self) -> bool:
        return False  # the client closed: close our side too

    def _answer(self, transport: asyncio.Transport) -> None:
        if self._response:
            transport.write(self._response)
        if self._close is ListenerClose.FIRST:
            transport.close()
        elif self._close is ListenerClose.RESET:
            close_with_reset(transport)


class _Datagrams(asyncio.DatagramProtocol):
    """A UDP endpoint: counts each datagram, answers it with ``response`` or its echo."""

    def __init__(self, counter: EndpointCounter, response: bytes) -> None:
        self._counter = counter
        self._response = response
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._counter.accepted += 1
        if self._transport is not None:
            self._transport.sendto(self._response or data, addr)


class Listener:
    """Serves ``endpoints`` with one close behaviour; counts accepted connections
    (TCP), or datagrams (``udp``: each is answered with ``response`` or echoed).

    ``http``: HTTP/1.1 instead of raw bytes (``response`` is the body; read_request
    and keep_alive do not apply: every request is read, keep-alive is the client's
    to ask). ``tls``: serve over TLS with this server context (TCP and HTTP alike).
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        close: ListenerClose = ListenerClose.WAIT,
        response: bytes = b"",
        read_request: bool = False,
        keep_alive: bool = False,
        backlog: int = 4096,
        udp: bool = False,
        http: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if close is ListenerClose.AUTO:
            raise ValueError("resolve ListenerClose.AUTO before starting a listener")
        if udp and (http or tls is not None):
            raise ValueError("UDP carries neither HTTP nor TLS")
        self._endpoints = list(endpoints)
        self._close = close
        self._response = response
        self._read = read_request
        self._keep_alive = keep_alive and read_request and close is ListenerClose.WAIT
        self._backlog = backlog
        self._udp = udp  # datagram endpoints: each datagram counts as one accept
        self._replies = http_replies(response) if http else None
        self._tls = tls
        self._servers: list[tuple[str, Any, EndpointCounter]] = []  # asyncio.Server or transport
        self._bound: list[Endpoint] = []
        self.loop_errors = 0

    @property
    def bound(self) -> list[Endpoint]:
        """The endpoints actually served (port 0 replaced by the port the kernel gave)."""
        return list(self._bound)

    def stats(self) -> ListenerStats:
        accepted = {name: counter.accepted for name, _, counter in self._servers}
        requests = {name: counter.requests for name, _, counter in self._servers}
        bad = {name: counter.bad_requests for name, _, counter in self._servers}
        return ListenerStats(accepted, self.loop_errors, requests, bad)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Count every unhandled callback error; log only the first few (not one per connection)."""
        self.loop_errors += 1
        if self.loop_errors <= LOGGED_ERRORS:
            loop.default_exception_handler(context)
        if self.loop_errors == LOGGED_ERRORS:
            logger.error("further loop errors are counted, not logged")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._on_loop_error)
        for endpoint in self._endpoints:
            counter = EndpointCounter()
            try:
                server: Any
                if self._udp:
                    server, _ = await loop.create_datagram_endpoint(
                        functools.partial(_Datagrams, counter, self._response),
                        local_addr=(endpoint.host, endpoint.port),
                    )
                    host, port = server.get_extra_info("sockname")[:2]
                else:
                    server = await loop.create_server(
                        self._factory(counter),
                        endpoint.host,
                        endpoint.port,
                        backlog=self._backlog,
                        reuse_address=True,
                        ssl=self._tls,
                    )
                    host, port = server.sockets[0].getsockname()[:2]
            except OSError as exc:
                await self.close()
                protocol = "udp" if self._udp else "tcp"
                raise ListenerError(
                    str(endpoint), _bind_reason(exc, endpoint.port, protocol)
                ) from None
            self._bound.append(Endpoint(host, port))
            self._servers.append((str(Endpoint(host, port)), server, counter))

    def _factory(self, counter: EndpointCounter) -> Callable[[], asyncio.Protocol]:
        close, response, read, again = self._close, self._response, self._read, self._keep_alive
        replies = self._replies
        if replies is not None:
            return lambda: HttpConnection(counter, close, replies)
        return lambda: _Connection(counter, close, response, read, again)

    async def drain(self, quiet: float = DRAIN_QUIET, limit: float = DRAIN_LIMIT) -> None:
        """Keep accepting until no connection arrived for ``quiet`` seconds (at most ``limit``).

        Clients have stopped by now; what is still in the accept queue was connected
        by them and must be counted.
        """
        deadline = time.monotonic() + limit
        last = -1
        while time.monotonic() < deadline:
            total = self.stats().total
            if total == last:
                return
            last = total
            await asyncio.sleep(quiet)

    async def close(self) -> None:
        for _, server, _ in self._servers:
            server.close()
        for _, server, _ in self._servers:
            if isinstance(server, asyncio.AbstractServer):
                await server.wait_closed()


def _bind_reason(exc: OSError, port: int, protocol: str = "tcp") -> str:
    """Why bind() failed, in words that say what to do next."""
    import errno

    if exc.errno == errno.EADDRINUSE:
        return f"address already in use: {_who_holds(port, protocol)}"
    if exc.errno == errno.EACCES:
        start = _read_int("/proc/sys/net/ipv4/ip_unprivileged_port_start", 1024)
        return (
            f"permission denied: on this host ports below {start}"
            " (net.ipv4.ip_unprivileged_port_start) need privilege. Listen on a port"
            f" of {start} or more; or give the process CAP_NET_BIND_SERVICE (run it as"
            " root, or setcap 'cap_net_bind_service=+ep' on its Python); or lower"
            " net.ipv4.ip_unprivileged_port_start"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no local interface has that address"
    return exc.strerror or str(exc)


def _who_holds(port: int, protocol: str = "tcp") -> str:
    """The sockets that hold ``port``: a listening service (named where /proc shows its
    process), or clients whose ephemeral port it is (the port conflict)."""
    from harness.kernel.listening import holders
    from harness.kernel.sockdiag import TcpState, dump_tcp

    listening = holders(port, protocol)
    if listening:
        owner = listening[0]
        who = f"{owner.process} (pid {owner.pid})" if owner.pid else "another user's process"
        return f"{who} listens on {owner.address}:{port}"
    if protocol == "udp":
        return "another UDP socket is bound to it"
    rows = dump_tcp()
    rows = rows[rows["sport"] == port]
    if len(rows):
        states = sorted({TcpState(int(s)).name for s in rows["state"]})
        return (
            f"{len(rows)} connection(s) use port {port} as their local port"
            f" ({', '.join(states)}): it is inside the ephemeral range, and a client"
            " took it. Reserve it (net.ipv4.ip_local_reserved_ports) or move the"
            " range (eph preflight shows both)"
        )
    return "another socket holds it (not visible from this network namespace or user)"


def _read_int(path: str, default: int) -> int:
    try:
        with open(path) as source:
            return int(source.read().strip())
    except (OSError, ValueError):
        return default


async def serve_forever(
    listener: Listener,
    *,
    ready: Callable[[list[Endpoint]], None],
    stop: asyncio.Event | None = None,
) -> ListenerStats:
    """Run ``listener`` until SIGINT/SIGTERM (or ``stop``), drain, and return its stats."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await listener.start()
    try:
        ready(listener.bound)
        await stop.wait()
        await listener.drain()
    finally:
        await listener.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return listener.stats()


def run_listener(listener: Listener, *, loop_kind: str = "uvloop") -> ListenerStats:
    """Serve in this process; print a JSON line when ready and one at exit (stdout)."""

    def ready(endpoints: list[Endpoint]) -> None:
        names = [str(e) for e in endpoints]
        print(json.dumps({"event": "listening", "endpoints": names}), flush=True)
        logger.info("listening on %s", ", ".join(names))

    coro = serve_forever(listener, ready=ready)
    if loop_kind == "uvloop":
        import uvloop

        stats: ListenerStats = uvloop.run(coro)
    else:
        stats = asyncio.run(coro)
    print(json.dumps({"event": "stopped", **stats.to_json()}), flush=True)
    sys.stdout.flush()
    return stats
