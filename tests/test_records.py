"""Records: staged rows stream to Arrow parts that survive truncation and merge to Parquet."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from harness.endpoints import ResolvedEndpoint
from harness.records import (
    CONNECTIONS_SCHEMA,
    NO_APPLICATION,
    ROW_DTYPE,
    RecordWriter,
    read_part,
)
from harness.run.merge import merge_parts

ENDPOINTS = [
    ResolvedEndpoint(socket.AF_INET, "127.0.0.1", 9000),
    ResolvedEndpoint(socket.AF_INET6, "::1", 9001),
]


def _writer(path: Path, engine: str = "locust") -> RecordWriter:
    return RecordWriter(path, endpoints=ENDPOINTS, close="client", engine=engine, pid=4242)


def _add(writer: RecordWriter, n: int, start: int = 0, errno: int = 0) -> None:
    address = writer.address_id("127.0.0.1")
    for i in range(n):
        writer.add(
            (
                start + i,
                start + i + 10000,
                start + i + 20000,
                address,
                40000 + i,
                i % 2,
                errno,
                0,
                *NO_APPLICATION,
            )
        )


def test_http_and_tls_fields_reach_the_merged_file(tmp_path: Path) -> None:
    """The handshake's stamp becomes µs from the start (0 stays 0: no TLS); requests,
    status and bytes pass through to connections.parquet."""
    writer = _writer(tmp_path / "p.arrows", engine="uvloop")
    writer.add((1_000_000, 1_050_000, 1_900_000, 0, 40000, 0, 0, 0, 1_300_000, 3, 200, 420))
    writer.add((2_000_000, 2_050_000, 2_100_000, 0, 40001, 0, 0, 1603, 0, 1, 503, 90))
    writer.close()
    merge_parts([tmp_path / "p.arrows"], tmp_path / "c.parquet")
    table = pq.read_table(tmp_path / "c.parquet")
    assert table.column("tls_us").to_pylist() == [300, 0]
    assert table.column("requests").to_pylist() == [3, 1]
    assert table.column("status").to_pylist() == [200, 503]
    assert table.column("rx_bytes").to_pylist() == [420, 90]


def test_row_is_small() -> None:
    assert ROW_DTYPE.itemsize <= 40  # the memory budget per connection


def test_flush_writes_batches_and_merge_expands(tmp_path: Path) -> None:
    writer = _writer(tmp_path / "a.arrows")
    _add(writer, 10)
    assert len(writer.flush()) == 10
    _add(writer, 5, start=100, errno=99)
    rows = writer.close()
    assert len(rows) == 5 and writer.written == 15

    count, truncated = merge_parts([tmp_path / "a.arrows"], tmp_path / "c.parquet")
    assert (count, truncated) == (15, [])
    table = pq.read_table(tmp_path / "c.parquet")
    assert table.schema.names == CONNECTIONS_SCHEMA.names
    assert table.column("local_addr").to_pylist() == ["127.0.0.1"] * 15
    assert table.column("remote_addr").to_pylist()[:2] == ["127.0.0.1", "::1"]
    assert table.column("remote_port").to_pylist()[:2] == [9000, 9001]
    assert table.column("errno").to_pylist() == [0] * 10 + [99] * 5
    # durations computed at flush from the raw stamps: 10 us to connect, 20 us to close
    assert set(table.column("connect_us").to_pylist()) == {10}
    assert set(table.column("close_us").to_pylist()) == {20}
    assert set(table.column("pid").to_pylist()) == {4242}
    assert set(table.column("engine").to_pylist()) == {"locust"}


def test_merge_sorts_by_start_across_processes(tmp_path: Path) -> None:
    for name, start in (("a", 1), ("b", 0)):
        writer = _writer(tmp_path / f"{name}.arrows")
        writer.add((start, start, start, 0, 0, 0, 0, 0, 0, 0, 0, 0))
        writer.add((start + 10, start + 10, start + 10, 0, 0, 0, 0, 0, 0, 0, 0, 0))
        writer.close()
    merge_parts(sorted(tmp_path.glob("*.arrows")), tmp_path / "c.parquet")
    starts = pq.read_table(tmp_path / "c.parquet").column("start_ns").to_pylist()
    assert starts == [0, 1, 10, 11]


def test_truncated_part_keeps_whole_batches(tmp_path: Path) -> None:
    path = tmp_path / "a.arrows"
    writer = _writer(path)
    _add(writer, 100)
    writer.flush()
    size_after_first = path.stat().st_size
    _add(writer, 100, start=1000)
    writer.flush()
    # a crash mid-write: cut the second batch in half
    os.truncate(path, size_after_first + (path.stat().st_size - size_after_first) // 2)
    result = read_part(path)
    assert result.truncated
    assert result.table.num_rows == 100


def test_part_without_schema_reads_empty(tmp_path: Path) -> None:
    path = tmp_path / "dead.arrows"
    path.write_bytes(b"")
    result = read_part(path)
    assert result.truncated and result.table.num_rows == 0
    count, truncated = merge_parts([path], tmp_path / "c.parquet")
    assert count == 0 and truncated == [path]


def test_address_table_is_bounded(tmp_path: Path) -> None:
    writer = _writer(tmp_path / "a.arrows")
    for i in range(255):
        writer.address_id(f"10.0.{i // 250}.{i % 250}")
    with pytest.raises(ValueError, match="more than 255"):
        writer.address_id("192.0.2.1")
    writer.close()


def test_new_addresses_after_a_flush_still_map(tmp_path: Path) -> None:
    writer = _writer(tmp_path / "a.arrows")
    _add(writer, 1)
    writer.flush()
    second = writer.address_id("127.0.0.2")
    writer.add((5, 5, 5, second, 1, 0, 0, 0, 0, 0, 0, 0))
    writer.close()
    table = read_part(tmp_path / "a.arrows").table
    assert table.column("local_addr").to_pylist() == ["127.0.0.1", "127.0.0.2"]


def test_bulk_conversion_matches_rows() -> None:
    rows = [(i, i, i, 0, i % 65536, 0, 0, 0, 0, 0, 0, 0) for i in range(1000)]
    array = np.array(rows, dtype=ROW_DTYPE)
    assert array["local_port"].tolist() == [i % 65536 for i in range(1000)]
