"""One churn attempt with gevent: the Locust engine's hot path.

It uses the *original* (unpatched) socket class in non-blocking mode and asks
gevent's hub to wait only when a call would block. A gevent socket with
``settimeout`` measured slower, because gevent builds a Timeout per call; this
way the recording user keeps pace with a bare connect/close Locust user
(``make bench``: ``eph_locust_vs_bare_locust``), and timeouts cost nothing until
a connect really has to wait.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent import monkey
from gevent.socket import wait_read, wait_write

from harness.load.churn import LINGER_RESET, UDP_PAYLOAD, ChurnPlan, Target, make_socket
from harness.load.http_client import (
    HeadResponses,
    HttpPlan,
    Response,
    TlsPlan,
    response_reader,
    tls_errno,
)
from harness.load.outcome import (
    INTERRUPTED,
    NO_REPLY,
    TIMED_OUT,
    columns,
    connect_result,
    errno_of,
)
from harness.records import RecordWriter
from harness.scenario import ClosePolicy, Protocol, Reply

__all__ = ["GeventChurn"]

_RealSocket: type[socket.socket] = monkey.get_original("socket", "socket")
_IN_PROGRESS = (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK)


class _Timeout(TimeoutError):
    """Raised by gevent's waits (one shared instance): an attempt's ``ETIMEDOUT``."""


_TIMEOUT = _Timeout()


class GeventChurn:
    """Runs attempts for one process and records each into ``writer``."""

    def __init__(
        self,
        plan: ChurnPlan,
        writer: RecordWriter,
        on_result: Callable[[Target, int, int, float, int, int], None],
    ) -> None:
        self.plan = plan
        self.writer = writer
        # (target, errno, io_errno, ms, rx_bytes, requests): ms is connect()'s, or for
        # HTTP the whole connection's
        self._on_result = on_result

    def attempt(self, target: Target) -> int:
        """Open, use and close one connection; return connect()'s errno (0 = connected)."""
        if self.plan.protocol is Protocol.UDP:
            return self._attempt_udp(target)
        plan = self.plan
        monotonic_ns = time.monotonic_ns
        t0 = monotonic_ns()
        t1 = t0
        err = INTERRUPTED  # until connect() answers
        io_err = rx = port = address_id = 0
        sock: socket.socket | _TlsSocket | None = None
        done = _Done()
        settled = False
        try:
            sock = make_socket(target, _RealSocket)
            err = sock.connect_ex(target.endpoint.sockaddr)
            if err in _IN_PROGRESS:
                err = _wait_connect(sock, plan.connect_timeout)
            t1 = monotonic_ns()
            if err == 0:
                local = sock.getsockname()
                port = local[1]
                address_id = self.writer.address_id(local[0])
                sock, io_err, rx = self._use(sock, target, done)
            settled = True
        except OSError as exc:
            t1 = monotonic_ns() if t1 == t0 else t1
            # after connect() said 0, a failure is the exchange's, even one that came
            # before getsockname() (a reset): the connection was made
            err, io_err = columns(exc, connected=err == 0)
            settled = True
        finally:
            # Interrupted (GreenletExit when a user is stopped, KeyboardInterrupt landing
            # in this frame, ...): the variables may be half set, so ask the socket itself
            # whether it connected. Records then match what the listener accepted.
            if not settled:
                raw = sock.sock if isinstance(sock, _TlsSocket) else sock
                err, port, address_id = self._settle(raw)
            if sock is not None:
                _close(sock, plan.close if err == 0 and io_err == 0 else ClosePolicy.CLIENT)
            t2 = monotonic_ns()
            self.writer.add(
                (t0, t1, t2, address_id, port, target.index, err, io_err, *done.fields())
            )
            ms = (t2 - t0 if plan.http is not None else t1 - t0) / 1e6
            self._on_result(target, err, io_err, ms, rx or done.rx, done.requests)
        return err

    def _use(
        self, sock: socket.socket, target: Target, done: _Done
    ) -> tuple[socket.socket | _TlsSocket, int, int]:
        """TLS, then HTTP or the plain exchange. Returns (socket, io_errno, bytes read):
        the socket is the TLS one once wrapped."""
        plan = self.plan
        used: socket.socket | _TlsSocket = sock
        if plan.tls is not None:
            used, code = _handshake(sock, plan.tls, target, plan.io_timeout)
            done.tls_ns = time.monotonic_ns()
            if code:
                return used, code, 0
        if plan.http is not None:
            return used, _http(used, plan.http, target.index, plan, done), 0
        io_err, rx = _exchange(used, plan)
        return used, io_err, rx

    def _attempt_udp(self, target: Target) -> int:
        """A connected UDP socket: connect() picks the source port (EAGAIN when none is
        free), one datagram out, optionally one back, then close frees the port at once."""
        plan = self.plan
        monotonic_ns = time.monotonic_ns
        t0 = t1 = monotonic_ns()
        err, io_err, rx, port, address_id = INTERRUPTED, 0, 0, 0, 0
        sock: socket.socket | None = None
        try:
            sock = make_socket(target, _RealSocket, socket.SOCK_DGRAM)
            err = sock.connect_ex(target.endpoint.sockaddr)
            t1 = monotonic_ns()
            if err == 0:
                local = sock.getsockname()
                port, address_id = local[1], self.writer.address_id(local[0])
                sock.send(plan.send or UDP_PAYLOAD)
                if plan.reply is Reply.DATA:
                    rx = len(_recv(sock, plan.io_timeout))
                if plan.hold:
                    gevent.sleep(plan.hold)
        except OSError as exc:  # ECONNREFUSED: an ICMP port unreachable came back
            err, io_err = columns(exc, connected=err == 0)
            if err:  # connect() did not answer: no socket, or no bind
                t1 = monotonic_ns()
        finally:
            if sock is not None:
                sock.close()
            t2 = monotonic_ns()
            self.writer.add((t0, t1, t2, address_id, port, target.index, err, io_err, 0, 0, 0, 0))
            self._on_result(target, err, io_err, (t1 - t0) / 1e6, rx, 0)
        return err

    def _settle(self, sock: socket.socket | None) -> tuple[int, int, int]:
        """Interrupted mid-attempt: did the handshake finish anyway? (errno, port, address)"""
        if sock is None:
            return INTERRUPTED, 0, 0
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                sock.getpeername()  # raises ENOTCONN while the handshake is pending
                local = sock.getsockname()
                return 0, local[1], self.writer.address_id(local[0])
        except OSError:
            pass
        return INTERRUPTED, 0, 0


class _Done:
    """What an HTTP/TLS connection got done before it ended: the records' last fields."""

    __slots__ = ("requests", "rx", "status", "tls_ns")

    def __init__(self) -> None:
        self.tls_ns = self.requests = self.status = self.rx = 0

    def fields(self) -> tuple[int, int, int, int]:
        return (self.tls_ns, self.requests, self.status, self.rx)

    def take(self, response: Response | HeadResponses) -> None:
        self.requests, self.status, self.rx = response.done, response.status, response.rx


class _TlsSocket:
    """TLS over the real socket through memory BIOs, waiting on gevent's hub.

    ``SSLContext.wrap_socket`` cannot serve here: gevent replaces ``ssl.SSLSocket``
    and ``ssl.SSLContext``, and the original classes then fail (their ``super()``
    calls name the patched ones). A memory BIO's ``SSLObject`` is the same either way.
    ``send`` and ``recv`` wait (up to ``timeout``) like blocking calls, so the plain
    exchange code reads the same.
    """

    __slots__ = ("_in", "_obj", "_out", "_timeout", "sock")

    def __init__(
        self, sock: socket.socket, context: ssl.SSLContext, name: str | None, timeout: float
    ) -> None:
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_hostname=name)
        self._timeout = timeout

    def handshake(self) -> None:
        self._call(self._obj.do_handshake)

    def send(self, data: bytes | memoryview) -> int:
        written: int = self._call(lambda: self._obj.write(data))
        return written

    def recv(self, size: int) -> bytes:
        try:
            data: bytes = self._call(lambda: self._obj.read(size))
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return b""  # the server closed, with or without close_notify
        return data

    def _call(self, step: Callable[[], object]) -> Any:
        while True:
            try:
                result = step()
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
                continue
            self._flush()
            return result

    def _flush(self) -> None:
        pending = self._out.read()
        if pending:
            _send_all(self.sock, pending, self._timeout)

    def _fill(self) -> None:
        data = _recv(self.sock, self._timeout)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    def fileno(self) -> int:
        return self.sock.fileno()

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        self.sock.setsockopt(level, option, value)

    def close(self) -> None:
        self.sock.close()


def _handshake(
    sock: socket.socket, tls: TlsPlan, target: Target, timeout: float
) -> tuple[_TlsSocket, int]:
    """The TLS handshake on the connected socket. Returns (the TLS socket, io_errno)."""
    name = tls.server_names[target.index]
    wrapped = _TlsSocket(sock, tls.context, name, timeout)
    try:
        wrapped.handshake()
    except _Timeout:
        return wrapped, TIMED_OUT
    except OSError as exc:
        code = tls_errno(exc, name)
        return wrapped, code if code is not None else errno_of(exc)
    return wrapped, 0


def _http(
    sock: socket.socket | _TlsSocket, http: HttpPlan, endpoint: int, plan: ChurnPlan, done: _Done
) -> int:
    """The connection's requests, each response read whole; its io_errno."""
    response = response_reader(http)
    try:
        for number in range(1, http.per_connection + 1):
            _send_all(sock, http.request(endpoint, number), plan.io_timeout)
            while response.done < number and not response.failed:
                chunk = _recv(sock, plan.io_timeout)
                if not chunk:
                    response.eof()
                    if response.done < number:
                        done.take(response)
                        return response.failed or NO_REPLY
                    break
                response.feed(chunk)
            if response.failed:
                break
        if plan.close is ClosePolicy.SERVER and not response.failed:
            while chunk := _recv(sock, plan.io_timeout):  # the server's FIN first
                response.feed(chunk)
        if plan.hold:
            gevent.sleep(plan.hold)
    except _Timeout:
        done.take(response)
        return TIMED_OUT
    done.take(response)
    return response.failed


def _wait_connect(sock: socket.socket, timeout: float) -> int:
    try:
        sock.getpeername()  # loopback: the handshake finished inside connect()
        return 0
    except OSError:
        pass  # ENOTCONN: a real round trip; wait for it on the hub
    try:
        wait_write(sock.fileno(), timeout=timeout, timeout_exc=_TIMEOUT)
    except _Timeout:
        answer = connect_result(sock)  # done meanwhile, the hub too busy to wake us
        return TIMED_OUT if answer is None else answer
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _exchange(sock: socket.socket | _TlsSocket, plan: ChurnPlan) -> tuple[int, int]:
    """Send, wait for the reply, hold. Returns (io_errno, bytes received)."""
    rx = 0
    try:
        if plan.send:
            _send_all(sock, plan.send, plan.io_timeout)
        if plan.reply is Reply.DATA:
            rx = len(_recv(sock, plan.io_timeout))
            if rx == 0:  # the server closed before replying
                return NO_REPLY, 0
        elif plan.reply is Reply.EOF:
            while chunk := _recv(sock, plan.io_timeout):
                rx += len(chunk)
        if plan.hold:
            gevent.sleep(plan.hold)
    except _Timeout:
        return TIMED_OUT, rx
    return 0, rx


def _send_all(sock: socket.socket | _TlsSocket, data: bytes, timeout: float) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except (BlockingIOError, ssl.SSLWantWriteError):
            wait_write(sock.fileno(), timeout=timeout, timeout_exc=_TIMEOUT)
        except ssl.SSLWantReadError:  # TLS renegotiation or a key update
            wait_read(sock.fileno(), timeout=timeout, timeout_exc=_TIMEOUT)


def _recv(sock: socket.socket | _TlsSocket, timeout: float) -> bytes:
    while True:
        try:
            return sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            wait_read(sock.fileno(), timeout=timeout, timeout_exc=_TIMEOUT)
        except ssl.SSLWantWriteError:
            wait_write(sock.fileno(), timeout=timeout, timeout_exc=_TIMEOUT)


def _close(sock: socket.socket | _TlsSocket, policy: ClosePolicy) -> None:
    if policy is ClosePolicy.RESET:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()
