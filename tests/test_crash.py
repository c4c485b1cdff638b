"""A run whose eph process dies: ``state.json`` says where it stood, and ``eph report``
summarizes it as crashed from what its parts hold."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from harness.errors import RunDirError
from harness.records import FLUSH_INTERVAL
from harness.run.crash import crashed_state
from harness.rundir import RunDir
from harness.runstate import STATE_FILE, Phase, noting_errors, read_state, write_state

from .conftest import eph, run_dir_summary, write_scenario
from .test_supervisor import _kill_and_measure, _marked_eph, _wait_for_load

# the writer's flush loop is a gevent sleep of FLUSH_INTERVAL plus the write itself
# on a shared 2-core machine: the last flush before a kill may be this much older
FLUSH_SLACK = 0.5


def _scenario(tmp_path: Path, duration: str) -> Path:
    return write_scenario(
        tmp_path / "s.toml",
        f"""
name = "crash"
duration = "{duration}"
[target]
endpoints = ["127.0.0.1:0"]
[listener]
[load]
users = 4
spawn_rate = 100
rate = 300
connect_timeout = "1s"
io_timeout = "1s"
""",
    )


def _part_rows(parts: Path) -> tuple[int, int, int]:
    """Rows, first and last start_ns the record parts hold, read batch by batch (a batch
    cut by the kill is not counted: eph keeps whole batches too)."""
    rows, first, last = 0, None, None
    for path in sorted(parts.glob("*.arrows")):
        if path.name.startswith("cpu-"):
            continue
        with pa.OSFile(str(path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
                for batch in reader:
                    start = batch.column("start_ns").to_numpy()
                    if len(start):
                        rows += len(start)
                        first = int(start.min()) if first is None else min(first, start.min())
                        last = int(start.max()) if last is None else max(last, start.max())
            except (pa.ArrowInvalid, OSError):
                pass
    assert first is not None and last is not None, "the parts held no records"
    return rows, int(first), int(last)


@pytest.mark.e2e
def test_kill_9_mid_load_then_report_says_crashed_with_every_flushed_record(
    tmp_path: Path,
) -> None:
    mark, out = uuid.uuid4().hex, tmp_path / "run"
    scenario = _scenario(tmp_path, "60s")
    with _marked_eph(["run", str(scenario), "--out", str(out)], tmp_path, mark) as proc:
        _wait_for_load(out, proc, tmp_path, lambda: True)
        time.sleep(1.5)
        state = read_state(out)
        assert state is not None and state.phase is Phase.LOADING and state.pid == proc.pid
        refused = eph(["report", str(out)], cwd=tmp_path)
        assert refused.returncode != 0 and "still going" in refused.stderr + refused.stdout
        killed_ns = time.monotonic_ns()
        _kill_and_measure(proc, mark)  # asserts no process of the run is left
    rows, first_ns, last_ns = _part_rows(out / "parts")
    done = eph(["report", str(out)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = run_dir_summary(out)
    assert summary["stop_reason"] == "crashed" and summary["interrupted"] is True
    assert summary["connections"]["attempted"] == rows == summary["conservation"]["records"]
    crash = summary["crash"]
    assert crash["phase"] == "loading" and crash["pid"] == proc.pid and crash["host_checked"]
    assert crash["last_record_s"] == pytest.approx((last_ns - first_ns) / 1e9, abs=1e-3)
    lag = (killed_ns - last_ns) / 1e9
    assert 0 <= lag <= FLUSH_INTERVAL + FLUSH_SLACK, f"last record {lag:.2f} s before the kill"
    assert crash["last_sample_s"] is not None and crash["last_sample_s"] > 0
    assert "The run crashed" in (out / "report.html").read_text()
    again = eph(["report", str(out)], cwd=tmp_path)  # parts merged: the same figures
    assert again.returncode == 0, again.stderr[-3000:]
    assert run_dir_summary(out)["crash"] == crash
    print(f"{rows} records, the last {lag:.2f} s before kill -9")


@pytest.mark.e2e
def test_state_file_walks_through_every_phase_of_a_normal_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                phase = json.loads((out / STATE_FILE).read_text())["phase"]
            except (OSError, ValueError):
                phase = None
            if phase is not None and (not seen or seen[-1] != phase):
                seen.append(phase)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        done = eph(["run", str(_scenario(tmp_path, "2s")), "--out", str(out)], cwd=tmp_path)
    finally:
        stop.set()
        watcher.join()
    assert done.returncode == 0, done.stderr[-3000:]
    order = [p.value for p in Phase]
    assert seen == sorted(seen, key=order.index), seen  # never backwards
    assert {"starting", "loading", "finished"} <= set(seen), seen
    state = read_state(out)
    assert state is not None and state.phase is Phase.FINISHED
    assert state.stop_reason == "duration" and state.host == socket.gethostname()
    assert state.load_started_at is not None and state.clock_offset_ns is not None
    assert "crash" not in run_dir_summary(out)
    assert crashed_state(RunDir(out)) is None


def test_a_state_left_by_a_dead_process_is_a_crash_and_a_live_one_is_refused(
    tmp_path: Path,
) -> None:
    run = RunDir.open(tmp_path / "run", create=True)
    write_state(run.path, Phase.LOADING, started_at=time.time())
    with pytest.raises(RunDirError, match="still going"):
        crashed_state(run)  # this process wrote it, and runs
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    data = json.loads((run.path / STATE_FILE).read_text())
    (run.path / STATE_FILE).write_text(json.dumps({**data, "pid": int(child.stdout)}))
    state = crashed_state(run)
    assert state is not None and state.phase is Phase.LOADING
    (run.path / STATE_FILE).write_text(json.dumps({**data, "host": "elsewhere"}))
    state = crashed_state(run)  # another host's process: not checked, reported as crashed
    assert state is not None and state.alive() is None
    write_state(run.path, Phase.FINISHED, stop_reason="duration")
    assert crashed_state(run) is None
    assert read_state(run.path).started_at is not None  # type: ignore[union-attr]
    assert os.stat(run.path / STATE_FILE).st_size > 0


def test_an_error_that_ends_eph_is_noted_in_the_phase_it_struck(tmp_path: Path) -> None:
    write_state(tmp_path, Phase.FINALIZING, stop_reason="duration")
    with pytest.raises(RunDirError), noting_errors(tmp_path):
        raise RunDirError(tmp_path, "cannot write connections.parquet (No space left)")
    state = read_state(tmp_path)
    assert state is not None and state.phase is Phase.FINALIZING
    assert state.stop_reason == "duration" and "No space left" in (state.error or "")
