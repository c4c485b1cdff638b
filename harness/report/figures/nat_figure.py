"""The NAT pool's ports in use beside the client's own: which of the two ran out.

A full SNAT pool drops SYNs while the client's range stays nearly empty, so the
client sees slow connects and timeouts instead of EADDRNOTAVAIL. This figure puts
the pool (``router/nat.parquet``) above the client's sockets toward the same
targets on one time axis, with conntrack's drops and the connects they slowed.
"""

from __future__ import annotations

import errno

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from harness.report.columns import scope_prefix_mask
from harness.report.figures._axes import empty, figure, time_bins
from harness.report.figures.occupancy_figure import occupancy_panel
from harness.report.nat_section import SYN_RETRANSMIT_US
from harness.report.rundata import RunData

__all__ = ["nat_pool"]

_LINES = 4  # destinations drawn one line each, the busiest first
# conntrack's counters of dropped SYNs, and the lab's for a port held after close
_DROPS = ("insert_failed", "drop", "held_drops")
_Series = tuple[str, np.ndarray, dict[str, np.ndarray]]  # destination, t_ns, counts


def nat_pool(data: RunData) -> Figure:
    """The NAT pool per destination against its size (above) and the client's own
    ports toward the targets against its range (below), on one time axis."""
    fig = figure(7)
    nat = data.nat_samples
    if nat is None or not nat.num_rows:
        empty(fig.subplots(), "no NAT samples (router/nat.parquet) in this run")
        fig.suptitle("NAT pool against the client's own ports")
        return fig
    pool_ax, client_ax = fig.subplots(2, 1, sharex=True)
    _pool_panel(pool_ax, data, nat)
    _legend(pool_ax, _drop_rates(pool_ax, data, nat))
    _client_panel(client_ax, data)
    _legend(client_ax, _slowed_connects(client_ax, data))
    fig.suptitle("NAT pool against the client's own ports (the router above, the client below)")
    return fig


def _destination_series(rows: pa.Table, name: str) -> _Series:
    """One destination's counts per sample, summed over the NAT addresses."""
    mine = rows.filter(pc.equal(rows.column("destination"), name))
    times, index = np.unique(mine.column("t_ns").to_numpy(), return_inverse=True)
    counts = {
        column: np.bincount(
            index,
            weights=pc.fill_null(mine.column(column), 0).to_numpy().astype(float),
            minlength=len(times),
        )
        for column in ("live", "time_wait", "in_use")
    }
    return name, times, counts


def _pool_panel(ax: Axes, data: RunData, nat: pa.Table) -> None:
    rows = nat.filter(pc.not_equal(nat.column("destination"), "all"))
    names = pc.unique(rows.column("destination")).to_pylist()
    series = sorted(
        (_destination_series(rows, name) for name in names),
        key=lambda one: -one[2]["in_use"].max(initial=0),
    )
    if len(series) == 1:
        _, t_ns, counts = series[0]
        held = np.maximum(counts["in_use"] - counts["live"] - counts["time_wait"], 0)
        stack = [("open flows", counts["live"], "tab:green")]
        stack.append(("TIME_WAIT/CLOSE entries", counts["time_wait"], "tab:purple"))
        stack += [("held after close", held, "tab:brown")] if held.any() else []
        labels, values, colors = zip(*stack, strict=True)
        ax.stackplot((t_ns - data.t0) / 1e9, *values, labels=labels, colors=colors, alpha=0.85)
    for n, (name, t_ns, counts) in enumerate(series[:_LINES] if len(series) > 1 else []):
        ax.plot((t_ns - data.t0) / 1e9, counts["in_use"], color=f"C{n}", label=f"to {name}")
    summary = data.summary.nat
    sizes = {d.pool_ports for d in summary.destinations} if summary is not None else set()
    for size in sorted(sizes):
        ax.axhline(size, color="black", lw=1, label=f"pool per destination ({size:,} ports)")
    _mark_nat(ax, data)
    shown = f", the busiest {_LINES} of {len(series)} destinations" if len(series) > _LINES else ""
    pool = f" {summary.pool}" if summary is not None else ""
    ax.set_title(f"router: NAT pool{pool}{shown}")
    ax.set_ylabel("NAT ports in use")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def _drop_rates(ax: Axes, data: RunData, nat: pa.Table) -> Axes | None:
    """The SYNs the NAT dropped per second between samples, on a twin axis; counters
    that moved together (conntrack counts one drop in both) share a line."""
    stats = nat.filter(pc.equal(nat.column("destination"), "all")).sort_by("t_ns")
    edges = data.sample_seconds(stats)
    lines: list[tuple[list[str], np.ndarray]] = []
    for name in _DROPS:
        values = stats.column(name).to_numpy(zero_copy_only=False).astype(float)
        steps = np.nan_to_num(np.diff(values))
        same = [names for names, seen in lines if np.array_equal(seen, steps)]
        if same:
            same[0].append(name)
        elif (steps > 0).any():
            lines.append(([name], steps))
    if not lines:
        return None
    twin = ax.twinx()
    for (names, steps), color in zip(lines, ("tab:red", "darkred", "m"), strict=False):
        rate = steps / np.maximum(np.diff(edges), 1e-9)
        label = f"{' = '.join(names)} ({int(steps.sum()):,} SYNs dropped)"
        twin.stairs(rate, edges, color=color, lw=1.0, label=label)
    twin.set_ylabel("SYNs dropped per second", color="tab:red")
    twin.set_ylim(bottom=0)
    return twin


def _client_panel(ax: Axes, data: RunData) -> None:
    samples = data.samples
    if samples is None or not scope_prefix_mask(samples, "to ").any():
        text = "no client socket samples toward the targets"  # empty() would unshare x
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xlabel("time since first attempt (s)")
        return
    usable = data.usable_ports
    occupancy = data.summary.occupancy
    peak = ""
    if occupancy is not None and occupancy.peak_fraction is not None:
        peak = f", at most {occupancy.peak_ports:,} in use ({occupancy.peak_fraction:.1%})"
    title = "client: its own ports toward the targets" + peak
    occupancy_panel(ax, data, (title, samples, "to ", float(usable) if usable else None))
    _mark_nat(ax, data)
    ax.set_ylabel("client sockets toward the targets")
    ax.set_ylim(bottom=0)


def _slowed_connects(ax: Axes, data: RunData) -> Axes | None:
    """Connects slowed by a dropped SYN (answered after a retransmission) or timed out,
    per second by when they began, on a twin axis."""
    edges, width = time_bins(data.seconds)
    kinds = (
        (data.ok & (data.connect_ms * 1000 >= SYN_RETRANSMIT_US), "tab:orange", "over 0.9 s"),
        (data.errno == errno.ETIMEDOUT, "tab:red", "timed out"),
    )
    twin = None
    for mask, color, what in kinds:
        if not mask.any():
            continue
        if twin is None:
            twin = ax.twinx()
        rate = np.histogram(data.seconds[mask], edges)[0] * data.every / width
        label = f"connects {what} ({int(mask.sum()) * data.every:,})"
        twin.stairs(rate, edges, color=color, lw=1.0, alpha=0.8, label=label)
    if twin is not None:
        twin.set_ylabel("connects per second", color="tab:red")
        twin.set_ylim(bottom=0)
    return twin


def _mark_nat(ax: Axes, data: RunData) -> None:
    nat = data.summary.nat
    if nat is not None and nat.exhausted_at_s is not None:
        at = nat.exhausted_at_s
        ax.axvline(at, color="tab:red", ls="--", lw=1.0, label=f"NAT exhausted at {at:.3g} s")


def _legend(ax: Axes, twin: Axes | None) -> None:
    """One legend for an axes and its twin, drawn on top of both."""
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:
        more, names = twin.get_legend_handles_labels()
        handles, labels = handles + more, labels + names
    if handles:
        right = (1.12, 1.0)  # beyond the twin axis's labels
        (twin or ax).legend(
            handles, labels, loc="upper left", bbox_to_anchor=right, fontsize="small"
        )
