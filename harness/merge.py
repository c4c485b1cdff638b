"""The end of a run: every process's record parts into one ``connections.parquet``
sorted by start time, in bounded memory.

Concatenating every part and sorting it in memory costs ~150 bytes a row: 15 GiB
for 100 million connections. Instead, three passes over the parts:

1. *Index*: read each part's batches one at a time (a truncated part up to its
   last whole batch), noting each batch's byte offset, its first and last start,
   and every 64th start.
2. *Plan*: cut the run's time into windows of about :data:`WINDOW_ROWS` rows
   (quantiles of the noted starts).
3. *Write*: per window, read back (by offset) only the batches that overlap it,
   keep their rows inside it, sort them and append them to the Parquet file as
   row groups of :data:`ROW_GROUP_ROWS`.

Batches are flushed every half second, so a batch overlaps one or two windows:
the parts are read about twice in all. Peak memory is one window (~100 bytes a
row once expanded and sorted) whatever the run's size. Dictionary columns get
one dictionary for the whole file (the union of every part's), so every row
group reads back with the same codes.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from harness.files import atomic_path
from harness.records import CONNECTIONS_SCHEMA, Part, expand_batch

__all__ = ["ROW_GROUP_ROWS", "WINDOW_ROWS", "merge_sorted"]

WINDOW_ROWS = 4_000_000  # rows sorted in memory at once (~400 MB at the peak)
ROW_GROUP_ROWS = 1_000_000  # later readers stream the file a row group at a time
_SAMPLE_EVERY = 64  # starts noted per batch for the windows' edges
_DICTIONARIES = ("local_addr", "remote_addr", "close", "engine", "host")


@dataclass
class _Batch:
    offset: int  # of its IPC message in the part file
    first_ns: int  # earliest and latest start, on the run's clock
    last_ns: int


@dataclass
class _IndexedPart:
    part: Part
    schema: pa.Schema | None = None
    meta: dict[str, str] = field(default_factory=dict)
    addresses: list[str] = field(default_factory=lambda: [""])
    batches: list[_Batch] = field(default_factory=list)
    truncated: bool = False


def _index(part: Part, samples: list[np.ndarray]) -> _IndexedPart:
    """Pass 1 over one part: its batches' offsets and spans, up to its last whole batch."""
    found = _IndexedPart(part)
    try:
        with pa.OSFile(str(part.path), "rb") as source:
            reader = ipc.open_stream(source)
            found.schema = reader.schema
            found.meta = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
            offset = source.tell()
            for batch, custom in _batches(reader, found):
                start = batch.column(0).to_numpy() + np.int64(part.shift_ns)
                if len(start):
                    found.batches.append(_Batch(offset, int(start.min()), int(start.max())))
                    samples.append(start[::_SAMPLE_EVERY].copy())
                if custom is not None and b"addresses" in custom:
                    found.addresses = json.loads(custom[b"addresses"])
                offset = source.tell()
    except (pa.ArrowInvalid, OSError):  # cut before its schema, or missing
        found.truncated = True
    return found


def _batches(
    reader: ipc.RecordBatchStreamReader, found: _IndexedPart
) -> Iterator[tuple[pa.RecordBatch, pa.KeyValueMetadata | None]]:
    while True:
        try:
            yield reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError):  # cut inside a batch: keep the ones before
            found.truncated = True
            return


def _edges(parts: Sequence[_IndexedPart], samples: list[np.ndarray]) -> np.ndarray:
    """Window edges in ns: about ``WINDOW_ROWS`` rows each, the last one closed."""
    spans = [(b.first_ns, b.last_ns) for found in parts for b in found.batches]
    if not spans:
        return np.zeros(0, np.int64)
    first, last = min(s[0] for s in spans), max(s[1] for s in spans)
    starts = np.concatenate(samples)
    windows = max(1, -(-len(starts) * _SAMPLE_EVERY // WINDOW_ROWS))
    inner = np.quantile(starts, np.linspace(0, 1, windows + 1)[1:-1], method="lower")
    return np.unique(np.concatenate(([first], inner, [last + 1]))).astype(np.int64)


class _Dictionaries:
    """One dictionary per dictionary column for the whole file: the union of the parts'."""

    def __init__(self, parts: Sequence[_IndexedPart]) -> None:
        values: dict[str, list[str]] = {name: [] for name in _DICTIONARIES}
        for found in parts:
            endpoints = json.loads(found.meta.get("endpoints", "[]")) or [["", 0]]
            given = {
                "local_addr": found.addresses,
                "remote_addr": [address for address, _ in endpoints],
                "close": [found.meta.get("close", "")],
                "engine": [found.meta.get("engine", "")],
                "host": [found.part.host or found.meta.get("host", "")],
            }
            for name, strings in given.items():
                values[name] += [s for s in strings if s not in values[name]]
        self.values = {name: pa.array(v or [""], pa.string()) for name, v in values.items()}

    def apply(self, table: pa.Table) -> pa.Table:
        """``table``'s dictionary columns re-coded against the file's dictionaries."""
        for name in _DICTIONARIES:
            column = table.column(name).combine_chunks()
            mapping = pc.index_in(column.dictionary, value_set=self.values[name])
            codes = pc.take(mapping, column.indices).cast(pa.int32())
            array = pa.DictionaryArray.from_arrays(codes, self.values[name])
            table = table.set_column(table.schema.get_field_index(name), name, array)
        return table


def _window(parts: Sequence[_IndexedPart], low: int, high: int, dicts: _Dictionaries) -> pa.Table:
    """Every row starting in [low, high), from the batches that overlap it, sorted."""
    tables = []
    for found in parts:
        wanted = [b for b in found.batches if b.last_ns >= low and b.first_ns < high]
        if not wanted or found.schema is None:
            continue
        with pa.OSFile(str(found.part.path), "rb") as source:
            for batch in wanted:
                source.seek(batch.offset)
                read = ipc.read_record_batch(ipc.read_message(source), found.schema)
                rows = expand_batch(read, found.meta, found.addresses, found.part)
                start = rows.column("start_ns")
                keep = pc.and_(pc.greater_equal(start, low), pc.less(start, high))
                tables.append(dicts.apply(rows.filter(keep)))
    if not tables:
        return CONNECTIONS_SCHEMA.empty_table()
    return pa.concat_tables(tables).sort_by("start_ns")


def merge_sorted(parts: Sequence[Part], out: Path) -> tuple[int, list[Path]]:
    """Merge part files into one Parquet file sorted by start time (see the module's
    docstring); the row count and the parts that were truncated."""
    samples: list[np.ndarray] = []
    indexed = [_index(part, samples) for part in parts]
    edges = _edges(indexed, samples)
    dicts = _Dictionaries(indexed)
    schema = CONNECTIONS_SCHEMA
    written = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for low, high in itertools.pairwise(edges):
            table = _window(indexed, int(low), int(high), dicts)
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            written += table.num_rows
        if not written:
            writer.write_table(schema.empty_table())
    return written, [found.part.path for found in indexed if found.truncated]
