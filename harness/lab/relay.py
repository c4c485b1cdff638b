"""A userspace link between two namespaces: delay, jitter and loss without netem.

``eph lab``'s pair topology normally joins its namespaces with a veth pair and
puts netem on it. Kernels built without netem (CONFIG_NET_SCH_NETEM; this
project's CI machines are such) get this instead: a TUN device in each namespace
and one process that reads each IP packet from one side, holds it for half the
round trip (plus jitter), drops it with the loss probability, and writes it to
the other side. The kernels at both ends see an ordinary point-to-point link,
so their TCP behaviour (SYN retransmits, TIME_WAIT, connect latency) is real.

Semantics, per direction, matching ``tc qdisc add ... netem delay D/2 J/2 loss L``
on each end: a packet is delayed by ``delay/2`` plus a uniform draw in
``±jitter/2``, and lost with probability ``loss`` percent. Unlike netem with
jitter, packets of one direction leave in the order they came (a later packet
never overtakes an earlier one), which keeps TCP free of spurious reordering.

It reads up to a burst of packets from one side before looking at the other
side and the clock, so that a busy direction cannot starve the other.

The process stops by itself at ``--max-seconds``, on SIGTERM/SIGINT, or when its
parent dies (the supervisor that starts it asks for PR_SET_PDEATHSIG, and so does
the relay itself), and writes what it forwarded to ``--stats``.

``python -m harness.lab.relay CLIENT_NS SERVER_NS --device eph0 --delay 0.02 ...``
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.kernel.exit import run_and_exit
from harness.kernel.parent_death import die_with_parent

__all__ = ["Impairment", "RelayStats", "open_tun", "relay"]

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_MAX_PACKET = 65535
_WAKE_UP = 0.1  # seconds: the longest a stop request waits
_BURST = 64  # packets read from one side before looking at the other and the clock


@dataclass(frozen=True)
class Impairment:
    """What the link does to each packet, per direction (seconds, percent)."""

    one_way: float = 0.0
    jitter: float = 0.0  # a uniform draw in ±jitter is added to one_way
    loss: float = 0.0

    @classmethod
    def from_round_trip(cls, delay: float, jitter: float, loss: float) -> Impairment:
        return cls(one_way=delay / 2, jitter=jitter / 2, loss=loss)


@dataclass
class RelayStats:
    forwarded: int = 0
    dropped: int = 0  # by the loss probability
    write_errors: int = 0
    max_queued: int = 0
    seconds: float = 0.0


def open_tun(namespace: str, device: str) -> int:
    """Attach to the TUN ``device`` of network namespace ``namespace`` (ip netns name).

    The calling process moves into that namespace (setns) to find the device; the
    returned descriptor keeps working wherever the process goes next.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    ns_fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(ns_fd, _CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns into {namespace}: {os.strerror(code)}")
    finally:
        os.close(ns_fd)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    ifreq = struct.pack("16sH22x", device.encode(), _IFF_TUN | _IFF_NO_PI)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, ifreq)
    except OSError:
        os.close(fd)
        raise
    return fd


def relay(
    a: int,
    b: int,
    impairment: Impairment,
    *,
    max_seconds: float,
    rng: random.Random | None = None,
    stop: list[bool] | None = None,
) -> RelayStats:
    """Move packets between descriptors ``a`` and ``b`` until ``max_seconds`` or ``stop[0]``."""
    link = _Link(a, b, impairment, rng or random.Random())
    stop = stop if stop is not None else [False]
    started = time.monotonic()
    deadline = started + max_seconds
    poller = select.epoll()
    poller.register(a, select.EPOLLIN)
    poller.register(b, select.EPOLLIN)
    try:
        while not stop[0]:
            now = time.monotonic()
            if now >= deadline:
                break
            wait = link.next_due(deadline) - now
            # PEP 475 resumes an interrupted poll, so a stop is seen at the next wake-up
            for fd, _ in poller.poll(min(max(wait, 0.0), deadline - now, _WAKE_UP)):
                link.take(fd)
            link.deliver(time.monotonic())
    finally:
        poller.close()
        link.stats.seconds = round(time.monotonic() - started, 3)
    return link.stats


class _Link:
    """Both directions: packets wait in one queue by due time, each direction in order."""

    def __init__(self, a: int, b: int, impairment: Impairment, rng: random.Random) -> None:
        self.stats = RelayStats()
        self._impairment = impairment
        self._loss = impairment.loss / 100
        self._rng = rng
        self._other = {a: b, b: a}
        self._last_due = {a: 0.0, b: 0.0}  # per output: keeps each direction in order
        self._queue: list[tuple[float, int, int, bytes]] = []  # (due, seq, out fd, packet)
        self._seq = 0

    def next_due(self, default: float) -> float:
        return self._queue[0][0] if self._queue else default

    def take(self, fd: int) -> None:
        """Read up to a burst of packets from ``fd``; lose each with the loss probability
        or queue it for the other side."""
        out = self._other[fd]
        for _ in range(_BURST):
            try:
                packet = os.read(fd, _MAX_PACKET)
            except BlockingIOError:
                break
            if self._loss and self._rng.random() < self._loss:
                self.stats.dropped += 1
                continue
            self._queue_for(out, packet)
        self.stats.max_queued = max(self.stats.max_queued, len(self._queue))

    def _queue_for(self, out: int, packet: bytes) -> None:
        impairment = self._impairment
        due = time.monotonic() + impairment.one_way
        if impairment.jitter:
            due += self._rng.uniform(-impairment.jitter, impairment.jitter)
        due = self._last_due[out] = max(due, self._last_due[out])
        self._seq += 1
        heapq.heappush(self._queue, (due, self._seq, out, packet))

    def deliver(self, now: float) -> None:
        """Write out every packet due by ``now``."""
        while self._queue and self._queue[0][0] <= now:
            _, _, out, packet = heapq.heappop(self._queue)
            try:
                os.write(out, packet)
                self.stats.forwarded += 1
            except OSError:
                self.stats.write_errors += 1  # the device went down: like a wire cut


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.lab.relay", description=__doc__)
    parser.add_argument("client_ns")
    parser.add_argument("server_ns")
    parser.add_argument("--device", default="eph0")
    parser.add_argument("--delay", type=float, default=0.0, help="round trip, seconds")
    parser.add_argument("--jitter", type=float, default=0.0, help="round trip, seconds")
    parser.add_argument("--loss", type=float, default=0.0, help="percent, each way")
    parser.add_argument("--max-seconds", type=float, required=True)
    parser.add_argument("--stats", type=Path)
    args = parser.parse_args(argv)
    stop = [False]

    def _stop(*_: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    die_with_parent(signal.SIGTERM)
    try:
        a = open_tun(args.client_ns, args.device)
        b = open_tun(args.server_ns, args.device)
    except OSError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2 if exc.errno in (errno.EPERM, errno.ENOENT) else 1
    print("ready", flush=True)
    impairment = Impairment.from_round_trip(args.delay, args.jitter, args.loss)
    stats = relay(a, b, impairment, max_seconds=args.max_seconds, stop=stop)
    if args.stats:
        args.stats.write_text(json.dumps({**asdict(impairment), **asdict(stats)}, indent=2))
    return 0


if __name__ == "__main__":
    run_and_exit(main)
