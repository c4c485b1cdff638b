"""``eph lab``: every load process records its CPU, and the summary charges it per attempt."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from harness.summary import Summary

from .conftest import eph, run_dir_summary, write_scenario

pytestmark = [pytest.mark.netns, pytest.mark.e2e, pytest.mark.serial]


@pytest.mark.parametrize(("engine", "processes"), [("locust", 2), ("uvloop", 1)])
def test_every_load_process_records_cpu_and_the_attempts_add_up(
    tmp_path: Path, engine: str, processes: int
) -> None:
    scenario = write_scenario(
        tmp_path / "cpu.toml",
        f"""
name = "cpu"
description = "test"
duration = "2s"
[target]
endpoints = ["127.0.0.1:9000"]
[listener]
[load]
engine = "{engine}"
processes = {processes}
users = 10
spawn_rate = 100
backoff = "20ms"
connect_timeout = "1s"
[kernel]
tcp_tw_reuse = 0
ip_local_port_range = [40000, 40999]
[lab]
""",
    )
    out = tmp_path / "run"
    result = eph(["lab", str(scenario), "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list((out / "parts").glob("*.arrows")), "every part was merged"

    cpu = pq.read_table(out / "cpu.parquet")
    records = pq.read_table(out / "connections.parquet")
    engines = cpu.column("engine").to_pylist()
    pids = cpu.column("pid").to_numpy()
    attempts = cpu.column("attempts").to_numpy()
    # each process that recorded connections has CPU rows, and they counted exactly its
    # records (conservation, per process and in all)
    record_pids, record_counts = np.unique(records.column("pid").to_numpy(), return_counts=True)
    assert len(record_pids) == processes
    for pid, count in zip(record_pids, record_counts, strict=True):
        assert (pids == pid).sum() >= 2, f"process {pid} has no CPU intervals"
        assert int(attempts[pids == pid].sum()) == int(count)
    assert int(attempts.sum()) == records.num_rows
    expected = {"locust"} if engine == "locust" else {"uvloop", "uvloop-driver"}
    assert set(engines) == expected
    # a uvloop child's driver (its Locust process) records CPU but no attempts
    assert len(np.unique(pids)) == processes * len(expected)
    assert not attempts[np.array(engines) == "uvloop-driver"].any()

    summary = Summary.from_json(run_dir_summary(out))
    assert summary.conservation.ok, summary.conservation
    section = summary.cpu
    assert section is not None
    assert section.attempts == records.num_rows == summary.connections.attempted
    assert section.processes == processes * len(expected)
    per_attempt = section.system_us_per_attempt
    assert per_attempt is not None and per_attempt > 0 and math.isfinite(per_attempt)
    assert section.by_occupancy, "the collector's samples place the intervals"
    assert sum(band.attempts for band in section.by_occupancy) == section.attempts


def test_system_cpu_per_connect_rises_once_the_even_half_is_held(tmp_path: Path) -> None:
    """connect() tries the even ports first; once they are all in TIME_WAIT (no reuse)
    each connect walks them before it finds an odd one. Measured on a 4k range at
    1000/s: 40-64 µs of system CPU per attempt below half, 206-245 µs above it (8k
    ports: 480-530 µs; 16k: ~1000 µs). The factor asserted, 2, is below the 3.5 to 5.5
    measured, so a busy machine passes."""
    scenario = write_scenario(
        tmp_path / "half.toml",
        """
name = "half"
description = "test"
duration = "6s"
[target]
endpoints = ["127.0.0.1:9000"]
[listener]
[load]
engine = "uvloop"
users = 8
spawn_rate = 100
rate = 1000.0
backoff = "20ms"
connect_timeout = "1s"
[kernel]
tcp_tw_reuse = 0
ip_local_port_range = [40000, 44095]
[lab]
""",
    )
    out = tmp_path / "run"
    result = eph(["lab", str(scenario), "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    section = Summary.from_json(run_dir_summary(out)).cpu
    assert section is not None

    def per_attempt(low: float, high: float) -> float:
        bands = [
            b
            for b in section.by_occupancy
            if low <= b.occupancy[0] and b.occupancy[1] <= high and b.attempts
        ]
        attempts = sum(b.attempts for b in bands)
        assert attempts > 500, section.by_occupancy
        return sum((b.system_us_per_attempt or 0.0) * b.attempts for b in bands) / attempts

    below, above = per_attempt(0.0, 0.5), per_attempt(0.5, 0.9)
    assert above > 2 * below, (below, above, section.by_occupancy)
