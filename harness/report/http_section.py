"""The summary's ``http`` section: requests, statuses and TLS handshakes, in bulk.

A run with ``[load.http]`` or ``load.tls`` records per connection the responses
read whole (``requests``), the last status (or the first unexpected one), the
response bytes and when the TLS handshake finished. :class:`HttpTally` adds
them up batch by batch, so a large run's scan and a small run's table give the
same section. Records without these columns (older runs, the kernel's) give none.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from harness.records import request_events
from harness.report.counts import ValueCounts
from harness.summary import Http, Latency

__all__ = ["HTTP_COLUMNS", "HttpTally", "http_findings", "http_section"]

HTTP_COLUMNS = ("errno", "io_errno", "connect_us", "tls_us", "requests", "status", "rx_bytes")


class HttpTally:
    """The section's sums, one batch at a time."""

    def __init__(self) -> None:
        self.seen = False  # any row with a request or a handshake
        self.requests = self.with_requests = self.rx = self.events = 0
        self.statuses = np.zeros(1000, np.int64)
        self.handshake_us = ValueCounts()

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        if "requests" not in batch.schema.names:
            self.events += batch.num_rows  # records without HTTP: one request each
            return
        rows = {name: batch.column(name).to_numpy() for name in HTTP_COLUMNS}
        requests = rows["requests"]
        self.events += int(request_events(rows).sum())  # type: ignore[arg-type]
        tls = rows["tls_us"] != 0
        if not (requests.any() or tls.any()):
            return
        self.seen = True
        self.requests += int(requests.sum(dtype=np.int64))
        self.with_requests += int(np.count_nonzero(requests))
        self.rx += int(rows["rx_bytes"].sum(dtype=np.int64))
        status = rows["status"]
        self.statuses += np.bincount(status[status < 1000], minlength=1000)[:1000]
        self.handshake_us.add(
            rows["tls_us"][tls].astype(np.int64) - rows["connect_us"][tls].astype(np.int64)
        )

    def section(self) -> Http | None:
        if not self.seen:
            return None
        codes = np.flatnonzero(self.statuses)
        codes = codes[codes != 0]
        return Http(
            requests=self.requests,
            connections_with_requests=self.with_requests,
            requests_per_connection=(
                round(self.requests / self.with_requests, 3) if self.with_requests else None
            ),
            statuses={str(int(c)): int(self.statuses[c]) for c in codes},
            response_bytes=self.rx,
            tls_handshakes=self.handshake_us.total,
            tls_handshake_ms=self._handshake(),
            locust_requests=self.events,
        )

    def _handshake(self) -> Latency | None:
        counts = self.handshake_us
        if not counts.total:
            return None
        p50, p90, p99 = (max(counts.percentile(q), 0.0) / 1000.0 for q in (50, 90, 99))
        top = float(counts.values[-1]) / 1000.0
        return Latency(p50=round(p50, 3), p90=round(p90, 3), p99=round(p99, 3), max=round(top, 3))


def http_section(batches: Iterable[pa.RecordBatch | pa.Table]) -> HttpTally:
    """The tally over ``batches`` (a table in memory is one)."""
    tally = HttpTally()
    for batch in batches:
        tally.add(batch)
    return tally


_MEANINGS = {
    "TLS_VERIFY": "the server's certificate did not verify (load.tls.ca_file, server_name)",
    "TLS_ERROR": "the TLS handshake failed",
    "HTTP_MALFORMED": "the reply was not HTTP",
}


def http_findings(http: Http | None, io_errors: dict[str, int]) -> list[str]:
    """The HTTP and TLS section in plain words, and what failed after connecting."""
    out = []
    if http is not None:
        statuses = ", ".join(f"{code} {n:,}" for code, n in sorted(http.statuses.items()))
        text = f"HTTP: {http.requests:,} responses over {http.connections_with_requests:,}"
        text += f" connections ({http.requests_per_connection or 0:g} each)"
        out.append(text + (f"; final statuses {statuses}." if statuses else "."))
        shake = http.tls_handshake_ms
        if shake is not None:
            out.append(
                f"TLS: {http.tls_handshakes:,} handshakes, {shake.p50:g} ms median,"
                f" {shake.p99:g} ms p99 after connect() answered."
            )
    if io_errors:
        kinds = ", ".join(
            f"{name} {n:,}" + (f" ({_MEANINGS[name]})" if name in _MEANINGS else "")
            for name, n in sorted(io_errors.items())
        )
        out.append(f"Failed after connecting: {kinds}.")
    return out
