"""The lab's userspace link, on socket pairs: what it does to each packet."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time

from harness.lab.relay import Impairment, RelayStats, relay


class _Wire:
    """Two datagram socket pairs with the relay between them: ``left`` <-> ``right``."""

    def __init__(self, impairment: Impairment, max_seconds: float = 5.0) -> None:
        self.left, inner_left = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.right, inner_right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for outer in (self.left, self.right):
            outer.settimeout(2)  # a stuck relay fails the test instead of hanging it
        for inner in (inner_left, inner_right):
            inner.setblocking(False)
        self._inner = (inner_left, inner_right)
        self.stop = [False]
        self.stats = RelayStats()

        def run() -> None:
            self.stats = relay(
                inner_left.fileno(),
                inner_right.fileno(),
                impairment,
                max_seconds=max_seconds,
                rng=random.Random(7),
                stop=self.stop,
            )

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def close(self) -> RelayStats:
        self.stop[0] = True
        self._thread.join(timeout=2)
        assert not self._thread.is_alive(), "the relay did not stop when asked"
        for sock in (self.left, self.right, *self._inner):
            sock.close()
        return self.stats


def test_each_packet_waits_the_one_way_delay_and_arrives_whole() -> None:
    wire = _Wire(Impairment(one_way=0.05))
    try:
        sent = time.monotonic()
        wire.left.send(b"syn")
        assert wire.right.recv(100) == b"syn"
        elapsed = time.monotonic() - sent
        wire.right.send(b"syn-ack")
        assert wire.left.recv(100) == b"syn-ack"
        round_trip = time.monotonic() - sent
    finally:
        stats = wire.close()
    assert 0.05 <= elapsed < 0.08
    assert 0.10 <= round_trip < 0.16
    assert stats.forwarded == 2 and stats.dropped == 0


def test_jitter_spreads_arrivals_but_keeps_each_direction_in_order() -> None:
    wire = _Wire(Impairment(one_way=0.02, jitter=0.015))
    try:
        for n in range(200):
            wire.left.send(n.to_bytes(2, "big"))
        got = [int.from_bytes(wire.right.recv(10), "big") for _ in range(200)]
    finally:
        wire.close()
    assert got == list(range(200))


def test_loss_drops_about_its_share() -> None:
    wire = _Wire(Impairment(loss=30.0))
    wire.right.settimeout(0.05)
    received = 0
    try:
        for _ in range(20):
            for _ in range(100):
                wire.left.send(b"x")
            with contextlib.suppress(TimeoutError):
                while True:
                    wire.right.recv(10)
                    received += 1
    finally:
        stats = wire.close()
    assert stats.forwarded == received and stats.write_errors == 0
    assert stats.forwarded + stats.dropped == 2000
    assert 0.26 <= stats.dropped / 2000 <= 0.34, stats


def test_it_stops_by_itself_at_its_time_limit() -> None:
    wire = _Wire(Impairment(), max_seconds=0.2)
    wire._thread.join(timeout=2)
    assert not wire._thread.is_alive()
    assert 0.2 <= wire.close().seconds < 0.5
