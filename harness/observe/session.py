"""``eph observe``: sample every path of this host's network namespace, with no load of its own.

Read-only: it dumps sockets with sock_diag and reads /proc, nothing else (on a
NAT router, conntrack too: :mod:`harness.observe.nat_pools`). Each
interval it takes one :class:`~harness.observe.paths.PathSnapshot`, judges it
with the capacity model (:mod:`harness.observe.outlook`), hands both to the
views (terminal, plain lines, Prometheus) and, with ``--out``, writes them
(:mod:`harness.observe.store`). It stops at ``duration``, on SIGINT or SIGTERM,
and always keeps what it saw.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from harness.capacity.port_model import reserved_spans
from harness.files import atomic_write_json
from harness.kernel.counters import read_counters
from harness.kernel.listening import read_conntrack
from harness.kernel.namespaces import NamespaceThread
from harness.kernel.sysctls import read_kernel
from harness.observe.nat_pools import NatSampler, NatSnapshot
from harness.observe.outlook import Outlook, outlook
from harness.observe.owners import OwnerIndex
from harness.observe.paths import NamespaceCounters, PathSampler, PathSnapshot
from harness.observe.store import ObserveStore, Retention, host_batch, paths_batch
from harness.observe.trace import start_trace
from harness.supervisor import Supervisor

__all__ = ["HostView", "NamespaceView", "Observation", "ObserveView", "Settings"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """The namespace's settings that decide how paths fill, read once at start."""

    port_range: tuple[int, int]
    reserved: str
    tw_reuse: int
    timestamps: int
    reuse_delay_ms: int | None
    conntrack_max: int | None
    netns: str | None = None

    @classmethod
    def read(cls) -> Settings:
        kernel = read_kernel()
        low, high = kernel.get("ip_local_port_range", [32768, 60999])
        return cls(
            port_range=(int(low), int(high)),
            reserved=str(kernel.get("ip_local_reserved_ports") or ""),
            tw_reuse=int(kernel.get("tcp_tw_reuse", 2)),
            timestamps=int(kernel.get("tcp_timestamps", 1)),
            reuse_delay_ms=kernel.get("tcp_tw_reuse_delay_ms"),
            conntrack_max=(read_conntrack() or {}).get("max"),
            netns=kernel.get("netns"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "netns": self.netns,
            "port_range": list(self.port_range),
            "reserved": self.reserved,
            "tcp_tw_reuse": self.tw_reuse,
            "tcp_timestamps": self.timestamps,
            "tcp_tw_reuse_delay_ms": self.reuse_delay_ms,
            "conntrack_max": self.conntrack_max,
        }


@dataclass(frozen=True)
class HostView:
    """One sample's host line: the settings and the counters' change since the last."""

    settings: Settings
    counters: dict[str, int | None]
    rates: dict[str, float]  # per second, for the cumulative counters
    sample_ms: float
    nat: NatSnapshot | None = None  # on a NAT router: its pools (harness.observe.nat_pools)
    # with every namespace: each one's counters and their rates, eph's own first
    namespaces: Sequence[NamespaceView] = ()


@dataclass(frozen=True)
class NamespaceView:
    """One namespace's counters in a sample, and their change per second since the last."""

    namespace: NamespaceCounters
    rates: dict[str, float]


class ObserveView(Protocol):
    """Something that shows each sample: the terminal, plain lines, Prometheus."""

    def show(self, snap: PathSnapshot, look: Outlook, host: HostView) -> None: ...

    def close(self) -> None: ...


OWNERS_REFRESH_S = 5.0  # /proc's fds read again at most this often (harness.observe.owners)
RATE_COUNTERS = ("tw_recycled", "timewait_overflow", "active_opens", "attempt_fails")


@dataclass
class Observation:
    """One sample every ``interval``, for ``duration`` seconds, or until stopped (SIGINT,
    SIGTERM or :meth:`stop`) when ``duration`` is None: the agent's way."""

    duration_s: float | None
    interval_s: float = 1.0
    top: int = 20
    out: Path | None = None
    views: Sequence[ObserveView] = ()
    settings: Settings = field(default_factory=Settings.read)
    trace: bool = False  # with out: the kernel's record of every connection (eBPF)
    trace_reason: str | None = None  # why --trace could not trace
    owners: bool = True  # who holds the ports, through /proc (harness.observe.owners)
    retention: Retention | None = None  # with out: rotate the files, keep a window
    reopen: bool = False  # SIGHUP: rotate the files at the next sample
    resume: bool = False  # with retention: go on with an earlier eph's samples in out
    all_namespaces: bool = False  # every network namespace of the host (setns, root)
    samples: int = 0
    stop_reason: str | None = None
    nat: NatSampler = field(default_factory=NatSampler, repr=False)
    _stop: bool = field(default=False, repr=False)
    # with every namespace: each one's last counters, by inode
    _namespaces_last: dict[int, tuple[float, dict[str, int | None]]] = field(
        default_factory=dict, repr=False
    )

    def stop(self, reason: str) -> None:
        self._stop, self.stop_reason = True, reason

    def run(self, clock: Callable[[], float] = time.monotonic) -> None:
        """Sample until ``duration_s`` or a stop signal; close the files and views."""
        duration = self.duration_s
        if not (self.interval_s > 0 and (duration is None or duration > 0)):  # 0 s: no end
            raise ValueError(
                f"interval ({self.interval_s} s) and duration ({self.duration_s} s) must be"
                " above zero"
            )
        sampler = PathSampler(
            self.settings.port_range,
            reserved_spans(self.settings.reserved),
            top=self.top,
            owners=OwnerIndex(refresh_s=max(OWNERS_REFRESH_S, self.interval_s))
            if self.owners
            else None,
            inside=NamespaceThread() if self.all_namespaces else None,
        )
        store = (
            ObserveStore(self.out, self.retention, resume=self.resume)
            if self.out is not None
            else None
        )
        if store is not None and store.resumed:
            logger.info("went on with %d parts of an earlier eph in %s", store.resumed, self.out)
        children = Supervisor()
        tracing = start_trace(children, self.out, tally=True) if self.trace and self.out else None
        self.trace_reason = tracing if isinstance(tracing, str) else None
        previous = _install_stop(self)
        began, started = clock(), time.time()
        self._write_meta(started, None)
        last_counters: tuple[float, dict[str, int | None]] | None = None
        try:
            while not self._stop:
                last_counters = self._one(sampler, store, last_counters)
                self.samples += 1
                if self.reopen:
                    self.reopen = False
                    if store is not None and store.retention is not None:
                        store.rotate()
                        logger.info("SIGHUP: new parts in %s", store.parts)
                    else:
                        logger.info("SIGHUP: no --keep, so no parts to rotate")
                next_at = began + self.samples * self.interval_s
                if duration is not None and next_at - began > duration:
                    self.stop_reason = self.stop_reason or "duration"
                    break
                _sleep_until(next_at, clock, lambda: self._stop)
        finally:
            _restore(previous)
            if sampler.inside is not None:
                sampler.inside.close()
            for view in self.views:
                view.close()
            if store is not None:
                store.close()
            with contextlib.closing(children):
                if tracing is not None and not isinstance(tracing, str):
                    tracing.finish()
            self._write_meta(started, clock() - began)

    def _write_meta(self, started: float, duration: float | None) -> None:
        """``observe.json``: what a report needs besides the samples."""
        if self.out is None:
            return
        atomic_write_json(
            self.out / "observe.json",
            {
                "started": started,
                "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
                "interval_s": self.interval_s,
                "top": self.top,
                "duration_s": duration,
                "samples": self.samples,
                "stop_reason": self.stop_reason if duration is not None else "running",
                "settings": self.settings.to_json(),
            },
        )

    def _one(
        self,
        sampler: PathSampler,
        store: ObserveStore | None,
        last: tuple[float, dict[str, int | None]] | None,
    ) -> tuple[float, dict[str, int | None]]:
        began = time.perf_counter()
        snap = sampler.sample()
        sample_ms = (time.perf_counter() - began) * 1000
        look = outlook(
            snap,
            tw_reuse=self.settings.tw_reuse,
            timestamps=self.settings.timestamps,
            reuse_delay_ms=self.settings.reuse_delay_ms,
        )
        counters = read_counters()
        rates = _rates(last, snap.time, counters)
        host = HostView(
            self.settings, counters, rates, sample_ms, self.nat.sample(), self._per_namespace(snap)
        )
        for view in self.views:
            view.show(snap, look, host)
        if store is not None:
            store.write(paths_batch(snap, look), host_batch(snap, counters, sample_ms, host.nat))
        return snap.time, counters

    def _per_namespace(self, snap: PathSnapshot) -> list[NamespaceView]:
        """Each namespace's counters with their rates; forgets the namespaces gone."""
        views, seen = [], {}
        for ns in snap.namespaces or ():
            views.append(NamespaceView(ns, _rates(self._namespaces_last.get(ns.inode),
                                                  snap.time, ns.counters)))  # fmt: skip
            seen[ns.inode] = (snap.time, ns.counters)
        self._namespaces_last = seen
        return views


def _rates(
    last: tuple[float, dict[str, int | None]] | None, now: float, counters: dict[str, int | None]
) -> dict[str, float]:
    if last is None or now <= last[0]:
        return {}
    then, before = last
    rates = {}
    for name in RATE_COUNTERS:
        a, b = before.get(name), counters.get(name)
        if a is not None and b is not None:
            rates[name] = (b - a) / (now - then)
    return rates


def _sleep_until(deadline: float, clock: Callable[[], float], stopped: Callable[[], bool]) -> None:
    """Sleep in short steps so that a stop request is seen within 0.1 s."""
    while not stopped():
        left = deadline - clock()
        if left <= 0:
            return
        time.sleep(min(left, 0.1))


_Handler = Callable[[int, FrameType | None], Any] | int | None


def _install_stop(observation: Observation) -> dict[int, _Handler]:
    def handle(signum: int, frame: FrameType | None) -> None:
        observation.stop(signal.Signals(signum).name)

    def reopen(signum: int, frame: FrameType | None) -> None:
        observation.reopen = True  # the loop rotates the files after this sample

    try:
        handlers: dict[int, _Handler] = {
            sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, reopen)
        return handlers
    except ValueError:  # not the main thread: the caller stops it with stop()
        return {}


def _restore(previous: dict[int, _Handler]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
