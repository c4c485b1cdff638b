"""What the kernel did: TIME_WAIT reuse ages and its counters over time."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from harness.capacity.port_model import TIME_WAIT_S
from harness.report.columns import scope_mask
from harness.report.figures._axes import (
    empty,
    figure,
    legend,
    mark_exhaustion,
    reuse_delay_s,
)
from harness.report.rundata import RunData

__all__ = ["counters", "reuse_age"]


def reuse_age(data: RunData) -> Figure:
    fig = figure()
    ax = fig.subplots()
    ages, weights = data.audit.reuse_age_weights()
    delay = reuse_delay_s(data)
    if len(ages):
        low = max(min(float(ages.min()), delay) / 2, 1e-4)
        ax.hist(
            ages,
            bins=list(np.geomspace(low, TIME_WAIT_S * 2, 80)),
            weights=weights,
            color="tab:purple",
            label=f"{int(weights.sum()):,} reuses",
        )
        ax.set_xscale("log")
    else:
        empty(ax, "no 4-tuple was used twice within TIME_WAIT in this run")
    ax.axvline(delay, color="tab:green", ls="--", label=f"tcp_tw_reuse delay {delay:g} s")
    ax.axvline(TIME_WAIT_S, color="black", ls="--", label="TIME_WAIT ends (60 s)")
    ax.set_xlabel("age of the TIME_WAIT a tuple was reused out of (s, from close to reuse)")
    ax.set_ylabel("connections")
    ax.set_title("TIME_WAIT reuse: how long after its close each tuple came back")
    legend(ax, loc="upper left", fontsize="small")
    return fig


_COUNTER_PANELS = (
    ("TIME_WAIT sockets", ("sockstat_tw",), False),
    ("TWRecycled (reuses)", ("tw_recycled",), True),
    ("TCPTimeWaitOverflow", ("timewait_overflow",), True),
    ("ListenOverflows", ("listen_overflows",), True),
)


def _counter_lines(
    ax: Axes,
    data: RunData,
    sides: list[tuple[str, pa.Table]],
    columns: tuple[str, ...],
    delta: bool,
) -> None:
    """One counter panel: a line per side (client, and the server in a pair lab)."""
    for (side, samples), style in zip(sides, ("-", "--"), strict=False):
        scope = scope_mask(samples)
        t = data.sample_seconds(samples)[scope]
        for column in columns:
            values = samples.column(column).to_numpy(zero_copy_only=False)[scope].astype(float)
            if np.isnan(values).all():
                continue
            if delta:
                values = values - np.nanmin(values[:1]) if len(values) else values
            ax.plot(t, values, style, label=side if len(sides) > 1 else None)


def counters(data: RunData) -> Figure:
    fig = figure(5)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    sides = [
        (name, s)
        for name, s in (("client", data.samples), ("server", data.server_samples))
        if s is not None and s.num_rows
    ]
    for ax, (title, columns, delta) in zip(axes, _COUNTER_PANELS, strict=True):
        _counter_lines(ax, data, sides, columns, delta)
        mark_exhaustion(ax, data)
        ax.set_title(title + (" since the start" if delta else ""), fontsize="medium")
        ax.grid(alpha=0.3)
        if len(sides) > 1:
            legend(ax, fontsize="x-small")
    if not sides:
        empty(axes[0], "no samples")
    for ax in axes[2:]:
        ax.set_xlabel("time since first attempt (s)")
    fig.suptitle("Kernel counters over time (the namespace's own in a lab)")
    return fig
