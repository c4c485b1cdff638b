"""From records and samples to answers: TIME_WAIT reuse, tuple uniqueness, occupancy, capacity.

Vectorised: one sort of the successful connections by (4-tuple, start) answers
reuse, overlap and reuse distance together.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from harness.capacity.model import TIME_WAIT_S, CapacityModel
from harness.report.summary import EXHAUSTION_ERRNOS
from harness.scenario import ClosePolicy, Protocol, Scenario

__all__ = [
    "IN_USE",
    "HostSamples",
    "TupleAudit",
    "analyze",
    "audit_tuples",
    "host_mask",
    "host_sections",
    "kernel_conservation",
    "occupancy_at_start",
    "port_allocation",
    "scope_series",
]

EXAMPLES = 5


@dataclass
class TupleAudit:
    distinct: int = 0
    max_uses: int = 0
    concurrent_duplicates: int = 0  # a use that began before the previous one closed
    examples: list[dict[str, Any]] = field(default_factory=list)
    reused_out_of_time_wait: int = 0  # began < 60 s after this side closed the tuple
    reuse_ages_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reuse_distance_median: float | None = None  # connections between two uses
    # start to start of consecutive uses of one tuple, and when the later one began
    cycle_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cycle_end_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def _codes(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name).combine_chunks()
    if pa.types.is_dictionary(column.type):
        return np.asarray(column.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)


def audit_tuples(table: pa.Table) -> TupleAudit:
    """Every successful connection's 4-tuple against the previous use of the same tuple."""
    errno = table.column("errno").to_numpy()
    ok = np.flatnonzero(errno == 0)
    if not len(ok):
        return TupleAudit()
    start = table.column("start_ns").to_numpy()[ok]
    end = start + table.column("close_us").to_numpy()[ok].astype(np.int64) * 1000
    key = (
        (_codes(table, "local_addr")[ok] << 48)
        | (table.column("local_port").to_numpy()[ok].astype(np.int64) << 32)
        | (_codes(table, "remote_addr")[ok] << 16)
        | table.column("remote_port").to_numpy()[ok].astype(np.int64)
    )
    client_closed = _codes(table, "close")[ok] == _client_code(table)
    order = np.lexsort((start, key))
    # rows are sorted by start time, so a row's index is its rank among all attempts
    key, start, end, client_closed, rank = (
        key[order],
        start[order],
        end[order],
        client_closed[order],
        ok[order],
    )
    same = key[1:] == key[:-1]
    gap = start[1:] - end[:-1]  # from the previous use's close to this use's start
    overlap = same & (gap < 0)
    reused = same & ~overlap & client_closed[:-1] & (gap < TIME_WAIT_S * 1e9)
    _, counts = np.unique(key, return_counts=True)
    audit = TupleAudit(
        distinct=len(counts),
        max_uses=int(counts.max()),
        concurrent_duplicates=int(overlap.sum()),
        reused_out_of_time_wait=int(reused.sum()),
        reuse_ages_s=gap[reused] / 1e9,
        cycle_s=(start[1:] - start[:-1])[same] / 1e9,
        cycle_end_ns=start[1:][same],
    )
    distances = (rank[1:] - rank[:-1])[same]
    if len(distances):
        audit.reuse_distance_median = float(np.median(distances))
    for i in np.flatnonzero(overlap)[:EXAMPLES]:
        audit.examples.append(
            {
                "local_port": int((key[i] >> 32) & 0xFFFF),
                "remote_port": int(key[i] & 0xFFFF),
                "first_start_ns": int(start[i]),
                "first_close_ns": int(end[i]),
                "second_start_ns": int(start[i + 1]),
            }
        )
    return audit


def port_allocation(table: pa.Table, port_range: Any) -> dict[str, Any]:
    """How the kernel handed out ports: uses per port, parity over time, starting offsets."""
    ok = table.column("errno").to_numpy() == 0
    ports = table.column("local_port").to_numpy()[ok].astype(np.int64)
    if not len(ports):
        return {}
    start = table.column("start_ns").to_numpy()[ok]
    seconds = (start - start[0]) / 1e9
    uses = np.bincount(ports)
    used = uses[uses > 0]
    odd = ports % 2 == 1
    connect_ms = table.column("connect_us").to_numpy()[ok] / 1000.0
    remote = table.column("remote_addr").combine_chunks()
    remote_codes = _codes(table, "remote_addr")[ok]
    remote_ports = table.column("remote_port").to_numpy()[ok].astype(np.int64)
    # rows are in start order: np.unique's first index is each destination's first use
    _, first = np.unique((remote_codes << 16) | remote_ports, return_index=True)
    names = remote.dictionary.to_pylist() if pa.types.is_dictionary(remote.type) else None
    first_port = {
        f"{names[remote_codes[i]] if names else remote_codes[i]}:{remote_ports[i]}": int(ports[i])
        for i in first[:64]
    }
    result: dict[str, Any] = {
        "max_uses_per_port": int(used.max()),
        "mean_uses_per_port": round(float(used.mean()), 3),
        "first_odd_s": round(float(seconds[odd][0]), 4) if odd.any() and not odd.all() else None,
        "first_port_by_destination": first_port,
        "connect_ms_by_parity": {
            "even": _quantiles(connect_ms[~odd]),
            "odd": _quantiles(connect_ms[odd]),
        },
    }
    if isinstance(port_range, list) and len(port_range) == 2:
        result["first_offset_by_destination"] = {
            name: port - int(port_range[0]) for name, port in first_port.items()
        }
    return result


def _client_code(table: pa.Table) -> int:
    column = table.column("close").combine_chunks()
    if not pa.types.is_dictionary(column.type):
        return -1
    values = column.dictionary.to_pylist()
    return values.index(ClosePolicy.CLIENT.value) if ClosePolicy.CLIENT.value in values else -1


@dataclass(frozen=True)
class HostSamples:
    """One load-generator host of a distributed run: its sockets and its kernel."""

    name: str
    samples: pa.Table | None
    kernel: dict[str, Any] | None
    info: dict[str, Any] = field(default_factory=dict)


def analyze(
    table: pa.Table,
    samples: pa.Table | None,
    scenario: Scenario,
    kernel: dict[str, Any],
    summary: dict[str, Any],
    server_samples: pa.Table | None = None,
    hosts: Sequence[HostSamples] = (),
) -> dict[str, Any]:
    """The summary sections this module owns: time_wait, tuples, occupancy, capacity,
    samples, and in a distributed run (``hosts``) one entry per load-generator host."""
    audit = audit_tuples(table)
    sections: dict[str, Any] = {}
    tw_peak = recycled = None
    occupancy_peak = None
    if samples is not None and samples.num_rows:
        tw_peak, occupancy_peak, recycled = _from_samples(samples)
        sample_ms = samples.column("sample_ms").to_numpy(zero_copy_only=False)
        sample_ms = sample_ms[~np.isnan(sample_ms)]
        sections["samples"] = {
            "count": len(sample_ms),
            "interval_s": scenario.collector.interval,
            "max_sample_ms": round(float(sample_ms.max()), 2) if len(sample_ms) else None,
            "median_sample_ms": round(float(np.median(sample_ms)), 2) if len(sample_ms) else None,
            "missing_after_s": samples_missing_after(table, samples, scenario.collector.interval),
        }
    sections["time_wait"] = {
        "peak": tw_peak,
        "reused_connections": audit.reused_out_of_time_wait,
        "kernel_tw_recycled": recycled,
        # positive: reuses the kernel did not count as TWRecycled (a just-closed tuple
        # handed out again, KERNEL-NOTES); negative: reuses the records missed
        "reused_minus_kernel": (
            audit.reused_out_of_time_wait - recycled if recycled is not None else None
        ),
        "reuse_age_s": _quantiles(audit.reuse_ages_s),
    }
    if server_samples is not None and server_samples.num_rows:
        # a lab's pair topology: the server namespace's own collector
        peak = scope_series(server_samples, ("time_wait",), side="at ")[1]
        sections["time_wait"]["server_peak"] = int(peak.max())
    sections["tuples"] = {
        "distinct": audit.distinct,
        "max_uses": audit.max_uses,
        "concurrent_duplicates": audit.concurrent_duplicates,
        "examples": audit.examples,
        "reuse_distance_median": audit.reuse_distance_median,
    }
    model = _model(scenario, kernel, _lifetime_s(table), hosts=max(1, len(hosts)))
    if hosts:
        sections["hosts"] = host_sections(table, hosts, model)
    sections["capacity"] = _capacity(model, summary, scenario.load.rate)
    sections["capacity"]["measured_sustained_rate_per_s"] = sustained_rate(table, audit)
    sections["ports"] = {
        **summary["ports"],
        **port_allocation(table, kernel.get("ip_local_port_range")),
    }
    if occupancy_peak is not None and model is not None and samples is not None:
        sections["occupancy"] = {
            "peak_ports": occupancy_peak,
            "usable_ports": model.ports,
            "peak_fraction": round(occupancy_peak / model.ports, 4) if model.ports else None,
            "connect_ms_by_occupancy": latency_by_occupancy(table, samples, model.ports),
        }
    return sections


def samples_missing_after(table: pa.Table, samples: pa.Table, interval_s: float) -> float | None:
    """When the collector's samples stop well before the load did (it died): the last
    sample, in seconds from the first attempt; None when they cover the run."""
    start = table.column("start_ns").to_numpy()
    if not len(start):
        return None
    last_sample = int(samples.column("t_ns").to_numpy().max())
    if last_sample >= int(start.max()) - 3 * interval_s * 1e9 - 0.5e9:
        return None
    return round((last_sample - int(start.min())) / 1e9, 3)


def kernel_conservation(table: pa.Table, samples: pa.Table | None) -> dict[str, Any] | None:
    """The kernel's own count of connects against the records: Tcp ActiveOpens counts
    each SYN a connect() sent, so over the run it must equal the attempts that did not
    fail locally for want of a port. None without counters in the samples."""
    if samples is None or not samples.num_rows or "active_opens" not in samples.column_names:
        return None
    scope = np.array(samples.column("scope").to_pylist(), dtype=object) == "all"

    def delta(name: str) -> int | None:
        values = samples.column(name).to_numpy(zero_copy_only=False)[scope].astype(float)
        values = values[~np.isnan(values)]
        return int(values[-1] - values[0]) if len(values) > 1 else None

    errno = table.column("errno").to_numpy()
    return {
        "kernel_active_opens": delta("active_opens"),
        "kernel_attempt_fails": delta("attempt_fails"),
        "attempts_sending_syn": int((~np.isin(errno, EXHAUSTION_ERRNOS)).sum()),
    }


OCCUPANCY_BINS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.01)


def scope_series(
    samples: pa.Table, columns: tuple[str, ...], side: str = "to "
) -> tuple[np.ndarray, np.ndarray]:
    """(t_ns, sum of ``columns``) per sample over the ``to`` (client side) or ``at``
    (server side) scopes; the ``all`` scope when there are none."""
    scope = np.array(samples.column("scope").to_pylist(), dtype=object)
    mask = np.array([s.startswith(side) for s in scope])
    if not mask.any():
        mask = scope == "all"
    values = sum(samples.column(c).to_numpy().astype(np.int64) for c in columns)[mask]
    times, index = np.unique(samples.column("t_ns").to_numpy()[mask], return_inverse=True)
    return times, np.bincount(index, weights=values, minlength=len(times))


def occupancy_at_start(table: pa.Table, samples: pa.Table, usable: int) -> np.ndarray | None:
    """For each successful connection, the share of the usable ports in use toward the
    targets when it began (interpolated between samples); None without enough data."""
    times, in_use = scope_series(samples, IN_USE)
    ok = table.column("errno").to_numpy() == 0
    if len(times) < 2 or not ok.any() or not usable:
        return None
    return np.asarray(np.interp(table.column("start_ns").to_numpy()[ok], times, in_use) / usable)


def latency_by_occupancy(table: pa.Table, samples: pa.Table, usable: int) -> list[dict[str, Any]]:
    """Connect latency (p50/p99, even and odd ports) in bands of range occupancy."""
    fraction = occupancy_at_start(table, samples, usable)
    if fraction is None:
        return []
    ok = table.column("errno").to_numpy() == 0
    connect_ms = table.column("connect_us").to_numpy()[ok] / 1000.0
    odd = table.column("local_port").to_numpy()[ok] % 2 == 1
    bands = []
    for low, high in itertools.pairwise(OCCUPANCY_BINS):
        band = (fraction >= low) & (fraction < high)
        if band.any():
            bands.append(
                {
                    "occupancy": [low, min(high, 1.0)],
                    "connections": int(band.sum()),
                    "even": _quantiles(connect_ms[band & ~odd]),
                    "odd": _quantiles(connect_ms[band & odd]),
                }
            )
    return bands


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


def _from_samples(samples: pa.Table) -> tuple[int, int, int | None]:
    """TIME_WAIT peak and occupancy peak toward the targets, and the TWRecycled delta."""
    tw_peak = int(scope_series(samples, ("time_wait",))[1].max())
    occupancy = int(scope_series(samples, IN_USE)[1].max())
    scope = np.array(samples.column("scope").to_pylist(), dtype=object)
    recycled_column = samples.column("tw_recycled").to_numpy(zero_copy_only=False)
    recycled_values = recycled_column[scope == "all"]
    recycled_values = recycled_values[~np.isnan(recycled_values.astype(float))]
    recycled = int(recycled_values[-1] - recycled_values[0]) if len(recycled_values) else None
    return tw_peak, occupancy, recycled


def _lifetime_s(table: pa.Table) -> float:
    """The median successful connection's life, connect() to close, in seconds."""
    ok = table.column("errno").to_numpy() == 0
    if not ok.any():
        return 0.0
    return float(np.median(table.column("close_us").to_numpy()[ok])) / 1e6


def _model(
    scenario: Scenario, kernel: dict[str, Any], lifetime_s: float, hosts: int = 1
) -> CapacityModel | None:
    port_range = kernel.get("ip_local_port_range")
    if not isinstance(port_range, list) or len(port_range) != 2:
        return None
    if scenario.load.socket_port_range is not None:  # IP_LOCAL_PORT_RANGE narrows it per socket
        low, high = scenario.load.socket_port_range
        port_range = [max(low, port_range[0]), min(high, port_range[1])]
    return CapacityModel.from_settings(
        port_range=port_range,
        reserved=str(kernel.get("ip_local_reserved_ports") or ""),
        tw_reuse=int(kernel.get("tcp_tw_reuse", 2)),
        reuse_delay_ms=kernel.get("tcp_tw_reuse_delay_ms"),
        timestamps=int(kernel.get("tcp_timestamps", 1)),
        # UDP has no TIME_WAIT: its ports come back at close, as after a reset
        close=ClosePolicy.RESET if scenario.load.protocol is Protocol.UDP else scenario.load.close,
        destinations=[e.host for e in scenario.target.endpoints],
        sources=len(scenario.load.source_addresses) or 1,
        lifetime_s=lifetime_s,
        hosts=hosts,
    )


def host_mask(table: pa.Table, name: str) -> np.ndarray:
    """Rows recorded by load-generator ``name`` (compared in Arrow, not per row in Python)."""
    if not table.num_rows:
        return np.zeros(0, dtype=bool)
    return np.asarray(pc.equal(table.column("host"), name).to_numpy(zero_copy_only=False))


def host_sections(
    table: pa.Table, hosts: Sequence[HostSamples], model: CapacityModel | None
) -> list[dict[str, Any]]:
    """Per load-generator host: its connections, ports, first failure and peak occupancy."""
    start = table.column("start_ns").to_numpy()
    t0 = int(start.min()) if len(start) else 0
    errno = table.column("errno").to_numpy()
    ports = table.column("local_port").to_numpy()
    sections = []
    for host in hosts:
        mine = host_mask(table, host.name)
        ok = mine & (errno == 0)
        failed = mine & np.isin(errno, list(EXHAUSTION_ERRNOS))
        used = np.unique(ports[ok])
        entry: dict[str, Any] = {
            "host": host.name,
            "hostname": host.info.get("hostname"),
            "attempted": int(mine.sum()),
            "succeeded": int(ok.sum()),
            "failed": int((mine & (errno != 0)).sum()),
            "source_addresses": sorted(
                str(a) for a in pc.unique(table.column("local_addr").filter(ok)).to_pylist()
            ),
            "distinct_ports": len(used),
            "port_span": [int(used[0]), int(used[-1])] if len(used) else None,
            "first_exhaustion_s": (
                round((int(start[failed].min()) - t0) / 1e9, 4) if failed.any() else None
            ),
            "port_range": (host.kernel or {}).get("ip_local_port_range"),
            "peak_in_use": None,
            "usable_ports": model.usable_ports * model.paths if model is not None else None,
            "clock_shift_ms": round(int(host.info.get("clock_shift_ns", 0)) / 1e6, 3),
        }
        if host.samples is not None and host.samples.num_rows:
            tw_peak, peak, _ = _from_samples(host.samples)
            entry["peak_in_use"] = peak
            entry["time_wait_peak"] = tw_peak
        sections.append(entry)
    return sections


def sustained_rate(table: pa.Table, audit: TupleAudit) -> float | None:
    """Successes per second after the range first ran out: the steady state the model's
    ceiling describes (None when the run never ran out, so never met the ceiling).

    Once every tuple cycles (each port used, held, handed out again), the rate is
    tuples / their mean cycle, start to start. Counting successes over a window
    instead is biased by where the window cuts the sawtooth: ports filled in a burst
    come back in a burst, and a 1.5 s run read 7-9% under (window opened at the
    first failure) or 6-12% over (window closed mid-burst). When fewer cycles than
    tuples follow the first failure (TIME_WAIT without reuse), it is the returns
    counted over the rest of the run.
    """
    errno = table.column("errno").to_numpy()
    exhausted = np.isin(errno, EXHAUSTION_ERRNOS)
    if not exhausted.any():
        return None
    start = table.column("start_ns").to_numpy()
    first = start[np.argmax(exhausted)]
    cycles = audit.cycle_s[audit.cycle_end_ns > first]
    if len(cycles) >= max(audit.distinct, 1) and cycles.mean() > 0:
        return round(float(audit.distinct / cycles.mean()), 1)
    window = (start.max() - first) / 1e9
    if window <= 0:
        return None
    returns = (errno == 0) & (start > first)
    return round(float(returns.sum() / window), 1)


def _capacity(
    model: CapacityModel | None, summary: dict[str, Any], paced_rate: float = 0.0
) -> dict[str, Any]:
    """Model against measured. The offered rate is the scenario's pace when it sets one
    (then the model's time to exhaustion is a prediction, not a rearrangement of what
    was measured); an unpaced run's offered rate is what it reached before running out."""
    conns, exhaustion = summary["connections"], summary["exhaustion"]
    duration = summary["duration_s"] or 0.0
    measured_rate = conns["succeeded"] / duration if duration else None
    first = exhaustion.get("first_failure_s")
    before = exhaustion.get("succeeded_before_first_failure")
    if paced_rate > 0:
        offered, source = paced_rate, "scenario"
    else:
        offered = before / first if first and before else conns.get("rate_per_s")
        source = "measured"
    result: dict[str, Any] = {
        "measured_rate_per_s": round(measured_rate, 1) if measured_rate else None,
        "measured_time_to_exhaustion_s": first,
        "model_max_rate_per_s": None,
        "model_time_to_exhaustion_s": None,
    }
    if model is None:
        return result
    limit = model.max_rate_per_s
    result.update(
        model_max_rate_per_s=round(limit, 2) if limit is not None else None,
        model_ports=model.ports,
        model_hold_s=model.hold_s,
        model_lifetime_s=round(model.lifetime_s, 6),
        model_reuse=model.reuse,
        offered_rate_per_s=round(offered, 1) if offered else None,
        offered_rate_source=source,
    )
    if offered:
        tte = model.time_to_exhaustion_s(offered)
        result["model_time_to_exhaustion_s"] = round(tte, 4) if tte is not None else None
    return result


def _quantiles(values: np.ndarray) -> dict[str, float] | None:
    if not len(values):
        return None
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50": round(float(p50), 4),
        "p90": round(float(p90), 4),
        "p99": round(float(p99), 4),
        "min": round(float(values.min()), 4),
    }
