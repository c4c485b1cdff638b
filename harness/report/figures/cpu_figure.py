"""CPU per connection: the load processes' system and user CPU per attempt as the range fills."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from harness.report.figures._axes import empty, figure, legend
from harness.report.rundata import RunData

__all__ = ["cpu_vs_occupancy"]

_TITLE = "System CPU per connection against range occupancy"


def cpu_vs_occupancy(data: RunData) -> Figure:
    """Bars per band of occupancy from the summary's ``cpu`` section (which is bounded:
    ten bands), the run's whole-run figure as a line."""
    fig = figure()
    ax = fig.subplots()
    cpu = data.summary.cpu
    bands = [b for b in cpu.by_occupancy if b.attempts] if cpu is not None else []
    if cpu is None or not bands:
        empty(ax, "needs the load processes' CPU (cpu.parquet) and socket samples")
        ax.set_title(_TITLE)
        return fig
    centers = np.array([(b.occupancy[0] + b.occupancy[1]) / 2 * 100 for b in bands])
    width = min(b.occupancy[1] - b.occupancy[0] for b in bands) * 100 * 0.4
    system = np.array([b.system_us_per_attempt or 0.0 for b in bands])
    user = np.array([b.user_us_per_attempt or 0.0 for b in bands])
    ax.bar(centers - width / 2, system, width, color="tab:red", label="system CPU")
    ax.bar(centers + width / 2, user, width, color="tab:grey", label="user CPU")
    for x, y, band in zip(centers, np.maximum(system, user), bands, strict=True):
        ax.annotate(
            f"{band.attempts:,}",
            (x, y),
            textcoords="offset points",
            xytext=(0, 2),
            ha="center",
            fontsize="x-small",
            color="grey",
        )
    if cpu.system_us_per_attempt is not None:
        ax.axhline(
            cpu.system_us_per_attempt,
            color="tab:red",
            ls="--",
            lw=1.0,
            label=f"system, whole run: {cpu.system_us_per_attempt:.3g} µs",
        )
    # connect() takes ports of the range's low-end parity first: past half, it walks them
    ax.axvline(50, color="grey", ls=":", lw=1.0, label="half the range (one parity)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, float(np.maximum(system, user).max()) * 1.12 or 1.0)
    ax.set_xlabel("ports of the range in use toward the targets (%)")
    ax.set_ylabel("CPU per attempt (µs), all load processes")
    ax.set_title(f"{_TITLE} (numbers: attempts in the band)")
    ax.grid(alpha=0.3, axis="y")
    legend(ax, loc="upper left", fontsize="small")
    return fig
