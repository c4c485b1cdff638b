"""4-tuples and ports: uniqueness, reuse out of TIME_WAIT, how the kernel handed ports out.

Vectorised: one sort of the successful connections by (4-tuple, start) answers
reuse, overlap and reuse distance together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from harness.capacity.port_model import TIME_WAIT_S
from harness.report.columns import quantiles
from harness.report.counts import ValueCounts
from harness.summary import Quantiles, TupleExample, Tuples

__all__ = [
    "TupleAudit",
    "Uses",
    "audit_uses",
    "sustained",
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
