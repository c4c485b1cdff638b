"""The warning before the errors: the occupancy at which connect() latency steps up.

connect() hands out ports of the range's low-end parity first; once that half is
held (TIME_WAIT), every connect scans all of it before it tries the other half
(docs/kernel.md, "Parity"). Users meet this as slow connects, seconds before the
first EADDRNOTAVAIL. The detector, on the successful connections' connect
latency against the share of usable ports in use when each began:

1. Bin the occupancy in steps of :data:`BIN_WIDTH` and take each bin's median
   latency (bins with fewer than :data:`MIN_BIN_CONNECTIONS` are ignored).
2. The onset is the first populated bin whose median is at least
   :data:`STEP_RATIO` times the baseline (the median of the medians of the bins
   below it), provided the step is *sustained*: at least :data:`SUSTAINED_SHARE`
   of the populated bins from there on stay that high, and there are at least
   :data:`MIN_BEFORE` connections below it and :data:`MIN_AFTER` from it on.
3. Before and after are the connections below and from the onset's occupancy:
   their p50, p99 and the p50 ratio, and the success rate in time before the
   first connection past the onset against the rate from then to the first
   failure for want of a port (or to the last record, when there is none or
   connects were failing already before the onset).

The bins are filled in the analysis's one pass over the records (a count per
microsecond value in each, so every median is exact), for a run of any size and
for an observation's traced path alike (``harness.report.analysis.latency_cliff``);
only the ~100 bins are looped here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.summary import LatencyCliff, Summary

__all__ = [
    "BIN_WIDTH",
    "MIN_AFTER",
    "MIN_BEFORE",
    "MIN_BIN_CONNECTIONS",
    "STEP_RATIO",
    "SUSTAINED_SHARE",
    "CliffSpans",
    "cliff_section",
    "occupancy_bins",
    "onset_bin",
]

BIN_WIDTH = 0.01  # of the usable range
MIN_BIN_CONNECTIONS = 20  # a bin with fewer has no median worth comparing
STEP_RATIO = 3.0  # median after / baseline: the 1k-port cliff is ~3x, the default range ~95x
SUSTAINED_SHARE = 0.8  # of the bins past the onset that must stay above the step
MIN_BEFORE = 200  # connections below the onset
MIN_AFTER = 100  # connections from it on
BIN_COUNT = round(1 / BIN_WIDTH) + 1


def onset_bin(medians: np.ndarray, counts: np.ndarray) -> int | None:
    populated = np.flatnonzero(counts >= MIN_BIN_CONNECTIONS)
    below = np.cumsum(counts) - counts  # connections in lower bins
    total = int(counts.sum())
    for position, b in enumerate(populated[1:], start=1):
        if below[b] < MIN_BEFORE or total - below[b] < MIN_AFTER:
            continue
        baseline = float(np.median(medians[populated[:position]]))
        if baseline <= 0 or medians[b] < STEP_RATIO * baseline:
            continue
        after = medians[populated[position:]]
        if np.mean(after >= STEP_RATIO * baseline) >= SUSTAINED_SHARE:
            return int(b)
    return None


def _rate(count: int, span_s: float) -> float | None:
    return round(count / span_s, 1) if span_s > 0 else None


@dataclass(frozen=True)
class CliffSpans:
    """What the section says around a found onset: latency (p50, p99 in ms) below and
    from it, and the successes before and after it in time."""

    onset: int  # the bin
    before_ms: tuple[float, float]
    after_ms: tuple[float, float]
    first_s: float  # the first success
    onset_s: float  # the first success past the onset
    end_s: float  # the first failure for want of a port ahead of it, or the last start
    in_before: int
    in_after: int


def cliff_section(spans: CliffSpans) -> LatencyCliff:
    (before_p50, before_p99), (after_p50, after_p99) = spans.before_ms, spans.after_ms
    return LatencyCliff(
        detected=True,
        onset_occupancy=round(spans.onset * BIN_WIDTH, 4),
        onset_s=round(spans.onset_s, 4),
        before_p50_ms=before_p50,
        after_p50_ms=after_p50,
        before_p99_ms=before_p99,
        after_p99_ms=after_p99,
        ratio=round(after_p50 / before_p50, 1) if before_p50 > 0 else None,
        rate_before_per_s=_rate(spans.in_before, spans.onset_s - spans.first_s),
        rate_after_per_s=_rate(spans.in_after, spans.end_s - spans.onset_s),
    )


def occupancy_bins(occupancy: np.ndarray) -> np.ndarray:
    """Each connection's bin of :data:`BIN_WIDTH`."""
    occupancy = np.clip(np.nan_to_num(occupancy), 0.0, 1.0)
    return np.minimum((occupancy / BIN_WIDTH).astype(np.int64), BIN_COUNT - 1)


def slowed(summary: Summary) -> bool:
    """Whether the run's connects slowed down past the cliff."""
    cliff = summary.latency_cliff
    return cliff is not None and cliff.detected


def cliff_findings(summary: Summary) -> list[str]:
    """The warning before the errors: connect latency stepped up as the range filled."""
    cliff = summary.latency_cliff
    if cliff is None or not cliff.detected:
        return []
    onset, ratio = cliff.onset_occupancy or 0.0, cliff.ratio or 0.0
    parity = 0.45 <= onset <= 0.55  # the low-parity half held: the scan before each port
    text = (
        f"Connects slowed down {ratio:,.0f}x"
        if ratio >= 10
        else f"Connects slowed down {ratio:.1f}x"
    ) + (
        f" once {onset:.0%} of the usable ports were held"
        + (" (the even half: connect() now scans it before each odd port)" if parity else "")
        + f", at {cliff.onset_s or 0:.3g} s: connect p50 {cliff.before_p50_ms} ms"
        f" -> {cliff.after_p50_ms} ms, p99 {cliff.before_p99_ms} -> {cliff.after_p99_ms} ms"
    )
    before, after = cliff.rate_before_per_s, cliff.rate_after_per_s
    if before and after is not None:
        went = "fell" if after < before else "went"
        text += f"; successful connections per second {went} from {before:,.0f} to {after:,.0f}"
    soft = summary.capacity.model_soft_rate_per_s
    if parity and soft:
        text += f". The model's soft limit here: above {soft:,.0f}/s the even half fills"
    if not parity:
        return [text + ". connect() searches a nearly full range: the ports are about to run out."]
    return [
        text + ". This is the warning before EADDRNOTAVAIL: a random IP_LOCAL_PORT_RANGE"
        " window per socket (load.socket_port_window), TIME_WAIT reuse, a wider range or"
        " more destinations keep connect() fast."
    ]
