"""4-tuples and ports: uniqueness, reuse out of TIME_WAIT, how the kernel handed ports out.

Vectorised: one sort of the successful connections by (4-tuple, start) answers
reuse, overlap and reuse distance together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from harness.capacity.port_model import TIME_WAIT_S
from harness.report.columns import codes, quantiles
from harness.report.counts import ValueCounts
from harness.report.scan import EXHAUSTION_ERRNOS
from harness.scenario import ClosePolicy
from harness.summary import ParityQuantiles, Ports, Quantiles, TupleExample, Tuples

__all__ = [
    "TupleAudit",
    "Uses",
    "audit_tuples",
    "audit_uses",
    "port_allocation",
    "sustained",
    "sustained_rate",
]

EXAMPLES = 5


@dataclass
class TupleAudit:
    distinct: int = 0
    max_uses: int = 0
    concurrent_duplicates: int = 0  # a use that began before the previous one closed
    examples: list[TupleExample] = field(default_factory=list)
    reused_out_of_time_wait: int = 0  # began < 60 s after this side closed the tuple
    reuse_ages_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reuse_distance_median: float | None = None  # connections between two uses
    # start to start of consecutive uses of one tuple, and when the later one began
    cycle_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cycle_end_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    reuse_distances: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # a large run's reuse ages, counted per microsecond (reuse_ages_s is then empty)
    reuse_age_us: ValueCounts | None = None

    def reuse_age_quantiles(self) -> Quantiles | None:
        """Quantiles of the reuse ages (s): exact, or of ages in whole microseconds."""
        if self.reuse_age_us is not None:
            return self.reuse_age_us.quantiles(scale=1e6)
        return quantiles(self.reuse_ages_s)

    def reuse_age_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Reuse ages (s) and how many reuses had each: for a histogram."""
        if self.reuse_age_us is not None:
            counts = self.reuse_age_us
            return counts.values / 1e6, counts.counts
        return self.reuse_ages_s, np.ones(len(self.reuse_ages_s), np.int64)

    def section(self) -> Tuples:
        """The summary's ``tuples``."""
        return Tuples(
            distinct=self.distinct,
            max_uses=self.max_uses,
            concurrent_duplicates=self.concurrent_duplicates,
            examples=self.examples,
            reuse_distance_median=self.reuse_distance_median,
        )


@dataclass(frozen=True)
class Uses:
    """The successful connections sorted by (4-tuple, start)."""

    key: np.ndarray  # local address, local port, remote address, remote port in one int64
    start: np.ndarray
    end: np.ndarray
    client_closed: np.ndarray
    rank: np.ndarray  # the row among all attempts (rows are sorted by start time)


def _uses(table: pa.Table, ok: np.ndarray) -> Uses:
    start = table.column("start_ns").to_numpy()[ok]
    end = start + table.column("close_us").to_numpy()[ok].astype(np.int64) * 1000
    key = (
        (codes(table, "local_addr")[ok] << 48)
        | (table.column("local_port").to_numpy()[ok].astype(np.int64) << 32)
        | (codes(table, "remote_addr")[ok] << 16)
        | table.column("remote_port").to_numpy()[ok].astype(np.int64)
    )
    client_closed = codes(table, "close")[ok] == _client_code(table)
    order = np.lexsort((start, key))
    return Uses(key[order], start[order], end[order], client_closed[order], ok[order])


def audit_tuples(table: pa.Table) -> TupleAudit:
    """Every successful connection's 4-tuple against the previous use of the same tuple."""
    ok = np.flatnonzero(table.column("errno").to_numpy() == 0)
    if not len(ok):
        return TupleAudit()
    return audit_uses(_uses(table, ok))


def audit_uses(uses: Uses) -> TupleAudit:
    """The audit of uses sorted by (4-tuple, start): all of a run's, or all of a share
    of its tuples (``harness.report.tuples_on_disk``)."""
    same = uses.key[1:] == uses.key[:-1]
    gap = uses.start[1:] - uses.end[:-1]  # from the previous use's close to this use's start
    overlap = same & (gap < 0)
    reused = same & ~overlap & uses.client_closed[:-1] & (gap < TIME_WAIT_S * 1e9)
    _, counts = np.unique(uses.key, return_counts=True)
    distances = (uses.rank[1:] - uses.rank[:-1])[same]
    return TupleAudit(
        distinct=len(counts),
        max_uses=int(counts.max()),
        concurrent_duplicates=int(overlap.sum()),
        examples=[_example(uses, int(i)) for i in np.flatnonzero(overlap)[:EXAMPLES]],
        reused_out_of_time_wait=int(reused.sum()),
        reuse_ages_s=gap[reused] / 1e9,
        reuse_distance_median=float(np.median(distances)) if len(distances) else None,
        reuse_distances=distances,
        cycle_s=(uses.start[1:] - uses.start[:-1])[same] / 1e9,
        cycle_end_ns=uses.start[1:][same],
    )


def _example(uses: Uses, i: int) -> TupleExample:
    """Use ``i`` and the one after it, which began before it closed."""
    return TupleExample(
        local_port=int((uses.key[i] >> 32) & 0xFFFF),
        remote_port=int(uses.key[i] & 0xFFFF),
        first_start_ns=int(uses.start[i]),
        first_close_ns=int(uses.end[i]),
        second_start_ns=int(uses.start[i + 1]),
    )


def _client_code(table: pa.Table) -> int:
    column = table.column("close").combine_chunks()
    if not pa.types.is_dictionary(column.type):
        return -1
    values = column.dictionary.to_pylist()
    return values.index(ClosePolicy.CLIENT.value) if ClosePolicy.CLIENT.value in values else -1


def port_allocation(table: pa.Table, ports: Ports) -> Ports:
    """``ports`` with how the kernel handed them out: uses per port, parity over time,
    starting offsets (unchanged when no connection succeeded)."""
    ok = table.column("errno").to_numpy() == 0
    local = table.column("local_port").to_numpy()[ok].astype(np.int64)
    result = ports.model_copy()
    if not len(local):
        return result
    start = table.column("start_ns").to_numpy()[ok]
    seconds = (start - start[0]) / 1e9
    used = np.bincount(local)
    used = used[used > 0]
    odd = local % 2 == 1
    connect_ms = table.column("connect_us").to_numpy()[ok] / 1000.0
    first_port = _first_port_by_destination(table, ok, local)
    result.max_uses_per_port = int(used.max())
    result.mean_uses_per_port = round(float(used.mean()), 3)
    result.first_odd_s = round(float(seconds[odd][0]), 4) if odd.any() and not odd.all() else None
    result.first_port_by_destination = first_port
    result.connect_ms_by_parity = ParityQuantiles(
        even=quantiles(connect_ms[~odd]), odd=quantiles(connect_ms[odd])
    )
    if ports.span is not None:
        result.first_offset_by_destination = {
            name: port - ports.span[0] for name, port in first_port.items()
        }
    return result


def _first_port_by_destination(
    table: pa.Table, ok: np.ndarray, local: np.ndarray
) -> dict[str, int]:
    """The port each destination (address:port) got first, for the first 64 of them."""
    remote = table.column("remote_addr").combine_chunks()
    remote_codes = codes(table, "remote_addr")[ok]
    remote_ports = table.column("remote_port").to_numpy()[ok].astype(np.int64)
    # rows are in start order: np.unique's first index is each destination's first use
    _, first = np.unique((remote_codes << 16) | remote_ports, return_index=True)
    names = remote.dictionary.to_pylist() if pa.types.is_dictionary(remote.type) else None
    return {
        f"{names[remote_codes[i]] if names else remote_codes[i]}:{remote_ports[i]}": int(local[i])
        for i in first[:64]
    }


def sustained_rate(table: pa.Table, audit: TupleAudit) -> float | None:
    """Successes per second after the range first ran out: the steady state the model's
    ceiling describes (None when the run never ran out, so never met the ceiling).

    Once every tuple cycles (each port used, held, handed out again), the rate is
    tuples / their mean cycle, start to start. Counting successes over a window
    instead is biased by where the window cuts the sawtooth: ports filled in a burst
    come back in a burst, so a window opened at the first failure reads low and one
    closed mid-burst reads high. When fewer cycles than tuples follow the first
    failure (TIME_WAIT without reuse), it is the returns counted over the rest of
    the run.
    """
    errno = table.column("errno").to_numpy()
    exhausted = np.isin(errno, EXHAUSTION_ERRNOS)
    if not exhausted.any():
        return None
    start = table.column("start_ns").to_numpy()
    first = start[np.argmax(exhausted)]
    cycles = audit.cycle_s[audit.cycle_end_ns > first]
    returns = int(((errno == 0) & (start > first)).sum())
    window = (start.max() - first) / 1e9
    return sustained(audit.distinct, len(cycles), float(cycles.sum()), returns, window)


def sustained(
    distinct: int, cycles: int, cycles_s: float, returns: int, window_s: float
) -> float | None:
    """:func:`sustained_rate` from what it counts: ``cycles`` after the first failure
    lasting ``cycles_s`` in all, successes (``returns``) in the ``window_s`` after it."""
    if cycles >= max(distinct, 1) and cycles_s > 0:
        return round(float(distinct / (cycles_s / cycles)), 1)
    if window_s <= 0:
        return None
    return round(float(returns / window_s), 1)
