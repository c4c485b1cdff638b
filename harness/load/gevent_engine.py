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
import time
from collections.abc import Callable

import gevent
from gevent import monkey
from gevent.socket import wait_read, wait_write

from harness.load.churn import LINGER_RESET, UDP_PAYLOAD, ChurnPlan, Target, make_socket
from harness.load.outcome import INTERRUPTED, NO_REPLY, TIMED_OUT, columns
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
        on_result: Callable[[Target, int, int, float, int], None],
    ) -> None:
        self.plan = plan
        self.writer = writer
        self._on_result = on_result  # (target, errno, io_errno, connect_ms, rx_bytes)

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
        sock: socket.socket | None = None
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
                io_err, rx = _exchange(sock, plan)
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
                err, port, address_id = self._settle(sock)
            if sock is not None:
                _close(sock, plan.close if err == 0 and io_err == 0 else ClosePolicy.CLIENT)
            t2 = monotonic_ns()
            self.writer.add((t0, t1, t2, address_id, port, target.index, err, io_err))
            self._on_result(target, err, io_err, (t1 - t0) / 1e6, rx)
        return err

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
            self.writer.add((t0, t1, t2, address_id, port, target.index, err, io_err))
            self._on_result(target, err, io_err, (t1 - t0) / 1e6, rx)
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


def _wait_connect(sock: socket.socket, timeout: float) -> int:
    try:
        wait_write(sock.fileno(), timeout=timeout, timeout_exc=_TIMEOUT)
    except _Timeout:
        return TIMED_OUT
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _exchange(sock: socket.socket, plan: ChurnPlan) -> tuple[int, int]:
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


def _send_all(sock: socket.socket, data: bytes, timeout: float) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            wait_write(sock.fileno(), timeout=timeout, timeout_exc=_TIMEOUT)


def _recv(sock: socket.socket, timeout: float) -> bytes:
    while True:
        try:
            return sock.recv(65536)
        except BlockingIOError:
            wait_read(sock.fileno(), timeout=timeout, timeout_exc=_TIMEOUT)


def _close(sock: socket.socket, policy: ClosePolicy) -> None:
    if policy is ClosePolicy.RESET:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()
