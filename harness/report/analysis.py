"""From records and samples to answers: the summary's TIME_WAIT, tuples, occupancy,
capacity, samples, latency cliff and hosts sections, on top of :func:`summarize`'s.

One analysis for every size of run. The records come as a handle
(``harness.report.ondisk``): a small run held, a large one on disk, read the same
way, a batch at a time. The sections come from the summary's scan, one sweep
(``disk_sweep``) and the tuple audit (``tuples_on_disk``, partitioned only for a run
on disk). Quantiles are exact (counts per microsecond value), except the reuse
ages': of ages binned to 1 microsecond.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from harness.report.cliff import STEP_RATIO, CliffSpans, cliff_section, onset_bin
from harness.report.counts import ValueCounts
from harness.report.disk_sweep import InUse, Sweep, sweep
from harness.report.hosts import HostSamples, sections_of
from harness.report.model_sections import (
    capacity_model,
    capacity_section,
    connection_rate,
    time_wait_section,
)
from harness.report.ondisk import RecordHandle, Records, as_handle
from harness.report.port_occupancy import (
    IN_USE,
    OCCUPANCY_BINS,
    counter_delta,
    peaks,
    samples_info,
    scope_series,
)
from harness.report.scan import RecordScan, scan_records
from harness.report.tuples import TupleAudit, sustained
from harness.report.tuples_on_disk import CycleCount, audit_on_disk
from harness.scenario import Scenario
from harness.summary import LatencyCliff, Occupancy, OccupancyBand, ParityQuantiles, Ports, Summary

__all__ = ["analyze", "audit_of", "in_use", "latency_cliff"]


def in_use(
    samples: pa.Table | None, usable: int | None, scan: RecordScan | None = None
) -> InUse | None:
    """Ports in use over time against the usable range, when both are known; with the
    records' ``scan``, placed between samples by the connects made (``InUse.at``)."""
    if samples is None or not samples.num_rows or not usable:
        return None
    times, counts = scope_series(samples, IN_USE)
    made = scan.made if scan is not None else None
    return InUse(times, counts, usable, made) if len(times) >= 2 else None


def audit_of(records: RecordHandle) -> tuple[TupleAudit, CycleCount]:
    """The tuple audit, once per run."""
    found: Any = records.cache.get("audit")
    if found is None:
        cycles = CycleCount(after_ns=scan_records(records).exhausted_ns)
        found = records.cache["audit"] = (audit_on_disk(records, cycles), cycles)
    audit, cycles = found
    return audit, cycles


def analyze(
    run_records: Records,
    samples: pa.Table | None,
    scenario: Scenario,
    summary: Summary,
    server_samples: pa.Table | None = None,
    hosts: Sequence[HostSamples] = (),
) -> Summary:
    """``summary`` with the sections this module owns: time_wait, tuples, occupancy,
    latency_cliff, capacity, samples, and in a distributed run (``hosts``) one entry
    per host. ``run_records``: a table, or a handle (held or on disk)."""
    records = as_handle(run_records)
    scan = scan_records(records)
    lifetime = scan.close_us.percentile(50) / 1e6 if scan.close_us.total else 0.0
    model = capacity_model(scenario, summary.kernel, lifetime, hosts=max(1, len(hosts)))
    usable = model.ports if model is not None else None
    occupancy = in_use(samples, usable, scan) if scan.succeeded else None
    found = sweep(records, scan, occupancy)
    audit, cycles = audit_of(records)
    held = samples if samples is not None and samples.num_rows else None
    result = summary.model_copy()
    if held is not None:
        result.samples = samples_info(records, held, scenario.collector.interval)
    result.time_wait = time_wait_section(
        audit, peaks(held) if held is not None else None, server_samples
    )
    result.tuples = audit.section()
    if hosts:
        result.hosts = sections_of(found.hosts, hosts, model, scan.first_ns or 0)
    result.capacity = capacity_section(model, summary, connection_rate(scenario))
    if scan.exhausted_ns is not None:
        window = (scan.last_ns - scan.exhausted_ns) / 1e9
        result.capacity.measured_sustained_rate_per_s = sustained(
            audit.distinct, cycles.count, cycles.total_s, found.returns, window
        )
    result.ports = _ports(scan, found, summary.ports)
    if held is not None and model is not None and occupancy is not None:
        top = peaks(held)
        result.occupancy = Occupancy(
            peak_ports=top.in_use,
            usable_ports=model.ports,
            peak_fraction=round(top.in_use / model.ports, 4) if model.ports else None,
            connect_ms_by_occupancy=_bands(found),
        )
        result.latency_cliff = _cliff(records, scan, found)
    if held is not None and "timewait_overflow" in held.column_names:
        result.time_wait.kernel_timewait_overflow = counter_delta(held, "timewait_overflow")
    return result


def _ports(scan: RecordScan, found: Sweep, ports: Ports) -> Ports:
    """:func:`tuples.port_allocation` from the counts."""
    result = ports.model_copy()
    if not scan.succeeded:
        return result
    used = scan.port_uses[scan.port_uses > 0]
    even, odd = found.parity
    result.max_uses_per_port = int(used.max())
    result.mean_uses_per_port = round(float(used.mean()), 3)
    if found.first_odd_ns is not None and odd.total < scan.succeeded:
        result.first_odd_s = round((found.first_odd_ns - (scan.first_ok_ns or 0)) / 1e9, 4)
    first = {f"{name}:{port}": local for (name, port), local in list(found.first_port.items())[:64]}
    result.first_port_by_destination = first
    result.connect_ms_by_parity = ParityQuantiles(
        even=even.quantiles(scale=1000), odd=odd.quantiles(scale=1000)
    )
    if ports.span is not None:
        low = ports.span[0]
        result.first_offset_by_destination = {name: port - low for name, port in first.items()}
    return result


def _bands(found: Sweep) -> list[OccupancyBand]:
    bands = []
    for band, (low, high) in enumerate(itertools.pairwise(OCCUPANCY_BINS)):
        even, odd = found.bands[2 * band], found.bands[2 * band + 1]
        if even.total + odd.total:
            bands.append(
                OccupancyBand(
                    occupancy=[low, min(high, 1.0)],
                    connections=even.total + odd.total,
                    even=even.quantiles(scale=1000),
                    odd=odd.quantiles(scale=1000),
                )
            )
    return bands


def _merged(parts: Sequence[ValueCounts]) -> ValueCounts:
    merged = ValueCounts()
    for part in parts:
        merged.merge(part.values, part.counts)
    return merged


def _ms(counts: ValueCounts) -> tuple[float, float]:
    return tuple(round(counts.percentile(q) / 1000, 4) for q in (50, 99))  # type: ignore[return-value]


def _cliff(records: RecordHandle, scan: RecordScan, found: Sweep) -> LatencyCliff:
    """The cliff (``harness.report.cliff``) from each bin's counts, and a pass for the rates."""
    counts = np.array([b.total for b in found.bins])
    medians = np.array([b.percentile(50) / 1000 if b.total else np.nan for b in found.bins])
    onset = onset_bin(medians, counts)
    if onset is None:
        return LatencyCliff(detected=False)
    t0 = scan.first_ns or 0
    onset_ns = int(found.bin_first_ns[onset:].min())
    failed = scan.exhausted_ns
    end_ns = failed if failed is not None and failed >= onset_ns else scan.last_ok_ns or 0
    before_ms, after_ms = _ms(_merged(found.bins[:onset])), _ms(_merged(found.bins[onset:]))
    if after_ms[0] < STEP_RATIO * before_ms[0]:
        # each bin past the onset is slow, but most connects from it on are not: with
        # tcp_tw_reuse the even ports come back out of TIME_WAIT and stay fast, and only
        # the few that take an odd port scan (a cliff lab's run: p50 0.017 ms before,
        # 0.016 ms after, bins of odd-port takers at ~1 ms). Connects did not slow down.
        return LatencyCliff(detected=False)
    in_before = in_after = 0
    for batch in records.batches(["start_ns", "errno"]):
        start = batch.column("start_ns").to_numpy()[batch.column("errno").to_numpy() == 0]
        in_before += int((start < onset_ns).sum())
        in_after += int(((start >= onset_ns) & (start < end_ns)).sum())
    return cliff_section(
        CliffSpans(
            onset=onset,
            before_ms=before_ms,
            after_ms=after_ms,
            first_s=((scan.first_ok_ns or 0) - t0) / 1e9,
            onset_s=(onset_ns - t0) / 1e9,
            end_s=(end_ns - t0) / 1e9,
            in_before=in_before,
            in_after=in_after,
        )
    )


def latency_cliff(records: RecordHandle, occupancy: InUse) -> LatencyCliff:
    """The cliff of ``records`` against ``occupancy``: what a run's summary says, for any
    records with their ports in use over time (an observation's traced path too)."""
    scan = scan_records(records)
    return _cliff(records, scan, sweep(records, scan, occupancy))
