"""One pass over a run's records (held or on disk) for the analysis: ports by
parity, latency by occupancy, the cliff's bins, each host's share, attempts per
second, and a sample of rows for the figures (every row, for a run of up to
:data:`FIGURE_ROWS`).

Latency is counted per microsecond value in each band or bin, so every quantile
is the exact one. What a figure draws from the sample says so in its title.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from harness.report.cliff import BIN_COUNT, occupancy_bins
from harness.report.columns import time_bins
from harness.report.counts import ValueCounts
from harness.report.hosts import HostCounts
from harness.report.ondisk import Held, RecordHandle, StableCodes
from harness.report.port_occupancy import OCCUPANCY_BINS
from harness.report.scan import EXHAUSTION_ERRNOS, RecordScan, StartCurve

__all__ = ["FIGURE_ROWS", "InUse", "Sweep", "sweep"]

FIGURE_ROWS = 1_000_000  # rows the figures of a large run draw from: 1 in k of the run
# what the sweep reads, and the sample keeps for the figures (not pid, engine, close)
_COLUMNS = (
    "start_ns",
    "connect_us",
    "close_us",
    "local_addr",
    "local_port",
    "remote_addr",
    "remote_port",
    "errno",
    "io_errno",
    "host",
)


@dataclass(frozen=True)
class InUse:
    """Ports in use toward the targets over time (the samples), against the usable;
    with ``made``, the run's successful connects over time (``RecordScan.made``)."""

    times: np.ndarray
    in_use: np.ndarray
    usable: int
    made: StartCurve | None = None

    @functools.cached_property
    def _made_at_samples(self) -> np.ndarray:
        assert self.made is not None
        return self.made.made_by(self.times)

    def at(self, start_ns: np.ndarray) -> np.ndarray:
        """The share of usable ports in use when each connect began. Between two samples
        the ports in use move in step with the connects made (``StartCurve``), or in
        time where none was made; before the first sample and after the last, the
        nearest sample's."""
        if self.made is None:
            return np.asarray(np.interp(start_ns, self.times, self.in_use) / self.usable)
        times, held, at_samples = self.times, self.in_use, self._made_at_samples
        gap = np.clip(np.searchsorted(times, start_ns, side="right") - 1, 0, len(times) - 2)
        made = at_samples[gap + 1] - at_samples[gap]
        span = times[gap + 1] - times[gap]
        by_count = (self.made.made_by(start_ns) - at_samples[gap]) / np.where(made > 0, made, 1)
        by_time = (start_ns - times[gap]) / np.where(span > 0, span, 1)
        share = np.clip(np.where(made > 0, by_count, by_time), 0.0, 1.0)
        return np.asarray((held[gap] + share * (held[gap + 1] - held[gap])) / self.usable)


def _value_counts(n: int) -> list[ValueCounts]:
    return [ValueCounts() for _ in range(n)]


@dataclass
class Sweep:
    """What one pass adds up (connect times in microseconds)."""

    parity: list[ValueCounts] = field(default_factory=lambda: _value_counts(2))  # even, odd
    first_odd_ns: int | None = None
    first_port: dict[tuple[str, int], int] = field(default_factory=dict)
    bands: list[ValueCounts] = field(default_factory=lambda: _value_counts(10))  # band, parity
    bins: list[ValueCounts] = field(default_factory=lambda: _value_counts(BIN_COUNT))
    bin_first_ns: np.ndarray = field(default_factory=lambda: np.full(BIN_COUNT, 2**62))
    returns: int = 0  # successes after the first failure for want of a port
    hosts: dict[str, HostCounts] = field(default_factory=dict)
    per_second: dict[int, np.ndarray] = field(default_factory=dict)  # errno (-1: all)
    edges: np.ndarray = field(default_factory=lambda: np.zeros(1))
    sample: list[pa.RecordBatch] = field(default_factory=list)
    every: int = 1


class _Pass:
    def __init__(
        self, scan: RecordScan, occupancy: InUse | None, every: int, keep_sample: bool
    ) -> None:
        self.scan, self.occupancy = scan, occupancy
        self.keep_sample = keep_sample
        self.t0 = scan.first_ns or 0
        self.found = Sweep(every=every)
        self.found.edges, _ = time_bins(np.array([scan.span_s]))
        self.remote, self.host = StableCodes(), StableCodes()
        self.row = 0

    def add(self, batch: pa.RecordBatch) -> None:
        found = self.found
        start, errno = batch.column("start_ns").to_numpy(), batch.column("errno").to_numpy()
        ok = errno == 0
        port = batch.column("local_port").to_numpy()
        connect = batch.column("connect_us").to_numpy()
        odd = port % 2 == 1
        found.parity[0].add(connect[ok & ~odd])
        found.parity[1].add(connect[ok & odd])
        if found.first_odd_ns is None and (ok & odd).any():
            found.first_odd_ns = int(start[ok & odd][0])
        self._first_ports(batch, ok, port)
        if self.scan.exhausted_ns is not None:
            found.returns += int((ok & (start > self.scan.exhausted_ns)).sum())
        if self.occupancy is not None:
            self._occupancy(self.occupancy.at(start[ok]), start[ok], connect[ok], odd[ok])
        self._hosts(batch, ok, errno, port)
        self._per_second(start, errno)
        if self.keep_sample:
            pick = np.flatnonzero((np.arange(self.row, self.row + len(start)) % found.every) == 0)
            found.sample.append(batch.take(pa.array(pick)))
        self.row += len(start)

    def _first_ports(self, batch: pa.RecordBatch, ok: np.ndarray, port: np.ndarray) -> None:
        remote = self.remote.of(batch.column("remote_addr"))[ok]
        names = self.remote.names()
        remote_port = batch.column("remote_port").to_numpy()[ok]
        keys = (remote << 16) | remote_port.astype(np.int64)
        # a hash of the few destinations, not a sort of every row: 8 ms against 80 ms
        for key in pc.unique(pa.array(keys)).to_numpy():
            name = (names[int(key) >> 16], int(key) & 0xFFFF)
            if name not in self.found.first_port:
                self.found.first_port[name] = int(port[ok][np.argmax(keys == key)])

    def _occupancy(
        self, share: np.ndarray, start: np.ndarray, connect: np.ndarray, odd: np.ndarray
    ) -> None:
        for band, (low, high) in enumerate(itertools.pairwise(OCCUPANCY_BINS)):
            inside = (share >= low) & (share < high)
            self.found.bands[2 * band].add(connect[inside & ~odd])
            self.found.bands[2 * band + 1].add(connect[inside & odd])
        bins = occupancy_bins(share).astype(np.uint8)
        order = np.argsort(bins, kind="stable")  # a radix sort for 8-bit keys
        bounds = np.searchsorted(bins[order], np.arange(BIN_COUNT + 1))
        for b in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[b] : bounds[b + 1]]
            self.found.bins[b].add(connect[rows])
            self.found.bin_first_ns[b] = min(self.found.bin_first_ns[b], int(start[rows].min()))

    def _hosts(
        self, batch: pa.RecordBatch, ok: np.ndarray, errno: np.ndarray, port: np.ndarray
    ) -> None:
        host = self.host.of(batch.column("host"))
        for code, name in self.host.names().items():
            mine = host == code
            if not mine.any():
                continue
            counts = self.found.hosts.setdefault(name, HostCounts())
            counts.attempted += int(mine.sum())
            counts.succeeded += int((mine & ok).sum())
            counts.failed += int((mine & ~ok).sum())
            hit = mine & np.isin(errno, EXHAUSTION_ERRNOS)
            if counts.first_exhaustion_ns is None and hit.any():
                counts.first_exhaustion_ns = int(batch.column("start_ns").to_numpy()[hit][0])
            used = pc.unique(batch.column("local_addr").filter(pa.array(mine & ok)))
            counts.addresses |= {str(a) for a in used.to_pylist()}
            counts.ports += np.bincount(port[mine & ok], minlength=65536)

    def _per_second(self, start: np.ndarray, errno: np.ndarray) -> None:
        """np.histogram's bins: an edge belongs to the bin it opens, the last edge to the
        last bin, nothing past it (searched, not divided: the edges are rounded floats)."""
        edges, rates = self.found.edges, self.found.per_second
        bins = len(edges) - 1
        t = (start - self.t0) / 1e9
        index = np.searchsorted(edges, t, side="right") - 1
        index[t == edges[-1]] = bins - 1
        index[(index < 0) | (index >= bins)] = bins  # counted past the end, then cut
        for value in [-1, *(int(e) for e in np.unique(errno))]:
            mine = index if value < 0 else index[errno == value]
            counts = np.bincount(mine, minlength=bins + 1)[:bins]
            rates[value] = rates.get(value, np.zeros(bins, np.int64)) + counts


def sweep(records: RecordHandle, scan: RecordScan, occupancy: InUse | None) -> Sweep:
    """The pass, once per run (kept with the records for the report after the summary)."""
    found = records.cache.get("sweep")
    if isinstance(found, Sweep):
        return found
    every = max(1, -(-records.num_rows // FIGURE_ROWS))
    # a held run's figures draw from its own table: no second copy of its rows
    run = _Pass(scan, occupancy, every, keep_sample=not isinstance(records, Held))
    for batch in records.batches(_COLUMNS):
        run.add(batch)
    records.cache["sweep"] = run.found
    return run.found
