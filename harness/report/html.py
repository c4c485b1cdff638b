"""``report.html``: figures (matplotlib, PNG) embedded in one self-contained page."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path

import jinja2
from matplotlib.figure import Figure

from harness.capacity.plan import Plan, from_run, make_plan, past_every_practical_lever
from harness.files import atomic_write
from harness.report.cliff import cliff_findings, slowed
from harness.report.figures import (
    RunData,
    compare_capacity,
    compare_occupancy,
    compare_successes,
    figures_for,
)
from harness.report.http_section import http_findings
from harness.report.nat_section import nat_findings
from harness.scenario import Scenario
from harness.summary import Service, Summary

__all__ = ["findings", "recommendations", "render_comparison", "render_report"]

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("harness.report", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
)


def render_report(path: Path, data: RunData) -> None:
    """Every figure the run draws (:func:`harness.report.figures.figures_for`), the
    findings and the recommendations, in one HTML file that needs nothing else to open."""
    figures = [(title, _png(make(data)), note) for title, make, note in figures_for(data)]
    html = _ENV.get_template("report.html.j2").render(
        summary=data.summary,
        kernel=data.summary.kernel.model_dump(mode="json", exclude_unset=True),
        scenario=data.scenario,
        scenario_json=json.dumps(data.scenario, indent=2),
        findings=findings(data.summary),
        recommendations=recommendations(data.summary, data.setup),
        figures=figures,
    )
    _write(path, html)


def _write(path: Path, html: str) -> None:
    """Whole or not at all: a reader never sees half a page."""
    atomic_write(path, html)


def recommendations(summary: Summary, scenario: Scenario) -> list[str]:
    """What the capacity model says would raise the ceiling this run met."""
    if not summary.capacity.model_ports:
        return []
    inputs, _ = from_run(summary, scenario)
    return recommendations_from_plan(make_plan(inputs), summary.exhaustion.exhausted)


def recommendations_from_plan(plan: Plan, exhausted: bool) -> list[str]:
    """The plan's advice in sentences: the practical levers that reach the goal, or one
    line when none does."""
    inputs = plan.inputs
    if plan.meets_goal and not exhausted:
        if plan.max_rate_per_s is None or plan.headroom is None:
            return [f"No client-side port limit at {inputs.rate:,.0f}/s: nothing to change."]
        return [
            f"The setup sustains {plan.max_rate_per_s:,.0f}/s, {plan.headroom:+.0%} over the"
            f" {inputs.rate:,.0f}/s offered: nothing to change for this load."
        ]
    beyond = past_every_practical_lever(plan)
    if beyond:
        return [beyond + " (eph plan --from RUN_DIR lists each lever with its figure.)"]
    out = [
        f"To sustain the offered {inputs.rate:,.0f}/s (the model's ceiling here:"
        f" {plan.max_rate_per_s or 0:,.0f}/s), any one of these:"
    ]
    for lever in plan.levers:
        if lever.reaches_goal and lever.practical:
            rate = (
                "no client-side port limit"
                if lever.max_rate_per_s is None
                else f"{lever.max_rate_per_s:,.0f}/s"
            )
            out.append(f"[{lever.kind}] {lever.name}, up to {rate}: {lever.change}.")
    return out


def findings(summary: Summary) -> list[str]:
    """The run in plain words."""
    return [
        *cliff_findings(summary),
        *_outcome_findings(summary),
        *http_findings(summary.http, summary.connections.io_errors),
        *nat_findings(summary.nat),
        *_outage_findings(summary),
        *_service_findings(summary.service),
        *_kernel_findings(summary),
        *_conservation_findings(summary),
        *_stop_findings(summary),
    ]


def _outcome_findings(summary: Summary) -> list[str]:
    """Exhausted or not, and the failed connects by errno."""
    out = []
    conns, exhaustion = summary.connections, summary.exhaustion
    if exhaustion.exhausted:
        text = (
            f"Exhausted after {exhaustion.first_failure_s or 0:.3g} s: first {exhaustion.errno}"
            f" after {exhaustion.succeeded_before_first_failure} successful connections"
        )
        occupancy = summary.occupancy
        if occupancy is not None:
            tw_peak = summary.time_wait.peak if summary.time_wait is not None else None
            text += (
                f"; at the peak {occupancy.peak_ports} of {occupancy.usable_ports} usable"
                " ports toward the targets were held"
                + (f", {tw_peak} of them in TIME_WAIT" if tw_peak is not None else "")
            )
        out.append(text + ".")
    elif conns.failed == 0 and not slowed(summary):
        out.append(f"No failures: {conns.succeeded} connections succeeded.")
    elif conns.failed == 0:
        out.append(
            f"No connect failed ({conns.succeeded} succeeded), but connects slowed down:"
            " see the first finding."
        )
    if conns.errors:
        text = ", ".join(f"{k} {v}" for k, v in sorted(conns.errors.items()))
        out.append(f"Failed connects: {text}.")
    return out


def _outage_findings(summary: Summary) -> list[str]:
    """Spans in which the target was down, and samples that stop early."""
    out = []
    nat = summary.nat
    for outage in summary.outages:
        if nat is not None and nat.exhausted:
            continue  # the NAT dropped those SYNs: nat_findings says so
        errors = ", ".join(f"{k} {v}" for k, v in sorted(outage.errors.items()))
        out.append(
            f"The target was unreachable from {outage.from_s:.3g} s to {outage.to_s:.3g} s"
            f" ({outage.failures} attempts in a row failed: {errors})"
            + (
                "; connections succeeded again after it."
                if outage.recovered
                else "; it had not recovered when the run ended."
            )
            + " That is the target, not the port range."
        )
    missing = summary.samples.missing_after_s if summary.samples is not None else None
    if missing is not None:
        out.append(
            f"The collector stopped at {missing:.3g} s: there are no socket samples after that"
            " (occupancy, TIME_WAIT and counters end there; the connection records do not)."
        )
    return out


def _service_findings(service: Service | None) -> list[str]:
    """The port-conflict lab: could the service bind its port again?"""
    if service is None or service.stopped_at_s is None:
        return []
    port, failed, stopped = service.port, service.failed_binds, service.stopped_at_s
    fix = (
        f" The fix: keep the port out of the clients' reach with"
        f" net.ipv4.ip_local_reserved_ports = {port} (or a range that excludes it;"
        f" eph plan --keep-port {port} writes it)."
    )
    if not failed:
        return [
            f"The service on port {port} restarted at {stopped:.3g} s and bound"
            " again at once: no client held its port."
        ]
    held: dict[str, int] = {}
    for attempt in service.attempts:
        for state, count in attempt.held_by.items():
            held[state] = max(held.get(state, 0), count)
    holders = ", ".join(f"{state} {count}" for state, count in sorted(held.items())) or "?"
    if service.rebound and service.rebound_at_s is not None:
        outcome = f"it bound again only at {service.rebound_at_s:.3g} s"
    else:
        outcome = "it never bound again before the run ended"
    return [
        f"Port conflict: the service on port {port} stopped at {stopped:.3g} s"
        f" and its bind() failed {failed} times with {', '.join(service.errors)}, because"
        f" clients had taken its port as their ephemeral port (client sockets on it: {holders});"
        f" {outcome}." + fix
    ]


def _conservation_findings(summary: Summary) -> list[str]:
    """Records against Locust, the kernel and the listener; workers that never shipped."""
    out = []
    cons = summary.conservation
    if cons.records_match_locust is False:
        out.append(
            f"Records ({cons.records}) differ from Locust's request count ({cons.locust_requests})."
        )
    if cons.attempts_match_kernel is False:
        out.append(
            f"The kernel counted {cons.kernel_active_opens} connects (Tcp ActiveOpens)"
            f" against {cons.attempts_sending_syn} recorded attempts that sent a SYN"
            + (
                f" and {cons.kernel_other_opens} connections of Locust's workers to their master"
                if cons.kernel_other_opens
                else ""
            )
            + (
                " (not judged: other sockets share this kernel)."
                if cons.kernel_check
                else ": records are missing or were made twice."
            )
        )
    if cons.succeeded_match_listener is False:
        out.append(
            f"Successful connects ({summary.connections.succeeded}) differ from the listener's"
            f" accepts ({cons.listener_accepted}): look at ListenOverflows (a full accept queue)."
        )
    elif cons.succeeded_match_listener:
        out.append("Every successful connect was accepted by the listener.")
    bad = summary.listener.bad_requests if summary.listener is not None else None
    if bad:
        out.append(
            f"The listener answered {bad:,} requests that did not parse with a 400 and a close:"
            " look at the scenario's send bytes or the client's request (summary.listener)."
        )
    distributed = summary.distributed
    if distributed is not None and distributed.missing_workers:
        out.append(
            f"{distributed.missing_workers} of {distributed.expected_workers} workers never"
            " shipped their records (the worker died or lost the master): their connections"
            " are not in this report, and Locust's count includes what they reported before."
        )
        out += [worker.finding() for worker in distributed.missing]
    return out


_STOP_REASONS = {
    "max_connections": "The run stopped when it reached load.max_connections.",
    "disk": "The run stopped early: the disk holding the run directory was nearly full"
    " (EPH_MIN_FREE_MB).",
    "locust exited": "Locust exited before the planned duration: see logs/locust.log.",
}


def _stop_findings(summary: Summary) -> list[str]:
    if summary.crash is not None:
        return [summary.crash.finding()]
    startup = summary.startup
    if summary.connections.attempted == 0 and not summary.interrupted:
        ran = (
            f" (Locust was launched {startup.launched_to_end_s:.3g} s before the end)"
            if startup is not None and startup.launched_to_end_s is not None
            else ""
        )
        return [
            f"No connection was attempted: the load lasted {summary.duration_s:.3g} s and"
            f" ended before any engine made its first connect{ran}. Locust starts, forks"
            " its processes (load.processes), and each engine starts its users first:"
            " give duration a few seconds more than that (a run that connects says how"
            " long it took in summary.startup)."
        ]
    out = []
    if summary.interrupted:
        out.append("The run was interrupted before its planned duration.")
    if summary.stop_reason in _STOP_REASONS:
        out.append(_STOP_REASONS[summary.stop_reason])
    return out


def _kernel_findings(summary: Summary) -> list[str]:
    """What the tuple audit, the TIME_WAIT reuse count and the capacity model say."""
    out = []
    overflow = summary.time_wait.kernel_timewait_overflow if summary.time_wait else None
    if overflow:
        out.append(
            f"TIME_WAIT overflow: {overflow:,} closes skipped TIME_WAIT because"
            f" net.ipv4.tcp_max_tw_buckets ({summary.kernel.tcp_max_tw_buckets}) was reached:"
            " their ports came back at once, without TIME_WAIT's protection against stray"
            " segments of the old connection."
        )
    tuples = summary.tuples
    if tuples is not None and tuples.distinct:
        if tuples.concurrent_duplicates:
            out.append(
                f"4-tuples NOT unique: {tuples.concurrent_duplicates} connections began"
                " while another on the same 4-tuple was still open."
            )
        else:
            out.append(
                f"4-tuples unique: {tuples.distinct} distinct, at most"
                f" {tuples.max_uses} uses of one."
            )
    time_wait = summary.time_wait
    if time_wait is not None and time_wait.reused_connections:
        kernel = time_wait.kernel_tw_recycled
        text = f"Reuse out of TIME_WAIT: {time_wait.reused_connections} connections"
        out.append(text + (f", kernel TWRecycled {kernel}." if kernel is not None else "."))
    out.extend(_capacity_findings(summary))
    return out


def _after_exhaustion_s(summary: Summary) -> float | None:
    """How long the run went on after its first failure for want of a port."""
    if not summary.exhaustion.exhausted:
        return None
    first = summary.exhaustion.first_failure_s
    return None if first is None else max(0.0, summary.duration_s - first)


def _capacity_findings(summary: Summary) -> list[str]:
    capacity = summary.capacity
    if capacity.model_ports is None:
        return []
    limit, hold = capacity.model_max_rate_per_s, capacity.model_hold_s
    lifetime_ms = (capacity.model_lifetime_s or 0.0) * 1000
    if hold is None:
        text = "Capacity model: no TIME_WAIT on the client (it does not close first)"
        if limit:
            text += f"; only each connection's {lifetime_ms:.3g} ms life holds a port"
        return [text + "."]
    busy = f"{hold:g} s hold" + (f" + {lifetime_ms:.3g} ms lifetime" if lifetime_ms else "")
    out = [
        f"Capacity model: at most {limit or 0:,.0f} new connections/s"
        f" ({capacity.model_ports} ports / ({busy})); measured"
        f" {capacity.measured_rate_per_s}/s on average."
    ]
    sustained = capacity.measured_sustained_rate_per_s
    after = _after_exhaustion_s(summary)
    if sustained is not None and limit and after is not None and after < hold:
        # the model's rate is the long run's, in which each port comes back after its
        # hold: a run that ended sooner has seen none come back, so there is no comparing
        out.append(
            f"After exhaustion the rate fell to {sustained:,.0f}/s. No port had come back"
            f" yet: each is held {hold:g} s after its close and the run ended {after:.3g} s"
            f" after the first failure, so the first would have come back about"
            f" {hold - after:.3g} s later. The model's {limit:,.0f}/s is the rate once they"
            " do: run longer than the hold to compare them."
        )
    elif sustained is not None and limit:
        out.append(
            f"After exhaustion the rate settled at {sustained:,.0f}/s,"
            f" {sustained / limit - 1:+.1%} against the model."
        )
    tte, model_tte = capacity.measured_time_to_exhaustion_s, capacity.model_time_to_exhaustion_s
    if tte is not None and model_tte:
        out.append(
            f"Time to exhaustion: {tte:.3g} s measured, {model_tte:.3g} s from the model at"
            f" the offered {capacity.offered_rate_per_s or 0:,.0f}/s"
            f" ({capacity.offered_rate_source})."
        )
    return out


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _latency(summary: Summary, which: str) -> float | None:
    found = summary.connections.connect_ms
    return None if found is None else float(getattr(found, which))


def _cliff(summary: Summary, which: str) -> object:
    cliff = summary.latency_cliff
    return getattr(cliff, which) if cliff is not None and cliff.detected else None


# what the comparison table shows: label, the value in a summary
COMPARED: list[tuple[str, Callable[[Summary], object]]] = [
    ("scenario", lambda s: s.scenario),
    ("port range", lambda s: s.ports.range),
    ("tcp_tw_reuse", lambda s: s.kernel.tcp_tw_reuse),
    ("reuse delay (ms)", lambda s: s.kernel.tcp_tw_reuse_delay_ms),
    ("attempted", lambda s: s.connections.attempted),
    ("succeeded", lambda s: s.connections.succeeded),
    ("failed", lambda s: s.connections.failed),
    ("attempts/s", lambda s: s.connections.rate_per_s),
    ("exhausted after (s)", lambda s: s.exhaustion.first_failure_s),
    ("sustained after exhaustion (/s)", lambda s: s.capacity.measured_sustained_rate_per_s),
    ("model ceiling (/s)", lambda s: s.capacity.model_max_rate_per_s),
    ("TIME_WAIT peak", lambda s: s.time_wait.peak if s.time_wait else None),
    ("reused out of TIME_WAIT", lambda s: s.time_wait.reused_connections if s.time_wait else None),
    ("slow connects from occupancy", lambda s: _cliff(s, "onset_occupancy")),
    ("slow connects: p50 ratio", lambda s: _cliff(s, "ratio")),
    ("soft limit (/s)", lambda s: s.capacity.model_soft_rate_per_s),
    ("connect p50 (ms)", lambda s: _latency(s, "p50")),
    ("connect p99 (ms)", lambda s: _latency(s, "p99")),
]


def _shown(value: object) -> object:
    if isinstance(value, list):
        return "-".join(str(v) for v in value)
    return "-" if value is None else value


def render_comparison(path: Path, runs: list[tuple[str, RunData]]) -> None:
    """``eph report --compare``: runs side by side, e.g. before and after tuning."""
    rows = [(label, [_shown(value(d.summary)) for _, d in runs]) for label, value in COMPARED]
    figures = [
        (title, _png(make(runs)), note)
        for title, make, note in (
            (
                "Successful connections per second",
                compare_successes,
                "Each run's successes per second from its first attempt; a plateau under"
                " the others is a lower ceiling.",
            ),
            (
                "Ports in use toward the targets",
                compare_occupancy,
                "Each run's client sockets toward its targets (all states), from the"
                " collector; dotted, its usable ports.",
            ),
            (
                "Capacity",
                compare_capacity,
                "Each run's model ceiling (x) and measured sustained rate (dot) by range size.",
            ),
        )
    ]
    html = _ENV.get_template("compare.html.j2").render(
        names=[name for name, _ in runs],
        rows=rows,
        findings=[(name, findings(d.summary)) for name, d in runs],
        figures=figures,
    )
    _write(path, html)
