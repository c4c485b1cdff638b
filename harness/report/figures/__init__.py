"""The report's figures: matplotlib ``Figure`` objects (no pyplot, so no global state).

Each function takes a :class:`RunData` and returns one titled figure with labelled
axes, units, a legend, and the exhaustion moment and limits marked. They work
from columns in bulk; large runs switch scatter plots to 2-D histograms. By
family: ``occupancy`` (ports in use), ``connections`` (outcomes and the ports
they got), ``kernel`` (TIME_WAIT reuse, counters), ``capacity``, ``compare``, and
``nat`` (a NAT router's pool beside the client's range). :func:`figures_for` says which
a run draws.
"""

from __future__ import annotations

from collections.abc import Callable

from matplotlib.figure import Figure

from harness.report.figures._axes import time_bins
from harness.report.figures.capacity import capacity
from harness.report.figures.compare import compare_capacity, compare_occupancy, compare_successes
from harness.report.figures.connections import allocation, outcomes, port_use
from harness.report.figures.cpu_figure import cpu_vs_occupancy
from harness.report.figures.kernel import counters, reuse_age
from harness.report.figures.nat_figure import nat_pool
from harness.report.figures.occupancy_figure import hosts, latency_vs_occupancy, occupancy
from harness.report.rundata import RunData

__all__ = [
    "FIGURES",
    "HOSTS_FIGURE",
    "NAT_FIGURE",
    "FigureMaker",
    "RunData",
    "compare_capacity",
    "compare_occupancy",
    "compare_successes",
    "figures_for",
    "time_bins",
]

FigureMaker = Callable[[RunData], Figure]

CPU_CAPTION = (
    "System and user CPU of the load processes per attempt, in bands of the range's"
    " occupancy (cpu.parquet joined with the collector's samples). connect() walks the"
    " ports in use looking for a free one, so system CPU per attempt rises as the range"
    " fills: often the first sign of exhaustion."
)

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
        "Median and p99 connect latency as the range fills, for even and odd ports. Once"
        " the even half is held, every connect scans it before an odd port: the red dashed"
        " line marks where the latency steps up (the cliff), the grey lines its p50 before"
        " and after. A full range makes connect() walk more candidate ports still.",
    ),
    ("System CPU per connection against occupancy", cpu_vs_occupancy, CPU_CAPTION),
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

# only with a NAT collector's samples (eph lab's nat topology), after the occupancy
NAT_FIGURE: tuple[str, FigureMaker, str] = (
    "NAT pool against the client's ports",
    nat_pool,
    "Above, the router's SNAT pool: the ports a new flow to each destination cannot take"
    " (open flows, conntrack's TIME_WAIT and CLOSE entries, ports held after close)"
    " against the pool per destination (ports x NAT addresses), and on the right axis the"
    " SYNs conntrack dropped per second. Below, on the same time axis, the client's own"
    " sockets toward the targets against its usable ports, and the connects that took a"
    " SYN retransmission (over 0.9 s) or timed out. A NAT pool exhausted: the upper stack"
    " at its line, drops rising and connects slowed or timed out while the lower stack"
    " stays far under its line, with no EADDRNOTAVAIL: the NAT ran out, not the client"
    " and not the server. The lower stack at its line instead: the client's range ran out.",
)


def figures_for(data: RunData) -> list[tuple[str, FigureMaker, str]]:
    """The figures a run draws: :data:`FIGURES`, the NAT pool's after the occupancy when
    a NAT collector ran, and the hosts' in a distributed run."""
    out = list(FIGURES)
    if data.nat_samples is not None:
        out.insert(1, NAT_FIGURE)
    if data.hosts:
        out.append(HOSTS_FIGURE)
    return out
