"""Feeding Locust's statistics in bulk, for engines that run outside Locust.

The uvloop engine sends its rows to the Locust process in batches; logging them
one by one through ``events.request`` would cost the Locust process several
microseconds per connection. Instead each batch becomes one ``StatsEntry`` per
endpoint, merged with ``StatsEntry.extend``: the same merge Locust's master uses
for its workers' reports. ``tests/test_locust_stats.py`` checks the result equals
logging each request.

CPU per connection goes to Locust's table too, as two entries of request type
``CPU`` (:func:`feed_cpu`): each interval of an engine process (see
``harness.load.cpu_meter``) counts as its attempts, each with a "response time" of the
interval's CPU *microseconds* per attempt. So the entry's average is exactly the
CPU spent over the attempts made, its percentiles weigh the intervals by their
attempts, and its request count repeats the connections'. They stay out of the
Aggregated row and out of eph's conservation count (``locust.json`` entries of
type ``CPU`` are skipped). The CPU of a Locust process that only drives a uvloop
child is not in them (it is in ``cpu.parquet``).

Imports locust: only for Locust processes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from locust import stats as locust_stats

from harness.load.cpu_meter import CPU_REQUEST_TYPE, CpuInterval
from harness.load.outcome import (
    ConnectionFailed,
    Outcome,
    classify_rows,
    failure,
    failure_counts,
)
from harness.records import request_events

__all__ = [
    "CPU_REQUEST_TYPE",
    "REQUEST_TYPE",
    "SYSTEM_CPU",
    "USER_CPU",
    "feed_cpu",
    "feed_rows",
]

REQUEST_TYPE = "TCP"
SYSTEM_CPU = "system µs per connection"
USER_CPU = "user µs per connection"


def feed_rows(
    stats: locust_stats.RequestStats,
    rows: np.ndarray,
    names: Sequence[str],
    request_type: str = REQUEST_TYPE,
) -> None:
    """Add ``rows`` (``records.ROW_DTYPE``) to ``stats`` as if each were one request.

    ``names[i]`` is the request name of endpoint ``i``. Request times are spread
    over wall-clock seconds from each row's monotonic start. For HTTP (a
    ``request_type`` other than ``TCP``) a row counts as :func:`request_events`.
    """
    if not len(rows):
        return
    mono_now, wall_now = time.monotonic_ns(), time.time()
    wall = wall_now - (mono_now - rows["start_ns"]) / 1e9
    for index in np.unique(rows["endpoint"]):
        mask = rows["endpoint"] == index
        _feed_endpoint(stats, names[int(index)], rows[mask], wall[mask], request_type)


def _response_us(rows: np.ndarray, request_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Each request's time in µs and the requests of each row: TCP's is the connect; an
    HTTP request's is its connection's whole time over its requests (with one request, the
    connect, handshake, request and response an HttpUser's new connection takes)."""
    if request_type == REQUEST_TYPE:
        return rows["connect_us"], np.ones(len(rows), np.int64)
    events = request_events(rows)
    return np.repeat(rows["close_us"] // events, events), events


def _feed_endpoint(
    stats: locust_stats.RequestStats,
    name: str,
    rows: np.ndarray,
    wall: np.ndarray,
    request_type: str,
) -> None:
    batch = locust_stats.StatsEntry(stats, name, request_type)
    response_us, events = _response_us(rows, request_type)
    response_ms = response_us.astype(np.float64) / 1000.0
    batch.num_requests = int(events.sum())
    # Locust annotates these int, but sums float times as given (as events.request does)
    batch.total_response_time = float(response_ms.sum())  # type: ignore[assignment]
    batch.min_response_time = float(response_ms.min())  # type: ignore[assignment]
    batch.max_response_time = float(response_ms.max())  # type: ignore[assignment]
    batch.start_time = float(wall.min())
    batch.last_request_timestamp = float(wall.max())
    values, counts = np.unique(response_us, return_counts=True)
    bucket = locust_stats.bucket_response_time  # replaceable at runtime, so looked up here
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        key = bucket(value / 1000.0)
        batch.response_times[key] = batch.response_times.get(key, 0) + count
    _per_second(batch.num_reqs_per_sec, np.repeat(wall, events))

    failed = classify_rows(rows) != Outcome.CONNECTED
    if failed.any():
        batch.num_failures = int(failed.sum())
        _per_second(batch.num_fail_per_sec, wall[failed])
        for errno, io_errno, count in failure_counts(rows):
            _log_errors(stats, name, request_type, failure(errno, io_errno), count)

    stats.get(name, request_type).extend(batch)
    stats.total.extend(batch)


def _per_second(target: dict[int, int], wall: np.ndarray) -> None:
    seconds, counts = np.unique(wall.astype(np.int64), return_counts=True)
    for second, count in zip(seconds.tolist(), counts.tolist(), strict=True):
        target[second] = target.get(second, 0) + count


def _log_errors(
    stats: locust_stats.RequestStats,
    name: str,
    request_type: str,
    error: ConnectionFailed,
    count: int,
) -> None:
    key = locust_stats.StatsError.create_key(request_type, name, error)
    entry = stats.errors.get(key)
    if entry is None:
        entry = stats.errors[key] = locust_stats.StatsError(request_type, name, error)
    entry.occurred()
    entry.occurrences += count - 1


def feed_cpu(stats: locust_stats.RequestStats, interval: CpuInterval) -> None:
    """Add one interval of an engine process to the ``CPU`` entries: its attempts,
    each with the interval's CPU µs per attempt as its response time."""
    if not interval.attempts:
        return  # CPU with no attempt to charge it to: cpu.parquet keeps it
    wall = time.time() - (time.monotonic_ns() - interval.t_ns) / 1e9
    for name, spent_us in ((SYSTEM_CPU, interval.stime_us), (USER_CPU, interval.utime_us)):
        per_attempt = spent_us / interval.attempts
        batch = locust_stats.StatsEntry(stats, name, CPU_REQUEST_TYPE)
        batch.num_requests = interval.attempts
        batch.total_response_time = float(spent_us)  # type: ignore[assignment]
        batch.min_response_time = per_attempt  # type: ignore[assignment]
        batch.max_response_time = per_attempt  # type: ignore[assignment]
        batch.start_time = wall - interval.interval_ns / 1e9
        batch.last_request_timestamp = wall
        batch.response_times[locust_stats.bucket_response_time(per_attempt)] = interval.attempts
        stats.get(name, CPU_REQUEST_TYPE).extend(batch)
