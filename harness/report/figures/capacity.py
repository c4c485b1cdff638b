"""The capacity model against the range size, with this run's model and measurement."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from harness.capacity.port_model import TIME_WAIT_S
from harness.report.figures._axes import empty, figure, legend, range_size, reuse_delay_s
from harness.report.rundata import RunData
from harness.summary import Capacity

__all__ = ["capacity"]


def _model_curves(ax: Axes, data: RunData, usable: int, lifetime: float) -> None:
    """Sustainable rate against range size: a 60 s hold, and tcp_tw_reuse's delay."""
    delay = reuse_delay_s(data)
    sizes = np.geomspace(min(100, usable), 65535, 200)
    scale = usable / range_size(data, usable)  # paths x usable share of the range
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


def _this_run(ax: Axes, cap: Capacity, size: int) -> None:
    """This run: measured (dot), the model (x) and the offered rate (dotted)."""
    measured = cap.measured_sustained_rate_per_s or cap.measured_rate_per_s
    if measured:
        kind = "sustained after exhaustion" if cap.measured_sustained_rate_per_s else "mean"
        ax.scatter(
            [size],
            [measured],
            s=60,
            color="tab:red",
            zorder=5,
            label=f"this run, measured {kind}: {measured:,.0f}/s",
        )
    if cap.model_max_rate_per_s:
        ax.scatter(
            [size],
            [cap.model_max_rate_per_s],
            s=60,
            marker="x",
            color="black",
            zorder=6,
            label=f"model for this run: {cap.model_max_rate_per_s:,.0f}/s",
        )
    if cap.offered_rate_per_s:
        ax.axhline(
            cap.offered_rate_per_s,
            color="grey",
            ls=":",
            label=f"offered {cap.offered_rate_per_s:,.0f}/s",
        )


def capacity(data: RunData) -> Figure:
    fig = figure(4.5)
    ax = fig.subplots()
    cap = data.summary.capacity
    if not cap.model_ports:
        empty(ax, "the port range is unknown: no capacity model")
        ax.set_title("Capacity model")
        return fig
    usable = cap.model_ports
    _model_curves(ax, data, usable, float(cap.model_lifetime_s or 0.0))
    _this_run(ax, cap, range_size(data, usable))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ports in ip_local_port_range")
    ax.set_ylabel("sustainable new connections/s")
    ax.set_title("Capacity: ports / (connection lifetime + hold), this run's paths")
    ax.grid(alpha=0.3, which="both")
    legend(ax, loc="upper left", fontsize="small")
    return fig
