"""The report's figures: matplotlib ``Figure`` objects (no pyplot, so no global state).

Each function takes a :class:`RunData` and returns one titled figure with labelled
axes, units, a legend, and the exhaustion moment and limits marked. They work
from columns in bulk: a 1,000,000-connection run renders all of them in a few
seconds (``make bench``). Large runs switch scatter plots to 2-D histograms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from harness.capacity.model import DEFAULT_REUSE_DELAY_S, TIME_WAIT_S, reserved_spans
from harness.errors import errno_name
from harness.report.analysis import (
    IN_USE,
    HostSamples,
    TupleAudit,
    audit_tuples,
    host_mask,
    occupancy_at_start,
    scope_series,
)

__all__ = ["FIGURES", "HOSTS_FIGURE", "RunData", "time_bins"]

SCATTER_LIMIT = 50_000  # above this many points a scatter becomes a 2-D histogram
_EVEN, _ODD = "tab:blue", "tab:orange"


@dataclass
class RunData:
    """One run's columns, read once and shared by every figure."""

    table: pa.Table
    samples: pa.Table | None
    summary: dict[str, Any]
    scenario: dict[str, Any]
    server_samples: pa.Table | None = None
    hosts: tuple[HostSamples, ...] = ()  # a distributed run's workers
    _audit: TupleAudit | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        start = self.table.column("start_ns").to_numpy()
        self.t0 = int(start.min()) if len(start) else 0
        self.seconds = (start - self.t0) / 1e9
        self.errno = self.table.column("errno").to_numpy()
        self.ok = self.errno == 0
        self.port = self.table.column("local_port").to_numpy()
        self.connect_ms = self.table.column("connect_us").to_numpy() / 1000.0

    @property
    def audit(self) -> TupleAudit:
        if self._audit is None:
            self._audit = audit_tuples(self.table)
        return self._audit

    @property
    def exhausted_at(self) -> float | None:
        exhaustion = self.summary.get("exhaustion", {})
        return exhaustion.get("first_failure_s") if exhaustion.get("exhausted") else None

    @property
    def port_range(self) -> tuple[int, int] | None:
        found = self.summary.get("ports", {}).get("range")
        return (
            (int(found[0]), int(found[1])) if isinstance(found, list) and len(found) == 2 else None
        )

    def sample_seconds(self, samples: pa.Table) -> np.ndarray:
        return np.asarray((samples.column("t_ns").to_numpy() - self.t0) / 1e9)


def time_bins(seconds: np.ndarray) -> tuple[np.ndarray, float]:
    """Whole bins only: a last, partial bin would read as a false drop in rate."""
    span = float(seconds.max()) if len(seconds) else 0.0
    width = 0.1 if span <= 10 else 1.0 if span <= 600 else 10.0
    count = max(1, int(span // width))
    return np.arange(count + 1) * width, width


def _figure(height: float = 4.0) -> Figure:
    return Figure(figsize=(10, height), layout="constrained")


def _mark_exhaustion(ax: Axes, data: RunData) -> None:
    if data.exhausted_at is not None:
        at = data.exhausted_at
        ax.axvline(at, color="tab:red", ls="--", lw=1.0, label=f"exhausted at {at:.3g} s")


def _legend(ax: Axes, **options: Any) -> None:
    """A legend when something is labelled (matplotlib warns about an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _occupancy_panels(data: RunData) -> list[tuple[str, pa.Table, str, float | None]]:
    """(title, samples, scope, usable ports) per panel: one per destination, or in a
    distributed run one per worker host (each host has a range of its own)."""
    ports = data.summary.get("capacity", {}).get("model_ports")
    if data.hosts:
        per_host = ports / len(data.hosts) if ports else None
        return [
            (host.name, host.samples, "to ", per_host)
            for host in data.hosts[:4]
            if host.samples is not None and host.samples.num_rows
        ]
    samples = data.samples
    if samples is None or not samples.num_rows:
        return []
    scopes = sorted({s for s in samples.column("scope").to_pylist() if s.startswith("to ")})
    if not scopes:
        return []
    per_destination = ports / len(scopes) if ports else None
    if len(scopes) > 4:  # many destinations: their sum
        total = per_destination * len(scopes) if per_destination else None
        return [(f"all {len(scopes)} destinations", samples, "to ", total)]
    return [(scope, samples, scope, per_destination) for scope in scopes]


def occupancy(data: RunData) -> Figure:
    """Ports in use toward each destination (or on each host), by state, against the
    usable range."""
    fig = _figure(4.5)
    panels = _occupancy_panels(data)
    if not panels:
        _empty(fig.subplots(), "no socket samples toward the targets in this run")
        fig.suptitle("Port-range occupancy")
        return fig
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, samples, scope, limit) in zip(axes, panels, strict=True):
        scope_names = np.array(samples.column("scope").to_pylist(), dtype=object)
        mask = (
            scope_names == scope
            if scope != "to "
            else np.char.startswith(scope_names.astype(str), "to ")
        )
        times, index = np.unique(data.sample_seconds(samples)[mask], return_inverse=True)
        by_state = {
            state: np.bincount(
                index, weights=samples.column(state).to_numpy()[mask], minlength=len(times)
            )
            for state in IN_USE
        }
        established, time_wait = by_state["established"], by_state["time_wait"]
        other = sum(by_state.values()) - established - time_wait
        ax.stackplot(
            times,
            established,
            time_wait,
            other,
            labels=["ESTABLISHED", "TIME_WAIT", "other states"],
            colors=["tab:green", "tab:purple", "tab:grey"],
            alpha=0.85,
        )
        if limit:
            ax.axhline(limit, color="black", lw=1, label=f"usable ports ({limit:,.0f})")
        _mark_exhaustion(ax, data)
        ax.set_title(title)
        ax.set_xlabel("time since first attempt (s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("client sockets toward the target")
    axes[0].legend(loc="lower right", fontsize="small")
    side = "each load-generator host" if data.hosts else "client side"
    fig.suptitle(f"Port-range occupancy by TCP state ({side}, from the collector)")
    return fig


def hosts(data: RunData) -> Figure:
    """A distributed run: each worker host's ports in use over time, and its ports' uses."""
    fig = _figure(4.5)
    left, right = fig.subplots(1, 2)
    for n, host in enumerate(data.hosts):
        color = f"C{n % 10}"
        if host.samples is not None and host.samples.num_rows:
            times, in_use = scope_series(host.samples, IN_USE)
            left.plot((times - data.t0) / 1e9, in_use, color=color, label=host.name)
        ports = data.port[data.ok & host_mask(data.table, host.name)]
        if len(ports):
            low, high = int(ports.min()), int(ports.max())
            edges = np.linspace(low, high + 1, min(high - low + 1, 200) + 1)
            counts, _ = np.histogram(ports, edges)
            right.stairs(counts, edges, color=color, label=f"{host.name} ({len(ports):,})")
    _mark_exhaustion(left, data)
    left.set_xlabel("time since first attempt (s)")
    left.set_ylabel("ports in use toward the targets")
    left.set_title("Occupancy per host")
    right.set_xlabel("local port")
    right.set_ylabel("connections per port bin")
    right.set_title("Source ports per host (successful connections)")
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        _legend(ax, loc="best", fontsize="small")
    fig.suptitle(f"{len(data.hosts)} load-generator hosts (Locust workers)")
    return fig


def outcomes(data: RunData) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    t = data.seconds
    edges, width = time_bins(t)
    centers = edges[:-1]

    def per_second(mask: np.ndarray | None = None) -> np.ndarray:
        return np.asarray(np.histogram(t if mask is None else t[mask], edges)[0] / width)

    ax.plot(centers, per_second(), label="attempts", color="black", lw=1.2)
    ax.plot(centers, per_second(data.ok), label="succeeded", color="tab:green")
    for value in np.unique(data.errno[~data.ok]):
        ax.plot(centers, per_second(data.errno == value), label=errno_name(int(value)))
    for n, outage in enumerate(data.summary.get("outages", [])):
        ax.axvspan(
            outage["from_s"],
            outage["to_s"],
            color="tab:red",
            alpha=0.12,
            label=None if n else "target unreachable (outage)",
        )
    _mark_exhaustion(ax, data)
    ax.set_xlabel("time since first attempt (s)")
    ax.set_ylabel(f"connections per second ({width:g} s bins)")
    ax.set_title("Connection attempts per second, by outcome (failures by errno)")
    ax.grid(alpha=0.3)
    _legend(ax, loc="upper right", fontsize="small")
    return fig


def allocation(data: RunData) -> Figure:
    fig = _figure(4.5)
    ax = fig.subplots()
    t, port = data.seconds[data.ok], data.port[data.ok]
    if len(port) > SCATTER_LIMIT:
        _, _, _, image = ax.hist2d(t, port, bins=(200, 100), cmin=1, cmap="viridis")
        fig.colorbar(image, ax=ax, label="connections per cell")
        edges, _ = time_bins(t)
        even = np.histogram(t[port % 2 == 0], edges)[0]
        every = np.maximum(np.histogram(t, edges)[0], 1)
        twin = ax.twinx()
        twin.plot(edges[:-1], even / every, color="white", lw=1.5, label="even-port share")
        twin.set_ylim(0, 1)
        twin.set_ylabel("share of even ports")
        _legend(twin, loc="upper left", fontsize="small")
    elif len(port):
        even = port % 2 == 0
        ax.scatter(t[even], port[even], s=2, color=_EVEN, label="even port")
        ax.scatter(t[~even], port[~even], s=2, color=_ODD, label="odd port")
    else:
        _empty(ax, "no successful connection")
    if data.port_range:
        low, high = data.port_range
        for edge in (low, high):
            ax.axhline(edge, color="grey", ls=":", lw=0.8)
        pad = 0.02 * (high - low) + 1
        ax.set_ylim(low - pad, high + pad)
    _mark_exhaustion(ax, data)
    ax.set_xlabel("time since first attempt (s)")
    ax.set_ylabel("local (ephemeral) port")
    ax.set_title("Source port given to each connection (dotted: ip_local_port_range)")
    if len(port):
        _legend(ax, loc="upper right", markerscale=4, fontsize="small")
    return fig


def port_use(data: RunData) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    ports = data.port[data.ok]
    low, high = data.port_range or ((int(ports.min()), int(ports.max())) if len(ports) else (0, 1))
    counts = np.bincount(ports, minlength=65536)[low : high + 1].astype(float)
    numbers = np.arange(low, high + 1)
    bins = min(len(numbers), 400)
    if bins == len(numbers):  # a bar per port
        for parity, color, name in ((0, _EVEN, "even ports"), (1, _ODD, "odd ports")):
            mine = numbers % 2 == parity
            ax.bar(numbers[mine], counts[mine], width=1.0, color=color, label=name)
    else:  # the mean of each parity over a bin of ports
        edges = np.linspace(low, high + 1, bins + 1)
        for parity, color, name in ((0, _EVEN, "even ports"), (1, _ODD, "odd ports")):
            mine = numbers % 2 == parity
            used, _ = np.histogram(numbers[mine], edges, weights=counts[mine])
            width, _ = np.histogram(numbers[mine], edges)
            ax.stairs(used / np.maximum(width, 1), edges, color=color, label=name)
    reserved = reserved_spans(
        str(data.summary.get("kernel", {}).get("ip_local_reserved_ports") or "")
    )
    shown = False
    for first, last in reserved:
        if last >= low and first <= high:
            ax.axvspan(
                max(first, low),
                min(last, high) + 1,
                color="tab:red",
                alpha=0.2,
                label=None if shown else "reserved (ip_local_reserved_ports)",
            )
            shown = True
    ax.set_xlabel("local port")
    ax.set_ylabel("connections per port" + ("" if bins == len(numbers) else " (bin mean)"))
    ax.set_title(f"Uses of each port of the range ({len(ports):,} connections)")
    ax.grid(alpha=0.3)
    _legend(ax, loc="upper right", fontsize="small")
    return fig


def reuse_age(data: RunData) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    ages = data.audit.reuse_ages_s
    delay_ms = data.summary.get("kernel", {}).get("tcp_tw_reuse_delay_ms")
    delay = delay_ms / 1000 if delay_ms else DEFAULT_REUSE_DELAY_S
    if len(ages):
        low = max(min(float(ages.min()), delay) / 2, 1e-4)
        ax.hist(
            ages,
            bins=list(np.geomspace(low, TIME_WAIT_S * 2, 80)),
            color="tab:purple",
            label=f"{len(ages):,} reuses",
        )
        ax.set_xscale("log")
    else:
        _empty(ax, "no 4-tuple was used twice within TIME_WAIT in this run")
    ax.axvline(delay, color="tab:green", ls="--", label=f"tcp_tw_reuse delay {delay:g} s")
    ax.axvline(TIME_WAIT_S, color="black", ls="--", label="TIME_WAIT ends (60 s)")
    ax.set_xlabel("age of the TIME_WAIT a tuple was reused out of (s, from close to reuse)")
    ax.set_ylabel("connections")
    ax.set_title("TIME_WAIT reuse: how long after its close each tuple came back")
    _legend(ax, loc="upper left", fontsize="small")
    return fig


def latency_vs_occupancy(data: RunData) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    usable = data.summary.get("capacity", {}).get("model_ports")
    samples = data.samples
    share = None
    if samples is not None and samples.num_rows and usable:
        share = occupancy_at_start(data.table, samples, int(usable))
    if share is None:
        _empty(ax, "needs socket samples and a known port range")
        ax.set_title("Connect latency against range occupancy")
        return fig
    fraction = share * 100
    connect = data.connect_ms[data.ok]
    odd = data.port[data.ok] % 2 == 1
    edges = np.linspace(0, 100, 21)
    centers = (edges[:-1] + edges[1:]) / 2
    which = np.clip(np.digitize(fraction, edges) - 1, 0, len(centers) - 1)
    for mask, color, name in ((~odd, _EVEN, "even ports"), (odd, _ODD, "odd ports")):
        for q, style in ((50, "-"), (99, ":")):
            values = [
                np.percentile(connect[mask & (which == b)], q)
                if (mask & (which == b)).sum() >= 5
                else np.nan
                for b in range(len(centers))
            ]
            ax.plot(centers, values, style, marker="o", ms=3, color=color, label=f"{name} p{q}")
    ax.set_yscale("log")
    ax.set_xlim(0, 100)
    ax.set_xlabel("ports of the range in use when the connect began (%)")
    ax.set_ylabel("connect latency (ms)")
    ax.set_title("Connect latency against range occupancy (a full range makes connect() search)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, loc="upper left", fontsize="small", ncol=2)
    return fig


_COUNTER_PANELS = (
    ("TIME_WAIT sockets", ("sockstat_tw",), False),
    ("TWRecycled (reuses)", ("tw_recycled",), True),
    ("TCPTimeWaitOverflow", ("timewait_overflow",), True),
    ("ListenOverflows", ("listen_overflows",), True),
)


def counters(data: RunData) -> Figure:
    fig = _figure(5)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    sides = [
        (name, s)
        for name, s in (("client", data.samples), ("server", data.server_samples))
        if s is not None and s.num_rows
    ]
    for ax, (title, columns, delta) in zip(axes, _COUNTER_PANELS, strict=True):
        for (side, samples), style in zip(sides, ("-", "--"), strict=False):
            scope = np.array(samples.column("scope").to_pylist(), dtype=object) == "all"
            t = data.sample_seconds(samples)[scope]
            for column in columns:
                values = samples.column(column).to_numpy(zero_copy_only=False)[scope].astype(float)
                if np.isnan(values).all():
                    continue
                if delta:
                    values = values - np.nanmin(values[:1]) if len(values) else values
                label = side if len(sides) > 1 else None
                ax.plot(t, values, style, label=label)
        _mark_exhaustion(ax, data)
        ax.set_title(title + (" since the start" if delta else ""), fontsize="medium")
        ax.grid(alpha=0.3)
        if len(sides) > 1:
            _legend(ax, fontsize="x-small")
    if not sides:
        _empty(axes[0], "no samples")
    for ax in axes[2:]:
        ax.set_xlabel("time since first attempt (s)")
    fig.suptitle("Kernel counters over time (the namespace's own in a lab)")
    return fig


def capacity(data: RunData) -> Figure:
    fig = _figure(4.5)
    ax = fig.subplots()
    cap = data.summary.get("capacity", {})
    ports = cap.get("model_ports")
    if not ports:
        _empty(ax, "the port range is unknown: no capacity model")
        ax.set_title("Capacity model")
        return fig
    usable = int(ports)
    lifetime = float(cap.get("model_lifetime_s") or 0.0)
    delay_ms = data.summary.get("kernel", {}).get("tcp_tw_reuse_delay_ms")
    delay = delay_ms / 1000 if delay_ms else DEFAULT_REUSE_DELAY_S
    sizes = np.geomspace(min(100, usable), 65535, 200)
    scale = usable / _range_size(data, usable)  # paths x usable share of the range
    ax.plot(
        sizes,
        sizes * scale / (TIME_WAIT_S + lifetime),
        color="tab:purple",
        label="TIME_WAIT (60 s hold)",
    )
    ax.plot(
        sizes,
        sizes * scale / (delay + lifetime),
        color="tab:green",
        label=f"tcp_tw_reuse, {delay:g} s delay",
    )
    size = _range_size(data, usable)
    measured = cap.get("measured_sustained_rate_per_s") or cap.get("measured_rate_per_s")
    if measured:
        kind = "sustained after exhaustion" if cap.get("measured_sustained_rate_per_s") else "mean"
        ax.scatter(
            [size],
            [measured],
            s=60,
            color="tab:red",
            zorder=5,
            label=f"this run, measured {kind}: {measured:,.0f}/s",
        )
    if cap.get("model_max_rate_per_s"):
        ax.scatter(
            [size],
            [cap["model_max_rate_per_s"]],
            s=60,
            marker="x",
            color="black",
            zorder=6,
            label=f"model for this run: {cap['model_max_rate_per_s']:,.0f}/s",
        )
    if cap.get("offered_rate_per_s"):
        ax.axhline(
            cap["offered_rate_per_s"],
            color="grey",
            ls=":",
            label=f"offered {cap['offered_rate_per_s']:,.0f}/s",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ports in ip_local_port_range")
    ax.set_ylabel("sustainable new connections/s")
    ax.set_title("Capacity: ports / (connection lifetime + hold), this run's paths")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, loc="upper left", fontsize="small")
    return fig


def _range_size(data: RunData, usable: int) -> int:
    if data.port_range:
        return data.port_range[1] - data.port_range[0] + 1
    return usable


FigureMaker = Callable[[RunData], Figure]

# title, function, what it shows (the report's caption)
FIGURES: list[tuple[str, FigureMaker, str]] = [
    (
        "Port-range occupancy",
        occupancy,
        "Client sockets toward each target by state, stacked, sampled by the collector,"
        " against the usable ports. Exhaustion is the stack reaching the line: from then on"
        " connect() fails until a TIME_WAIT ends or becomes reusable.",
    ),
    (
        "Attempts and outcomes",
        outcomes,
        "Attempts, successes and failures by errno per second. A drop to the backoff rate"
        " with EADDRNOTAVAIL is the range running out; the red line is the first failure."
        " Shaded spans are outages: every attempt failed at the target (refused, reset,"
        " timed out).",
    ),
    (
        "Source-port allocation",
        allocation,
        "The port each connection got against time; even ports blue, odd orange (on large"
        " runs a 2-D histogram and the even share). connect() tries ports of the range's"
        " low-end parity first, so the odd half fills last.",
    ),
    (
        "Port use over the range",
        port_use,
        "How many connections each port carried. Reserved ports are never handed out; an"
        " uneven floor shows the parity preference.",
    ),
    (
        "TIME_WAIT reuse age",
        reuse_age,
        "For each tuple used again while its TIME_WAIT could still hold it, the time from"
        " its close to the reuse. With tcp_tw_reuse the ages pile up just past the reuse"
        " delay; without it nothing comes back before 60 s.",
    ),
    (
        "Connect latency against occupancy",
        latency_vs_occupancy,
        "Median and p99 connect latency as the range fills, for even and odd ports. A full"
        " range makes connect() walk more candidate ports before it finds one.",
    ),
    (
        "Kernel counters",
        counters,
        "TIME_WAIT sockets, and TWRecycled, TCPTimeWaitOverflow and ListenOverflows since"
        " the start (client side; dashed: the server in a lab's pair topology).",
    ),
    (
        "Capacity",
        capacity,
        "The model's sustainable rate against the range size, for a 60 s TIME_WAIT hold and"
        " for tcp_tw_reuse's delay, with this run's model (x) and measured rate (dot).",
    ),
]

# only in a distributed run (eph run --master)
HOSTS_FIGURE: tuple[str, FigureMaker, str] = (
    "Load-generator hosts",
    hosts,
    "Each Locust worker host has a port range of its own: its ports in use toward the"
    " targets over time (its own collector, on the run's clock) and how often each of its"
    " source ports carried a connection.",
)


def compare_successes(runs: list[tuple[str, RunData]]) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    for name, data in runs:
        t = data.seconds[data.ok]
        if not len(t):
            continue
        edges, width = time_bins(data.seconds)
        ax.plot(edges[:-1], np.histogram(t, edges)[0] / width, label=name)
    return _finish(
        fig,
        ax,
        ("time since the run's first attempt (s)", "successful connections per second"),
        "Successful connections per second, run by run",
        "upper right",
    )


def compare_occupancy(runs: list[tuple[str, RunData]]) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    for name, data in runs:
        if data.samples is None or not data.samples.num_rows:
            continue
        times, in_use = scope_series(data.samples, IN_USE)
        (line,) = ax.plot((times - data.t0) / 1e9, in_use, label=name)
        usable = data.summary.get("capacity", {}).get("model_ports")
        if usable:
            ax.axhline(usable, color=line.get_color(), ls=":", lw=1)
    return _finish(
        fig,
        ax,
        ("time since the run's first attempt (s)", "client sockets toward the targets"),
        "Ports in use toward the targets (dotted: each run's usable ports)",
        "lower right",
    )


def compare_capacity(runs: list[tuple[str, RunData]]) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    for name, data in runs:
        cap = data.summary.get("capacity", {})
        usable = cap.get("model_ports")
        if not usable:
            continue
        size = _range_size(data, int(usable))
        model = cap.get("model_max_rate_per_s")
        measured = cap.get("measured_sustained_rate_per_s") or cap.get("measured_rate_per_s")
        (point,) = ax.plot([size], [measured or np.nan], "o", ms=8, label=f"{name} measured")
        if model:
            ax.plot([size], [model], "x", ms=10, color=point.get_color(), label=f"{name} model")
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _finish(
        fig,
        ax,
        ("ports in ip_local_port_range", "new connections/s"),
        "Capacity, run by run: the model's ceiling (x) and what was measured (dot)",
        "upper left",
    )


def _finish(fig: Figure, ax: Axes, labels: tuple[str, str], title: str, where: str) -> Figure:
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, loc=where, fontsize="small")
    return fig
