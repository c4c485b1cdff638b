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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from harness.summary import KernelWitness

__all__ = ["MATCH_WINDOW_NS", "kernel_witness"]

MATCH_WINDOW_NS = 1_000_000_000  # a record and the kernel's row of it start this close

_COLUMNS = ["start_ns", "local_addr", "local_port", "remote_addr", "remote_port", "errno"]


def kernel_witness(
    records: Path, kernel: Path | None, reason: str | None = None, lost_events: int = 0
) -> KernelWitness:
    """Match ``records`` (eph's connections.parquet) with ``kernel`` (the recorder's)."""
    if kernel is None or not kernel.exists() or not records.exists():
        return KernelWitness(available=False, reason=reason or "no kernel trace for this run")
    ours = pq.read_table(records, columns=_COLUMNS)
    seen = pq.read_table(kernel, columns=_COLUMNS)
    codes = _AddressCodes()
    ours_key, seen_key = _endpoint_key(ours, codes), _endpoint_key(seen, codes)
    seen = seen.filter(pa.array(np.isin(seen_key, ours_key)))
    matched = _matched_tuples(ours, seen, codes) + _matched_failures(ours, seen, codes)
    return KernelWitness(
        available=True,
        kernel_connections=seen.num_rows,
        records=ours.num_rows,
        matched=matched,
        only_in_records=ours.num_rows - matched,
        only_in_kernel=seen.num_rows - matched,
        lost_events=lost_events,
    )


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


def _tuple_turns(table: pa.Table, codes: _AddressCodes) -> tuple[np.ndarray, np.ndarray]:
    """Per connection that connected: its 4-tuple key and turn on it, with its start."""
    ok = (table.column("local_port").to_numpy() > 0) & (table.column("errno").to_numpy() == 0)
    local = codes.of(table.column("local_addr"))[ok]
    key = (local << 48) + (table.column("local_port").to_numpy()[ok].astype(np.int64) << 32)
    key += _endpoint_key(table, codes)[ok]
    start = table.column("start_ns").to_numpy()[ok]
    order = np.lexsort((start, key))
    key, start = key[order], start[order]
    first = np.r_[True, key[1:] != key[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(key)), 0))
    turn = np.arange(len(key)) - group_start
    return np.stack([key, turn]), start


def _matched_tuples(ours: pa.Table, seen: pa.Table, codes: _AddressCodes) -> int:
    (ok, ot), os_ = _tuple_turns(ours, codes)
    (sk, st), ss = _tuple_turns(seen, codes)
    left = pa.table({"key": ok, "turn": ot, "a": os_})
    right = pa.table({"key": sk, "turn": st, "b": ss})
    joined = left.join(right, ["key", "turn"], join_type="inner")
    if not joined.num_rows:
        return 0
    gap = np.abs(joined.column("a").to_numpy() - joined.column("b").to_numpy())
    return int(np.count_nonzero(gap < MATCH_WINDOW_NS))


def _matched_failures(ours: pa.Table, seen: pa.Table, codes: _AddressCodes) -> int:
    def counts(table: pa.Table) -> dict[tuple[int, int], int]:
        failed = table.column("errno").to_numpy() != 0
        errno = table.column("errno").to_numpy()[failed].astype(np.int64)
        key = _endpoint_key(table, codes)[failed]
        pairs, n = np.unique(np.stack([errno, key], axis=1), axis=0, return_counts=True)
        return {(int(e), int(k)): int(c) for (e, k), c in zip(pairs, n, strict=True)}

    mine, theirs = counts(ours), counts(seen)
    same = {pair: min(n, theirs.get(pair, 0)) for pair, n in mine.items()}
    left: dict[int, int] = {}
    right: dict[int, int] = {}
    for pair, n in mine.items():
        left[pair[1]] = left.get(pair[1], 0) + n - same[pair]
    for pair, n in theirs.items():
        right[pair[1]] = right.get(pair[1], 0) + n - same.get(pair, 0)
    return sum(same.values()) + sum(min(n, right.get(e, 0)) for e, n in left.items())
