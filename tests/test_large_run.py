"""A large run's records are scanned in batches, not held: the numbers must be the ones
the in-memory analysis finds. Batches are shrunk to a few dozen rows so that spans,
first failures and ties cross batch edges."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.errors import RunDirError
from harness.observe.collector import SAMPLES_SCHEMA, STATES
from harness.records import CONNECTIONS_SCHEMA, application_zeros
from harness.report import disk_sweep, ondisk
from harness.report.analysis import analyze
from harness.report.figures.connections import allocation
from harness.report.hosts import HostSamples
from harness.report.ondisk import OnDisk
from harness.report.port_occupancy import kernel_conservation
from harness.report.scan import scan_records
from harness.report.summarize import summarize
from harness.report.tuples_on_disk import CycleCount, audit_on_disk
from harness.run.finalize import finalize, load_run
from harness.rundir import RunDir
from harness.scenario import parse_scenario
from harness.summary import Kernel

KERNEL = Kernel(ip_local_port_range=[40000, 40999], tcp_tw_reuse=1, tcp_timestamps=1)
SCENARIO = 'name = "t"\n[target]\nendpoints = ["127.0.0.1:9000"]\n'


def varied_table(n: int, seed: int) -> pa.Table:
    """Successes, refusals in runs of 1 to 30 (outages and blips), then EADDRNOTAVAIL
    mixed with successes; starts with ties; microsecond latencies of many values."""
    rng = np.random.default_rng(seed)
    errno = np.zeros(n, np.uint16)
    at = 0
    while at < n // 2:
        at += int(rng.integers(5, 60))
        errno[at : at + int(rng.integers(1, 30))] = 111
        at += 30
    errno[n // 2 :][rng.random(n - n // 2) < 0.4] = 99
    start = np.cumsum(rng.integers(0, 3, n)) * 1_000_000 + 7_000_000_000  # 0: a tie
    ok = errno == 0
    ports = np.where(ok, 40000 + rng.integers(0, 1000, n), 0)

    def const(value: str) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value]))

    return pa.table(
        {
            "start_ns": pa.array(start.astype(np.int64)),
            "connect_us": pa.array(rng.integers(20, 5000, n).astype(np.uint32)),
            "close_us": pa.array(rng.integers(5000, 90_000, n).astype(np.uint32)),
            "local_addr": const("127.0.0.1"),
            "local_port": pa.array(ports.astype(np.uint16)),
            "remote_addr": const("127.0.0.1"),
            "remote_port": pa.array(np.full(n, 9000, np.uint16)),
            "errno": pa.array(errno),
            "io_errno": pa.array(np.where(ok & (rng.random(n) < 0.01), 104, 0).astype(np.uint16)),
            "close": const("client"),
            "engine": const("locust"),
            "pid": pa.array(np.ones(n, np.uint32)),
            "host": const("localhost"),
            **application_zeros(n),
        },
        schema=CONNECTIONS_SCHEMA,
    )


def on_disk(table: pa.Table, path: Path) -> OnDisk:
    pq.write_table(table, path, row_group_size=100)
    return OnDisk(path, table.num_rows)


def reuse_table(n: int, seed: int) -> pa.Table:
    """A small range cycled fast: tuples reused out of TIME_WAIT, a few used twice at
    once (a concurrent duplicate), failures between."""
    table = varied_table(n, seed)
    rng = np.random.default_rng(seed)
    ports = table.column("local_port").to_numpy() % 40 + 40000
    ports[table.column("errno").to_numpy() != 0] = 0
    close_us = table.column("close_us").to_numpy().copy()
    close_us[rng.integers(0, n, 5)] = 90_000_000  # held 90 s: the next use overlaps
    table = table.set_column(4, "local_port", pa.array(ports.astype(np.uint16)))
    return table.set_column(2, "close_us", pa.array(close_us))


@pytest.mark.parametrize("seed", [1, 2])
def test_the_tuple_audit_by_partitions_is_the_whole_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    monkeypatch.setattr(ondisk, "BATCH_ROWS", 50)
    table = reuse_table(4000, seed)
    first = int(table.column("start_ns").to_numpy()[2000])
    held_cycles = CycleCount(after_ns=first)
    expected = audit_on_disk(ondisk.Held(table), held_cycles)  # one partition, in memory
    cycles = CycleCount(after_ns=first)
    got = audit_on_disk(on_disk(table, tmp_path / "c.parquet"), cycles)
    assert expected.concurrent_duplicates > 0 and expected.reused_out_of_time_wait > 100
    for name in ("distinct", "max_uses", "concurrent_duplicates", "reused_out_of_time_wait"):
        assert getattr(got, name) == getattr(expected, name), name
    assert got.reuse_distance_median == expected.reuse_distance_median
    assert got.examples == expected.examples
    assert held_cycles.count > 0
    assert cycles.count == held_cycles.count
    assert cycles.total_s == pytest.approx(held_cycles.total_s)
    # ages counted per microsecond: quantiles within a microsecond of the exact ones
    exact, binned = expected.reuse_age_quantiles(), got.reuse_age_quantiles()
    assert exact is not None and binned is not None
    for q in ("p50", "p90", "p99", "min"):
        assert abs(getattr(exact, q) - getattr(binned, q)) <= 1e-4 + 1e-6, q
    assert not list((tmp_path).glob(".eph-tuples-*"))  # the partitions are gone


def _samples(table: pa.Table, usable: int) -> pa.Table:
    """A collector sample every 100 ms, ports in use rising to the whole range."""
    start = table.column("start_ns").to_numpy()
    times = np.arange(start.min() - 50_000_000, start.max() + 200_000_000, 100_000_000)
    in_use = np.minimum(usable, np.arange(len(times)) * usable // (len(times) * 3 // 4))
    n = len(times)
    columns: dict[str, object] = {"t_ns": np.repeat(times, 2)}
    columns["scope"] = np.tile(["all", "to 127.0.0.1:9000"], n)
    for state in STATES:
        value = in_use if state == "time_wait" else np.zeros(n, np.int64)
        columns[state] = np.repeat(value, 2)
    columns["ports"] = pa.nulls(2 * n, pa.list_(pa.uint16()))
    columns["sample_ms"] = np.full(2 * n, 1.5)
    for name in SAMPLES_SCHEMA.names[len(STATES) + 4 :]:
        columns[name] = pa.array(np.repeat(np.arange(n) * 7, 2), mask=np.tile([False, True], n))
    return pa.table(columns).cast(SAMPLES_SCHEMA)


def cliff_table(n: int, seed: int) -> pa.Table:
    """Connects slow down tenfold past 60% of the run: the cliff, then exhaustion."""
    table = reuse_table(n, seed)
    connect = table.column("connect_us").to_numpy().astype(np.int64) % 300 + 100
    connect[int(n * 0.6) :] *= 10
    return table.set_column(1, "connect_us", pa.array(connect.astype(np.uint32)))


def test_a_large_runs_analysis_is_the_in_memory_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ondisk, "BATCH_ROWS", 300)
    table = cliff_table(6000, 4)
    samples = _samples(table, 1000)
    scenario = parse_scenario(SCENARIO)
    args = {"scenario": "t", "started_at": "x", "interrupted": False, "kernel": KERNEL}
    records = on_disk(table, tmp_path / "c.parquet")
    expected = summarize(scan_records(table), duration_s=3.0, **args)  # type: ignore[arg-type]
    expected = analyze(table, samples, scenario, expected)
    got = summarize(scan_records(records), duration_s=3.0, **args)  # type: ignore[arg-type]
    got = analyze(records, samples, scenario, got)
    assert expected.latency_cliff is not None and expected.latency_cliff.detected
    assert expected.occupancy is not None and expected.capacity.measured_sustained_rate_per_s
    exact, binned = expected.model_dump(), got.model_dump()
    ages = exact["time_wait"].pop("reuse_age_s"), binned["time_wait"].pop("reuse_age_s")
    assert exact == binned
    for q in ("p50", "p90", "p99", "min"):  # binned to 1 us
        assert abs(ages[0][q] - ages[1][q]) <= 1.1e-4, q
    conserved = kernel_conservation(table, samples), kernel_conservation(records, samples)
    assert conserved[0] == conserved[1]


def _run(path: Path, table: pa.Table, samples: pa.Table) -> Path:
    run = RunDir.open(path, create=True)
    run.write_scenario(parse_scenario(SCENARIO))
    pq.write_table(table, run.connections)
    pq.write_table(samples, run.path / "samples.parquet")
    finalize(run.path, started_at=1_700_000_000.0, duration_s=3.0, kernel=KERNEL)
    return run.path


def test_a_large_run_reports_what_a_small_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = cliff_table(6000, 5)
    samples = _samples(table, 1000)
    small = _run(tmp_path / "small", table, samples)
    held = load_run(small)
    monkeypatch.setattr(ondisk, "IN_MEMORY_ROWS", 1000)
    monkeypatch.setattr(ondisk, "BATCH_ROWS", 300)
    monkeypatch.setattr(disk_sweep, "FIGURE_ROWS", 500)
    large = _run(tmp_path / "large", table, samples)
    exact, scanned = (json.loads((p / "summary.json").read_text()) for p in (small, large))
    exact["time_wait"].pop("reuse_age_s"), scanned["time_wait"].pop("reuse_age_s")
    assert exact == scanned
    drawn = load_run(large)
    assert drawn.every == 12 and drawn.table.num_rows == 500 and held.every == 1
    titles = [ax.get_title() for ax in allocation(drawn).axes]  # a figure drawn from the sample
    assert any("(1 in 12 connections drawn)" in t for t in titles)
    for ours, theirs in zip(held.per_second(), drawn.per_second(), strict=True):
        if isinstance(ours, dict):
            assert ours.keys() == theirs.keys()
            assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
        else:
            assert np.array_equal(ours, theirs)
    assert np.array_equal(held.port_uses(), drawn.port_uses())
    assert drawn.audit.reused_out_of_time_wait == held.audit.reused_out_of_time_wait


def test_each_hosts_share_of_a_large_run_is_the_in_memory_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ondisk, "BATCH_ROWS", 250)
    table = cliff_table(3000, 6)
    n = table.num_rows
    which = (np.arange(n) % 3 == 0).astype(np.int32)  # a third of the rows on worker b
    hosts_column = pa.DictionaryArray.from_arrays(pa.array(which), pa.array(["a", "b"]))
    table = table.set_column(table.schema.get_field_index("host"), "host", hosts_column)
    hosts = [HostSamples("a", None, None), HostSamples("b", None, None, {"clock_shift_ns": 5})]
    scenario = parse_scenario(SCENARIO)
    args = {"scenario": "t", "started_at": "x", "interrupted": False, "kernel": KERNEL}
    records = on_disk(table, tmp_path / "c.parquet")
    expected = summarize(scan_records(table), duration_s=3.0, **args)  # type: ignore[arg-type]
    expected = analyze(table, None, scenario, expected, hosts=hosts)
    got = summarize(scan_records(records), duration_s=3.0, **args)  # type: ignore[arg-type]
    got = analyze(records, None, scenario, got, hosts=hosts)
    assert [h.attempted for h in expected.hosts] == [2000, 1000]
    assert got.hosts == expected.hosts


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_during_the_audit_says_how_much_it_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ondisk, "BATCH_ROWS", 500)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        table = varied_table(8000, 1)
        pq.write_table(table, small / "c.parquet", row_group_size=2000)
        records = OnDisk(small / "c.parquet", table.num_rows)
        assert records.path.stat().st_size < 200_000  # the records fit; the audit's files do not
        with pytest.raises(
            RunDirError, match=r"8,000 connections needs up to 0.3 MiB free.*eph report"
        ):
            audit_on_disk(records, CycleCount(after_ns=None))
        assert not list(small.glob(".eph-tuples-*")), "its partial files are removed"
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_crashed_run_on_disk_reaches_as_far_as_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash section of a run past 2 million records failed with a TypeError: it
    took a table and got the on-disk handle. One implementation reads both."""
    import socket
    import time

    from harness.run.crash import crash_section
    from harness.runstate import Phase, RunState

    monkeypatch.setattr(ondisk, "BATCH_ROWS", 37)
    table = varied_table(2_000, seed=11)
    state = RunState(
        phase=Phase.LOADING,
        pid=2**22 + 1,  # no such process
        host=socket.gethostname(),
        updated_at=time.time(),
        clock_offset_ns=1_700_000_000 * 10**9,
    )
    held = crash_section(state, table, None)
    scanned = crash_section(state, on_disk(table, tmp_path / "c.parquet"), None)
    assert scanned == held
    assert held.last_record_s is not None and held.last_record_s > 0


def test_a_crashed_nat_run_past_the_limit_reports_like_a_small_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's two cases end to end, through eph report: a crashed run scanned from
    disk reports as crashed with every record, and a NAT run keeps its nat section,
    both as the same run held in memory does."""
    import socket
    import time

    from harness.run.finalize import rerender
    from harness.runstate import STATE_FILE, Phase, RunState

    from .tables import write_nat

    table = varied_table(3000, seed=5)
    t0 = int(table.column("start_ns")[0].as_py())
    crashed = RunState(
        phase=Phase.LOADING,
        pid=2**22 + 3,  # no such process: the run's eph is gone
        host=socket.gethostname(),
        updated_at=time.time(),
        started_at=1_700_000_000.0,
        load_started_at=1_700_000_001.0,
        clock_offset_ns=10**18,
    )

    def crashed_run(path: Path) -> dict[str, object]:
        run = RunDir.open(path, create=True)
        run.write_scenario(parse_scenario(SCENARIO))
        pq.write_table(table, run.connections)
        (run.path / STATE_FILE).write_text(crashed.model_dump_json())
        t = [t0 + i * 500_000_000 for i in range(8)]
        write_nat(run.path, t, in_use=[1, 2, 4, 4, 4, 4, 4, 4], dropped=[0, 0, 0, 2, 4, 6, 8, 8])
        return rerender(run.path).to_json()

    small = crashed_run(tmp_path / "small")
    monkeypatch.setattr(ondisk, "IN_MEMORY_ROWS", 1000)
    monkeypatch.setattr(ondisk, "BATCH_ROWS", 300)
    monkeypatch.setattr(disk_sweep, "FIGURE_ROWS", 500)
    large = crashed_run(tmp_path / "large")
    assert large["crash"] == small["crash"] and large["crash"] is not None
    assert large["nat"] == small["nat"] and large["nat"] is not None
    assert large["connections"] == small["connections"]
    assert large["connections"]["attempted"] == 3000  # every record  # type: ignore[index]
