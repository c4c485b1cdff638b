"""What every figure shares: a titled canvas, time bins, the exhaustion mark, legends."""

from __future__ import annotations

from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from harness.capacity.port_model import DEFAULT_REUSE_DELAY_S
from harness.report.columns import time_bins
from harness.report.rundata import RunData

__all__ = [
    "EVEN",
    "ODD",
    "SCATTER_LIMIT",
    "empty",
    "figure",
    "finish",
    "legend",
    "mark_exhaustion",
    "range_size",
    "reuse_delay_s",
    "time_bins",
]

SCATTER_LIMIT = 50_000  # above this many points a scatter becomes a 2-D histogram
EVEN, ODD = "tab:blue", "tab:orange"


def figure(height: float = 4.0) -> Figure:
    return Figure(figsize=(10, height), layout="constrained")


def mark_exhaustion(ax: Axes, data: RunData) -> None:
    if data.exhausted_at is not None:
        at = data.exhausted_at
        ax.axvline(at, color="tab:red", ls="--", lw=1.0, label=f"exhausted at {at:.3g} s")


def legend(ax: Axes, **options: Any) -> None:
    """A legend when something is labelled (matplotlib warns about an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def finish(fig: Figure, ax: Axes, labels: tuple[str, str], title: str, where: str) -> Figure:
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    legend(ax, loc=where, fontsize="small")
    return fig


def range_size(data: RunData, usable: int) -> int:
    """Ports in ip_local_port_range (``usable`` when the range is unknown)."""
    if data.port_range:
        return data.port_range[1] - data.port_range[0] + 1
    return usable


def reuse_delay_s(data: RunData) -> float:
    """tcp_tw_reuse's delay on the run's kernel (the default before Linux 6.14)."""
    delay_ms = data.summary.kernel.tcp_tw_reuse_delay_ms
    return delay_ms / 1000 if delay_ms else DEFAULT_REUSE_DELAY_S
