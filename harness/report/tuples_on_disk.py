"""The tuple audit of a run, partitioned only when it must be: a run held in memory
is audited as one partition; a large one goes out of core, its successful
connections spread over :data:`PARTITIONS` files by a hash of their 4-tuple, each
file audited alone.

Every use of a tuple lands in the same partition, so each partition's sort by
(4-tuple, start) sees whole histories: counts, overlaps and reuses add up to
exactly what one sort of the whole run finds. A partition holds ~1/64 of the
run (1.5 million uses of 100 million, ~100 MB while sorted). Reuse ages are
counted per microsecond (their quantiles: of ages binned to 1 us) and reuse
distances per value (their median: exact).
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from harness.errors import RunDirError
from harness.report.counts import ValueCounts
from harness.report.ondisk import Held, RecordHandle, StableCodes
from harness.report.tuples import EXAMPLES, TupleAudit, Uses, audit_uses
from harness.scenario import ClosePolicy
from harness.summary import TupleExample

__all__ = ["PARTITIONS", "CycleCount", "audit_on_disk"]

PARTITIONS = 64
_COLUMNS = ("start_ns", "close_us", "local_addr", "local_port", "remote_addr", "remote_port")
_USE_SCHEMA = pa.schema(
    [
        ("key", pa.int64()),
        ("start", pa.int64()),
        ("end", pa.int64()),
        ("rank", pa.int64()),
        ("client_closed", pa.bool_()),
    ]
)
_USE_BYTES = 33  # a use in a partition file: key, start, end, rank, client_closed
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: any port range spreads evenly


@dataclass
class CycleCount:
    """Consecutive uses of a tuple whose later use began after ``after_ns``."""

    after_ns: int | None
    count: int = 0
    total_s: float = 0.0


@dataclass
class _Totals:
    audit: TupleAudit = field(default_factory=TupleAudit)
    examples: list[tuple[int, int, TupleExample]] = field(default_factory=list)
    distances: ValueCounts = field(default_factory=ValueCounts)


class _UseMaker:
    """Each batch's successful connections as uses (key, start, end, rank, who closed),
    with address codes that stay the same from one batch to the next."""

    def __init__(self) -> None:
        self.codes = {name: StableCodes() for name in ("local_addr", "remote_addr", "close")}
        self.rank = 0

    def uses(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        codes = self.codes
        ok = np.flatnonzero(batch.column("errno").to_numpy() == 0)
        start = batch.column("start_ns").to_numpy()[ok]
        key = (
            (codes["local_addr"].of(batch.column("local_addr"))[ok] << 48)
            | (batch.column("local_port").to_numpy()[ok].astype(np.int64) << 32)
            | (codes["remote_addr"].of(batch.column("remote_addr"))[ok] << 16)
            | batch.column("remote_port").to_numpy()[ok].astype(np.int64)
        )
        close = codes["close"].of(batch.column("close"))[ok]
        uses = pa.record_batch(
            [
                key,
                start,
                start + batch.column("close_us").to_numpy()[ok].astype(np.int64) * 1000,
                ok + self.rank,
                close == codes["close"].code(ClosePolicy.CLIENT.value),
            ],
            schema=_USE_SCHEMA,
        )
        self.rank += batch.num_rows
        return uses


def _spread(records: RecordHandle, directory: Path) -> None:
    """The successful connections' uses into the partition files."""
    maker = _UseMaker()
    paths = [directory / f"{n}.arrows" for n in range(PARTITIONS)]
    writers = [ipc.new_file(str(p), _USE_SCHEMA) for p in paths]
    try:
        for batch in records.batches([*_COLUMNS, "errno", "close"]):
            uses = maker.uses(batch)
            key = uses.column("key").to_numpy()
            part = ((key.astype(np.uint64) * _MIX) >> np.uint64(58)).astype(np.uint8)
            order = np.argsort(part, kind="stable")  # a radix sort for 8-bit keys
            bounds = np.searchsorted(part[order], np.arange(PARTITIONS + 1))
            uses = uses.take(pa.array(order))  # once, then a slice per partition
            for n, (low, high) in enumerate(itertools.pairwise(bounds)):
                if high > low:
                    writers[n].write_batch(uses.slice(low, high - low))
    finally:
        for writer in writers:
            writer.close()


def _audit_partition(path: Path, cycles: CycleCount) -> TupleAudit:
    with pa.memory_map(str(path)) as source:
        return _audit_uses(ipc.open_file(source).read_all(), cycles)


def _audit_uses(uses: pa.Table, cycles: CycleCount) -> TupleAudit:
    """One partition's audit: every use of each of its tuples, whole."""
    if not uses.num_rows:
        return TupleAudit()
    key, start = uses.column("key").to_numpy(), uses.column("start").to_numpy()
    # uses arrive in start order (the file is sorted by it, and the spread kept the
    # order): a stable sort by tuple alone is the (tuple, start) order, in half the time
    order = np.argsort(key, kind="stable")
    audit = audit_uses(
        Uses(
            key[order],
            start[order],
            uses.column("end").to_numpy()[order],
            uses.column("client_closed").to_numpy(zero_copy_only=False)[order],
            uses.column("rank").to_numpy()[order],
        )
    )
    if cycles.after_ns is not None:
        later = audit.cycle_s[audit.cycle_end_ns > cycles.after_ns]
        cycles.count += len(later)
        cycles.total_s += float(later.sum())
    return audit


def _add(totals: _Totals, part: TupleAudit) -> None:
    audit = totals.audit
    audit.distinct += part.distinct
    audit.max_uses = max(audit.max_uses, part.max_uses)
    audit.concurrent_duplicates += part.concurrent_duplicates
    audit.reused_out_of_time_wait += part.reused_out_of_time_wait
    if audit.reuse_age_us is None:
        audit.reuse_age_us = ValueCounts()
    audit.reuse_age_us.add(np.floor(part.reuse_ages_s * 1e6).astype(np.int64))
    totals.distances.add(part.reuse_distances)
    totals.examples += [
        ((e.local_port << 16) | e.remote_port, e.first_start_ns, e) for e in part.examples
    ]


def audit_on_disk(records: RecordHandle, cycles: CycleCount) -> TupleAudit:
    """The run's tuple audit (its cycles after ``cycles.after_ns`` counted into
    ``cycles``): a run held in memory as one partition, a large one partition by
    partition in a directory beside its records."""
    totals = _Totals()
    if isinstance(records, Held):
        maker = _UseMaker()
        batches = [maker.uses(b) for b in records.batches([*_COLUMNS, "errno", "close"])]
        uses = pa.Table.from_batches(batches, schema=_USE_SCHEMA)
        _add(totals, _audit_uses(uses, cycles))
        return _finish(totals)
    with tempfile.TemporaryDirectory(prefix=".eph-tuples-", dir=records.path.parent) as tmp:
        try:
            _spread(records, Path(tmp))
        except OSError as exc:  # a full disk: say what the audit needed, where
            needed = records.num_rows * _USE_BYTES / 2**20
            raise RunDirError(
                records.path.parent,
                f"cannot write the tuple audit's partitions ({exc.strerror or exc}): the"
                f" report of {records.num_rows:,} connections needs up to {needed:,.1f} MiB"
                " free in the run directory while it runs; free some space and run"
                " `eph report` again",
            ) from None
        for n in range(PARTITIONS):
            _add(totals, _audit_partition(Path(tmp) / f"{n}.arrows", cycles))
    return _finish(totals)


def _finish(totals: _Totals) -> TupleAudit:
    audit = totals.audit
    audit.examples = [e for _, _, e in sorted(totals.examples, key=lambda x: x[:2])][:EXAMPLES]
    if totals.distances.total:
        audit.reuse_distance_median = totals.distances.percentile(50)
    return audit
