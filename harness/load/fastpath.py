"""The uvloop engine's fast path: plain connect/close churn driven by callbacks.

When a scenario only opens and closes connections (no bytes sent, no reply
awaited, no hold; the client closes or resets), each user is a chain of
callbacks on the uvloop loop instead of an asyncio Task awaiting a Protocol.
Of the styles measured on loopback, from slowest to fastest: ``create_connection``
+ Protocol with two ``asyncio.timeout`` blocks; a non-blocking socket watched with
``loop.add_writer`` per connection (uvloop builds and tears down a poll handle
for every fd); the same with ``select.epoll`` by hand; and the same first asking
``getpeername()`` after EINPROGRESS, which keeps pace with a blocking Python
loop. ``make bench`` compares the engine with a C loop (``eph_uvloop_vs_c_loop``).

On loopback the kernel finishes the handshake inside connect(), so the
``getpeername()`` check finds most connections already up and they complete
without touching the poller. Over a real round trip it fails with ENOTCONN and
the socket waits for writability like any non-blocking connect; a sweeper
closes those older than ``connect_timeout`` (ETIMEDOUT), so no timer is made
per connection.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import time
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from harness.load.churn import LINGER_RESET, ChurnPlan, Target, make_socket
from harness.load.cpu_meter import CpuInterval, CpuMeter
from harness.load.outcome import INTERRUPTED, TIMED_OUT, connect_result, errno_of
from harness.load.pacing import Pacer
from harness.records import RecordWriter
from harness.scenario import ClosePolicy, Protocol, Reply

__all__ = ["FRAME_HEADER", "CallbackChurn", "CallbackUsers", "flush_frame", "write_frame"]

_INLINE = 64  # attempts one user makes in a row before letting the loop run others
_SWEEP_EVERY = 0.05  # seconds between timeout sweeps over connects in flight

_InFlight = tuple[socket.socket, Target, int, int]  # socket, target, start ns, user slot

# the uvloop child's stdout: frames of a ``<I`` row count and the child's CPU over the
# interval (a ``CpuInterval``'s six fields), then that many ROW_DTYPE rows
FRAME_HEADER = struct.Struct("<I6q")
_NO_CPU = CpuInterval(0, 0, 0, 0, 0, 0)


def write_frame(out: BinaryIO, rows: np.ndarray, cpu: CpuInterval | None = None) -> None:
    out.write(FRAME_HEADER.pack(len(rows), *(cpu or _NO_CPU)) + rows.tobytes())
    out.flush()


def flush_frame(writer: RecordWriter, meter: CpuMeter | None, out: BinaryIO) -> None:
    """One interval: the staged rows to the part file and the Locust process, with the
    CPU this process spent meanwhile (``harness.load.cpu_meter``)."""
    rows = writer.flush()
    write_frame(out, rows, meter.tick(rows) if meter is not None else None)


class CallbackUsers:
    """N users, each a chain of callbacks on the loop: what both callback paths share.

    A subclass's ``_start(slot)`` makes one attempt and returns its errno when it
    ended at once, or ``None`` while it waits (its callback then calls ``_next``).
    """

    def __init__(
        self,
        plan: ChurnPlan,
        writer: RecordWriter,
        out: BinaryIO,
        meter: CpuMeter | None = None,
    ) -> None:
        self.plan = plan
        self.writer = writer
        self.meter = meter
        self._out = out
        self._pacer = Pacer(plan.rate) if plan.rate > 0 else None
        self._targets: Iterator[Target] = plan.cycle()
        self._users = 0
        self._active: set[int] = set()  # user slots with an attempt or a wait pending
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def set_users(self, count: int) -> None:
        loop = self._loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._started(loop)
        self._users = max(0, count)
        for slot in range(self._users):
            if slot not in self._active:
                self._active.add(slot)
                loop.call_soon(self._next, slot)

    def _started(self, loop: asyncio.AbstractEventLoop) -> None:
        """The first users: start the sweeper (``self._sweep`` every _SWEEP_EVERY)."""
        self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)

    def _sweep(self) -> None:
        raise NotImplementedError

    def _start(self, slot: int) -> int | None:
        raise NotImplementedError

    def flush(self) -> None:
        flush_frame(self.writer, self.meter, self._out)

    def _next(self, slot: int, paced: bool = False) -> None:
        """Attempt after attempt for one user until one must wait (connect, pace, backoff)."""
        loop = self._loop
        assert loop is not None
        for _ in range(_INLINE):
            if slot >= self._users:
                self._active.discard(slot)
                return
            if self._pacer is not None and not paced:
                delay = self._pacer.delay()
                if delay > 0:
                    loop.call_later(delay, self._next, slot, True)
                    return
            paced = False
            err = self._start(slot)
            if err is None:
                return  # in flight: a callback or the sweeper carries on
            if err and self.plan.backoff:
                loop.call_later(self.plan.backoff, self._next, slot)
                return
        loop.call_soon(self._next, slot)


class CallbackChurn(CallbackUsers):
    """N users, each a chain of non-blocking connect/close attempts, every one recorded."""

    def __init__(
        self,
        plan: ChurnPlan,
        writer: RecordWriter,
        out: BinaryIO,
        meter: CpuMeter | None = None,
    ) -> None:
        super().__init__(plan, writer, out, meter)
        self._linger = plan.close is ClosePolicy.RESET
        self._timeout_ns = int(plan.connect_timeout * 1e9)
        self._inflight: dict[int, _InFlight] = {}  # fd -> connect in progress

    @staticmethod
    def applies(plan: ChurnPlan) -> bool:
        """Whether the scenario is plain churn this path serves (else the Protocol path)."""
        return (
            plan.protocol is Protocol.TCP
            and plan.http is None
            and plan.tls is None
            and not plan.send
            and plan.reply is Reply.NONE
            and not plan.hold
            and plan.close in (ClosePolicy.CLIENT, ClosePolicy.RESET)
        )

    async def stop(self) -> None:
        """No new attempts; wait (bounded) for connects in flight, then record the rest."""
        self._users = 0
        deadline = time.monotonic() + self.plan.connect_timeout + 1.0
        while (self._active or self._inflight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for fd in list(self._inflight):
            self._finish_inflight(fd, INTERRUPTED, resume=False)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _start(self, slot: int) -> int | None:
        """One attempt; its errno when it ended at once, ``None`` while it connects."""
        target = next(self._targets)
        t0 = time.monotonic_ns()
        try:
            if target.needs_socket_setup:
                sock = make_socket(target)
            else:
                sock = socket.socket(target.endpoint.family, socket.SOCK_STREAM)
                sock.setblocking(False)
            if self._linger:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except OSError as exc:  # no socket (EMFILE), or the source address cannot bind
            code = errno_of(exc)
            t1 = time.monotonic_ns()
            self.writer.add((t0, t1, t1, 0, 0, target.index, code, 0, 0, 0, 0, 0))
            return code
        err = sock.connect_ex(target.endpoint.sockaddr)
        if err == errno.EINPROGRESS:
            try:
                sock.getpeername()  # loopback: the handshake finished inside connect()
                err = 0
            except OSError:
                fd = sock.fileno()
                self._inflight[fd] = (sock, target, t0, slot)
                assert self._loop is not None
                self._loop.add_writer(fd, self._on_writable, fd)
                return None
        return self._finish(sock, target, t0, err)

    def _on_writable(self, fd: int) -> None:
        entry = self._inflight.get(fd)
        if entry is not None:
            err = entry[0].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._finish_inflight(fd, err, resume=True)

    def _finish_inflight(self, fd: int, err: int, *, resume: bool) -> None:
        sock, target, t0, slot = self._inflight.pop(fd)
        assert self._loop is not None
        self._loop.remove_writer(fd)
        err = self._finish(sock, target, t0, err)
        if not resume:
            self._active.discard(slot)
        elif err and self.plan.backoff:
            self._loop.call_later(self.plan.backoff, self._next, slot)
        else:
            self._next(slot)

    def _finish(self, sock: socket.socket, target: Target, t0: int, err: int) -> int:
        t1 = time.monotonic_ns()
        port = address_id = 0
        if err == 0:
            try:
                local = sock.getsockname()
                port, address_id = local[1], self.writer.address_id(local[0])
            except OSError:  # reset before we looked: still a connection that was made
                pass
        sock.close()  # with SO_LINGER 0 set: a reset
        self.writer.add(
            (t0, t1, time.monotonic_ns(), address_id, port, target.index, err, 0, 0, 0, 0, 0)
        )
        return err

    def _sweep(self) -> None:
        """Connects older than connect_timeout end as ETIMEDOUT."""
        loop = self._loop
        assert loop is not None
        now = time.monotonic_ns()
        for fd, entry in list(self._inflight.items()):
            # identity, not the fd: a finished connect's fd may already serve a new one
            if now - entry[2] >= self._timeout_ns and self._inflight.get(fd) is entry:
                answer = connect_result(entry[0])  # done meanwhile, the loop too busy to see
                self._finish_inflight(fd, TIMED_OUT if answer is None else answer, resume=True)
        self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)
