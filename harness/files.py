"""Files in a run directory: written atomically, streams read as far as they go.

Two disciplines every writer and reader of a run directory shares:

- A file another process may read while it is being written (progress, the
  summary, a merged Parquet file) appears whole or not at all: it is written
  beside its final name and renamed over it (:func:`atomic_path`).
- A part file is an Arrow IPC *stream* that a crash can cut anywhere.
  :func:`read_stream` keeps every whole batch before the cut and says what it
  dropped: a truncated stream is worth a finding, never silence.

And one tool both share: Parquet files each sorted by a key, merged into one in
bounded memory (:func:`merge_sorted_files`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

__all__ = [
    "SORTED_MERGE_ROWS",
    "StreamRead",
    "atomic_path",
    "atomic_write",
    "atomic_write_json",
    "merge_sorted_files",
    "read_stream",
]

SORTED_MERGE_ROWS = 2_000_000  # rows in memory at once when sorted files are merged

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds.

    On any exception the temporary file is removed and ``path`` is left as it was.
    The temporary name carries the pid, so two processes never share one.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def atomic_write_json(path: Path, data: Any, *, indent: int | None = 2) -> None:
    """``data`` as JSON (a newline at the end when indented), written atomically."""
    text = json.dumps(data, indent=indent)
    atomic_write(path, text + "\n" if indent is not None else text)


@dataclass
class StreamRead:
    """What :func:`read_stream` got out of one Arrow IPC stream file."""

    path: Path
    schema: pa.Schema | None
    batches: list[pa.RecordBatch] = field(default_factory=list)
    # custom metadata of each batch, None where it had none (same order as batches)
    custom: list[dict[bytes, bytes] | None] = field(default_factory=list)
    # why the stream ended early, or None when it ended cleanly
    error: str | None = None
    # bytes of the file after the last whole batch (what a truncation dropped)
    dropped_bytes: int = 0

    @property
    def truncated(self) -> bool:
        return self.error is not None

    @property
    def rows(self) -> int:
        return sum(b.num_rows for b in self.batches)

    def table(self, schema: pa.Schema | None = None) -> pa.Table:
        """The whole batches as one table (``schema`` when the stream had none)."""
        use = self.schema if self.schema is not None else schema
        if use is None:
            raise ValueError(f"{self.path}: the stream has no schema and none was given")
        return pa.Table.from_batches(self.batches, schema=use)

    def describe(self) -> str:
        """One line for a log or a finding."""
        if not self.truncated:
            return f"{self.path.name}: {len(self.batches)} batches, {self.rows} rows"
        return (
            f"{self.path.name}: truncated ({self.error}); kept {len(self.batches)} whole "
            f"batches ({self.rows} rows), dropped {self.dropped_bytes} bytes after them"
        )


def read_stream(path: Path) -> StreamRead:
    """Read an Arrow IPC stream file up to its last whole batch.

    A missing file, or one cut before its schema, reads as no schema and no
    batches, with ``error`` saying why. A file cut inside a batch keeps every
    batch before it. A truncation is logged at WARNING with what was dropped.
    """
    result = StreamRead(path=path, schema=None)
    try:
        size = path.stat().st_size
        with pa.OSFile(str(path), "rb") as source:
            try:
                reader = ipc.open_stream(source)
            except (pa.ArrowInvalid, OSError) as exc:
                result.error = f"no schema: {exc}"
                result.dropped_bytes = size
                return result
            result.schema = reader.schema
            good = source.tell()
            while True:
                try:
                    batch, custom = reader.read_next_batch_with_custom_metadata()
                except StopIteration:
                    break
                except (pa.ArrowInvalid, OSError) as exc:
                    result.error = str(exc) or type(exc).__name__
                    result.dropped_bytes = size - good
                    break
                result.batches.append(batch)
                result.custom.append(dict(custom) if custom is not None else None)
                good = source.tell()
    except OSError as exc:
        result.error = f"unreadable: {exc}"
    if result.truncated:
        logger.warning("%s", result.describe())
    return result


def merge_sorted_files(paths: Sequence[Path], out: Path, key: str) -> int:
    """Parquet files each sorted by ``key`` into one, sorted, in bounded memory: a batch
    of each source at a time. Rows up to the smallest last key that a source still
    reading has shown are safe to write (no row to come can sort before them); the
    rest wait for the next batches. Returns the rows written. ``out`` may be one of
    ``paths``: it is replaced only at the end."""
    files = [pq.ParquetFile(path, pre_buffer=False) for path in paths]
    schema = pa.unify_schemas([f.schema_arrow for f in files], promote_options="permissive")
    step = max(1, SORTED_MERGE_ROWS // max(1, len(files)))
    sources = [f.iter_batches(batch_size=step) for f in files]
    pending: list[pa.Table] = [schema.empty_table() for _ in files]
    done = [False] * len(files)
    written = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        while True:
            for n, source in enumerate(sources):
                if not done[n] and pending[n].num_rows == 0:
                    batch = next(source, None)
                    if batch is None:
                        done[n] = True
                    else:
                        pending[n] = pa.Table.from_batches([batch]).cast(schema)
            if not any(t.num_rows for t in pending):
                break
            reading = [pending[n] for n in range(len(files)) if not done[n]]
            bound = min(int(t.column(key)[-1].as_py()) for t in reading) if reading else None
            ready, kept = [], []
            for table in pending:
                if bound is None:
                    ready.append(table)
                    kept.append(schema.empty_table())
                    continue
                cut = int(np.searchsorted(table.column(key).to_numpy(), bound, side="right"))
                ready.append(table.slice(0, cut))
                kept.append(table.slice(cut))
            pending = kept
            window = pa.concat_tables(ready).unify_dictionaries().combine_chunks()
            order = np.argsort(window.column(key).to_numpy(), kind="stable")
            writer.write_table(window.take(pa.array(order)), row_group_size=SORTED_MERGE_ROWS)
            written += window.num_rows
    return written
