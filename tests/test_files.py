"""Atomic writes and the truncated-stream reader that every run-directory file shares."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from harness.files import atomic_path, atomic_write, atomic_write_json, read_stream

SCHEMA = pa.schema([("x", pa.int64())])


def _stream(path: Path, batches: int, rows: int = 100) -> list[int]:
    """Write ``batches`` batches and return the file size after each one."""
    sizes = []
    with pa.OSFile(str(path), "wb") as sink, ipc.new_stream(sink, SCHEMA) as writer:
        for b in range(batches):
            writer.write_batch(pa.record_batch([pa.array(range(b * rows, (b + 1) * rows))], SCHEMA))
            sink.flush()
            sizes.append(path.stat().st_size)
    return sizes


def test_atomic_write_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"a": 1})
    atomic_write(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"kept": True})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert json.loads(target.read_text()) == {"kept": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_whole_stream_reads_clean(tmp_path: Path) -> None:
    path = tmp_path / "part.arrows"
    _stream(path, 3)
    read = read_stream(path)
    assert not read.truncated
    assert read.rows == 300 and read.dropped_bytes == 0
    assert read.table().column("x").to_pylist() == list(range(300))


@pytest.mark.parametrize("cut", [1, 17, 200])
def test_cut_stream_keeps_whole_batches_and_says_what_it_dropped(
    tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "part.arrows"
    sizes = _stream(path, 4)
    data = path.read_bytes()
    end = sizes[2] + cut  # two whole batches and a part of the third... or the fourth
    path.write_bytes(data[:end])
    with caplog.at_level(logging.WARNING, logger="harness.files"):
        read = read_stream(path)
    whole = sum(1 for s in sizes if s <= end)
    assert read.truncated
    assert len(read.batches) == whole
    assert read.rows == whole * 100
    assert read.dropped_bytes == end - sizes[whole - 1]
    assert "truncated" in caplog.text and str(read.dropped_bytes) in caplog.text


def test_stream_cut_before_its_schema(tmp_path: Path) -> None:
    path = tmp_path / "part.arrows"
    _stream(path, 1)
    path.write_bytes(path.read_bytes()[:10])
    read = read_stream(path)
    assert read.truncated and read.schema is None and read.dropped_bytes == 10
    assert read.table(SCHEMA).num_rows == 0
    with pytest.raises(ValueError, match="no schema"):
        read.table()


def test_missing_stream_is_an_error_not_an_exception(tmp_path: Path) -> None:
    read = read_stream(tmp_path / "absent.arrows")
    assert read.truncated and "unreadable" in (read.error or "")
