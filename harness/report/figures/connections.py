"""Connections over time and the ports they got: outcomes, allocation, use of each port."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from harness.capacity.port_model import reserved_spans
from harness.errors import errno_name
from harness.report.figures._axes import (
    EVEN,
    ODD,
    SCATTER_LIMIT,
    empty,
    figure,
    legend,
    mark_exhaustion,
    time_bins,
)
from harness.report.rundata import RunData

__all__ = ["allocation", "outcomes", "port_use"]


def outcomes(data: RunData) -> Figure:
    fig = figure()
    ax = fig.subplots()
    edges, width, counts = data.per_second()  # every connection, on a large run too
    centers = edges[:-1]
    zero = np.zeros(len(centers))
    ax.plot(centers, counts.get(-1, zero) / width, label="attempts", color="black", lw=1.2)
    ax.plot(centers, counts.get(0, zero) / width, label="succeeded", color="tab:green")
    for value in sorted(v for v in counts if v > 0):
        ax.plot(centers, counts[value] / width, label=errno_name(value))
    for n, outage in enumerate(data.summary.outages):
        ax.axvspan(
            outage.from_s,
            outage.to_s,
            color="tab:red",
            alpha=0.12,
            label=None if n else "target unreachable (outage)",
        )
    mark_exhaustion(ax, data)
    ax.set_xlabel("time since first attempt (s)")
    ax.set_ylabel(f"connections per second ({width:g} s bins)")
    ax.set_title("Connection attempts per second, by outcome (failures by errno)")
    ax.grid(alpha=0.3)
    legend(ax, loc="upper right", fontsize="small")
    return fig


def _even_share(fig: Figure, ax: Axes, t: np.ndarray, port: np.ndarray, every: int) -> None:
    """A large run: a 2-D histogram of ports against time, and the even ports' share."""
    _, _, _, image = ax.hist2d(t, port, bins=(200, 100), cmin=1, cmap="viridis")
    drawn = "connections per cell" + (f" (1 in {every:,} drawn)" if every > 1 else "")
    fig.colorbar(image, ax=ax, label=drawn)
    edges, _ = time_bins(t)
    even = np.histogram(t[port % 2 == 0], edges)[0]
    every = np.maximum(np.histogram(t, edges)[0], 1)
    twin = ax.twinx()
    twin.plot(edges[:-1], even / every, color="white", lw=1.5, label="even-port share")
    twin.set_ylim(0, 1)
    twin.set_ylabel("share of even ports")
    legend(twin, loc="upper left", fontsize="small")


def allocation(data: RunData) -> Figure:
    fig = figure(4.5)
    ax = fig.subplots()
    t, port = data.seconds[data.ok], data.port[data.ok]
    if len(port) > SCATTER_LIMIT:
        _even_share(fig, ax, t, port, data.every)
    elif len(port):
        even = port % 2 == 0
        ax.scatter(t[even], port[even], s=2, color=EVEN, label="even port")
        ax.scatter(t[~even], port[~even], s=2, color=ODD, label="odd port")
    else:
        empty(ax, "no successful connection")
    if data.port_range:
        low, high = data.port_range
        for edge in (low, high):
            ax.axhline(edge, color="grey", ls=":", lw=0.8)
        pad = 0.02 * (high - low) + 1
        ax.set_ylim(low - pad, high + pad)
    mark_exhaustion(ax, data)
    ax.set_xlabel("time since first attempt (s)")
    ax.set_ylabel("local (ephemeral) port")
    ax.set_title(
        "Source port given to each connection (dotted: ip_local_port_range)" + data.sample_note
    )
    if len(port):
        legend(ax, loc="upper right", markerscale=4, fontsize="small")
    return fig


def _uses_by_parity(ax: Axes, numbers: np.ndarray, counts: np.ndarray, bins: int) -> None:
    """A bar per port, or the mean of each parity over a bin of ports."""
    low, high = int(numbers[0]), int(numbers[-1])
    edges = np.linspace(low, high + 1, bins + 1)
    for parity, color, name in ((0, EVEN, "even ports"), (1, ODD, "odd ports")):
        mine = numbers % 2 == parity
        if bins == len(numbers):
            ax.bar(numbers[mine], counts[mine], width=1.0, color=color, label=name)
        else:
            used, _ = np.histogram(numbers[mine], edges, weights=counts[mine])
            width, _ = np.histogram(numbers[mine], edges)
            ax.stairs(used / np.maximum(width, 1), edges, color=color, label=name)


def _mark_reserved(ax: Axes, data: RunData, low: int, high: int) -> None:
    shown = False
    for first, last in reserved_spans(data.summary.kernel.reserved):
        if last >= low and first <= high:
            ax.axvspan(
                max(first, low),
                min(last, high) + 1,
                color="tab:red",
                alpha=0.2,
                label=None if shown else "reserved (ip_local_reserved_ports)",
            )
            shown = True


def port_use(data: RunData) -> Figure:
    fig = figure()
    ax = fig.subplots()
    uses = data.port_uses()  # every connection, on a large run too
    used = np.flatnonzero(uses)
    low, high = data.port_range or ((int(used[0]), int(used[-1])) if len(used) else (0, 1))
    counts = uses[low : high + 1].astype(float)
    numbers = np.arange(low, high + 1)
    bins = min(len(numbers), 400)
    _uses_by_parity(ax, numbers, counts, bins)
    _mark_reserved(ax, data, low, high)
    ax.set_xlabel("local port")
    ax.set_ylabel("connections per port" + ("" if bins == len(numbers) else " (bin mean)"))
    ax.set_title(f"Uses of each port of the range ({int(uses.sum()):,} connections)")
    ax.grid(alpha=0.3)
    legend(ax, loc="upper right", fontsize="small")
    return fig
