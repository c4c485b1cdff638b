"""``report.html``: figures (matplotlib, PNG) embedded in one self-contained page."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from matplotlib.figure import Figure

from harness.churn import errno_name
from harness.summary import Columns

__all__ = ["render_report"]

SCATTER_LIMIT = 50_000  # above this many points the port map becomes a 2-D histogram
_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("harness", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
)


def render_report(
    path: Path, cols: Columns, summary: dict[str, Any], scenario: dict[str, Any]
) -> None:
    figures = [
        ("Connections per second", _rate_figure(cols), _RATE_NOTE),
        ("Source-port allocation", _port_figure(cols, summary), _PORT_NOTE),
    ]
    html = _ENV.get_template("report.html.j2").render(
        summary=summary,
        scenario=scenario,
        scenario_json=json.dumps(scenario, indent=2),
        findings=findings(summary),
        figures=[(title, _png(fig), note) for title, fig, note in figures],
    )
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)


_RATE_NOTE = (
    "Attempts, successes and failures by errno in each time bin, per second. A step down"
    " to the backoff rate with EADDRNOTAVAIL failures is the port range running out."
)
_PORT_NOTE = (
    "Each successful connection's ephemeral source port against its start time; even ports"
    " blue, odd orange. connect() hands out ports of the range's low-end parity first."
)


def findings(summary: dict[str, Any]) -> list[str]:
    """The run in plain words."""
    out = []
    conns = summary["connections"]
    exhaustion = summary["exhaustion"]
    if exhaustion["exhausted"]:
        out.append(
            f"Exhausted after {exhaustion['first_failure_s']:.3g} s: first {exhaustion['errno']}"
            f" after {exhaustion['succeeded_before_first_failure']} successful connections."
        )
    elif conns["failed"] == 0:
        out.append(f"No failures: {conns['succeeded']} connections succeeded.")
    if conns["errors"]:
        text = ", ".join(f"{k} {v}" for k, v in sorted(conns["errors"].items()))
        out.append(f"Failed connects: {text}.")
    out.extend(_kernel_findings(summary))
    cons = summary.get("conservation", {})
    if cons.get("records_match_locust") is False:
        out.append(
            f"Records ({cons['records']}) differ from Locust's request count"
            f" ({cons['locust_requests']})."
        )
    if cons.get("succeeded_match_listener") is False:
        out.append(
            f"Successful connects ({conns['succeeded']}) differ from the listener's accepts"
            f" ({cons['listener_accepted']}): look at ListenOverflows (a full accept queue)."
        )
    elif cons.get("succeeded_match_listener"):
        out.append("Every successful connect was accepted by the listener.")
    if summary.get("interrupted"):
        out.append("The run was interrupted before its planned duration.")
    return out


def _kernel_findings(summary: dict[str, Any]) -> list[str]:
    """What the tuple audit, the TIME_WAIT reuse count and the capacity model say."""
    out = []
    tuples = summary.get("tuples")
    if tuples and tuples.get("distinct"):
        if tuples["concurrent_duplicates"]:
            out.append(
                f"4-tuples NOT unique: {tuples['concurrent_duplicates']} connections began"
                " while another on the same 4-tuple was still open."
            )
        else:
            out.append(
                f"4-tuples unique: {tuples['distinct']} distinct, at most"
                f" {tuples['max_uses']} uses of one."
            )
    time_wait = summary.get("time_wait")
    if time_wait and time_wait.get("reused_connections"):
        kernel = time_wait.get("kernel_tw_recycled")
        text = f"Reuse out of TIME_WAIT: {time_wait['reused_connections']} connections"
        out.append(text + (f", kernel TWRecycled {kernel}." if kernel is not None else "."))
    capacity = summary.get("capacity")
    if capacity and capacity.get("model_max_rate_per_s") is not None:
        out.append(
            f"Capacity model: at most {capacity['model_max_rate_per_s']:g} new"
            f" connections/s ({capacity['model_ports']} ports /"
            f" {capacity['model_hold_s']:g} s); measured {capacity['measured_rate_per_s']}/s."
        )
    elif capacity and capacity.get("model_ports") is not None:
        out.append(
            "Capacity model: no client-side limit from TIME_WAIT (the client does not close first)."
        )
    return out


def time_bins(seconds: np.ndarray) -> tuple[np.ndarray, float]:
    """Whole bins only: a last, partial bin would read as a false drop in rate."""
    span = float(seconds.max()) if len(seconds) else 0.0
    width = 0.1 if span <= 10 else 1.0 if span <= 600 else 10.0
    count = max(1, int(span // width))
    return np.arange(count + 1) * width, width


def _rate_figure(cols: Columns) -> Figure:
    fig = Figure(figsize=(10, 4), layout="constrained")  # no pyplot: no global state
    ax = fig.subplots()
    t = cols.seconds()
    edges, width = time_bins(t)
    centers = edges[:-1]
    ax.plot(centers, np.histogram(t, edges)[0] / width, label="attempts", color="black", lw=1.2)
    ax.plot(
        centers, np.histogram(t[cols.ok], edges)[0] / width, label="succeeded", color="tab:green"
    )
    for value in np.unique(cols.errno[cols.errno != 0]):
        mask = cols.errno == value
        ax.plot(centers, np.histogram(t[mask], edges)[0] / width, label=errno_name(int(value)))
    ax.set_xlabel("time since first attempt (s)")
    ax.set_ylabel(f"connections per second ({width:g} s bins)")
    ax.set_title("Connection attempts per second, by outcome")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    return fig


def _port_figure(cols: Columns, summary: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    ok = cols.ok
    t, port = cols.seconds()[ok], cols.local_port[ok]
    if len(port) > SCATTER_LIMIT:
        image = ax.hexbin(t, port, gridsize=(120, 60), bins="log", cmap="viridis", mincnt=1)
        fig.colorbar(image, ax=ax, label="connections per cell")
    else:
        even = port % 2 == 0
        ax.scatter(t[even], port[even], s=2, color="tab:blue", label="even port")
        ax.scatter(t[~even], port[~even], s=2, color="tab:orange", label="odd port")
        if len(port):
            ax.legend(loc="upper right", markerscale=4)
    port_range = summary["ports"].get("range")
    if isinstance(port_range, list) and len(port_range) == 2:
        for edge in port_range:
            ax.axhline(edge, color="grey", ls="--", lw=0.8)
        ax.set_ylim(
            port_range[0] - 0.02 * (port_range[1] - port_range[0]) - 1,
            port_range[1] + 0.02 * (port_range[1] - port_range[0]) + 1,
        )
    ax.set_xlabel("time since first attempt (s)")
    ax.set_ylabel("local (ephemeral) port")
    ax.set_title("Source port given to each successful connection (dashed: ip_local_port_range)")
    return fig


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
