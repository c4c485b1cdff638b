"""The target listener: an asyncio Protocol server, run on uvloop.

Protocol-based on purpose: here the streams API accepts about half as fast
(KERNEL-NOTES: 40,000 vs 17,500 accepts/s). This module never imports locust,
so its process is never monkey-patched by gevent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import struct
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.endpoints import Endpoint
from harness.errors import ListenerError
from harness.scenario import ListenerClose

__all__ = ["Listener", "ListenerStats", "serve_forever"]

logger = logging.getLogger(__name__)

_LINGER_RESET = struct.pack("ii", 1, 0)
DRAIN_QUIET = 0.1  # seconds with no new accept before a stopping listener closes
DRAIN_LIMIT = 2.0  # at most this long
LOGGED_ERRORS = 5


@dataclass
class _Counter:
    accepted: int = 0


@dataclass
class ListenerStats:
    """What a listener saw, per endpoint it served."""

    accepted: dict[str, int] = field(default_factory=dict)
    loop_errors: int = 0  # unhandled exceptions in callbacks: should stay 0

    @property
    def total(self) -> int:
        return sum(self.accepted.values())

    def to_json(self) -> dict[str, object]:
        return {
            "accepted": self.total,
            "endpoints": dict(self.accepted),
            "loop_errors": self.loop_errors,
        }


class _Connection(asyncio.Protocol):
    __slots__ = ("_close", "_read", "_response", "_transport")

    def __init__(self, counter: _Counter, close: ListenerClose, response: bytes, read: bool):
        counter.accepted += 1
        self._close = close
        self._response = response
        self._read = read
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike
        transport = typing.cast(asyncio.Transport, transport)
        self._transport = transport
        if not self._read:
            self._answer(transport)

    def data_received(self, data: bytes) -> None:
        if self._read and self._transport is not None:
            self._read = False
            self._answer(self._transport)

    def eof_received(self) -> bool:
        return False  # the client closed: close our side too

    def _answer(self, transport: asyncio.Transport) -> None:
        if self._response:
            transport.write(self._response)
        if self._close is ListenerClose.FIRST:
            transport.close()
        elif self._close is ListenerClose.RESET:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            transport.abort()


class Listener:
    """Serves ``endpoints`` with one close behaviour; counts accepted connections."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        close: ListenerClose = ListenerClose.WAIT,
        response: bytes = b"",
        read_request: bool = False,
        backlog: int = 4096,
    ) -> None:
        if close is ListenerClose.AUTO:
            raise ValueError("resolve ListenerClose.AUTO before starting a listener")
        self._endpoints = list(endpoints)
        self._close = close
        self._response = response
        self._read = read_request
        self._backlog = backlog
        self._servers: list[tuple[str, asyncio.Server, _Counter]] = []
        self.loop_errors = 0

    @property
    def bound(self) -> list[Endpoint]:
        """The endpoints actually served (port 0 replaced by the port the kernel gave)."""
        result = []
        for _, server, _ in self._servers:
            host, port = server.sockets[0].getsockname()[:2]
            result.append(Endpoint(host, port))
        return result

    def stats(self) -> ListenerStats:
        accepted = {name: counter.accepted for name, _, counter in self._servers}
        return ListenerStats(accepted, self.loop_errors)

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
            counter = _Counter()
            factory = self._factory(counter)
            try:
                server = await loop.create_server(
                    factory, endpoint.host, endpoint.port, backlog=self._backlog, reuse_address=True
                )
            except OSError as exc:
                await self.close()
                raise ListenerError(str(endpoint), _bind_reason(exc)) from None
            host, port = server.sockets[0].getsockname()[:2]
            self._servers.append((str(Endpoint(host, port)), server, counter))

    def _factory(self, counter: _Counter) -> Callable[[], _Connection]:
        close, response, read = self._close, self._response, self._read
        return lambda: _Connection(counter, close, response, read)

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
            await server.wait_closed()


def _bind_reason(exc: OSError) -> str:
    import errno

    if exc.errno == errno.EADDRINUSE:
        return "address already in use (another process listens there)"
    if exc.errno == errno.EACCES:
        return (
            "permission denied: ports below net.ipv4.ip_unprivileged_port_start need"
            " CAP_NET_BIND_SERVICE; pick a port above 1023"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no local interface has that address"
    return exc.strerror or str(exc)


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
