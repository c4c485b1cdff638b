"""The summary's first sections (connections, ports, exhaustion, outages, HTTP) from
one scan of a run's records, batch by batch, whatever its size: a small run is a
batch or a few, a large one is read from Parquet a million rows at a time
(``harness.report.ondisk``). There is no second, in-memory copy of these formulas.

Counts are counts; connect latency comes from a count per microsecond value, so
its quantiles are exact; outages carry an open span from one batch to the next.
An outage is a span in which every attempt failed at the target (refused, reset,
timed out, unreachable): the target was down, which is not the range running out.
Attempts that failed locally for want of a port are left out, so an outage during
exhaustion is still found. Each span runs from its first failure to the next
success (``recovered``) or to its last failure.
"""

from __future__ import annotations

import errno as errno_module
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from harness.errors import errno_name
from harness.report.counts import ValueCounts
from harness.report.http_section import HTTP_COLUMNS, HttpTally
from harness.report.ondisk import Held, OnDisk, Records, record_batches
from harness.summary import Connections, Exhaustion, Kernel, Latency, Outage, Ports

__all__ = [
    "EXHAUSTION_ERRNOS",
    "MAX_OUTAGES",
    "MIN_OUTAGE_FAILURES",
    "SCAN_COLUMNS",
    "RecordScan",
    "StartCurve",
    "scan_records",
]

# local errors that mean "no ephemeral port left": connect() toward a destination
# (EADDRNOTAVAIL), bind(ip, 0) (EADDRINUSE), connected UDP (EAGAIN)
EXHAUSTION_ERRNOS = (errno_module.EADDRNOTAVAIL, errno_module.EADDRINUSE, errno_module.EAGAIN)
MIN_OUTAGE_FAILURES = 5  # fewer failures in a row is a blip, not an outage
MAX_OUTAGES = 20

SCAN_COLUMNS = ("start_ns", "connect_us", "close_us", "local_port", "errno", "io_errno")
_WITH_HTTP = (*SCAN_COLUMNS, *(c for c in HTTP_COLUMNS if c not in SCAN_COLUMNS))


def _names(counts: np.ndarray) -> dict[str, int]:
    return {errno_name(int(n)): int(counts[n]) for n in np.flatnonzero(counts)}


@dataclass
class _Span:
    """An outage under way: failures at the target, in a row."""

    begin_ns: int
    last_ns: int
    errors: np.ndarray = field(default_factory=lambda: np.zeros(65536, np.int64))

    @property
    def failures(self) -> int:
        return int(self.errors.sum())


class _Outages:
    """:func:`summary.outages`, fed in batches."""

    def __init__(self) -> None:
        self.found: list[Outage] = []
        self.open: _Span | None = None
        self.t0 = 0

    def _close(self, to_ns: int, recovered: bool) -> None:
        span, self.open = self.open, None
        if span is None or span.failures < MIN_OUTAGE_FAILURES or len(self.found) >= MAX_OUTAGES:
            return
        self.found.append(
            Outage(
                from_s=round((span.begin_ns - self.t0) / 1e9, 4),
                to_s=round((to_ns - self.t0) / 1e9, 4),
                failures=span.failures,
                errors=_names(span.errors),
                recovered=recovered,
            )
        )

    def add(self, errno: np.ndarray, start: np.ndarray) -> None:
        keep = ~np.isin(errno, EXHAUSTION_ERRNOS)
        errno, start = errno[keep], start[keep]
        bad = (errno != 0).astype(np.int8)
        edges = np.diff(np.concatenate(([0], bad, [0])))
        begins, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if self.open is not None and len(start) and (not len(begins) or begins[0] > 0):
            self._close(int(start[0]), recovered=True)
        # only spans that may count: long ones, and those at either end of the batch
        long = ((ends - begins) >= MIN_OUTAGE_FAILURES) | (begins == 0) | (ends == len(bad))
        for begin, end in zip(begins[long], ends[long], strict=True):
            if self.open is None:
                self.open = _Span(int(start[begin]), int(start[begin]))
            np.add.at(self.open.errors, errno[begin:end].astype(np.int64), 1)
            self.open.last_ns = int(start[end - 1])
            if end < len(bad):
                self._close(int(start[end]), recovered=True)
            if len(self.found) >= MAX_OUTAGES:
                break

    def finish(self) -> list[Outage]:
        if self.open is not None:
            self._close(self.open.last_ns, recovered=False)
        return self.found


class StartCurve:
    """Successful connects counted in time bins from the run's first start: how many
    had begun by any instant. Bins are :data:`FIRST_WIDTH_NS` wide and double (pairs
    summed) whenever the run outgrows :data:`MAX_BINS`, so the curve stays within 8 MiB
    for a run of any length; which bins a start lands in depends on it alone, so the
    curve is the same however the records are batched.

    ``InUse.at`` reads it to place each connect between two samples of the collector
    by the connects made in between, not by time: where the rate collapses inside a
    gap (the collector is starved exactly when connects turn slow), interpolating in
    time put a 0.5 cliff at 0.40 of the range; by count, at 0.50."""

    FIRST_WIDTH_NS = 100_000
    MAX_BINS = 1 << 20

    def __init__(self) -> None:
        self.origin: int | None = None
        self.width_ns = self.FIRST_WIDTH_NS
        self.counts = np.zeros(0, np.int64)
        self._curve: tuple[np.ndarray, np.ndarray] | None = None  # edges, made by each

    def add(self, origin: int, start_ok: np.ndarray) -> None:
        self.origin = origin if self.origin is None else self.origin
        if not len(start_ok):
            return
        offset = np.maximum(start_ok.astype(np.int64) - self.origin, 0)
        while int(offset.max()) // self.width_ns >= self.MAX_BINS:
            if len(self.counts) % 2:
                self.counts = np.append(self.counts, 0)
            self.counts = self.counts.reshape(-1, 2).sum(axis=1)
            self.width_ns *= 2
        at = offset // self.width_ns
        grown = max(len(self.counts), int(at.max()) + 1)
        self.counts = np.pad(self.counts, (0, grown - len(self.counts)))
        self.counts += np.bincount(at, minlength=grown)
        self._curve = None

    def made_by(self, t_ns: np.ndarray) -> np.ndarray:
        """How many successful connects had begun by each instant (linear within a bin)."""
        if self.origin is None or not len(self.counts):
            return np.zeros(len(t_ns))
        if self._curve is None:  # once per scan, not once per batch the sweep places
            edges = self.origin + np.arange(len(self.counts) + 1, dtype=np.float64) * self.width_ns
            self._curve = (edges, np.concatenate([[0], np.cumsum(self.counts)]))
        edges, made = self._curve
        return np.asarray(np.interp(np.asarray(t_ns, dtype=np.float64), edges, made))


class RecordScan:
    """What ``summarize`` reads from the records, added up batch by batch."""

    def __init__(self) -> None:
        self.attempted = 0
        self.succeeded = 0
        self.first_ns: int | None = None
        self.last_ns = 0
        self.errors = np.zeros(65536, np.int64)
        self.io_errors = np.zeros(65536, np.int64)  # of the successful connections
        self.port_uses = np.zeros(65536, np.int64)  # successful connections per local port
        self.connect_us = ValueCounts()  # of the successful connections
        self.close_us = ValueCounts()  # of the successful connections: their lifetimes
        self.first_ok_ns: int | None = None
        self.last_ok_ns: int | None = None
        self.exhaustion = Exhaustion(
            exhausted=False, first_failure_s=None, succeeded_before_first_failure=None
        )
        self.exhausted_ns: int | None = None  # the first failure for want of a port
        self._ok_before = 0  # successes in the batches read so far
        self._ok_at_last = 0  # of which started at the last start read
        self._outages = _Outages()
        self.http = HttpTally()
        self.made = StartCurve()

    def add(self, batch: pa.RecordBatch) -> None:
        self.http.add(batch)
        start = batch.column("start_ns").to_numpy()
        if not len(start):
            return
        errno = batch.column("errno").to_numpy()
        ok = errno == 0
        if self.first_ns is None:
            self.first_ns = self._outages.t0 = int(start[0])
        if not self.exhaustion.exhausted:
            self._exhaustion(start, errno, ok)
        self.attempted += len(start)
        self.succeeded += int(ok.sum())
        self.last_ns = int(start[-1])
        self.errors += np.bincount(errno, minlength=65536)
        self.io_errors += np.bincount(batch.column("io_errno").to_numpy()[ok], minlength=65536)
        self.port_uses += np.bincount(batch.column("local_port").to_numpy()[ok], minlength=65536)
        self.connect_us.add(batch.column("connect_us").to_numpy()[ok])
        self.close_us.add(batch.column("close_us").to_numpy()[ok])
        if ok.any():
            self.first_ok_ns = (
                self.first_ok_ns if self.first_ok_ns is not None else int(start[ok][0])
            )
            self.last_ok_ns = int(start[ok][-1])
        self._outages.add(errno, start)
        self.made.add(self.first_ns, start[ok])
        self._ok_before += int(ok.sum())
        self._ok_at_last = int((ok & (start == start[-1])).sum())

    def _exhaustion(self, start: np.ndarray, errno: np.ndarray, ok: np.ndarray) -> None:
        hit = np.isin(errno, EXHAUSTION_ERRNOS)
        if not hit.any():
            return
        first = int(np.argmax(hit))
        at = int(start[first])
        before = self._ok_before - (self._ok_at_last if self.last_ns == at else 0)
        self.exhaustion = Exhaustion(
            exhausted=True,
            errno=errno_name(int(errno[first])),
            first_failure_s=round((at - (self.first_ns or 0)) / 1e9, 4),
            succeeded_before_first_failure=before + int((ok & (start < at)).sum()),
        )
        self.exhausted_ns = at

    def connections(self, duration_s: float) -> Connections:
        errors, io_errors = self.errors.copy(), self.io_errors.copy()
        errors[0] = io_errors[0] = 0
        n, span = self.attempted, self.span_s
        if span > 0:
            rate = round((n - 1) / span, 1)
        else:
            rate = round(n / duration_s, 1) if duration_s > 0 else 0.0
        return Connections(
            attempted=n,
            succeeded=self.succeeded,
            failed=n - self.succeeded,
            errors=_names(errors),
            io_errors=_names(io_errors),
            rate_per_s=rate,
            connect_ms=self._latency(),
        )

    def ports(self, kernel: Kernel) -> Ports:
        used = self.port_uses
        even = int(used[::2].sum())
        return Ports(
            range=kernel.ip_local_port_range,
            distinct_used=int(np.count_nonzero(used)),
            even_fraction=round(even / self.succeeded, 4) if self.succeeded else None,
        )

    def first_exhaustion(self) -> Exhaustion:
        return self.exhaustion

    def _latency(self) -> Latency | None:
        if not self.connect_us.total:
            return None
        p50, p90, p99 = (self.connect_us.percentile(q) / 1000.0 for q in (50, 90, 99))
        return Latency(
            p50=round(p50, 3),
            p90=round(p90, 3),
            p99=round(p99, 3),
            max=round(float(self.connect_us.values[-1]) / 1000.0, 3),
        )

    def outages(self) -> list[Outage]:
        """The outages found (call once, after the last batch)."""
        return self._outages.finish()

    @property
    def span_s(self) -> float:
        """From the first start to the last, in seconds."""
        return (self.last_ns - (self.first_ns or 0)) / 1e9 if self.attempted > 1 else 0.0


def scan_records(records: Records) -> RecordScan:
    """A run's records, of any size, scanned once (a large run keeps the scan with its
    handle, for the analyses after)."""
    handle = records if isinstance(records, OnDisk | Held) else None
    found = handle.cache.get("scan") if handle is not None else None
    if not isinstance(found, RecordScan):
        found = RecordScan()
        columns = _WITH_HTTP if "requests" in records.column_names else SCAN_COLUMNS
        for batch in record_batches(records, columns):
            found.add(batch)
        if handle is not None:
            handle.cache["scan"] = found
    return found
