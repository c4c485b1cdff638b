"""A run's records as every analysis reads them: a batch at a time.

A small run is held (:class:`Held`), a large one stays on disk (:class:`OnDisk`);
both give the same batches, keep what a pass found for the next one (``cache``),
and so run through the same code: there is no second analysis for large runs.

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
    "Held",
    "OnDisk",
    "RecordHandle",
    "Records",
    "StableCodes",
    "as_handle",
    "open_records",
    "record_batches",
    "start_span",
]

IN_MEMORY_ROWS = 2_000_000  # above this a run's records are scanned, not held
BATCH_ROWS = 1_000_000  # rows read at once (the merge's row groups)


@dataclass(frozen=True)
class OnDisk:
    """Where a large run's records are, and how many: read a batch at a time."""

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


@dataclass(frozen=True)
class Held:
    """A run small enough to hold: its table, read as :class:`OnDisk` reads a file."""

    table: pa.Table
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    path: Path | None = None  # where it came from, when a file: the audit's scratch goes beside

    @property
    def num_rows(self) -> int:
        return int(self.table.num_rows)

    @property
    def column_names(self) -> list[str]:
        return list(self.table.column_names)

    def batches(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        yield from self.table.select(list(columns)).to_batches(max_chunksize=BATCH_ROWS)


RecordHandle: TypeAlias = "Held | OnDisk"
"""A run's records, held or on disk: what every analysis takes."""


def as_handle(records: pa.Table | OnDisk | Held) -> Held | OnDisk:
    """``records`` as a handle (a table is held)."""
    if isinstance(records, OnDisk | Held):
        return records
    return Held(records)


Records: TypeAlias = "pa.Table | OnDisk | Held"
"""A run's records: held (a small run) or on disk (a large one); read both alike with
:func:`record_batches`."""


def record_batches(records: Records, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The rows in start order, only ``columns``, a batch at a time: the one way a
    section that reads records for any size of run reads them. A run held in memory
    is a batch or a few (its chunks); one on disk ``BATCH_ROWS`` at a time."""
    if isinstance(records, OnDisk | Held):
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
