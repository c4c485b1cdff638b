"""The uvloop engine: churn through asyncio Protocols in a process of its own.

Locust stays the control plane: the Locust process starts this one, tells it
how many concurrent loops to run (its user count) on stdin, and reads its rows
back on stdout to feed Locust's statistics. Records go straight to this
process's part file. Never imports locust.

Plain connect/close churn takes the callback fast path (``harness.load.fastpath``).
Everything else (bytes to send, a reply to wait for, a hold, a server-first
close) runs one Task per user over Protocols: of the asyncio styles, uvloop
``create_connection`` + Protocol measured faster than ``loop.sock_connect``
(compare with ``make bench``).

Wire format: stdin carries JSON lines (``{"users": N}``, ``{"stop": true}``);
stdout carries one frame per flush: a ``<I`` row count and this process's CPU
over the interval (``harness.load.cpu_meter.CpuInterval``), then that many
``ROW_DTYPE`` rows; it ends with EOF after the last flush. The first frame, empty,
comes once the loop runs: the engine is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from harness.kernel.exit import run_and_exit
from harness.load.churn import LINGER_RESET, UDP_PAYLOAD, ChurnPlan, Target, make_socket
from harness.load.cpu_meter import CpuInterval, CpuMeter, cpu_part_path
from harness.load.fastpath import FRAME_HEADER, CallbackChurn, flush_frame, write_frame
from harness.load.http_client import tls_errno
from harness.load.httppath import HttpChurn
from harness.load.outcome import INTERRUPTED, NO_REPLY, TIMED_OUT, columns, errno_of
from harness.load.pacing import Pacer
from harness.records import FLUSH_INTERVAL, ROW_DTYPE, RecordWriter
from harness.scenario import ClosePolicy, Protocol, Reply, Scenario

__all__ = ["FRAME_HEADER", "Frame", "UvloopChurn", "read_frame", "read_frame_cpu"]


class _Client(asyncio.Protocol):
    """Notes when the connection is up, and wakes a waiter on data, EOF or an error."""

    __slots__ = ("connected_ns", "eof", "error", "rx", "transport", "waiter")

    def __init__(self) -> None:
        self.connected_ns = 0
        self.rx = 0
        self.eof = False
        self.error: Exception | None = None  # what ended the connection (a reset), if anything
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connected_ns = time.monotonic_ns()
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.rx += len(data)
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # keep our side open: the close policy decides

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, until_eof: bool) -> None:
        loop = asyncio.get_running_loop()
        while not self.eof and (until_eof or self.rx == 0):
            self.waiter = loop.create_future()
            await self.waiter


class UvloopChurn:
    """N concurrent attempt loops, resized on request, recording every attempt."""

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
        self._target_users = 0
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._targets = plan.cycle()

    def set_users(self, count: int) -> None:
        self._target_users = max(0, count)
        for index in range(count):
            if index not in self._workers:
                task = asyncio.get_running_loop().create_task(self._work(index))
                self._workers[index] = task
                task.add_done_callback(functools.partial(self._forget, index))

    def _forget(self, index: int, _task: asyncio.Task[None]) -> None:
        self._workers.pop(index, None)

    async def stop(self) -> None:
        """Let every loop finish its attempt (bounded), then cancel what is left."""
        self._target_users = 0
        plan = self.plan
        limit = plan.connect_timeout + plan.io_timeout + plan.hold + 1.0
        tasks = list(self._workers.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=limit)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _work(self, index: int) -> None:
        pacer, backoff = self._pacer, self.plan.backoff
        while index < self._target_users:
            if pacer is not None:
                delay = pacer.delay()
                if delay > 0:
                    await asyncio.sleep(delay)
            if await self.attempt(next(self._targets)) and backoff:
                await asyncio.sleep(backoff)

    async def attempt(self, target: Target) -> int:
        """One connection; returns connect()'s errno (0 = connected)."""
        if self.plan.protocol is Protocol.UDP:
            return await self._attempt_udp(target)
        plan = self.plan
        loop = asyncio.get_running_loop()
        t0 = time.monotonic_ns()
        t1 = t0
        err = INTERRUPTED  # until connect() answers: what a stop mid-connect records
        io_err = port = address_id = tls_ns = 0
        client: _Client | None = None
        sock: socket.socket | None = None  # TLS: the connected socket, until the handshake
        try:
            try:
                async with asyncio.timeout(plan.connect_timeout):
                    if plan.tls is None:
                        client = await self._connect(loop, target)
                    else:
                        sock = await self._connect_tcp(loop, target)
                err = 0
                t1 = client.connected_ns if client is not None else time.monotonic_ns()
                local = (
                    client.transport.get_extra_info("sockname")  # type: ignore[union-attr]
                    if client is not None
                    else sock.getsockname()  # type: ignore[union-attr]
                )
                port = local[1]
                address_id = self.writer.address_id(local[0])
            except OSError as exc:  # TimeoutError included: ETIMEDOUT
                err = errno_of(exc)
            if t1 == t0:
                t1 = time.monotonic_ns()
            if sock is not None and err == 0:
                client, io_err = await self._handshake(loop, target, sock)
                tls_ns = time.monotonic_ns() if client is not None else 0
                sock = None  # the transport's now, or closed
            if client is not None and io_err == 0:
                io_err = await self._exchange(client)
        finally:
            # runs on cancellation too: the attempt is recorded either way
            if sock is not None:
                sock.close()
            if client is not None and client.transport is not None:
                _close(client.transport, plan.close if io_err == 0 else ClosePolicy.CLIENT)
            t2 = time.monotonic_ns()
            self.writer.add(
                (t0, t1, t2, address_id, port, target.index, err, io_err, tls_ns, 0, 0, 0)
            )
        return err

    async def _connect_tcp(self, loop: asyncio.AbstractEventLoop, target: Target) -> socket.socket:
        """A connected socket, before TLS: connect()'s own time apart from the handshake's."""
        sock = make_socket(target)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, target.endpoint.sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _handshake(
        self, loop: asyncio.AbstractEventLoop, target: Target, sock: socket.socket
    ) -> tuple[_Client | None, int]:
        """TLS over a connected socket, within io_timeout: the client, or its io_errno."""
        tls = self.plan.tls
        assert tls is not None
        name = tls.server_names[target.index]
        try:
            async with asyncio.timeout(self.plan.io_timeout):
                _, client = await loop.create_connection(
                    _Client, sock=sock, ssl=tls.context, server_hostname=name or ""
                )
        except OSError as exc:  # ssl.SSLError, a reset, TimeoutError
            sock.close()
            code = tls_errno(exc, name)
            return None, code if code is not None else errno_of(exc)
        return client, 0

    async def _attempt_udp(self, target: Target) -> int:
        """A connected UDP socket: connect() picks the port (EAGAIN when none is free),
        a datagram out, optionally one back, hold, close (the port is free at once)."""
        plan = self.plan
        t0 = t1 = time.monotonic_ns()
        err, io_err, port, address_id = INTERRUPTED, 0, 0, 0
        sock: socket.socket | None = None
        try:
            try:
                sock = make_socket(target, kind=socket.SOCK_DGRAM)
                err = sock.connect_ex(target.endpoint.sockaddr)
                t1 = time.monotonic_ns()
                if err == 0:
                    local = sock.getsockname()
                    port, address_id = local[1], self.writer.address_id(local[0])
                    sock.send(plan.send or UDP_PAYLOAD)
                    if plan.reply is Reply.DATA:
                        async with asyncio.timeout(plan.io_timeout):
                            await asyncio.get_running_loop().sock_recv(sock, 65536)
                    if plan.hold:
                        await asyncio.sleep(plan.hold)
            except OSError as exc:  # ECONNREFUSED: an ICMP port unreachable came back
                err, io_err = columns(exc, connected=err == 0)
                if err:  # connect() did not answer: no socket, or no bind
                    t1 = time.monotonic_ns()
        finally:
            if sock is not None:
                sock.close()
            t2 = time.monotonic_ns()
            self.writer.add((t0, t1, t2, address_id, port, target.index, err, io_err, 0, 0, 0, 0))
        return err

    async def _connect(self, loop: asyncio.AbstractEventLoop, target: Target) -> _Client:
        endpoint = target.endpoint
        if not target.needs_socket_setup:
            _, client = await loop.create_connection(_Client, endpoint.address, endpoint.port)
            return client
        sock = await self._connect_tcp(loop, target)
        _, client = await loop.create_connection(_Client, sock=sock)
        return client

    async def _exchange(self, client: _Client) -> int:
        plan = self.plan
        try:
            async with asyncio.timeout(plan.io_timeout):
                if plan.send:
                    client.transport.write(plan.send)  # type: ignore[union-attr]
                if plan.reply is not Reply.NONE:
                    await client.wait(until_eof=plan.reply is Reply.EOF)
                    # a reset before the reply (or the EOF) waited for: as recv() raises it
                    if client.error is not None and (plan.reply is Reply.EOF or not client.rx):
                        return errno_of(client.error)
                    if plan.reply is Reply.DATA and client.rx == 0:
                        return NO_REPLY
            if plan.hold:
                await asyncio.sleep(plan.hold)
        except TimeoutError:
            return TIMED_OUT
        return 0

    def flush(self) -> None:
        flush_frame(self.writer, self.meter, self._out)


def _close(transport: asyncio.Transport, policy: ClosePolicy) -> None:
    if policy is ClosePolicy.RESET:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        transport.abort()
    else:
        transport.close()


class Frame(NamedTuple):
    """One flush of the engine child: its rows, and its CPU over the interval."""

    rows: np.ndarray
    cpu: CpuInterval


def read_frame_cpu(stream: BinaryIO) -> Frame | None:
    """Read one frame; ``None`` at EOF."""
    header = stream.read(FRAME_HEADER.size)
    if len(header) < FRAME_HEADER.size:
        return None
    count, *cpu = FRAME_HEADER.unpack(header)
    payload = stream.read(count * ROW_DTYPE.itemsize)
    if len(payload) < count * ROW_DTYPE.itemsize:
        return None
    return Frame(np.frombuffer(payload, dtype=ROW_DTYPE), CpuInterval(*cpu))


def read_frame(stream: BinaryIO) -> np.ndarray | None:
    """Read one frame's rows; ``None`` at EOF."""
    frame = read_frame_cpu(stream)
    return frame.rows if frame is not None else None


async def _serve(churn: UvloopChurn | CallbackChurn | HttpChurn) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    # ready: an empty frame tells the Locust process this engine can connect now. Under
    # load its start (imports, the loop) took seconds, and a run timed from its spawn
    # had none of its connections (``harness.load.users``)
    write_frame(sys.stdout.buffer, np.zeros(0, dtype=ROW_DTYPE))
    stopping = asyncio.Event()

    async def flusher() -> None:
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), FLUSH_INTERVAL)
            except TimeoutError:
                churn.flush()

    flush_task = loop.create_task(flusher())
    while True:
        line = await reader.readline()
        if not line:  # the Locust process went away: stop too
            break
        command = json.loads(line)
        if command.get("stop"):
            break
        if "users" in command:
            churn.set_users(int(command["users"]))
    await churn.stop()
    stopping.set()
    await flush_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", type=Path, required=True, help="resolved scenario JSON")
    parser.add_argument("--part", type=Path, required=True, help="records part file to write")
    parser.add_argument("--rate-share", type=float, default=1.0)
    args = parser.parse_args(argv)
    scenario = Scenario.model_validate(json.loads(args.scenario.read_text()))
    plan = ChurnPlan.from_scenario(scenario, rate_share=args.rate_share)
    writer = RecordWriter(
        args.part,
        endpoints=plan.endpoints,
        close=plan.close_label,
        engine="uvloop",
        pid=os.getpid(),
    )
    meter = CpuMeter(cpu_part_path(args.part.parent, f"uvloop-{os.getpid()}"), engine="uvloop")
    engine: type[UvloopChurn | CallbackChurn | HttpChurn] = UvloopChurn
    if HttpChurn.applies(plan):
        engine = HttpChurn
    elif CallbackChurn.applies(plan):
        engine = CallbackChurn
    churn = engine(plan, writer, sys.stdout.buffer, meter)
    # Ctrl-C reaches the whole process group; this process stops when its Locust
    # process says so (stdin), after finishing and recording its attempts.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    import uvloop

    try:
        uvloop.run(_serve(churn))
    finally:
        rows = writer.close()
        write_frame(sys.stdout.buffer, rows, meter.close(rows))
        sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    run_and_exit(main)
