"""The streaming merge: windows of rows sorted apart give the file one in-memory sort gives."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness import files
from harness.endpoints import ResolvedEndpoint
from harness.records import CONNECTIONS_SCHEMA, Part, RecordWriter, read_part
from harness.run import merge
from harness.run.merge import merge_parts

ENDPOINTS = [
    ResolvedEndpoint(socket.AF_INET, "127.0.0.1", 9000),
    ResolvedEndpoint(socket.AF_INET6, "::1", 9001),
]


def _part(path: Path, seed: int, engine: str, batches: int = 6) -> None:
    """A part of ``batches`` flushes, starts random but rising from flush to flush."""
    rng = np.random.default_rng(seed)
    writer = RecordWriter(path, endpoints=ENDPOINTS, close="client", engine=engine, pid=seed)
    for flush in range(batches):
        address = writer.address_id(f"10.0.0.{flush % 3 + seed}")
        starts = np.sort(rng.integers(flush * 1000, flush * 1000 + 1500, 40))
        for i, start in enumerate(starts):
            errno = 99 if i % 7 == 0 else 0
            row = (int(start), int(start) + 5000, int(start) + 9000, address, 40000 + i, i % 2)
            writer.add((*row, errno, 0, 0, 0, 0, 0))
        writer.flush()
    writer.close()


def _in_memory(parts: list[Part]) -> pa.Table:
    """What the merge must equal: every part read whole, concatenated, sorted."""
    tables = [read_part(p.path, p.host, p.shift_ns).table for p in parts]
    table = pa.concat_tables(tables).unify_dictionaries().combine_chunks()
    return _decoded(table.sort_by([("start_ns", "ascending"), ("pid", "ascending")]))


def _decoded(table: pa.Table) -> pa.Table:
    columns = [c.cast(pa.string()) if pa.types.is_dictionary(c.type) else c for c in table.columns]
    return pa.table(columns, names=table.column_names)


@pytest.mark.parametrize("window_rows", [50, 100_000])
def test_windows_merge_like_one_sort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window_rows: int
) -> None:
    monkeypatch.setattr(merge, "WINDOW_ROWS", window_rows)
    monkeypatch.setattr(merge, "ROW_GROUP_ROWS", 64)
    _part(tmp_path / "a.arrows", 1, "locust")
    _part(tmp_path / "b.arrows", 2, "uvloop")
    _part(tmp_path / "w.arrows", 3, "locust")
    parts = [
        Part(tmp_path / "a.arrows"),
        Part(tmp_path / "b.arrows"),
        Part(tmp_path / "w.arrows", host="worker-1", shift_ns=-700),  # another host's clock
    ]
    count, truncated = merge_parts(parts, tmp_path / "c.parquet")
    written = pq.read_table(tmp_path / "c.parquet")
    assert count == written.num_rows == 3 * 6 * 40 and truncated == []
    assert written.schema.remove_metadata() == CONNECTIONS_SCHEMA
    got = _decoded(written).sort_by([("start_ns", "ascending"), ("pid", "ascending")])
    assert got.equals(_in_memory(parts))
    assert np.all(np.diff(written.column("start_ns").to_numpy()) >= 0)
    if window_rows < 100:  # many windows: row groups as asked, one dictionary for all
        meta = pq.ParquetFile(tmp_path / "c.parquet").metadata
        assert meta.num_row_groups > 3
        assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) <= 64


def test_a_truncated_part_keeps_its_whole_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(merge, "WINDOW_ROWS", 30)
    path = tmp_path / "a.arrows"
    _part(path, 1, "locust", batches=3)
    os.truncate(path, path.stat().st_size - 100)  # inside the last batch
    count, truncated = merge_parts([path], tmp_path / "c.parquet")
    assert truncated == [path] and count == 2 * 40 == read_part(path).table.num_rows


@pytest.mark.parametrize("window", [1, 3, 10, 1000])
def test_two_sorted_files_merge_in_bounded_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """eph report --collect-from folds a worker's records into the run's file: the two
    sorted files are merged a batch of each at a time (it used to read both whole and
    sort them), and the result is the one sort of both."""
    rng = np.random.default_rng(window)
    a = pa.table({"start_ns": np.sort(rng.integers(0, 50, 40)), "who": ["a"] * 40})
    b = pa.table({"start_ns": np.sort(rng.integers(0, 50, 25)), "who": ["b"] * 25})
    pq.write_table(a, tmp_path / "a.parquet")
    pq.write_table(b, tmp_path / "b.parquet")
    monkeypatch.setattr(files, "SORTED_MERGE_ROWS", window)
    out = tmp_path / "a.parquet"  # written over one of its sources, as the fold does
    rows = files.merge_sorted_files(
        [tmp_path / "a.parquet", tmp_path / "b.parquet"], out, "start_ns"
    )
    got = pq.read_table(out)
    assert rows == got.num_rows == 65
    keys = got.column("start_ns").to_numpy()
    assert (np.diff(keys) >= 0).all()
    expected = sorted(
        zip(*[np.concatenate([a[c], b[c]]).tolist() for c in ("start_ns", "who")], strict=True)
    )
    assert sorted(zip(keys.tolist(), got.column("who").to_pylist(), strict=True)) == expected
