"""``eph report --compare``: runs side by side, each run a line or a point."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from harness.report.figures._axes import figure, finish, range_size
from harness.report.port_occupancy import IN_USE, scope_series
from harness.report.rundata import RunData

__all__ = ["compare_capacity", "compare_occupancy", "compare_successes"]


def compare_successes(runs: list[tuple[str, RunData]]) -> Figure:
    fig = figure()
    ax = fig.subplots()
    for name, data in runs:
        edges, width, counts = data.per_second()
        if 0 in counts and counts[0].sum():
            ax.plot(edges[:-1], counts[0] / width, label=name)
    return finish(
        fig,
        ax,
        ("time since the run's first attempt (s)", "successful connections per second"),
        "Successful connections per second, run by run",
        "upper right",
    )


def compare_occupancy(runs: list[tuple[str, RunData]]) -> Figure:
    fig = figure()
    ax = fig.subplots()
    for name, data in runs:
        if data.samples is None or not data.samples.num_rows:
            continue
        times, in_use = scope_series(data.samples, IN_USE)
        (line,) = ax.plot((times - data.t0) / 1e9, in_use, label=name)
        if data.usable_ports:
            ax.axhline(data.usable_ports, color=line.get_color(), ls=":", lw=1)
    return finish(
        fig,
        ax,
        ("time since the run's first attempt (s)", "client sockets toward the targets"),
        "Ports in use toward the targets (dotted: each run's usable ports)",
        "lower right",
    )


def compare_capacity(runs: list[tuple[str, RunData]]) -> Figure:
    fig = figure()
    ax = fig.subplots()
    for name, data in runs:
        cap = data.summary.capacity
        if not cap.model_ports:
            continue
        size = range_size(data, cap.model_ports)
        model = cap.model_max_rate_per_s
        measured = cap.measured_sustained_rate_per_s or cap.measured_rate_per_s
        (point,) = ax.plot([size], [measured or np.nan], "o", ms=8, label=f"{name} measured")
        if model:
            ax.plot([size], [model], "x", ms=10, color=point.get_color(), label=f"{name} model")
    ax.set_xscale("log")
    ax.set_yscale("log")
    return finish(
        fig,
        ax,
        ("ports in ip_local_port_range", "new connections/s"),
        "Capacity, run by run: the model's ceiling (x) and what was measured (dot)",
        "upper left",
    )
