"""From the collector's samples: ports in use, TIME_WAIT, latency as the range fills,
the kernel's own counters, and whether the samples cover the run."""

from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from harness.report.columns import scope_mask, scope_prefix_mask
from harness.report.ondisk import Records
from harness.report.scan import EXHAUSTION_ERRNOS, scan_records
from harness.summary import SamplesInfo

__all__ = [
    "IN_USE",
    "OCCUPANCY_BINS",
    "KernelCount",
    "Peaks",
    "counter_delta",
    "kernel_conservation",
    "peaks",
    "samples_info",
    "samples_missing_after",
    "scope_series",
]

IN_USE = (
    "established",
    "syn_sent",
    "syn_recv",
    "fin_wait1",
    "fin_wait2",
    "time_wait",
    "close",
    "close_wait",
    "last_ack",
    "closing",
)
OCCUPANCY_BINS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.01)


def scope_series(
    samples: pa.Table, columns: tuple[str, ...], side: str = "to "
) -> tuple[np.ndarray, np.ndarray]:
    """(t_ns, sum of ``columns``) per sample over the ``to`` (client side) or ``at``
    (server side) scopes; the ``all`` scope when there are none."""
    mask = scope_prefix_mask(samples, side)
    if not mask.any():
        mask = scope_mask(samples)
    values = sum(samples.column(c).to_numpy().astype(np.int64) for c in columns)[mask]
    times, index = np.unique(samples.column("t_ns").to_numpy()[mask], return_inverse=True)
    return times, np.bincount(index, weights=values, minlength=len(times))


def counter_delta(samples: pa.Table, name: str) -> int | None:
    """A kernel counter's growth over the run (the ``all`` scope), None without two values."""
    values = samples.column(name).to_numpy(zero_copy_only=False)[scope_mask(samples)]
    values = values.astype(float)
    values = values[~np.isnan(values)]
    return int(values[-1] - values[0]) if len(values) > 1 else None


@dataclass(frozen=True)
class Peaks:
    """What one collector's samples say about the client side."""

    time_wait: int  # TIME_WAIT sockets toward the targets, at the most
    in_use: int  # sockets toward the targets in any state, at the most
    tw_recycled: int | None  # the kernel's TWRecycled over the run


def peaks(samples: pa.Table) -> Peaks:
    """TIME_WAIT peak and occupancy peak toward the targets, and the TWRecycled delta."""
    values = samples.column("tw_recycled").to_numpy(zero_copy_only=False)[scope_mask(samples)]
    values = values[~np.isnan(values.astype(float))]
    return Peaks(
        time_wait=int(scope_series(samples, ("time_wait",))[1].max()),
        in_use=int(scope_series(samples, IN_USE)[1].max()),
        tw_recycled=int(values[-1] - values[0]) if len(values) else None,
    )


def samples_info(table: Records, samples: pa.Table, interval_s: float) -> SamplesInfo:
    """How many samples, how long one took, and whether they cover the run."""
    sample_ms = samples.column("sample_ms").to_numpy(zero_copy_only=False)
    sample_ms = sample_ms[~np.isnan(sample_ms)]
    return SamplesInfo(
        count=len(sample_ms),
        interval_s=interval_s,
        max_sample_ms=round(float(sample_ms.max()), 2) if len(sample_ms) else None,
        median_sample_ms=round(float(np.median(sample_ms)), 2) if len(sample_ms) else None,
        missing_after_s=samples_missing_after(table, samples, interval_s),
    )


def samples_missing_after(table: Records, samples: pa.Table, interval_s: float) -> float | None:
    """When the collector's samples stop well before the load did (it died): the last
    sample, in seconds from the first attempt; None when they cover the run."""
    scan = scan_records(table)
    if scan.first_ns is None:
        return None
    first, last = scan.first_ns, scan.last_ns
    last_sample = int(samples.column("t_ns").to_numpy().max())
    if last_sample >= last - 3 * interval_s * 1e9 - 0.5e9:
        return None
    return round((last_sample - first) / 1e9, 3)


# what tcp_done() counts in Tcp AttemptFails for a connect: a RST or an ICMP error
# answering the SYN (eph's own connect_timeout closes the socket: not counted)
ENDED_IN_SYN_SENT = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)


@dataclass(frozen=True)
class KernelCount:
    """The kernel's count of connects (Tcp ActiveOpens) next to the records'."""

    kernel_active_opens: int | None
    kernel_attempt_fails: int | None
    attempts_sending_syn: int
    attempts_failing_after_syn: int = 0
    """Records the kernel ended in SYN_SENT (refused, unreachable): its AttemptFails."""


def kernel_conservation(table: Records, samples: pa.Table | None) -> KernelCount | None:
    """The kernel's own count of connects against the records: Tcp ActiveOpens counts
    each SYN a connect() sent, so over the run it must equal the attempts that did not
    fail locally for want of a port. None without counters in the samples."""
    if samples is None or not samples.num_rows or "active_opens" not in samples.column_names:
        return None
    scan = scan_records(table)
    sending = scan.attempted - int(scan.errors[list(EXHAUSTION_ERRNOS)].sum())
    return KernelCount(
        kernel_active_opens=counter_delta(samples, "active_opens"),
        kernel_attempt_fails=counter_delta(samples, "attempt_fails"),
        attempts_sending_syn=sending,
        attempts_failing_after_syn=int(scan.errors[list(ENDED_IN_SYN_SENT)].sum()),
    )
