"""CPU per interval: the meter's accounting, its parts and merge, the uvloop frames,
Locust's CPU entries, and the summary's cpu section."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.load.cpu_meter import (
    CpuInterval,
    CpuMeter,
    cpu_part_path,
    is_cpu_part,
    merge_cpu_parts,
)
from harness.load.fastpath import write_frame
from harness.load.uvloop_engine import read_frame, read_frame_cpu
from harness.records import ROW_DTYPE, Part
from harness.report.cpu_section import cpu_section
from harness.report.port_occupancy import IN_USE
from harness.run.readings import locust_request_count

from .conftest import ROOT

# A child process burns CPU between ticks until its own CPU clock has moved by
# BURN_S: first in user space (a Python loop), then in the kernel (reading
# /dev/zero, which the kernel fills: system time). It prints what its CPU clock
# said for each interval; the meter's rows must agree.
BURN = r"""
import json, os, sys, time
from pathlib import Path
import numpy as np
from harness.load.cpu_meter import CpuMeter
from harness.records import ROW_DTYPE

BURN_S = float(sys.argv[2])
meter = CpuMeter(Path(sys.argv[1]), engine="test")
rows = np.zeros(3, dtype=ROW_DTYPE)
rows["errno"] = [0, 99, 0]
clock = []
ticks = []  # monotonic ns just before and just after each tick

def tick(*args):
    before = time.monotonic_ns()
    meter.tick(*args)
    ticks.append((before, time.monotonic_ns()))

def burn(step):
    start = time.process_time()
    while time.process_time() - start < BURN_S:
        step()
    clock.append(time.process_time() - start)

tick()
burn(lambda: sum(range(2000)))
tick(rows)
with open("/dev/zero", "rb", buffering=0) as zero:
    burn(lambda: zero.read(1 << 20))
before = time.monotonic_ns()
meter.close()
ticks.append((before, time.monotonic_ns()))
print(json.dumps({"clock": clock, "ticks": ticks}))
"""

BURN_S = 0.3
TOLERANCE_S = 0.03  # getrusage splits the precise total by tick samples


def _read(path: Path) -> pa.Table:
    merged = path.parent / "cpu.parquet"
    merge_cpu_parts([Part(path)], merged)
    return pq.read_table(merged)


@pytest.mark.serial  # CPU time against wall time: another test's load would share the cores
def test_cpu_burned_in_a_child_is_counted_per_interval(tmp_path: Path) -> None:
    part = cpu_part_path(tmp_path / "parts", "test-1")
    out = subprocess.run(
        [sys.executable, "-c", BURN, str(part), str(BURN_S)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    said = json.loads(out.stdout)
    user_clock, system_clock = said["clock"]
    ticks = said["ticks"]
    table = _read(part)
    assert table.num_rows == 3  # the first tick, the user interval, the system interval
    _, user, system = table.to_pylist()
    assert (user["attempts"], user["succeeded"]) == (3, 2)
    assert (system["attempts"], system["succeeded"]) == (0, 0)
    for n, (row, clock) in enumerate(((user, user_clock), (system, system_clock))):
        spent = (row["utime_us"] + row["stime_us"]) / 1e6
        assert spent == pytest.approx(clock, abs=TOLERANCE_S), row
        # the interval lies between what the child saw around the two ticks that close
        # it (not against the CPU it spent: the process has threads besides the burning
        # one, numpy's and Arrow's, and CPU summed over them may exceed the wall time)
        (open_before, open_after), (close_before, close_after) = ticks[n], ticks[n + 1]
        assert close_before - open_after <= row["interval_ns"] <= close_after - open_before
    assert user["utime_us"] > 0.8 * BURN_S * 1e6 > user["stime_us"]
    assert system["stime_us"] > 0.5 * BURN_S * 1e6 > system["utime_us"]
    assert table.column("engine").to_pylist() == ["test"] * 3
    assert len(set(table.column("pid").to_pylist())) == 1


def test_merge_keeps_each_process_and_the_whole_batches_of_a_truncated_part(
    tmp_path: Path,
) -> None:
    parts = []
    for n in range(2):
        meter = CpuMeter(cpu_part_path(tmp_path, f"p{n}"), engine=f"e{n}", pid=100 + n)
        for _ in range(3):
            meter.tick(np.zeros(5, dtype=ROW_DTYPE))
        meter.close()
        parts.append(meter.path)
    assert all(is_cpu_part(p) for p in parts)
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) - 20])  # killed mid-batch
    out = tmp_path / "cpu.parquet"
    rows = merge_cpu_parts([Part(parts[0]), Part(parts[1], "worker", 5)], out)
    table = pq.read_table(out)
    assert rows == table.num_rows == 4 + 3
    assert table.column("t_ns").to_pylist() == sorted(table.column("t_ns").to_pylist())
    by_pid = dict(zip(*np.unique(table.column("pid").to_numpy(), return_counts=True), strict=True))
    assert by_pid == {100: 4, 101: 3}
    hosts = set(table.column("host").to_pylist())
    assert "worker" in hosts and len(hosts) == 2


def test_a_uvloop_frame_carries_the_childs_cpu() -> None:
    rows = np.zeros(4, dtype=ROW_DTYPE)
    rows["local_port"] = [1, 2, 3, 4]
    cpu = CpuInterval(10, 500_000_000, 1200, 3400, 4, 3)
    stream = io.BytesIO()
    write_frame(stream, rows, cpu)
    write_frame(stream, rows[:0])
    stream.seek(0)
    frame = read_frame_cpu(stream)
    assert frame is not None and frame.cpu == cpu
    assert frame.rows["local_port"].tolist() == [1, 2, 3, 4]
    rest = read_frame(stream)
    assert rest is not None and len(rest) == 0
    assert read_frame(stream) is None


LOCUST_FEED = r"""
import json
from locust.stats import RequestStats
from harness.load.cpu_meter import CpuInterval
from harness.load.stats import CPU_REQUEST_TYPE, SYSTEM_CPU, USER_CPU, feed_cpu
import time

stats = RequestStats()
now = time.monotonic_ns()
feed_cpu(stats, CpuInterval(now, 500_000_000, 1000, 4000, 100, 90))
feed_cpu(stats, CpuInterval(now, 500_000_000, 3000, 36000, 300, 300))
feed_cpu(stats, CpuInterval(now, 500_000_000, 5000, 5000, 0, 0))  # nothing to charge
system = stats.get(SYSTEM_CPU, CPU_REQUEST_TYPE)
user = stats.get(USER_CPU, CPU_REQUEST_TYPE)
print(json.dumps({
    "requests": system.num_requests,
    "system_avg": system.avg_response_time,
    "user_avg": user.avg_response_time,
    "min": system.min_response_time,
    "max": system.max_response_time,
    "median": system.median_response_time,
    "total": stats.total.num_requests,
    "json": stats.serialize_stats(),
}))
"""


def test_locust_shows_cpu_microseconds_per_connection_outside_the_total(tmp_path: Path) -> None:
    out = subprocess.run(  # importing locust monkey-patches the process
        [sys.executable, "-c", LOCUST_FEED],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    got = json.loads(out.stdout)
    assert got["requests"] == 400
    assert got["system_avg"] == pytest.approx(40_000 / 400)  # µs spent over attempts
    assert got["user_avg"] == pytest.approx(4000 / 400)
    assert (got["min"], got["max"], got["median"]) == (40, 120, 120)
    assert got["total"] == 0  # not requests: the Aggregated row is the connections'
    # eph's conservation count skips them in Locust's --json-file output
    stats_json = tmp_path / "locust.json"
    tcp = {"method": "TCP", "name": "127.0.0.1:9000", "num_requests": 7}
    stats_json.write_text(json.dumps([*got["json"], tcp]))
    assert locust_request_count(stats_json) == 7


def _cpu_table(t_s: list[float], stime_us: list[int], attempts: list[int]) -> pa.Table:
    n = len(t_s)
    return pa.table(
        {
            "t_ns": pa.array([int(t * 1e9) for t in t_s], pa.int64()),
            "interval_ns": pa.array([500_000_000] * n, pa.int64()),
            "utime_us": pa.array([100] * n, pa.int64()),
            "stime_us": pa.array(stime_us, pa.int64()),
            "attempts": pa.array(attempts, pa.uint32()),
            "succeeded": pa.array(attempts, pa.uint32()),
            "host": pa.array(["h"] * n),
            "pid": pa.array([1, 2] * (n // 2), pa.uint32()),
        }
    )


def _samples(t_s: list[float], in_use: list[int]) -> pa.Table:
    n = len(t_s)
    return pa.table(
        {
            "t_ns": pa.array([int(t * 1e9) for t in t_s], pa.int64()),
            "scope": pa.array(["to 127.0.0.1:9000"] * n),
            **{
                state: pa.array(in_use if state == "time_wait" else [0] * n, pa.int64())
                for state in IN_USE
            },
        }
    )


def test_the_cpu_section_bands_intervals_by_occupancy_at_their_middle() -> None:
    # two processes; the range (1000 ports) fills from 0 to 1000 over 4 s
    cpu = _cpu_table(
        [1.0, 1.0, 4.0, 4.0], stime_us=[1000, 0, 30_000, 6000], attempts=[100, 0, 100, 0]
    )
    samples = _samples([0.0, 4.0], [0, 1000])
    section = cpu_section(cpu, samples, 1000)
    assert section is not None
    assert (section.processes, section.intervals, section.attempts) == (2, 4, 200)
    assert section.system_us_per_attempt == pytest.approx(37_000 / 200)
    assert section.system_s == pytest.approx(0.037)
    # the first intervals' middle (0.75 s) is at 18.75 % occupancy, the last (3.75 s) 93.75 %
    low, high = section.by_occupancy
    assert (low.occupancy, low.attempts, low.system_us_per_attempt) == ([0.1, 0.2], 100, 10.0)
    assert (high.occupancy, high.attempts, high.system_us_per_attempt) == ([0.9, 1.0], 100, 360.0)
    assert cpu_section(cpu, None, 1000) is not None
    assert cpu_section(cpu, None, 1000).by_occupancy == []  # type: ignore[union-attr]
    assert cpu_section(None, samples, 1000) is None
