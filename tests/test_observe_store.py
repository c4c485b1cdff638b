"""An observation that runs for months: parts rotated on schedule and on demand, the
oldest dropped by age or by size, and what is kept merged at the end
(``harness.observe.store``), on the real file system with a clock the test moves."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from harness.observe.store import HOST_SCHEMA, PATHS_SCHEMA, ObserveStore, Retention

START = 1_800_000_000.0  # a whole second: the parts are named by the second


def _batches(t: float) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    paths = pa.RecordBatch.from_pylist([{"time": t, "label": "a -> b:1"}], schema=PATHS_SCHEMA)
    host = pa.RecordBatch.from_pylist([{"time": t, "paths": 1}], schema=HOST_SCHEMA)
    return paths, host


def _observe(
    out: Path, retention: Retention, seconds: int, hup_at: int | None = None
) -> ObserveStore:
    now = [START]
    store = ObserveStore(out, retention, clock=lambda: now[0])
    for i in range(seconds * 10):  # a sample every 100 ms
        now[0] = START + i / 10
        store.write(*_batches(now[0]))
        if hup_at is not None and i == hup_at * 10:
            store.rotate()  # what SIGHUP does
    now[0] = START + seconds
    return store


def test_parts_older_than_keep_go_and_the_rest_is_merged_at_the_end(tmp_path: Path) -> None:
    store = _observe(tmp_path, Retention(rotate_s=2.0, keep_s=4.0), seconds=20)
    parts = sorted(p.name for p in store.parts.glob("paths-*.parquet"))
    assert 2 <= len(parts) <= 3, parts  # 4 s of 2 s parts, and the one being finished
    assert store.rotations == 9 and store.dropped == 9 - len(parts)
    rows, samples = store.close()
    times = pq.read_table(tmp_path / "host.parquet").column("time").to_pylist()
    assert samples == len(times) == rows
    assert times == sorted(times) and times[-1] == START + 19.9  # the newest, in order
    assert START + 20 - times[0] <= 4.0 + 2.0  # keep, and at most one part more
    assert not store.parts.exists()  # merged into the two files


def test_a_size_bound_keeps_the_newest_parts_within_it(tmp_path: Path) -> None:
    store = _observe(tmp_path, Retention(rotate_s=1.0, keep_bytes=1), seconds=10)
    # each part is more than a byte: only the newest finished one stays
    assert len(list(store.parts.glob("paths-*.parquet"))) == 1
    store.close()
    times = pq.read_table(tmp_path / "paths.parquet").column("time").to_pylist()
    assert times and min(times) >= START + 9.0  # only the part open at the end


def test_rotate_on_demand_starts_a_new_part(tmp_path: Path) -> None:
    store = _observe(tmp_path, Retention(rotate_s=3600.0), seconds=3, hup_at=1)
    assert store.rotations == 1 and store.dropped == 0
    rows, samples = store.close()
    assert rows == samples == 30  # nothing dropped without keep


def test_without_retention_the_two_files_are_written_as_before(tmp_path: Path) -> None:
    store = _observe(tmp_path, None, seconds=2, hup_at=1)  # type: ignore[arg-type]
    assert store.rotations == 0
    assert store.close() == (20, 20)
    assert not store.parts.exists()
    assert (tmp_path / "paths.parquet").exists() and (tmp_path / "host.parquet").exists()


def test_a_restarted_agent_goes_on_with_what_the_last_one_kept(tmp_path: Path) -> None:
    """Stopped cleanly (merged files) or killed (streams cut), the earlier samples
    become parts of the next eph in the same directory, and retention covers them."""
    first = _observe(tmp_path, Retention(rotate_s=2.0, keep_s=3600.0), seconds=4)
    assert first.close() == (40, 40)
    killed = _observe(tmp_path / "killed", Retention(rotate_s=2.0), seconds=3)
    for writer in (killed._paths, killed._host):  # as SIGKILL leaves them: never finished
        writer.close()
    for f in killed._files:
        f.close()

    later = lambda: START + 100  # noqa: E731
    again = ObserveStore(tmp_path, Retention(rotate_s=2.0, keep_s=3600.0), later, resume=True)
    assert again.resumed == 2  # paths.parquet and host.parquet
    again.write(*_batches(START + 100))
    rows, samples = again.close()
    times = pq.read_table(tmp_path / "host.parquet").column("time").to_pylist()
    assert rows == samples == 41 and times[0] == START and times[-1] == START + 100

    after_kill = ObserveStore(tmp_path / "killed", Retention(rotate_s=2.0), later, resume=True)
    assert after_kill.resumed == 2  # the two streams of the part being written
    assert after_kill.close()[1] == 30  # every sample: the finished parts and the cut one
