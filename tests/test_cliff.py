"""The latency-cliff detector (``harness.report.cliff``) on synthetic records: the
run's own analysis (``latency_cliff``), fed connections whose occupancy, latency
and timing are known."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pytest

from harness.records import CONNECTIONS_SCHEMA, application_zeros
from harness.report.analysis import latency_cliff
from harness.report.disk_sweep import InUse
from harness.report.ondisk import Held
from harness.report.scan import StartCurve, scan_records
from harness.summary import LatencyCliff

USABLE = 10_000


class CliffInput(NamedTuple):
    occupancy: np.ndarray  # share of the usable ports in use as each success began
    connect_ms: np.ndarray
    start_s: np.ndarray
    failures_s: np.ndarray  # attempts that failed for want of a port


def records_of(data: CliffInput) -> pa.Table:
    """The connection records that say ``data``."""
    ok_ns = np.round(data.start_s * 1e9).astype(np.int64)
    failed_ns = np.round(data.failures_s * 1e9).astype(np.int64)
    start = np.concatenate([ok_ns, failed_ns])
    order = np.argsort(start, kind="stable")
    n = len(start)
    ok = np.concatenate([np.ones(len(ok_ns), bool), np.zeros(len(failed_ns), bool)])[order]
    connect_us = np.concatenate([np.round(data.connect_ms * 1000), np.zeros(len(failed_ns))])

    def const(value: str) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value]))

    table = pa.table(
        {
            "start_ns": pa.array(start[order]),
            "connect_us": pa.array(np.maximum(1, connect_us[order]).astype(np.uint32)),
            "close_us": pa.array(np.full(n, 5000, np.uint32)),
            "local_addr": const("127.0.0.1"),
            "local_port": pa.array(np.where(ok, 40000 + np.arange(n) % 20000, 0).astype(np.uint16)),
            "remote_addr": const("127.0.0.1"),
            "remote_port": pa.array(np.full(n, 9000, np.uint16)),
            "errno": pa.array(np.where(ok, 0, 99).astype(np.uint16)),
            "io_errno": pa.array(np.zeros(n, np.uint16)),
            "close": const("client"),
            "engine": const("locust"),
            "pid": pa.array(np.ones(n, np.uint32)),
            "host": const("localhost"),
            **application_zeros(n),
        },
        schema=CONNECTIONS_SCHEMA,
    )
    return table


def detect_cliff(data: CliffInput) -> LatencyCliff:
    """The records and the samples that say ``data``, through the run's analysis: a
    sample of the ports in use at every successful connect."""
    if len(data.start_s) < 2:
        return LatencyCliff(detected=False)
    ok_ns = np.round(data.start_s * 1e9)
    occupancy = InUse(ok_ns, data.occupancy * USABLE, USABLE)
    return latency_cliff(Held(records_of(data)), occupancy)


def _fill(
    n: int = 20_000,
    *,
    step_at: float = 0.5,
    before_ms: float = 0.01,
    after_ms: float = 0.9,
    noise: float = 0.3,
    seed: int = 1,
    fast_rate: float = 50_000.0,
    slow_rate: float | None = None,
) -> CliffInput:
    """A range filling linearly from empty to full; latency steps at ``step_at``."""
    rng = np.random.default_rng(seed)
    occupancy = np.linspace(0.0, 1.0, n, endpoint=False)
    slow = occupancy >= step_at
    base = np.where(slow, after_ms, before_ms)
    connect_ms = base * rng.lognormal(0.0, noise, n)
    gaps = np.where(slow, 1 / (slow_rate or fast_rate * before_ms / after_ms), 1 / fast_rate)
    start_s = np.concatenate(([0.0], np.cumsum(gaps[:-1])))
    return CliffInput(occupancy, connect_ms, start_s, np.zeros(0))


def test_a_sharp_step_at_the_even_half_is_found_with_its_ratio_and_rates() -> None:
    cliff = detect_cliff(_fill(slow_rate=1_000.0))
    assert cliff.detected
    assert cliff.onset_occupancy == pytest.approx(0.5, abs=0.01)
    assert cliff.ratio == pytest.approx(90, rel=0.1)
    assert cliff.before_p50_ms == pytest.approx(0.01, rel=0.1)
    assert cliff.after_p50_ms == pytest.approx(0.9, rel=0.1)
    assert cliff.after_p99_ms is not None and cliff.after_p99_ms > cliff.after_p50_ms
    assert cliff.rate_before_per_s == pytest.approx(50_000, rel=0.01)
    assert cliff.rate_after_per_s == pytest.approx(1_000, rel=0.01)
    assert cliff.onset_s == pytest.approx(10_000 / 50_000, rel=0.01)


def test_a_collector_gap_across_the_step_leaves_the_onset_where_it_is() -> None:
    """The collector samples every 20 ms but misses 0.40 to 0.53 of the range (starved,
    as it is on a busy machine just when connects turn slow). In time, the gap's
    slow tail is spread back over its fast part; by the connects made, it is not."""
    data = _fill(slow_rate=1_000.0)
    records = records_of(data)
    every_20ms = np.searchsorted(data.start_s, np.arange(0, data.start_s[-1], 0.02))
    kept = every_20ms[(data.occupancy[every_20ms] < 0.40) | (data.occupancy[every_20ms] > 0.53)]
    times, held = np.round(data.start_s[kept] * 1e9), data.occupancy[kept] * USABLE
    gap = np.diff(times).max() / 1e6
    assert gap > 100, gap  # the samples do miss the step

    in_time = latency_cliff(Held(records), InUse(times, held, USABLE))
    assert in_time.onset_occupancy is not None and in_time.onset_occupancy < 0.45, in_time
    by_count = InUse(times, held, USABLE, scan_records(Held(records)).made)
    cliff = latency_cliff(Held(records), by_count)
    assert cliff.onset_occupancy == pytest.approx(0.5, abs=0.01), cliff


def test_the_start_curve_is_the_same_however_the_records_are_batched() -> None:
    """It doubles its bins as a run grows; the bins a start lands in depend on the start
    alone, so one batch and many give the same curve."""
    rng = np.random.default_rng(3)
    start = np.sort(rng.integers(0, 400 * 10**9, 50_000))  # 400 s: past 2^20 bins of 100 µs
    whole, parts = StartCurve(), StartCurve()
    whole.add(int(start[0]), start)
    for part in np.array_split(start, 37):
        parts.add(int(start[0]), part)
    assert whole.width_ns == parts.width_ns == 4 * StartCurve.FIRST_WIDTH_NS
    np.testing.assert_array_equal(whole.counts, parts.counts)
    at = np.array([start[0], start[1000], start[-1] + whole.width_ns])
    assert whole.made_by(at)[[0, 2]].tolist() == [0, len(start)]
    assert abs(whole.made_by(at)[1] - 1000) <= whole.counts.max()  # within one bin


def test_flat_latency_has_no_cliff() -> None:
    cliff = detect_cliff(_fill(after_ms=0.01))
    assert not cliff.detected
    assert cliff.onset_occupancy is None and cliff.ratio is None


def test_a_step_under_the_ratio_is_not_a_cliff() -> None:
    assert not detect_cliff(_fill(after_ms=0.02)).detected  # 2x: noise, not a scan
    assert detect_cliff(_fill(after_ms=0.04)).detected  # 4x: the 1k-port cliff's size


def test_a_short_spike_is_not_sustained() -> None:
    data = _fill(after_ms=0.01)
    spike = (data.occupancy >= 0.3) & (data.occupancy < 0.33)
    slowed = np.where(spike, data.connect_ms * 100, data.connect_ms)
    cliff = detect_cliff(CliffInput(data.occupancy, slowed, data.start_s, data.failures_s))
    assert not cliff.detected


def test_too_few_connections_decide_nothing() -> None:
    assert not detect_cliff(_fill(n=150)).detected


def test_noisy_latency_still_finds_the_onset() -> None:
    cliff = detect_cliff(_fill(noise=1.0, after_ms=0.15, seed=7))
    assert cliff.detected
    assert cliff.onset_occupancy == pytest.approx(0.5, abs=0.02)


def test_occupancy_that_never_reaches_the_step_has_no_cliff() -> None:
    data = _fill()
    low = data.occupancy < 0.5
    kept = CliffInput(data.occupancy[low], data.connect_ms[low], data.start_s[low], np.zeros(0))
    assert not detect_cliff(kept).detected


def test_empty_input() -> None:
    empty = np.zeros(0)
    assert not detect_cliff(CliffInput(empty, empty, empty, empty)).detected


def test_the_rate_after_ends_at_the_first_failure_for_want_of_a_port() -> None:
    data = _fill(slow_rate=1_000.0)
    onset_s = 10_000 / 50_000
    failures = np.array([onset_s + 2.0, onset_s + 2.001])
    cliff = detect_cliff(CliffInput(data.occupancy, data.connect_ms, data.start_s, failures))
    assert cliff.rate_after_per_s == pytest.approx(1_000, rel=0.01)
    assert cliff.onset_s == pytest.approx(onset_s, rel=0.01)


def test_failures_before_the_onset_leave_the_rate_after_over_the_rest() -> None:
    """A range already failing (full windows): the rate after runs to the last start,
    not to the next failure a few microseconds on."""
    data = _fill(slow_rate=1_000.0)
    failures = np.array([0.01, 10_000 / 50_000 + 0.0001])
    cliff = detect_cliff(CliffInput(data.occupancy, data.connect_ms, data.start_s, failures))
    assert cliff.rate_after_per_s == pytest.approx(1_000, rel=0.01)


def test_a_random_port_window_is_aligned_and_inside_the_range() -> None:
    from harness.load.churn import PortWindow

    window = PortWindow.over(40000, 55999, 64)
    assert window.count == 250
    picks = {window.pick() for _ in range(2000)}
    lows = np.array([value & 0xFFFF for value in picks])
    highs = np.array([value >> 16 for value in picks])
    assert ((lows - 40000) % 64 == 0).all() and (highs - lows == 63).all()
    assert lows.min() >= 40000 and highs.max() <= 55999
    assert len(picks) > 200  # spread over the windows
    assert PortWindow.over(40000, 40009, 64) == PortWindow(40000, 10, 1)  # narrower range


def test_slow_bins_past_the_half_are_no_cliff_when_most_connects_stay_fast() -> None:
    """tcp_tw_reuse: the even ports come back out of TIME_WAIT and stay fast while the
    range sits nearly full; only the few that take an odd port scan, and fill each bin
    from the half on with slow ones. Connects as a whole did not slow down."""
    data = _fill(slow_rate=1_000.0)
    reused = 30_000
    occupancy = np.concatenate([data.occupancy, np.full(reused, 0.995)])
    fast = 0.01 * np.random.default_rng(2).lognormal(0.0, 0.3, reused)
    start = data.start_s[-1] + np.arange(1, reused + 1) / 50_000
    both = CliffInput(occupancy, np.concatenate([data.connect_ms, fast]),
                      np.concatenate([data.start_s, start]), data.failures_s)  # fmt: skip
    assert not detect_cliff(both).detected
    # the same slow bins without the fast mass are the cliff they look like
    assert detect_cliff(data).detected
