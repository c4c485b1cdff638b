"""From records and samples to answers: the summary's TIME_WAIT, tuples, occupancy,
capacity, samples and hosts sections, on top of :func:`summarize`'s.

The pieces live by concept: ``tuples`` (4-tuples, reuse, port allocation),
``occupancy`` (what the samples say), ``hosts`` (a distributed run's workers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from harness.report.analysis_on_disk import analyze_on_disk
from harness.report.cliff import CliffInput, detect_cliff
from harness.report.hosts import HostSamples, host_sections
from harness.report.model_sections import (
    capacity_model,
    capacity_section,
    connection_rate,
    time_wait_section,
)
from harness.report.ondisk import is_on_disk
from harness.report.port_occupancy import (
    counter_delta,
    latency_by_occupancy,
    occupancy_at_start,
    peaks,
    samples_info,
)
from harness.report.scan import EXHAUSTION_ERRNOS
from harness.report.tuples import audit_tuples, port_allocation, sustained_rate
from harness.scenario import Scenario
from harness.summary import LatencyCliff, Occupancy, Summary

__all__ = ["analyze", "capacity_model", "connection_rate", "latency_cliff"]


def analyze(
    table: pa.Table,
    samples: pa.Table | None,
    scenario: Scenario,
    summary: Summary,
    server_samples: pa.Table | None = None,
    hosts: Sequence[HostSamples] = (),
) -> Summary:
    """``summary`` with the sections this module owns: time_wait, tuples, occupancy,
    capacity, samples, and in a distributed run (``hosts``) one entry per host.

    ``table`` may stand for a run too large to hold (``harness.report.ondisk``)."""
    if is_on_disk(table):
        return analyze_on_disk(table, samples, scenario, summary, server_samples, hosts)
    audit = audit_tuples(table)
    found = peaks(samples) if samples is not None and samples.num_rows else None
    model = capacity_model(scenario, summary.kernel, _lifetime_s(table), hosts=max(1, len(hosts)))
    result = summary.model_copy()
    if samples is not None and samples.num_rows:
        result.samples = samples_info(table, samples, scenario.collector.interval)
    result.time_wait = time_wait_section(audit, found, server_samples)
    result.tuples = audit.section()
    if hosts:
        result.hosts = host_sections(table, hosts, model)
    result.capacity = capacity_section(model, summary, connection_rate(scenario))
    result.capacity.measured_sustained_rate_per_s = sustained_rate(table, audit)
    result.ports = port_allocation(table, summary.ports)
    if found is not None and model is not None and samples is not None:
        result.occupancy = Occupancy(
            peak_ports=found.in_use,
            usable_ports=model.ports,
            peak_fraction=round(found.in_use / model.ports, 4) if model.ports else None,
            connect_ms_by_occupancy=latency_by_occupancy(table, samples, model.ports),
        )
        result.latency_cliff = latency_cliff(table, samples, model.ports)
    if samples is not None and samples.num_rows and "timewait_overflow" in samples.column_names:
        result.time_wait.kernel_timewait_overflow = counter_delta(samples, "timewait_overflow")
    return result


def latency_cliff(table: pa.Table, samples: pa.Table, usable: int) -> LatencyCliff | None:
    """Connect latency against occupancy: where it steps up (``harness.report.cliff``)."""
    occupancy = occupancy_at_start(table, samples, usable)
    if occupancy is None:
        return None
    ok = table.column("errno").to_numpy() == 0
    start = table.column("start_ns").to_numpy()
    start_s = (start - start.min()) / 1e9
    out_of_ports = np.isin(table.column("errno").to_numpy(), EXHAUSTION_ERRNOS)
    return detect_cliff(
        CliffInput(
            occupancy=occupancy,
            connect_ms=table.column("connect_us").to_numpy()[ok] / 1000.0,
            start_s=start_s[ok],
            failures_s=np.sort(start_s[out_of_ports]),
        )
    )


def _lifetime_s(table: pa.Table) -> float:
    """The median successful connection's life, connect() to close, in seconds."""
    ok = table.column("errno").to_numpy() == 0
    if not ok.any():
        return 0.0
    return float(np.median(table.column("close_us").to_numpy()[ok])) / 1e6
