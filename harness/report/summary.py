"""The summary's first sections, computed in bulk from the records (the model: ``model``)."""

from __future__ import annotations

import errno as errno_module
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from harness.errors import errno_name
from harness.summary import (
    SCHEMA_VERSION,
    Connections,
    Conservation,
    Exhaustion,
    Http,
    Kernel,
    Latency,
    Listener,
    Outage,
    Ports,
    Summary,
)

__all__ = [
    "EXHAUSTION_ERRNOS",
    "SCHEMA_VERSION",
    "Columns",
    "RecordSections",
    "outages",
    "summarize",
]

# local errors that mean "no ephemeral port left": connect() toward a destination
# (EADDRNOTAVAIL), bind(ip, 0) (EADDRINUSE), connected UDP (EAGAIN)
EXHAUSTION_ERRNOS = (errno_module.EADDRNOTAVAIL, errno_module.EADDRINUSE, errno_module.EAGAIN)


@dataclass(frozen=True)
class Columns:
    """The numeric columns of ``connections.parquet`` as numpy arrays."""

    start_ns: np.ndarray
    connect_us: np.ndarray
    local_port: np.ndarray
    errno: np.ndarray
    io_errno: np.ndarray

    @classmethod
    def from_table(cls, table: pa.Table) -> Columns:
        def column(name: str, dtype: str) -> np.ndarray:
            return np.asarray(table.column(name).to_numpy(), dtype=dtype)

        return cls(
            start_ns=column("start_ns", "int64"),
            connect_us=column("connect_us", "uint32"),
            local_port=column("local_port", "uint16"),
            errno=column("errno", "uint16"),
            io_errno=column("io_errno", "uint16"),
        )

    @property
    def ok(self) -> np.ndarray:
        return np.asarray(self.errno == 0)

    def seconds(self) -> np.ndarray:
        """Start times in seconds from the first attempt."""
        if not len(self.start_ns):
            return np.zeros(0)
        return np.asarray((self.start_ns - self.start_ns.min()) / 1e9)

    def connections(self, duration_s: float) -> Connections:
        return _connections(self, duration_s)

    def ports(self, kernel: Kernel) -> Ports:
        return _ports(self, kernel)

    def first_exhaustion(self) -> Exhaustion:
        return _exhaustion(self)

    def outages(self) -> list[Outage]:
        return outages(self)


class RecordSections(Protocol):
    """What the summary's first sections need of the records: :class:`Columns` in
    memory, or a scan of a large run (``harness.report.scan``)."""

    def connections(self, duration_s: float) -> Connections: ...
    def ports(self, kernel: Kernel) -> Ports: ...
    def first_exhaustion(self) -> Exhaustion: ...
    def outages(self) -> list[Outage]: ...


def _counts(values: np.ndarray) -> dict[str, int]:
    names, counts = np.unique(values[values != 0], return_counts=True)
    return {errno_name(int(n)): int(c) for n, c in zip(names, counts, strict=True)}


def summarize(
    cols: RecordSections,
    *,
    scenario: str,
    started_at: str,
    duration_s: float,
    interrupted: bool,
    kernel: Kernel,
    listener: Listener | None = None,
    locust_requests: int | None = None,
    lossy_link: bool = False,
    datagrams: bool = False,
    http: Http | None = None,
) -> Summary:
    """The summary's first sections, from the records alone; analysis adds the rest."""
    connections = cols.connections(duration_s)
    summary = Summary(
        scenario=scenario,
        interrupted=interrupted,
        started_at=started_at,
        duration_s=round(duration_s, 3),
        connections=connections,
        ports=cols.ports(kernel),
        exhaustion=cols.first_exhaustion(),
        outages=cols.outages(),
        kernel=kernel,
        conservation=_conservation(
            connections.attempted,
            connections.succeeded,
            listener,
            locust_requests,
            lossy_link,
            datagrams,
            http,
        ),
    )
    if listener is not None:
        summary.listener = listener
    if http is not None:
        summary.http = http
    return summary


def _connections(cols: Columns, duration_s: float) -> Connections:
    attempted, ok = len(cols.errno), cols.ok
    succeeded = int(ok.sum())
    return Connections(
        attempted=attempted,
        succeeded=succeeded,
        failed=attempted - succeeded,
        errors=_counts(cols.errno),
        io_errors=_counts(cols.io_errno[ok]),
        rate_per_s=_rate(cols, duration_s),
        connect_ms=_latency(cols.connect_us[ok]),
    )


def _ports(cols: Columns, kernel: Kernel) -> Ports:
    """The ports the successful connections got."""
    ports = cols.local_port[cols.ok]
    return Ports(
        range=kernel.ip_local_port_range,
        distinct_used=len(np.unique(ports)),
        even_fraction=round(float((ports % 2 == 0).mean()), 4) if len(ports) else None,
    )


def _rate(cols: Columns, duration_s: float) -> float:
    """Attempts per second over the records' own span (the load's real window)."""
    n = len(cols.start_ns)
    span = float(cols.start_ns.max() - cols.start_ns.min()) / 1e9 if n > 1 else 0.0
    # n starts span n-1 gaps; fall back to the planned window for tiny runs
    if span > 0:
        return round((n - 1) / span, 1)
    return round(n / duration_s, 1) if duration_s > 0 else 0.0


def _latency(connect_us: np.ndarray) -> Latency | None:
    if not len(connect_us):
        return None
    p50, p90, p99 = np.percentile(connect_us, [50, 90, 99]) / 1000.0
    return Latency(
        p50=round(p50, 3),
        p90=round(p90, 3),
        p99=round(p99, 3),
        max=round(float(connect_us.max()) / 1000.0, 3),
    )


def _exhaustion(cols: Columns) -> Exhaustion:
    hit = np.isin(cols.errno, EXHAUSTION_ERRNOS)
    if not hit.any():
        return Exhaustion(
            exhausted=False, first_failure_s=None, succeeded_before_first_failure=None
        )
    first = int(np.argmax(hit))  # rows are sorted by start time
    start = cols.start_ns[first]
    return Exhaustion(
        exhausted=True,
        errno=errno_name(int(cols.errno[first])),
        first_failure_s=round(float(start - cols.start_ns.min()) / 1e9, 4),
        succeeded_before_first_failure=int((cols.ok & (cols.start_ns < start)).sum()),
    )


MIN_OUTAGE_FAILURES = 5  # fewer failures in a row is a blip, not an outage
MAX_OUTAGES = 20


def outages(cols: Columns) -> list[Outage]:
    """Spans in which every attempt failed at the target (refused, reset, timed out,
    unreachable): the target was down, which is not the range running out.

    Attempts that failed locally for want of a port are left out, so an outage
    during exhaustion is still found. Each span runs from its first failure to the
    next success (``recovered``) or to its last failure.
    """
    keep = ~np.isin(cols.errno, EXHAUSTION_ERRNOS)
    errno, start = cols.errno[keep], cols.start_ns[keep]
    bad = (errno != 0).astype(np.int8)
    if not bad.any():
        return []
    t0 = int(cols.start_ns.min())
    edges = np.diff(np.concatenate(([0], bad, [0])))
    begins, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    long = (ends - begins) >= MIN_OUTAGE_FAILURES
    windows = []
    for begin, end in zip(begins[long][:MAX_OUTAGES], ends[long][:MAX_OUTAGES], strict=True):
        recovered = bool(end < len(start))
        names, counts = np.unique(errno[begin:end], return_counts=True)
        windows.append(
            Outage(
                from_s=round((int(start[begin]) - t0) / 1e9, 4),
                to_s=round((int(start[end if recovered else end - 1]) - t0) / 1e9, 4),
                failures=int(end - begin),
                errors={errno_name(int(n)): int(c) for n, c in zip(names, counts, strict=True)},
                recovered=recovered,
            )
        )
    return windows


def _conservation(
    attempted: int,
    succeeded: int,
    listener: Listener | None,
    locust_requests: int | None,
    lossy_link: bool = False,
    datagrams: bool = False,
    http: Http | None = None,
) -> Conservation:
    """Every attempt recorded, counted by Locust, and (if connected) accepted by our listener.

    Over a lab link that loses packets the last check is reported but not judged:
    a client is connected once it sends the handshake's final ACK, and when that
    ACK (and the FIN after it) is lost the server never accepts the connection.
    """
    result = Conservation(records=attempted, ok=True)
    checks = []
    if locust_requests is not None:
        result.locust_requests = locust_requests
        expected = attempted
        if http is not None and http.locust_requests != attempted:
            expected = result.records_as_locust_requests = http.locust_requests
        result.records_match_locust = locust_requests == expected
        checks.append(result.records_match_locust)
    served = listener.requests if listener is not None else None
    if http is not None and served is not None:
        result.listener_requests = served
        result.requests_match_listener = served == http.requests
        if not lossy_link:
            checks.append(result.requests_match_listener)
    if listener is not None:
        result.listener_accepted = listener.accepted
        result.succeeded_match_listener = listener.accepted == succeeded
        if lossy_link:
            result.listener_check = "not judged: the lab's link loses packets"
        elif datagrams:
            # a UDP "success" is a local connect(); its datagram may still be dropped
            result.listener_check = "not judged: UDP datagrams may be dropped"
        else:
            checks.append(result.succeeded_match_listener)
    result.ok = all(checks)
    return result
