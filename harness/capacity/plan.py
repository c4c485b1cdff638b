"""``eph plan``: the capacity question answered before any load is sent.

From a rate and a setup (port range, reserved ports, close side, tcp_tw_reuse and
its delay, source addresses, destinations, load-generator hosts) the capacity
model (``harness.capacity.port_model``) gives the sustainable rate, the time to exhaustion at
the asked rate and the headroom; then each lever is tried alone to say how far it
goes: the kernel's (a sysctl.d snippet to apply by hand, never applied here) and
the code's (IP_BIND_ADDRESS_NO_PORT with more source addresses, more destination
ports, keep-alive or pooling, server-first close).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from harness.capacity.levers import Lever, fmt_rate, levers, ports_text
from harness.capacity.plan_inputs import PlanInputs
from harness.capacity.port_model import CapacityModel, merge_reserved, unreserved_in_range
from harness.scenario import ClosePolicy, Protocol, Scenario

if TYPE_CHECKING:  # only its attributes are read: capacity/ needs nothing of report/ to run
    from harness.summary import ObserveSummary, Summary

__all__ = [
    "Lever",
    "Plan",
    "PlanInputs",
    "from_kernel",
    "from_run",
    "make_plan",
    "past_every_practical_lever",
    "render_text",
]


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    usable_ports: int  # per path and host
    ports: int  # across paths and hosts
    hold_s: float | None  # after close; None: no TIME_WAIT on the client
    busy_s: float
    max_rate_per_s: float | None
    time_to_exhaustion_s: float | None  # at the asked rate; None: never
    headroom: float | None  # max / asked - 1; None: no limit
    levers: list[Lever]
    sysctl_snippet: str  # the kernel levers that reach the goal, combined
    soft_rate_per_s: float | None = None  # the low-parity half fills; None: never
    time_to_slow_s: float | None = None  # at the asked rate; None: never

    @property
    def slows_down(self) -> bool:
        """At the asked rate the low-parity half fills: connects slow down."""
        return self.soft_rate_per_s is not None and self.soft_rate_per_s < self.inputs.rate

    @property
    def meets_goal(self) -> bool:
        return self.max_rate_per_s is None or self.max_rate_per_s >= self.inputs.rate

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"]["close"] = self.inputs.close.value
        data["meets_goal"] = self.meets_goal
        return data


def from_kernel(kernel: Mapping[str, Any], rate: float, **given: Any) -> PlanInputs:
    """Inputs from a kernel reading (``harness.kernel.sysctls.read_kernel``), ``given`` winning."""
    settings: dict[str, Any] = {"rate": rate}
    if isinstance(kernel.get("ip_local_port_range"), list):
        settings["port_range"] = tuple(kernel["ip_local_port_range"])
    for key, name in (
        ("ip_local_reserved_ports", "reserved"),
        ("tcp_tw_reuse", "tw_reuse"),
        ("tcp_tw_reuse_delay_ms", "reuse_delay_ms"),
        ("tcp_timestamps", "timestamps"),
        ("tcp_max_tw_buckets", "tw_buckets"),
    ):
        if kernel.get(key) is not None:
            settings[name] = str(kernel[key]) if name == "reserved" else int(kernel[key])
    settings["reuse_delay_settable"] = "tcp_tw_reuse_delay_ms" in kernel
    settings.update({k: v for k, v in given.items() if v is not None})
    return PlanInputs(**settings)


Measured = dict[str, tuple[Any, Any]]  # what was compared -> (the model's, the run's)


def from_run(summary: Summary, scenario: Scenario) -> tuple[PlanInputs, Measured]:
    """``eph plan --from RUN_DIR``: the run's own setup and rate, and what it measured."""
    capacity, load = summary.capacity, scenario.load
    hosts = [e.host for e in scenario.target.endpoints]
    rate = capacity.offered_rate_per_s or summary.connections.rate_per_s or 1.0
    inputs = from_kernel(
        summary.kernel.model_dump(exclude_unset=True),
        float(rate),
        lifetime_s=float(capacity.model_lifetime_s or 0.0),
        # UDP has no TIME_WAIT: as far as ports go, it closes like a reset
        close=ClosePolicy.RESET if load.protocol is Protocol.UDP else load.close,
        sources=len(load.source_addresses) or 1,
        destinations=len(hosts),
        loopback=all(h.startswith("127.") or h in ("::1", "localhost") for h in hosts),
        socket_window=load.socket_port_window,
    )
    if load.socket_port_range:  # IP_LOCAL_PORT_RANGE narrows the range per socket
        low, high = inputs.port_range
        socket_low, socket_high = load.socket_port_range
        inputs = replace(inputs, port_range=(max(low, socket_low), min(high, socket_high)))
    plan_model = inputs.model()
    measured: Measured = {
        "ports before the first failure": (
            plan_model.ports,
            summary.exhaustion.succeeded_before_first_failure,
        ),
        "time to exhaustion (s)": (
            _round(plan_model.time_to_exhaustion_s(inputs.rate), 4),
            capacity.measured_time_to_exhaustion_s,
        ),
        "sustained rate after it (/s)": (
            _round(plan_model.max_rate_per_s),
            capacity.measured_sustained_rate_per_s,
        ),
    }
    measured.update(_cliff_measured(summary, plan_model))
    return inputs, measured


def _cliff_measured(summary: Summary, model: CapacityModel) -> Measured:
    """The run's latency cliff (the report's ``latency_cliff``) against the soft limit."""
    cliff = summary.latency_cliff
    if cliff is None:
        return {}
    soft = model.soft_rate_per_s
    if not cliff.detected:
        return {"slow connects from occupancy": (0.5 if soft is not None else None, None)}
    return {
        "slow connects from occupancy": (0.5 if soft is not None else None, cliff.onset_occupancy),
        "connect p50 before/after (ms)": (
            None,
            f"{cliff.before_p50_ms} -> {cliff.after_p50_ms} ({cliff.ratio}x)",
        ),
        "connect p99 after the onset (ms)": (None, cliff.after_p99_ms),
        "successes/s before/after": (
            None,
            f"{cliff.rate_before_per_s or 0:,.0f} -> {cliff.rate_after_per_s or 0:,.0f}",
        ),
    }


def from_observation(summary: ObserveSummary) -> tuple[PlanInputs, Measured]:
    """``eph plan --from DIR`` of an observation: its busiest path's rate, hold and lifetime.

    The client closes first where the path showed TIME_WAIT; otherwise the hold
    is the server's (or a reset's) and only the lifetime keeps a port busy.
    """
    if not summary.paths:
        raise ValueError("the observation saw no client path: nothing to plan from")
    path = summary.paths[0]
    settings = summary.settings
    kernel = {
        "ip_local_port_range": settings.get("port_range"),
        "ip_local_reserved_ports": settings.get("reserved"),
        "tcp_tw_reuse": settings.get("tcp_tw_reuse"),
        "tcp_timestamps": settings.get("tcp_timestamps"),
        "tcp_tw_reuse_delay_ms": settings.get("tcp_tw_reuse_delay_ms"),
    }
    host = path.remote.rsplit(":", 1)[0].strip("[]")
    inputs = from_kernel(
        {k: v for k, v in kernel.items() if v is not None},
        max(path.new_per_s_peak, 1.0),
        lifetime_s=path.lifetime_s,
        close=ClosePolicy.CLIENT if path.hold_s > 0 else ClosePolicy.SERVER,
        destinations=1,
        loopback=host.startswith("127.") or host == "::1",
    )
    model = inputs.model()
    measured: Measured = {
        "usable ports of the path": (model.usable_ports, path.usable_ports),
        "ports held at the peak": (model.ports, path.peak_ports),
    }
    return inputs, measured


def make_plan(inputs: PlanInputs) -> Plan:
    model = inputs.model()
    limit = model.max_rate_per_s
    found = levers(inputs, model)
    return Plan(
        inputs=inputs,
        usable_ports=model.usable_ports,
        ports=model.ports,
        hold_s=model.hold_s,
        busy_s=model.busy_s,
        max_rate_per_s=_round(limit),
        time_to_exhaustion_s=_round(model.time_to_exhaustion_s(inputs.rate), 4),
        headroom=round(limit / inputs.rate - 1, 4) if limit and inputs.rate > 0 else None,
        levers=found,
        sysctl_snippet=_snippet(inputs, found),
        soft_rate_per_s=_round(model.soft_rate_per_s),
        time_to_slow_s=_round(model.time_to_slow_s(inputs.rate), 4),
    )


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _snippet(inputs: PlanInputs, levers: list[Lever]) -> str:
    """A sysctl.d file: the first practical kernel lever that reaches the goal, else every
    practical one."""
    kernel = [lever for lever in levers if lever.kind == "kernel" and lever.practical]
    chosen = [next((lever for lever in kernel if lever.reaches_goal), None)]
    picks = [lever for lever in chosen if lever] or kernel
    if not picks:
        return ""
    lines = [
        "# /etc/sysctl.d/90-ephemeral-ports.conf (written by eph plan; apply by hand:",
        "#   sudo sysctl --system). Check it against your services first.",
        f"# goal: {inputs.rate:g} new connections/s",
    ]
    settings: dict[str, str] = {}
    for lever in picks:
        lines.append(f"# {lever.name}: up to {fmt_rate(lever.max_rate_per_s)}")
        lines.extend(f"{key} = {value}" for key, value in lever.sysctls.items())
        settings.update(lever.sysctls)
    # whatever range stays in effect, the services' ports must not be in the clients' reach
    reserved_key = "net.ipv4.ip_local_reserved_ports"
    reserved = settings.get(reserved_key, inputs.reserved)
    low, high = inputs.port_range
    if "net.ipv4.ip_local_port_range" in settings:
        low, high = (int(v) for v in settings["net.ipv4.ip_local_port_range"].split())
    exposed = unreserved_in_range(reserved, inputs.keep_ports, low, high)
    if exposed:
        lines.append(f"# keep {ports_text(exposed)} (services listen there) out of the range")
        lines.append(f"{reserved_key} = {merge_reserved(reserved, exposed)}")
    return "\n".join(lines) + "\n"


def _lever_lines(lever: Lever) -> list[str]:
    mark = "reaches the goal" if lever.reaches_goal else "not enough"
    if not lever.practical:
        mark = f"impractical: {lever.limit}"
    soft = (
        f"; slow connects above {fmt_rate(lever.soft_rate_per_s)}"
        if lever.soft_rate_per_s is not None
        else "; no slow scan"
    )
    lines = [
        f"  [{lever.kind}] {lever.name}: {fmt_rate(lever.max_rate_per_s)} ({mark}{soft})",
        f"      {lever.change}",
    ]
    if lever.caveat:
        lines.append(f"      note: {lever.caveat}")
    return lines


def render_text(plan: Plan, measured: Measured | None = None) -> str:
    """The plan for people: the verdict, the numbers, the levers, the snippet."""
    i = plan.inputs
    lines = [
        f"goal: {i.rate:,.0f} new connections/s; connections live {i.lifetime_s * 1000:g} ms,"
        f" the {i.close.value} closes",
        f"setup: ports {i.port_range[0]}-{i.port_range[1]} ({plan.usable_ports:,} usable),"
        f" tcp_tw_reuse={i.tw_reuse}, {i.sources} source address(es), {i.destinations}"
        f" destination(s), {i.hosts} host(s)",
        "",
    ]
    hold = "none (no TIME_WAIT on the client)" if plan.hold_s is None else f"{plan.hold_s:g} s"
    lines.append(
        f"sustainable: {fmt_rate(plan.max_rate_per_s)}  ="
        f" {plan.ports:,} ports / ({i.lifetime_s:g} s lifetime + hold {hold})"
    )
    lines.append(_soft_line(plan))
    if plan.meets_goal:
        headroom = "" if plan.headroom is None else f" (headroom {plan.headroom:+.0%})"
        slow = (
            f", but connects slow down after {plan.time_to_slow_s:g} s (the soft limit)"
            if plan.slows_down and plan.time_to_slow_s is not None
            else ""
        )
        lines.append(f"verdict: the goal fits{headroom}{slow}")
    else:
        lines.append(
            f"verdict: SHORT. At {i.rate:,.0f}/s the ports run out after"
            f" {plan.time_to_exhaustion_s:g} s (headroom {plan.headroom:+.0%})"
        )
    if measured:
        lines += ["", "model against this run:"]
        for name, (model, seen) in measured.items():
            lines.append(f"  {name:<32} model {_fmt(model):>12}  measured {_fmt(seen):>12}")
    lines += ["", "levers (each alone, the practical ones that reach the goal first):"]
    for lever in plan.levers:
        lines += _lever_lines(lever)
    beyond = past_every_practical_lever(plan)
    if beyond:
        lines += ["", beyond]
    if plan.sysctl_snippet:
        lines += ["", plan.sysctl_snippet.rstrip()]
    return "\n".join(lines) + "\n"


def past_every_practical_lever(plan: Plan) -> str | None:
    """One line when no practical lever reaches the goal (a load made to exhaust, or one
    far past this setup), with the most that one gives; None when one does."""
    practical = [lever for lever in plan.levers if lever.practical]
    if plan.meets_goal or any(lever.reaches_goal for lever in practical):
        return None
    best = max(
        (lever for lever in practical if lever.max_rate_per_s is not None),
        key=lambda lever: lever.max_rate_per_s or 0.0,
        default=None,
    )
    most = f": the most one gives is {fmt_rate(best.max_rate_per_s)} ({best.name})" if best else ""
    return (
        f"The offered {plan.inputs.rate:,.0f}/s is past every practical lever{most}."
        " Combine them, pool connections, or take the rate as a test of exhaustion."
    )


def _soft_line(plan: Plan) -> str:
    """The soft limit: where the low-parity half fills and connect() starts to scan it."""
    if plan.soft_rate_per_s is None:
        why = (
            "a random IP_LOCAL_PORT_RANGE window per socket bounds the scan"
            if plan.inputs.socket_window
            else "nothing holds the ports long enough to fill half the range"
        )
        return f"soft limit: none ({why})"
    text = (
        f"soft limit: {fmt_rate(plan.soft_rate_per_s)}  = {plan.ports / 2:,.0f} ports (the even"
        f" half) / busy time: above it the even half fills and every connect scans it first"
    )
    if plan.slows_down and plan.time_to_slow_s is not None:
        text += f"; at {plan.inputs.rate:,.0f}/s after {plan.time_to_slow_s:g} s"
    return text


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.4g}" if isinstance(value, float) else str(value)
