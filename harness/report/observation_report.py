"""``report.html`` of an observation: which path is eating the ports, and what would help.

Five figures, each from ``paths.parquet`` / ``host.parquet`` as sampled (one
point a sample, nothing binned): occupancy per path against its usable ports,
new connections/s per path, time to exhaustion, the busiest path's ports by who
held them, and the kernel's counters.
Findings and recommendations come from the capacity model
(``harness.capacity.port_model``) with the measured rate, hold and lifetime.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from pathlib import Path

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from harness.capacity.port_model import TIME_WAIT_S
from harness.files import atomic_write
from harness.observe.store import STATE_COLUMNS
from harness.report.nat_section import nat_findings
from harness.summary import ObservedPath, ObserveSummary
from harness.units import human_duration

__all__ = ["observation_findings", "observation_recommendations", "render_observation"]

PARITY_FRACTION = 0.5  # connect() walks the even half first (docs/kernel.md, "Parity")
SHOWN_PATHS = 5

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("harness.report", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
)


def observation_findings(summary: ObserveSummary) -> list[str]:
    """What happened, in plain words, the worst first."""
    found: list[str] = []
    if summary.exec is not None:
        found.append(
            f"Your client, against {summary.exec.target}: {summary.exec.verdict}"
            f" (its output: {summary.exec.stdout}, {summary.exec.stderr})."
        )
    found += _traced_findings(summary)
    found += nat_findings(summary.nat)
    ex = summary.exhaustion
    if ex.exhausted and ex.path is not None and ex.first_full_s is not None:
        path = next(p for p in summary.paths if p.label == ex.path)
        found.append(
            f"Ports exhausted on {ex.path}: all {path.usable_ports:,} usable ports were held"
            f" {ex.first_full_s:.1f} s into the observation"
            f" ({_states(path.states_at_peak)}); new connections to it fail with EADDRNOTAVAIL."
            + _holders(path)
        )
    for path in summary.paths:
        if path.label == ex.path:
            continue
        if path.time_to_exhaustion_s is not None:
            found.append(
                f"{path.label} is heading for exhaustion: at {path.new_per_s_peak:,.0f}"
                f" new connections/s its {path.usable_ports:,} ports last"
                f" {human_duration(path.time_to_exhaustion_s)} from the worst moment seen."
                + _holders(path)
            )
        elif path.peak_fraction >= PARITY_FRACTION:
            found.append(
                f"{path.label} held {path.peak_fraction:.0%} of its ports: past half,"
                " connect() searches the used half first and slows down." + _holders(path)
            )
    if not found and summary.paths:
        top = summary.paths[0]
        found.append(
            f"No path near exhaustion: the busiest, {top.label}, peaked at"
            f" {top.peak_ports:,} of {top.usable_ports:,} ports ({top.peak_fraction:.1%})."
        )
    if not summary.paths:
        found.append("No client connections were seen in this network namespace.")
    overflow = summary.host.timewait_overflow
    if overflow:
        found.append(
            f"TCPTimeWaitOverflow rose by {overflow:,}: tcp_max_tw_buckets is full and sockets"
            " skip TIME_WAIT (no port hold, but no protection against late segments)."
        )
    return found


def _traced_findings(summary: ObserveSummary) -> list[str]:
    """From the kernel's rows (--trace): the latency cliff, and 4-tuples used at once."""
    traced = summary.traced
    if traced is None:
        return []
    out = []
    cliff = traced.latency_cliff
    if cliff.detected:
        out.append(
            f"Connects on {traced.path} slowed down {cliff.ratio or 0:,.0f}x once"
            f" {cliff.onset_occupancy or 0:.0%} of its usable ports were held: connect p50"
            f" {cliff.before_p50_ms} ms -> {cliff.after_p50_ms} ms, p99 {cliff.before_p99_ms}"
            f" -> {cliff.after_p99_ms} ms (from the kernel's own record of"
            f" {traced.connections:,} connections). Past half the range connect() scans the"
            " used half first: the warning before EADDRNOTAVAIL."
        )
    if traced.tuples.concurrent_duplicates:
        out.append(
            f"{traced.tuples.concurrent_duplicates} connections reused a 4-tuple still in use"
            " by another, in the kernel's own record."
        )
    return out


def _states(states: dict[str, int]) -> str:
    return ", ".join(f"{n:,} {s.upper()}" for s, n in sorted(states.items(), key=lambda x: -x[1]))


def observation_recommendations(summary: ObserveSummary) -> list[str]:
    """Levers for the busiest path, sized from the model with the measured inputs."""
    if not summary.paths:
        return []
    p = summary.paths[0]
    rate = p.new_per_s_peak
    busy = p.lifetime_s + p.hold_s
    if rate <= 0 or busy <= 0:
        return []
    needed = math.ceil(rate * busy * 1.25)  # 25% headroom
    sustainable = p.usable_ports / busy
    if rate <= sustainable * 0.8:
        return [
            f"{p.label} sustains {sustainable:,.0f} new connections/s at its hold of"
            f" {busy:.1f} s; the peak seen, {rate:,.0f}/s, leaves room: nothing to change."
        ]
    out = [
        f"Pool or keep connections alive: at the peak rate of {rate:,.0f}/s with a"
        f" {busy:.1f} s hold, {p.label} needs {needed:,} ports; N requests per connection"
        " divide that by N.",
        f"Widen ip_local_port_range to at least {needed:,} usable ports"
        f" (now {p.usable_ports:,}); keep the ends of different parity.",
        f"Spread over {math.ceil(rate / (sustainable * 0.8))} destination addresses or ports:"
        " each gets the whole range.",
    ]
    if p.hold_s >= TIME_WAIT_S:
        out.append(
            "Let the server close first, or turn on tcp_tw_reuse = 1 (needs TCP timestamps"
            " on both sides): the 60 s TIME_WAIT then leaves the client."
        )
    return out


# ---------------------------------------------------------------- figures


def _series(paths: pa.Table, label: str, column: str, t0: float) -> tuple[np.ndarray, np.ndarray]:
    rows = paths.filter(pc.equal(paths.column("label"), label))
    time = rows.column("time").to_numpy() - t0
    return time, rows.column(column).to_numpy(zero_copy_only=False).astype(float)


def _occupancy(paths: pa.Table, summary: ObserveSummary, t0: float) -> Figure:
    fig = Figure(figsize=(10, 6.5))
    top, stack = fig.subplots(2, 1, sharex=True)
    for p in summary.paths[:SHOWN_PATHS]:
        t, ports = _series(paths, p.label, "ports", t0)
        top.plot(t, 100 * ports / max(1, p.usable_ports), label=p.label)
    top.axhline(100, color="black", lw=0.8)
    top.axhline(100 * PARITY_FRACTION, color="grey", ls="--", lw=0.8, label="half: slow connect()")
    top.set_ylabel("% of usable ports")
    top.legend(fontsize=7, loc="upper left")
    if summary.paths:
        p = summary.paths[0]
        t, _ = _series(paths, p.label, "ports", t0)
        layers = [_series(paths, p.label, s, t0)[1] for s in STATE_COLUMNS]
        names = [s.upper() for s in STATE_COLUMNS]
        kept = [(n, y) for n, y in zip(names, layers, strict=True) if y.any()]
        if kept:
            stack.stackplot(t, *(y for _, y in kept), labels=[n for n, _ in kept], alpha=0.8)
        stack.axhline(p.usable_ports, color="black", lw=0.8, label="usable ports")
        stack.set_title(f"busiest path, {p.label}: sockets by state", fontsize=9)
        stack.legend(fontsize=7, loc="upper left")
    stack.set_xlabel("seconds")
    stack.set_ylabel("sockets")
    return fig


def _rates(paths: pa.Table, host: pa.Table, summary: ObserveSummary, t0: float) -> Figure:
    fig = Figure(figsize=(10, 3.5))
    ax = fig.subplots()
    for p in summary.paths[:SHOWN_PATHS]:
        t, rate = _series(paths, p.label, "new_per_s", t0)
        ax.plot(t, rate, label=p.label)
    if host.num_rows > 1:
        t = host.column("time").to_numpy() - t0
        opens = host.column("active_opens").to_numpy(zero_copy_only=False).astype(float)
        ax.plot(t[1:], np.diff(opens) / np.diff(t), color="black", lw=0.8, ls=":",
                label="ActiveOpens/s (whole host)")  # fmt: skip
    ax.set_xlabel("seconds")
    ax.set_ylabel("new connections/s")
    ax.legend(fontsize=7, loc="upper left")
    return fig


def _exhaustion(paths: pa.Table, summary: ObserveSummary, t0: float) -> Figure:
    fig = Figure(figsize=(10, 3.5))
    ax = fig.subplots()
    drawn = False
    for p in summary.paths[:SHOWN_PATHS]:
        t, tte = _series(paths, p.label, "time_to_exhaustion_s", t0)
        if np.isfinite(tte).any():
            ax.plot(t, tte, marker=".", label=p.label)
            drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no path was heading for exhaustion", ha="center", transform=ax.transAxes)
    ax.set_xlabel("seconds")
    ax.set_ylabel("seconds to exhaustion")
    return fig


def _counters(host: pa.Table, t0: float) -> Figure:
    fig = Figure(figsize=(10, 3.5))
    left = fig.subplots()
    t = host.column("time").to_numpy() - t0
    for name, label in (("sockstat_tw", "TIME_WAIT sockets"), ("conntrack_count", "conntrack")):
        values = host.column(name).to_numpy(zero_copy_only=False)
        if values.dtype != object:
            left.plot(t, values, label=label)
    left.set_xlabel("seconds")
    left.set_ylabel("sockets / entries")
    right = left.twinx()
    for name, label in (
        ("tw_recycled", "TWRecycled"),
        ("timewait_overflow", "TCPTimeWaitOverflow"),
    ):
        values = host.column(name).to_numpy(zero_copy_only=False)
        if values.dtype != object and len(values):
            right.plot(t, values - values[0], ls="--", label=f"{label} (since start)")
    right.set_ylabel("count since start")
    fig.legend(fontsize=7, loc="upper left")
    return fig


OWNERS_SHOWN = 5


def owner_series(
    paths: pa.Table, label: str, t0: float
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray] | None:
    """Per sample of one path: the ports each owner held (the most holding ones, by
    ``comm[pid]``), and the unattributed; None where owners were not looked up."""
    if "owners" not in paths.column_names:
        return None
    rows = paths.filter(pc.equal(paths.column("label"), label))
    unattributed = rows.column("unattributed").to_numpy(zero_copy_only=False)
    if not len(unattributed) or unattributed.dtype == object:  # nulls: --no-owners
        return None
    t = rows.column("time").to_numpy() - t0
    held: dict[str, np.ndarray] = {}
    for i, owners in enumerate(rows.column("owners").to_pylist()):
        for owner in owners or []:
            name = f"{owner['comm']}[{owner['pid']}]"
            held.setdefault(name, np.zeros(len(t)))[i] = owner["ports"]
    top = sorted(held, key=lambda name: -held[name].max())[:OWNERS_SHOWN]
    return t, {name: held[name] for name in top}, unattributed.astype(float)


def _owners(paths: pa.Table, summary: ObserveSummary, t0: float) -> Figure:
    fig = Figure(figsize=(10, 3.5))
    ax = fig.subplots()
    series = owner_series(paths, summary.paths[0].label, t0) if summary.paths else None
    if series is None:
        ax.text(0.5, 0.5, "owners were not looked up (--no-owners)", ha="center",
                transform=ax.transAxes)  # fmt: skip
        return fig
    t, held, unattributed = series
    names = [*held, "unattributed (TIME_WAIT: no owner left)"]
    ax.stackplot(t, *held.values(), unattributed, labels=names, alpha=0.8)
    ax.axhline(summary.paths[0].usable_ports, color="black", lw=0.8, label="usable ports")
    ax.set_title(f"busiest path, {summary.paths[0].label}: ports by who held them", fontsize=9)
    ax.set_xlabel("seconds")
    ax.set_ylabel("ports")
    ax.legend(fontsize=7, loc="upper left")
    return fig


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


FIGURE_NOTES = {
    "occupancy": "Ports held per path against its usable ports (the range, less reserved and"
    " listening ports): 100% is exhaustion; past 50% connect() is already slower.",
    "rates": "New connections per second per path, counted by socket cookie between samples;"
    " ActiveOpens beside it is the host's total (short sockets that leave no TIME_WAIT are"
    " seen there only).",
    "exhaustion": "At each sample's rate, how long until the path's free ports are gone;"
    " absent while the rate fits the range.",
    "owners": "The busiest path's ports by the process whose sockets held them (through"
    " /proc), and the ports of sockets nobody owns any more (TIME_WAIT): eph observe --trace"
    " names who opened those in the table above.",
    "counters": "The kernel's own counters: TIME_WAIT sockets, conntrack entries, TIME_WAIT"
    " reuses and overflows.",
}


def render_observation(directory: Path, summary: ObserveSummary) -> Path:
    """``report.html`` in ``directory``, self-contained."""
    paths = pq.read_table(directory / "paths.parquet")
    host = pq.read_table(directory / "host.parquet")
    t0 = float(host.column("time")[0].as_py()) if host.num_rows else 0.0
    makers: list[tuple[str, str, Callable[[], Figure]]] = [
        ("Occupancy per path", "occupancy", lambda: _occupancy(paths, summary, t0)),
        ("New connections per second", "rates", lambda: _rates(paths, host, summary, t0)),
        ("Time to exhaustion", "exhaustion", lambda: _exhaustion(paths, summary, t0)),
        ("Who held the ports", "owners", lambda: _owners(paths, summary, t0)),
        ("Kernel counters", "counters", lambda: _counters(host, t0)),
    ]
    figures = [(title, _png(make()), FIGURE_NOTES[key]) for title, key, make in makers]
    html = _ENV.get_template("observe.html.j2").render(
        summary=summary,
        findings=observation_findings(summary),
        recommendations=observation_recommendations(summary),
        figures=figures,
        paths=summary.paths[:20],
    )
    out = directory / "report.html"
    atomic_write(out, html)
    return out


def _holders(path: ObservedPath) -> str:
    """Who held the path's ports at its peak, as a sentence (empty when nobody is known)."""
    parts = [f"{o.comm} (pid {o.pid}) {o.ports:,}" for o in path.owners]
    opened = [
        f"{o.comm} ({o.ports:,} ports, {o.processes:,} process{'es' if o.processes != 1 else ''})"
        for o in path.opened_by
    ]
    text = f" Held by {', '.join(parts)}." if parts else ""
    if opened:
        text += f" Its TIME_WAIT ports were opened by {', '.join(opened)}."
    elif path.unattributed_ports:
        text += (
            f" {path.unattributed_ports:,} ports were held by sockets with no owner left"
            " (TIME_WAIT): eph observe --trace names who opened them."
        )
    return text
