"""The kernel as a witness of a run's records: did eph record every connection it made?

With ``eph run --trace`` the eBPF recorder writes ``kernel_connections.parquet``
beside eph's own ``connections.parquet``. The two are matched in bulk:

- a connection that connected is matched by its 4-tuple and its turn on that
  4-tuple (the n-th use of a tuple in the records is the n-th in the kernel's
  account), when both started within ``MATCH_WINDOW_NS`` of each other;
- a failure may have no port (EADDRNOTAVAIL), and a record of one may not
  know the port the kernel tried: failures are matched by count per errno and
  remote endpoint; the rest of them by count per endpoint whatever their errno
  (eph's own connect timeout is, to the kernel, a socket closed while connecting).

Only the kernel's connections toward the run's endpoints count: other processes
of the namespace are not eph's to account for.

In bounded memory: both files are read a batch at a time. Failures are counted as
they pass; each connection that connected is reduced to its 4-tuple and start and
kept, or, above :data:`PARTITION_ROWS` rows, spilled to one of a few partitions by
local port (a tuple's every use lands in one), which are then matched one at a time.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from harness.summary import KernelWitness

__all__ = ["MATCH_WINDOW_NS", "PARTITION_ROWS", "kernel_witness"]

MATCH_WINDOW_NS = 1_000_000_000  # a record and the kernel's row of it start this close

PARTITION_ROWS = 2_000_000  # connections of one file matched in memory at once
BATCH_ROWS = 1_000_000
_COLUMNS = ["start_ns", "local_addr", "local_port", "remote_addr", "remote_port", "errno"]


def kernel_witness(
    records: Path, kernel: Path | None, reason: str | None = None, lost_events: int = 0
) -> KernelWitness:
    """Match ``records`` (eph's connections.parquet) with ``kernel`` (the recorder's)."""
    if kernel is None or not kernel.exists() or not records.exists():
        return KernelWitness(available=False, reason=reason or "no kernel trace for this run")
    ours_file, seen_file = pq.ParquetFile(records), pq.ParquetFile(kernel)
    rows = max(ours_file.metadata.num_rows, seen_file.metadata.num_rows)
    parts = max(1, -(-rows // PARTITION_ROWS))
    codes = _AddressCodes()
    endpoints = np.unique(
        np.concatenate(
            [np.empty(0, np.int64)]
            + [_endpoint_key(t, codes) for t in _tables(ours_file, ["remote_addr", "remote_port"])]
        )
    )
    with tempfile.TemporaryDirectory(prefix=".witness.", dir=kernel.parent) as scratch:
        ours, seen = _Side(parts, Path(scratch) / "ours"), _Side(parts, Path(scratch) / "seen")
        for table in _tables(ours_file, _COLUMNS):
            ours.add(table, codes)
        for table in _tables(seen_file, _COLUMNS):
            ours_endpoint = np.isin(_endpoint_key(table, codes), endpoints)
            seen.add(table.filter(pa.array(ours_endpoint)), codes)
        matched = sum(_matched_tuples(ours.part(n), seen.part(n)) for n in range(parts))
    matched += _matched_failures(ours.failures, seen.failures)
    return KernelWitness(
        available=True,
        kernel_connections=seen.rows,
        records=ours.rows,
        matched=matched,
        only_in_records=ours.rows - matched,
        only_in_kernel=seen.rows - matched,
        lost_events=lost_events,
    )


def _tables(source: pq.ParquetFile, columns: list[str]) -> Iterator[pa.Table]:
    for batch in source.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        yield pa.Table.from_batches([batch])


class _Side:
    """One file's account: rows, failures counted per (errno, endpoint), and each
    connection that connected as (4-tuple, start), held or spilled by partition."""

    def __init__(self, parts: int, scratch: Path) -> None:
        self.rows = 0
        self.failures: Counter[tuple[int, int]] = Counter()
        self._parts = parts
        self._scratch = scratch
        self._held: list[list[np.ndarray]] = [[] for _ in range(parts)]
        if parts > 1:
            scratch.mkdir()

    def add(self, table: pa.Table, codes: _AddressCodes) -> None:
        self.rows += table.num_rows
        errno = table.column("errno").to_numpy().astype(np.int64)
        endpoint = _endpoint_key(table, codes)
        failed = errno != 0
        pairs, n = np.unique(
            np.stack([errno[failed], endpoint[failed]], 1), axis=0, return_counts=True
        )
        self.failures.update({(int(e), int(k)): int(c) for (e, k), c in zip(pairs, n, strict=True)})
        port = table.column("local_port").to_numpy().astype(np.int64)
        ok = (port > 0) & ~failed
        key = (codes.of(table.column("local_addr"))[ok] << 48) + (port[ok] << 32) + endpoint[ok]
        rows = np.stack([key, table.column("start_ns").to_numpy()[ok].astype(np.int64)], 1)
        which = port[ok] % self._parts
        for part in range(self._parts):
            chosen = rows[which == part] if self._parts > 1 else rows
            if not len(chosen):
                continue
            if self._parts == 1:
                self._held[part].append(chosen)
            else:
                with open(self._scratch / str(part), "ab") as spill:
                    spill.write(chosen.tobytes())

    def part(self, n: int) -> np.ndarray:
        """Partition ``n``'s (4-tuple, start) rows."""
        if self._parts == 1:
            return np.concatenate(self._held[n] or [np.empty((0, 2), np.int64)])
        path = self._scratch / str(n)
        if not path.exists():
            return np.empty((0, 2), np.int64)
        return np.fromfile(path, np.int64).reshape(-1, 2)


class _AddressCodes:
    """One small int per address string, shared by both tables (their dictionaries differ)."""

    def __init__(self) -> None:
        self._codes: dict[str, int] = {}

    def of(self, column: pa.ChunkedArray) -> np.ndarray:
        array = column.combine_chunks()
        if not pa.types.is_dictionary(array.type):
            array = array.dictionary_encode()
        table = np.array(
            [self._codes.setdefault(str(v), len(self._codes)) for v in array.dictionary.to_pylist()]
            or [0],
            dtype=np.int64,
        )
        indices = array.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        codes: np.ndarray = table[indices]
        return codes


def _endpoint_key(table: pa.Table, codes: _AddressCodes) -> np.ndarray:
    key: np.ndarray = codes.of(table.column("remote_addr")) << 16
    key += table.column("remote_port").to_numpy().astype(np.int64)
    return key


def _tuple_turns(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(4-tuple, start) rows as each one's 4-tuple key and turn on it, with its start."""
    key, start = rows[:, 0], rows[:, 1]
    order = np.lexsort((start, key))
    key, start = key[order], start[order]
    first = np.r_[True, key[1:] != key[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(key)), 0))
    turn = np.arange(len(key)) - group_start
    return np.stack([key, turn]), start


def _matched_tuples(ours: np.ndarray, seen: np.ndarray) -> int:
    (ok, ot), os_ = _tuple_turns(ours)
    (sk, st), ss = _tuple_turns(seen)
    left = pa.table({"key": ok, "turn": ot, "a": os_})
    right = pa.table({"key": sk, "turn": st, "b": ss})
    joined = left.join(right, ["key", "turn"], join_type="inner")
    if not joined.num_rows:
        return 0
    gap = np.abs(joined.column("a").to_numpy() - joined.column("b").to_numpy())
    return int(np.count_nonzero(gap < MATCH_WINDOW_NS))


def _matched_failures(mine: Counter[tuple[int, int]], theirs: Counter[tuple[int, int]]) -> int:
    same = {pair: min(n, theirs.get(pair, 0)) for pair, n in mine.items()}
    left: dict[int, int] = {}
    right: dict[int, int] = {}
    for pair, n in mine.items():
        left[pair[1]] = left.get(pair[1], 0) + n - same[pair]
    for pair, n in theirs.items():
        right[pair[1]] = right.get(pair[1], 0) + n - same.get(pair, 0)
    return sum(same.values()) + sum(min(n, right.get(e, 0)) for e, n in left.items())
