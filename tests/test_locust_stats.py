"""The uvloop engine's bulk stats feed equals logging each request through Locust.

Runs in a subprocess: importing locust monkey-patches the process with gevent.
"""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT

SCRIPT = r"""
import json, time
import numpy as np
from locust.stats import RequestStats
from harness.load.outcome import failure
from harness.load.stats import REQUEST_TYPE, feed_rows
from harness.records import ROW_DTYPE

rng = np.random.default_rng(7)
n = 5000
rows = np.zeros(n, dtype=ROW_DTYPE)
rows["start_ns"] = time.monotonic_ns() - np.arange(n)[::-1] * 1000
rows["connect_us"] = rng.integers(1, 250_000, n)
rows["endpoint"] = rng.integers(0, 2, n)
rows["errno"] = np.where(rng.random(n) < 0.1, 99, 0)
rows["io_errno"] = np.where((rows["errno"] == 0) & (rng.random(n) < 0.05), 104, 0)
names = ["127.0.0.1:9000", "127.0.0.1:9001"]

one = RequestStats()
for row in rows:
    err, io = int(row["errno"]), int(row["io_errno"])
    name, ms = names[row["endpoint"]], row["connect_us"] / 1000.0
    one.log_request(REQUEST_TYPE, name, ms, 0)
    if err or io:
        one.log_error(REQUEST_TYPE, name, failure(err, io))

bulk = RequestStats()
feed_rows(bulk, rows[: n // 2], names)
feed_rows(bulk, rows[n // 2 :], names)

def view(stats):
    out = {}
    for (name, method), e in sorted(stats.entries.items()):
        out[name] = [e.num_requests, e.num_failures, round(e.total_response_time, 3),
                     round(e.min_response_time, 3), round(e.max_response_time, 3),
                     sorted(e.response_times.items()),
                     e.get_response_time_percentile(0.5), e.get_response_time_percentile(0.99)]
    t = stats.total
    out["total"] = [t.num_requests, t.num_failures, sorted(t.response_times.items())]
    out["errors"] = sorted((e.name, repr(e.error), e.occurrences) for e in stats.errors.values())
    out["per_second"] = sum(t.num_reqs_per_sec.values())
    return out

print(json.dumps([view(one), view(bulk)]))
"""


def test_bulk_feed_equals_per_request_logging() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    one, bulk = json.loads(out.stdout)
    assert one["total"][0] == 5000
    assert one["errors"], "the sample has failures"
    assert bulk == one


HTTP_SCRIPT = r"""
import json, time
import numpy as np
from locust.stats import RequestStats
from harness.errors import HTTP_STATUS, TLS_VERIFY
from harness.load.outcome import failure
from harness.load.stats import feed_rows
from harness.records import ROW_DTYPE

rng = np.random.default_rng(11)
n = 3000
rows = np.zeros(n, dtype=ROW_DTYPE)
rows["start_ns"] = time.monotonic_ns() - np.arange(n)[::-1] * 1000
rows["connect_us"] = rng.integers(1, 2000, n)
rows["close_us"] = rows["connect_us"] + rng.integers(100, 90_000, n)
rows["requests"] = rng.integers(1, 6, n)
kind = rng.random(n)
rows["errno"] = np.where(kind < 0.05, 99, 0)  # no connection: no response either
rows["requests"][rows["errno"] != 0] = 0
rows["io_errno"] = np.select(
    [(kind >= 0.05) & (kind < 0.1), (kind >= 0.1) & (kind < 0.13), (kind >= 0.13) & (kind < 0.15)],
    [HTTP_STATUS + 503, TLS_VERIFY, 110], 0)
rows["requests"][rows["io_errno"] == TLS_VERIFY] = 0
name = "/"

# each row as the documented requests: its whole responses (a failing status is the
# last of them, and the failure), one more when it failed otherwise; each its share
one = RequestStats()
for row in rows:
    err, io, done = int(row["errno"]), int(row["io_errno"]), int(row["requests"])
    status_failed = HTTP_STATUS <= io < HTTP_STATUS + 1000
    failed = bool(err or io)
    events = max(done + (failed and not status_failed), 1)
    ms = (int(row["close_us"]) // events) / 1000.0
    for i in range(events):
        one.log_request("GET", name, ms, 0)
    if failed:
        one.log_error("GET", name, failure(err, io))

bulk = RequestStats()
feed_rows(bulk, rows[: n // 3], [name], "GET")
feed_rows(bulk, rows[n // 3 :], [name], "GET")

def view(stats):
    (e,) = stats.entries.values()
    return [e.method, e.num_requests, e.num_failures, round(e.total_response_time, 3),
            sorted(e.response_times.items()), e.get_response_time_percentile(0.99),
            sorted((x.name, repr(x.error), x.occurrences) for x in stats.errors.values())]

print(json.dumps([view(one), view(bulk)]))
"""


def test_http_rows_feed_locust_as_their_requests() -> None:
    """An HTTP row stands for its responses (and its failure) in Locust's table, under the
    method and path, as an HttpUser's requests would."""
    out = subprocess.run(
        [sys.executable, "-c", HTTP_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    one, bulk = json.loads(out.stdout)
    assert one[0] == "GET" and one[1] > 3000 * 2  # several requests a connection
    errors = " ".join(error for _, error, _ in one[6])
    assert "HTTP_503 after connect" in errors and "TLS_VERIFY after connect" in errors
    assert bulk == one
