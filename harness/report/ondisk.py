"""A run too large to hold: its ``connections.parquet`` read a batch at a time.

Holding a run's records costs ~375 bytes a connection by the time the report is
drawn (the table, numpy copies, the tuple audit's sort, the figures' masks):
3.7 GiB for 10 million connections. Above :data:`IN_MEMORY_ROWS` the analyses
read the file in batches of :data:`BATCH_ROWS` instead and keep only what they
add up: counts per errno and per port, counts per distinct microsecond value
(exact quantiles, ``harness.report.counts``), the first and last of things.
The file is sorted by start time (the merge sees to it), so a scan meets the
rows in time order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "BATCH_ROWS",
    "IN_MEMORY_ROWS",
    "OnDisk",
    "Records",
    "StableCodes",
    "is_on_disk",
    "open_records",
    "record_batches",
    "start_span",
]

IN_MEMORY_ROWS = 2_000_000  # above this a run's records are scanned, not held
BATCH_ROWS = 1_000_000  # rows read at once (the merge's row groups)


@dataclass(frozen=True)
class OnDisk:
    """Where a large run's records are, and how many: passed where a small run's
    ``pa.Table`` goes, and recognised there by :func:`is_on_disk`."""

    path: Path
    num_rows: int
    # what the analyses found in a scan, for the next one (the summary's, the audit)
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def batches(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        """The rows in start order, ``BATCH_ROWS`` at a time, only ``columns``.

        Without ``pre_buffer=False`` pyarrow keeps the buffers it read ahead for the
        whole scan: 9 MB more held per batch of 6 columns, 1 GB over 100M rows
        (measured here); with it, the scan stays at one batch.
        """
        source = pq.ParquetFile(self.path, pre_buffer=False)
        yield from source.iter_batches(batch_size=BATCH_ROWS, columns=list(columns))

    @property
    def column_names(self) -> list[str]:
        return list(pq.read_schema(self.path).names)


class StableCodes:
    """One int per string of a dictionary column, the same in every batch (a batch's
    own dictionary codes may differ from the next one's)."""

    def __init__(self) -> None:
        self._codes: dict[str, int] = {}

    def code(self, value: str) -> int:
        return self._codes.setdefault(value, len(self._codes))

    def names(self) -> dict[int, str]:
        return {code: name for name, code in self._codes.items()}

    def of(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if not pa.types.is_dictionary(column.type):
            column = column.dictionary_encode()
        table = np.array([self.code(str(v)) for v in column.dictionary.to_pylist()] or [0])
        indices = column.indices.fill_null(0).to_numpy(zero_copy_only=False)
        return np.asarray(table[indices], dtype=np.int64)


def is_on_disk(table: object) -> bool:
    return isinstance(table, OnDisk)


Records: TypeAlias = "pa.Table | OnDisk"
"""A run's records: held (a small run) or on disk (a large one); read both alike with
:func:`record_batches`."""


def record_batches(records: Records, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The rows in start order, only ``columns``, a batch at a time: the one way a
    section that reads records for any size of run reads them. A run held in memory
    is a batch or a few (its chunks); one on disk ``BATCH_ROWS`` at a time."""
    if isinstance(records, OnDisk):
        yield from records.batches(columns)
        return
    yield from records.select(list(columns)).to_batches(max_chunksize=BATCH_ROWS)


def start_span(records: Records) -> tuple[int | None, int | None]:
    """The first and last ``start_ns`` (None, None without rows)."""
    first: int | None = None
    last: int | None = None
    for batch in record_batches(records, ["start_ns"]):
        if not batch.num_rows:
            continue
        starts = batch.column(0).to_numpy()
        low, high = int(starts.min()), int(starts.max())
        first = low if first is None else min(first, low)
        last = high if last is None else max(last, high)
    return first, last


def open_records(path: Path) -> pa.Table | OnDisk:
    """The records in memory when there are few, else a handle to scan them."""
    rows = pq.ParquetFile(path).metadata.num_rows
    if rows > IN_MEMORY_ROWS:
        return OnDisk(path, rows)
    return pq.read_table(path)
