"""The model's side of a run's summary: the capacity model of the run's own setup, the
``capacity`` section (model against measured) and the ``time_wait`` section. One copy,
for a run held in memory and one scanned from disk alike."""

from __future__ import annotations

import pyarrow as pa

from harness.capacity.port_model import CapacityModel
from harness.report.port_occupancy import Peaks, scope_series
from harness.report.tuples import TupleAudit
from harness.scenario import ClosePolicy, Protocol, Scenario
from harness.summary import Capacity, Kernel, Summary, TimeWait

__all__ = ["capacity_model", "capacity_section", "connection_rate", "time_wait_section"]


def time_wait_section(
    audit: TupleAudit, found: Peaks | None, server_samples: pa.Table | None
) -> TimeWait:
    recycled = found.tw_recycled if found is not None else None
    time_wait = TimeWait(
        peak=found.time_wait if found is not None else None,
        reused_connections=audit.reused_out_of_time_wait,
        kernel_tw_recycled=recycled,
        # positive: reuses the kernel did not count as TWRecycled (a just-closed tuple
        # handed out again, docs/kernel.md "Reuse"); negative: reuses the records missed
        reused_minus_kernel=(
            audit.reused_out_of_time_wait - recycled if recycled is not None else None
        ),
        reuse_age_s=audit.reuse_age_quantiles(),
    )
    if server_samples is not None and server_samples.num_rows:
        # a lab's pair topology: the server namespace's own collector
        time_wait.server_peak = int(scope_series(server_samples, ("time_wait",), "at ")[1].max())
    return time_wait


def capacity_model(
    scenario: Scenario, kernel: Kernel, lifetime_s: float, hosts: int = 1
) -> CapacityModel | None:
    """The model of the run's own setup; None when the port range is unknown."""
    port_range = kernel.port_span
    if port_range is None:
        return None
    if scenario.load.socket_port_range is not None:  # IP_LOCAL_PORT_RANGE narrows it per socket
        low, high = scenario.load.socket_port_range
        port_range = (max(low, port_range[0]), min(high, port_range[1]))
    return CapacityModel.from_settings(
        port_range=port_range,
        reserved=kernel.reserved,
        tw_reuse=2 if kernel.tcp_tw_reuse is None else kernel.tcp_tw_reuse,
        reuse_delay_ms=kernel.tcp_tw_reuse_delay_ms,
        timestamps=1 if kernel.tcp_timestamps is None else kernel.tcp_timestamps,
        # UDP has no TIME_WAIT: its ports come back at close, as after a reset
        close=ClosePolicy.RESET if scenario.load.protocol is Protocol.UDP else scenario.load.close,
        destinations=[e.host for e in scenario.target.endpoints],
        sources=len(scenario.load.source_addresses) or 1,
        lifetime_s=lifetime_s,
        hosts=hosts,
        tw_buckets=kernel.tcp_max_tw_buckets,
        window=scenario.load.socket_port_window,
    )


def connection_rate(scenario: Scenario) -> float:
    """The scenario's pace in new connections/s: ``load.rate`` counts HTTP requests, and
    ``requests_per_connection`` of them share a connection (0: not paced)."""
    return scenario.load.rate / scenario.load.requests_per_connection


def capacity_section(
    model: CapacityModel | None, summary: Summary, paced_rate: float = 0.0
) -> Capacity:
    """Model against measured. The offered rate is the scenario's pace when it sets one
    (then the model's time to exhaustion is a prediction, not a rearrangement of what
    was measured); an unpaced run's offered rate is what it reached before running out."""
    conns, exhaustion = summary.connections, summary.exhaustion
    duration = summary.duration_s or 0.0
    measured_rate = conns.succeeded / duration if duration else None
    first, before = exhaustion.first_failure_s, exhaustion.succeeded_before_first_failure
    result = Capacity(
        measured_rate_per_s=round(measured_rate, 1) if measured_rate else None,
        measured_time_to_exhaustion_s=first,
        model_max_rate_per_s=None,
        model_time_to_exhaustion_s=None,
    )
    if model is None:
        return result
    paced = paced_rate > 0
    reached = before / first if first and before else conns.rate_per_s
    offered = paced_rate if paced else reached
    limit = model.max_rate_per_s
    result.model_max_rate_per_s = round(limit, 2) if limit is not None else None
    result.model_ports = model.ports
    result.model_hold_s = model.hold_s
    result.model_lifetime_s = round(model.lifetime_s, 6)
    result.model_reuse = model.reuse
    soft = model.soft_rate_per_s
    result.model_soft_rate_per_s = round(soft, 2) if soft is not None else None
    result.model_tw_buckets = model.tw_buckets
    result.offered_rate_per_s = round(offered, 1) if offered else None
    result.offered_rate_source = "scenario" if paced else "measured"
    if offered:
        tte = model.time_to_exhaustion_s(offered)
        result.model_time_to_exhaustion_s = round(tte, 4) if tte is not None else None
    return result
