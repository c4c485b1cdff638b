"""The uvloop engine's request/response fast path: HTTP (and TLS) churn by callbacks.

Each user is a chain of callbacks over non-blocking sockets, like the connect
churn of ``harness.load.fastpath``: connect (on loopback it finishes inside
connect(), seen by ``getpeername()``), the TLS handshake when asked, the
requests, each response read whole, and the close by policy, recorded in bulk
at flush. No Task, no Protocol, no transport per connection.

Sockets wait on one ``select.epoll`` of this engine's own, watched by the loop
as a single reader: each socket is added once and re-armed ``EPOLLONESHOT`` for
every wait, and leaves the set when it is closed. Measured with 32 users against
one nginx worker (new connection per request): 6,500/s with ``loop.add_reader``
per wait, which builds and frees a uvloop poll handle each time, against
6,900-8,900/s with the one epoll. A sweeper ends connections past their
deadline (``connect_timeout`` to connect, ``io_timeout`` per exchange) with
ETIMEDOUT, so no timer is made per connection.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from harness.load.churn import LINGER_RESET, ChurnPlan, Target, make_socket
from harness.load.cpu_meter import CpuMeter
from harness.load.fastpath import CallbackUsers
from harness.load.http_client import HeadResponses, HttpPlan, Response, response_reader, tls_errno
from harness.load.outcome import INTERRUPTED, NO_REPLY, TIMED_OUT, connect_result, errno_of
from harness.records import RecordWriter
from harness.scenario import ClosePolicy, Protocol

__all__ = ["HttpChurn"]

_SWEEP_EVERY = 0.05  # seconds between deadline sweeps (as the connect path)
_IN = select.EPOLLIN | select.EPOLLONESHOT
_OUT = select.EPOLLOUT | select.EPOLLONESHOT
_WANT_READ = (BlockingIOError, ssl.SSLWantReadError)
_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK  # one syscall, not two

# what a connection waits for
_CONNECT, _HANDSHAKE, _SEND, _RESPONSE, _DRAIN, _HOLD = range(6)


class _Conn:
    """One connection in flight."""

    __slots__ = (
        "address",
        "deadline",
        "pending",
        "phase",
        "port",
        "registered",
        "response",
        "sent",
        "slot",
        "sock",
        "t0",
        "t1",
        "target",
        "tls_ns",
    )

    def __init__(self, sock: socket.socket, target: Target, t0: int, slot: int) -> None:
        self.sock = sock
        self.target = target
        self.t0 = t0
        self.t1 = 0
        self.tls_ns = 0
        self.slot = slot
        self.phase = _CONNECT
        self.deadline = 0
        self.registered = False
        self.address = self.port = 0
        self.sent = 0  # requests sent
        self.pending = b""  # what is left of a request the socket did not take whole
        self.response: Response | HeadResponses | None = None


class HttpChurn(CallbackUsers):
    """N users, each a chain of HTTP connections (TLS if asked), every one recorded."""

    def __init__(
        self,
        plan: ChurnPlan,
        writer: RecordWriter,
        out: BinaryIO,
        meter: CpuMeter | None = None,
    ) -> None:
        if plan.http is None and plan.tls is None:
            raise ValueError("HttpChurn serves [load.http] or load.tls")
        super().__init__(plan, writer, out, meter)
        self._http: HttpPlan | None = plan.http
        self._connect_ns = int(plan.connect_timeout * 1e9)
        self._io_ns = int(plan.io_timeout * 1e9)
        self._conns: dict[int, _Conn] = {}  # fd -> connection waiting on the epoll
        self._held: dict[_Conn, int] = {}  # waiting on a timer -> its io_errno at a stop
        self._epoll = select.epoll()
        # plain HTTP needs no more than the C socket type: its Python subclass's
        # __init__ cost 12 µs a connection in the profile (docs/guides/staging.md, "HTTP and TLS")
        self._socket: Callable[[int, int], Any] = (
            socket.socket if plan.tls is not None else _socket.socket
        )

    @staticmethod
    def applies(plan: ChurnPlan) -> bool:
        """HTTP, or a TLS handshake with nothing else to send (TCP only)."""
        if plan.protocol is not Protocol.TCP:
            return False
        return plan.http is not None or (plan.tls is not None and not plan.send)

    def _started(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self._epoll.fileno(), self._on_events)
        super()._started(loop)

    async def stop(self) -> None:
        """No new connections; wait (bounded) for those in flight, then record the rest."""
        self._users = 0
        plan = self.plan
        deadline = time.monotonic() + plan.connect_timeout + plan.io_timeout + plan.hold + 1.0
        while (self._active or self._conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._conns.values()):
            self._end(conn, INTERRUPTED, resume=False)
        for conn, code in list(self._held.items()):
            del self._held[conn]
            self._end(conn, code, resume=False)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
            assert self._loop is not None
            self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()

    # ------------------------------------------------------------ attempts

    def _start(self, slot: int) -> int | None:
        """One connection; connect()'s errno when it ended at once, else ``None``."""
        target = next(self._targets)
        t0 = time.monotonic_ns()
        try:
            if target.needs_socket_setup:
                sock = make_socket(target)
            else:
                sock = self._socket(target.endpoint.family, _NONBLOCKING_STREAM)
        except OSError as exc:  # no socket (EMFILE), or the source address cannot bind
            code = errno_of(exc)
            t1 = time.monotonic_ns()
            self.writer.add((t0, t1, t1, 0, 0, target.index, code, 0, 0, 0, 0, 0))
            return code
        conn = _Conn(sock, target, t0, slot)
        err = sock.connect_ex(target.endpoint.sockaddr)
        if err == errno.EINPROGRESS:
            try:
                sock.getpeername()  # loopback: the handshake finished inside connect()
            except OSError:
                conn.deadline = t0 + self._connect_ns
                self._wait(conn, _OUT)
                return None
            err = 0
        if err:
            self._record(conn, err, 0)
            sock.close()
            return err
        self._connected(conn)
        return None

    def _connected(self, conn: _Conn) -> None:
        conn.t1 = time.monotonic_ns()
        try:
            local = conn.sock.getsockname()
            conn.port, conn.address = local[1], self.writer.address_id(local[0])
        except OSError:  # reset before we looked: still a connection that was made
            pass
        tls = self.plan.tls
        if tls is None:
            self._send(conn)
            return
        name = tls.server_names[conn.target.index]
        conn.sock = tls.context.wrap_socket(
            conn.sock, server_hostname=name, do_handshake_on_connect=False
        )
        conn.phase = _HANDSHAKE
        conn.deadline = conn.t1 + self._io_ns
        self._handshake(conn)

    def _handshake(self, conn: _Conn) -> None:
        try:
            conn.sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            self._wait(conn, _IN)
            return
        except ssl.SSLWantWriteError:
            self._wait(conn, _OUT)
            return
        except OSError as exc:
            code = tls_errno(exc, self.plan.tls.server_names[conn.target.index])  # type: ignore[union-attr]
            self._end(conn, code if code is not None else errno_of(exc))
            return
        conn.tls_ns = time.monotonic_ns()
        self._send(conn)

    def _send(self, conn: _Conn) -> None:
        """The next request (paced when load.rate is set), or the end of a TLS-only one."""
        http = self._http
        if http is None:
            self._close_by_policy(conn)
            return
        if not conn.pending:
            if conn.sent and self._pacer is not None:
                delay = self._pacer.delay()
                if delay > 0:  # the next request waits for its slot
                    self._hold(conn, delay, INTERRUPTED, self._write, True)
                    return
            self._write(conn, True)
            return
        self._write(conn, False)

    def _write(self, conn: _Conn, new: bool) -> None:
        if new:
            conn.sent += 1
            assert self._http is not None
            conn.pending = self._http.request(conn.target.index, conn.sent)
            if conn.response is None:
                conn.response = response_reader(self._http)
        conn.deadline = time.monotonic_ns() + self._io_ns
        try:
            taken = conn.sock.send(conn.pending)
        except (BlockingIOError, ssl.SSLWantWriteError):
            taken = 0
        except ssl.SSLWantReadError:
            conn.phase = _SEND
            self._wait(conn, _IN)
            return
        except OSError as exc:
            self._end(conn, errno_of(exc))
            return
        conn.pending = conn.pending[taken:]
        conn.phase = _SEND if conn.pending else _RESPONSE
        self._wait(conn, _OUT if conn.pending else _IN)

    def _read(self, conn: _Conn) -> None:
        """Read what there is; move on when the response (or the drain) is whole."""
        response = conn.response
        if response is None or self._http is None:
            self._drain(conn)
            return
        while True:
            try:
                data = conn.sock.recv(65536)
            except _WANT_READ:
                self._wait(conn, _IN)
                return
            except ssl.SSLWantWriteError:
                self._wait(conn, _OUT)
                return
            except OSError as exc:
                self._end(conn, response.failed or errno_of(exc))
                return
            if not data:
                response.eof()
                if conn.phase == _DRAIN or response.done >= conn.sent:
                    self._end(conn, response.failed)
                else:
                    self._end(conn, response.failed or NO_REPLY)
                return
            response.feed(data)
            if response.failed:
                self._end(conn, response.failed)
                return
            if conn.phase == _RESPONSE and response.done >= conn.sent:
                if conn.sent < self._http.per_connection:
                    self._send(conn)
                    return
                if self.plan.close is not ClosePolicy.SERVER:
                    self._close_by_policy(conn)
                    return
                conn.phase = _DRAIN  # wait for the server's FIN: TIME_WAIT on its side
                conn.deadline = time.monotonic_ns() + self._io_ns

    def _drain(self, conn: _Conn) -> None:
        """A TLS-only connection waits for the server's close."""
        while True:
            try:
                if not conn.sock.recv(65536):
                    self._end(conn, 0)
                    return
            except _WANT_READ:
                self._wait(conn, _IN)
                return
            except OSError as exc:
                self._end(conn, errno_of(exc))
                return

    def _close_by_policy(self, conn: _Conn) -> None:
        if self.plan.close is ClosePolicy.SERVER:
            conn.phase = _DRAIN
            self._wait(conn, _IN)
            return
        if self.plan.hold:
            self._hold(conn, self.plan.hold, 0, self._end, 0)
            return
        self._end(conn, 0)

    # ------------------------------------------------------------ waiting

    def _hold(
        self, conn: _Conn, delay: float, at_stop: int, then: Callable[..., None], arg: object
    ) -> None:
        """Off the epoll for ``delay``, then ``then(conn, arg)``; a stop that comes first
        ends it with ``at_stop`` (0: the exchange was done), so it is still recorded."""
        conn.phase = _HOLD
        self._held[conn] = at_stop
        assert self._loop is not None
        self._loop.call_later(delay, self._release, conn, then, arg)

    def _release(self, conn: _Conn, then: Callable[..., None], arg: object) -> None:
        if self._held.pop(conn, None) is not None:
            then(conn, arg)

    def _wait(self, conn: _Conn, events: int) -> None:
        fd = conn.sock.fileno()
        if conn.registered:
            self._epoll.modify(fd, events)
        else:
            self._epoll.register(fd, events)
            conn.registered = True
        self._conns[fd] = conn

    def _on_events(self) -> None:
        for fd, _ in self._epoll.poll(0):
            conn = self._conns.pop(fd, None)
            if conn is None:
                continue
            phase = conn.phase
            if phase == _CONNECT:
                err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._end(conn, err)
                else:
                    self._connected(conn)
            elif phase == _HANDSHAKE:
                self._handshake(conn)
            elif phase == _SEND:
                self._send(conn)
            else:
                self._read(conn)

    def _sweep(self) -> None:
        """Connections past their deadline end as ETIMEDOUT."""
        loop = self._loop
        assert loop is not None
        now = time.monotonic_ns()
        for fd, conn in list(self._conns.items()):
            if conn.deadline and now >= conn.deadline and self._conns.get(fd) is conn:
                del self._conns[fd]
                # a connect done meanwhile, the loop too busy to see it, goes on as one
                answer = connect_result(conn.sock) if conn.phase == _CONNECT else None
                if answer == 0:
                    self._connected(conn)
                else:
                    self._end(conn, TIMED_OUT if answer is None else answer)
        self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)

    # ------------------------------------------------------------ the end

    def _end(self, conn: _Conn, code: int, resume: bool = True) -> None:
        """Close and record; connect()'s failure goes in errno, any later one in io_errno."""
        self._conns.pop(conn.sock.fileno(), None)
        connected = conn.t1 != 0
        # a failed exchange closes plainly, as on the other paths
        if connected and not code and self.plan.close is ClosePolicy.RESET:
            with contextlib.suppress(OSError):
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        conn.sock.close()
        self._record(conn, 0 if connected else code, code if connected else 0)
        if not resume:
            self._active.discard(conn.slot)
        elif code and not connected and self.plan.backoff:
            assert self._loop is not None
            self._loop.call_later(self.plan.backoff, self._next, conn.slot)
        else:
            self._next(conn.slot)

    def _record(self, conn: _Conn, err: int, io_err: int) -> None:
        t2 = time.monotonic_ns()
        response = conn.response
        requests, status, rx = (
            (response.done, response.status, response.rx) if response is not None else (0, 0, 0)
        )
        t1 = conn.t1 or t2
        row = (conn.t0, t1, t2, conn.address, conn.port, conn.target.index, err, io_err)
        self.writer.add((*row, conn.tls_ns, requests, status, rx))
