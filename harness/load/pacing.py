"""The connect-rate cap: one schedule of connection slots shared by every user.

Both engines are single-threaded inside a process (gevent greenlets, asyncio
tasks), so a plain object needs no lock: each caller reserves the next slot and
sleeps until it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Pacer"]


class Pacer:
    """Hands out start times ``1/rate`` apart; an idle spell earns no burst."""

    __slots__ = ("_clock", "_interval", "_next")

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be above 0, got {rate}")
        self._interval = 1.0 / rate
        self._clock = clock
        self._next = 0.0

    def delay(self) -> float:
        """Reserve the next slot; return how long to sleep until it (0 when due)."""
        now = self._clock()
        slot = self._next if self._next > now else now
        self._next = slot + self._interval
        return slot - now
