"""Ports in use: by state toward each destination, per host, and latency as they fill."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from harness.report.columns import scope_mask, scope_prefix_mask
from harness.report.figures._axes import EVEN, ODD, empty, figure, legend, mark_exhaustion
from harness.report.hosts import host_mask
from harness.report.port_occupancy import IN_USE, scope_series
from harness.report.rundata import RunData

__all__ = ["Panel", "hosts", "latency_vs_occupancy", "occupancy", "occupancy_panel"]

Panel = tuple[str, pa.Table, str, float | None]  # title, samples, scope, usable ports


def _occupancy_panels(data: RunData) -> list[Panel]:
    """One panel per destination, or in a distributed run one per worker host (each
    host has a range of its own)."""
    ports = data.usable_ports
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
    found = pc.unique(samples.column("scope")).to_pylist()
    scopes = sorted(s for s in found if s is not None and s.startswith("to "))
    if not scopes:
        return []
    per_destination = ports / len(scopes) if ports else None
    if len(scopes) > 4:  # many destinations: their sum
        total = per_destination * len(scopes) if per_destination else None
        return [(f"all {len(scopes)} destinations", samples, "to ", total)]
    return [(scope, samples, scope, per_destination) for scope in scopes]


def occupancy_panel(ax: Axes, data: RunData, panel: Panel) -> None:
    """One panel: the sockets of the panel's scope (``"to "``: every destination's) by
    state, stacked, against its usable ports."""
    title, samples, scope, limit = panel
    mask = scope_mask(samples, scope) if scope != "to " else scope_prefix_mask(samples, "to ")
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
    mark_exhaustion(ax, data)
    ax.set_title(title)
    ax.set_xlabel("time since first attempt (s)")
    ax.grid(alpha=0.3)


def occupancy(data: RunData) -> Figure:
    """Ports in use toward each destination (or on each host), by state, against the
    usable range."""
    fig = figure(4.5)
    panels = _occupancy_panels(data)
    if not panels:
        empty(fig.subplots(), "no socket samples toward the targets in this run")
        fig.suptitle("Port-range occupancy")
        return fig
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        occupancy_panel(ax, data, panel)
    axes[0].set_ylabel("client sockets toward the target")
    axes[0].legend(loc="lower right", fontsize="small")
    side = "each load-generator host" if data.hosts else "client side"
    fig.suptitle(f"Port-range occupancy by TCP state ({side}, from the collector)")
    return fig


def hosts(data: RunData) -> Figure:
    """A distributed run: each worker host's ports in use over time, and its ports' uses."""
    fig = figure(4.5)
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
    mark_exhaustion(left, data)
    left.set_xlabel("time since first attempt (s)")
    left.set_ylabel("ports in use toward the targets")
    left.set_title("Occupancy per host")
    right.set_xlabel("local port")
    right.set_ylabel("connections per port bin")
    right.set_title("Source ports per host (successful connections)")
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        legend(ax, loc="best", fontsize="small")
    fig.suptitle(f"{len(data.hosts)} load-generator hosts (Locust workers){data.sample_note}")
    return fig


def _mark_cliff(ax: Axes, data: RunData) -> None:
    """The detected onset of slow connects, and the p50 before and after it."""
    cliff = data.summary.latency_cliff
    if cliff is None or not cliff.detected or cliff.onset_occupancy is None:
        return
    at = cliff.onset_occupancy * 100
    ax.axvline(
        at,
        color="tab:red",
        ls="--",
        lw=1.0,
        label=f"cliff at {at:.0f}% ({cliff.ratio or 0:,.0f}x p50)",
    )
    if cliff.before_p50_ms and cliff.after_p50_ms:
        ax.hlines(cliff.before_p50_ms, 0, at, color="grey", lw=0.8, ls="-.")
        ax.hlines(cliff.after_p50_ms, at, 100, color="grey", lw=0.8, ls="-.")


def latency_vs_occupancy(data: RunData) -> Figure:
    fig = figure()
    ax = fig.subplots()
    share = None
    if data.in_use is not None and data.ok.any():  # as the summary's bands place them
        share = data.in_use.at(data.table.column("start_ns").to_numpy()[data.ok])
    if share is None:
        empty(ax, "needs socket samples and a known port range")
        ax.set_title("Connect latency against range occupancy")
        return fig
    fraction = share * 100
    connect = data.connect_ms[data.ok]
    odd = data.port[data.ok] % 2 == 1
    edges = np.linspace(0, 100, 21)
    centers = (edges[:-1] + edges[1:]) / 2
    which = np.clip(np.digitize(fraction, edges) - 1, 0, len(centers) - 1)
    for mask, color, name in ((~odd, EVEN, "even ports"), (odd, ODD, "odd ports")):
        for q, style in ((50, "-"), (99, ":")):
            values = [
                np.percentile(connect[mask & (which == b)], q)
                if (mask & (which == b)).sum() >= 5
                else np.nan
                for b in range(len(centers))
            ]
            ax.plot(centers, values, style, marker="o", ms=3, color=color, label=f"{name} p{q}")
    _mark_cliff(ax, data)
    ax.set_yscale("log")
    ax.set_xlim(0, 100)
    ax.set_xlabel("ports of the range in use when the connect began (%)")
    ax.set_ylabel("connect latency (ms)")
    ax.set_title(
        "Connect latency against range occupancy (a held even half makes connect() scan)"
        + data.sample_note
    )
    ax.grid(alpha=0.3, which="both")
    legend(ax, loc="upper left", fontsize="small", ncol=2)
    return fig
