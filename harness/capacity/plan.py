"""``eph plan``: the capacity question answered before any load is sent.

From a rate and a setup (port range, reserved ports, close side, tcp_tw_reuse and
its delay, source addresses, destinations, load-generator hosts) the capacity
model (``harness.capacity.model``) gives the sustainable rate, the time to exhaustion at
the asked rate and the headroom; then each lever is tried alone to say how far it
goes: the kernel's (a sysctl.d snippet to apply by hand, never applied here) and
the code's (IP_BIND_ADDRESS_NO_PORT with more source addresses, more destination
ports, keep-alive or pooling, server-first close).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from harness.capacity.model import (
    DEFAULT_REUSE_DELAY_S,
    CapacityModel,
    merge_reserved,
    reserved_in_range,
    unreserved_in_range,
)
from harness.scenario import ClosePolicy

__all__ = ["Lever", "Plan", "PlanInputs", "from_kernel", "from_run", "make_plan", "render_text"]

FULL_RANGE = (1024, 65535)  # the widest range the kernel accepts a low end of 1024 for


@dataclass(frozen=True)
class PlanInputs:
    rate: float  # new connections per second wanted, all hosts together
    port_range: tuple[int, int] = (32768, 60999)
    lifetime_s: float = 0.0  # connect() to close
    close: ClosePolicy = ClosePolicy.CLIENT
    reserved: str = ""
    tw_reuse: int = 2
    reuse_delay_ms: int | None = None  # None: the kernel's default (1 s)
    timestamps: int = 1
    sources: int = 1
    destinations: int = 1
    loopback: bool = False  # the destinations are loopback addresses (tw_reuse = 2)
    hosts: int = 1
    reuse_delay_settable: bool = True  # tcp_tw_reuse_delay_ms exists (Linux 6.14+)
    # ports local services listen on (found by the preflight, or --keep-port): any
    # range recommended here leaves them out of the clients' reach, reserved
    keep_ports: tuple[int, ...] = ()

    def model(self) -> CapacityModel:
        destination = "127.0.0.1" if self.loopback else "192.0.2.1"
        return CapacityModel.from_settings(
            port_range=self.port_range,
            reserved=self.reserved,
            tw_reuse=self.tw_reuse,
            reuse_delay_ms=self.reuse_delay_ms,
            timestamps=self.timestamps,
            close=self.close,
            destinations=[destination] * max(1, self.destinations),
            sources=self.sources,
            lifetime_s=self.lifetime_s,
            hosts=self.hosts,
        )


@dataclass(frozen=True)
class Lever:
    """One change, alone, and the rate it gives."""

    kind: str  # "kernel" or "code"
    name: str
    change: str  # what to do, in words
    max_rate_per_s: float | None  # None: no port limit at all
    reaches_goal: bool
    sysctls: dict[str, str] = field(default_factory=dict)
    caveat: str = ""
    applies: dict[str, Any] = field(default_factory=dict)  # the PlanInputs it changes


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

    @property
    def meets_goal(self) -> bool:
        return self.max_rate_per_s is None or self.max_rate_per_s >= self.inputs.rate

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"]["close"] = self.inputs.close.value
        data["meets_goal"] = self.meets_goal
        return data


def from_kernel(kernel: dict[str, Any], rate: float, **given: Any) -> PlanInputs:
    """Inputs from a kernel reading (``harness.kernel.sysctls.read_kernel``), ``given`` winning."""
    settings: dict[str, Any] = {"rate": rate}
    if isinstance(kernel.get("ip_local_port_range"), list):
        settings["port_range"] = tuple(kernel["ip_local_port_range"])
    for key, name in (
        ("ip_local_reserved_ports", "reserved"),
        ("tcp_tw_reuse", "tw_reuse"),
        ("tcp_tw_reuse_delay_ms", "reuse_delay_ms"),
        ("tcp_timestamps", "timestamps"),
    ):
        if kernel.get(key) is not None:
            settings[name] = str(kernel[key]) if name == "reserved" else int(kernel[key])
    settings["reuse_delay_settable"] = "tcp_tw_reuse_delay_ms" in kernel
    settings.update({k: v for k, v in given.items() if v is not None})
    return PlanInputs(**settings)


def from_run(
    summary: dict[str, Any], scenario: dict[str, Any]
) -> tuple[PlanInputs, dict[str, Any]]:
    """``eph plan --from RUN_DIR``: the run's own setup and rate, and what it measured."""
    capacity = summary.get("capacity", {})
    endpoints = scenario["target"]["endpoints"]
    hosts = [str(e).rsplit(":", 1)[0].strip("[]") for e in endpoints]
    rate = capacity.get("offered_rate_per_s") or summary["connections"]["rate_per_s"] or 1.0
    inputs = from_kernel(
        summary.get("kernel", {}),
        float(rate),
        lifetime_s=float(capacity.get("model_lifetime_s") or 0.0),
        close=_close_side(scenario.get("load", {})),
        sources=len(scenario.get("load", {}).get("source_addresses", [])) or 1,
        destinations=len(endpoints),
        loopback=all(h.startswith("127.") or h in ("::1", "localhost") for h in hosts),
    )
    socket_range = scenario.get("load", {}).get("socket_port_range")
    if socket_range:  # IP_LOCAL_PORT_RANGE narrows the range per socket
        low, high = inputs.port_range
        inputs = replace(inputs, port_range=(max(low, socket_range[0]), min(high, socket_range[1])))
    plan_model = inputs.model()
    exhaustion = summary.get("exhaustion", {})
    measured = {
        "ports before the first failure": (
            plan_model.ports,
            exhaustion.get("succeeded_before_first_failure"),
        ),
        "time to exhaustion (s)": (
            _round(plan_model.time_to_exhaustion_s(inputs.rate), 4),
            capacity.get("measured_time_to_exhaustion_s"),
        ),
        "sustained rate after it (/s)": (
            _round(plan_model.max_rate_per_s),
            capacity.get("measured_sustained_rate_per_s"),
        ),
    }
    return inputs, measured


def _close_side(load: dict[str, Any]) -> ClosePolicy:
    """UDP has no TIME_WAIT: as far as ports go, it closes like a reset."""
    if load.get("protocol") == "udp":
        return ClosePolicy.RESET
    return ClosePolicy(load.get("close", "client"))


def make_plan(inputs: PlanInputs) -> Plan:
    model = inputs.model()
    limit = model.max_rate_per_s
    levers = _levers(inputs, model)
    return Plan(
        inputs=inputs,
        usable_ports=model.usable_ports,
        ports=model.ports,
        hold_s=model.hold_s,
        busy_s=model.busy_s,
        max_rate_per_s=_round(limit),
        time_to_exhaustion_s=_round(model.time_to_exhaustion_s(inputs.rate), 4),
        headroom=round(limit / inputs.rate - 1, 4) if limit and inputs.rate > 0 else None,
        levers=levers,
        sysctl_snippet=_snippet(inputs, levers),
    )


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _levers(inputs: PlanInputs, model: CapacityModel) -> list[Lever]:
    goal = inputs.rate
    out: list[Lever] = []

    def rate_with(**changes: Any) -> float | None:
        return replace(inputs, **changes).model().max_rate_per_s

    def reaches(rate: float | None) -> bool:
        return rate is None or rate >= goal

    # kernel: the range. The least widening that reaches the goal, else the widest.
    high = inputs.port_range[1]
    per_port = model.paths * model.hosts / model.busy_s if model.busy_s > 0 else math.inf
    needed = math.ceil(goal / per_port) if per_port != math.inf else 0
    if needed > model.usable_ports:
        # the services' ports get reserved first, so the count is of ports clients can use
        keep = merge_reserved(inputs.reserved, inputs.keep_ports)
        new_low = _widened_low(needed, high, keep)
        new_range = (new_low, high) if new_low is not None else FULL_RANGE
        kept = unreserved_in_range(inputs.reserved, inputs.keep_ports, *new_range)
        reserved = merge_reserved(inputs.reserved, kept) if kept else inputs.reserved
        rate = rate_with(port_range=new_range, reserved=reserved)
        sysctls = {"net.ipv4.ip_local_port_range": f"{new_range[0]} {new_range[1]}"}
        if kept:
            sysctls["net.ipv4.ip_local_reserved_ports"] = reserved
        out.append(
            Lever(
                "kernel",
                "wider ip_local_port_range",
                f"net.ipv4.ip_local_port_range = {new_range[0]} {new_range[1]}"
                f" ({new_range[1] - new_range[0] + 1} ports"
                + (f"; reserving {_ports_text(kept)}, where services listen)" if kept else ")"),
                _round(rate),
                reaches(rate),
                sysctls,
                "ports below 32768 may collide with services that listen on them: eph"
                " reserved the ones listening now; reserve any other service's port too",
                {"port_range": new_range, "reserved": reserved},
            )
        )
    if inputs.close is ClosePolicy.CLIENT and model.hold_s is not None and not model.reuse:
        rate = rate_with(tw_reuse=1, timestamps=1)
        sysctls = {"net.ipv4.tcp_tw_reuse": "1"}
        if not inputs.timestamps:
            sysctls["net.ipv4.tcp_timestamps"] = "1"
        out.append(
            Lever(
                "kernel",
                "TIME_WAIT reuse",
                "net.ipv4.tcp_tw_reuse = 1: a port comes back"
                f" {inputs.reuse_delay_ms or DEFAULT_REUSE_DELAY_S * 1000:g} ms after close"
                " instead of 60 s (needs TCP timestamps, on by default)",
                _round(rate),
                reaches(rate),
                sysctls,
                "outgoing connections only; the server side is unaffected",
                {"tw_reuse": 1, "timestamps": 1},
            )
        )
    if inputs.close is ClosePolicy.CLIENT and inputs.reuse_delay_settable:
        delay_ms = _delay_needed_ms(inputs, model)
        current = inputs.reuse_delay_ms or DEFAULT_REUSE_DELAY_S * 1000
        reuse_rate = rate_with(tw_reuse=1, timestamps=1)
        if delay_ms is not None and delay_ms < current and not reaches(reuse_rate):
            rate = rate_with(tw_reuse=1, timestamps=1, reuse_delay_ms=delay_ms)
            out.append(
                Lever(
                    "kernel",
                    "shorter reuse delay",
                    f"net.ipv4.tcp_tw_reuse = 1 with net.ipv4.tcp_tw_reuse_delay ="
                    f" {delay_ms} (Linux 6.14+; {_fmt_rate(reuse_rate)} at {current:g} ms)",
                    _round(rate),
                    reaches(rate),
                    {"net.ipv4.tcp_tw_reuse": "1", "net.ipv4.tcp_tw_reuse_delay": str(delay_ms)},
                    "keep it well above the path's round trip: PAWS needs the old segments gone",
                    {"tw_reuse": 1, "timestamps": 1, "reuse_delay_ms": delay_ms},
                )
            )
    if model.busy_s > 0:
        for name, attr, code in (
            (
                "more source addresses",
                "sources",
                "bind each socket to one of {n} local addresses with IP_BIND_ADDRESS_NO_PORT"
                " set first, so the port is picked per 4-tuple at connect()",
            ),
            (
                "more destinations",
                "destinations",
                "spread connections over {n} destination address:port pairs (more"
                " listeners or a VIP per backend): each gets the whole range",
            ),
            ("more load-generator hosts", "hosts", "spread the load over {n} hosts"),
        ):
            current_n = getattr(inputs, attr)
            per_unit = model.ports / current_n / model.busy_s
            n = max(current_n + 1, math.ceil(goal / per_unit))
            rate = rate_with(**{attr: n})
            out.append(
                Lever(
                    "code", name, code.format(n=n), _round(rate), reaches(rate), applies={attr: n}
                )
            )
    if limit := model.max_rate_per_s:
        per_connection = max(2, math.ceil(goal / limit))
        out.append(
            Lever(
                "code",
                "keep-alive or pooling",
                f"reuse each connection for {per_connection} or more requests (HTTP keep-alive,"
                " a connection pool): new connections/s fall by that factor",
                _round(limit * per_connection),
                True,
            )
        )
    if inputs.close is ClosePolicy.CLIENT and model.hold_s:
        rate = rate_with(close=ClosePolicy.SERVER)
        out.append(
            Lever(
                "code",
                "server-first close",
                "let the server close first (or the client reset with SO_LINGER 0): the"
                " TIME_WAIT lands on the server, which does not spend ephemeral ports on it",
                _round(rate),
                reaches(rate),
                caveat="a reset skips TIME_WAIT's protection against stray old segments",
                applies={"close": ClosePolicy.SERVER},
            )
        )
    return out


def _widened_low(needed: int, high: int, reserved: str) -> int | None:
    """The highest low end (different parity from ``high``) giving ``needed`` usable ports."""
    low = high - needed + 1
    while low >= FULL_RANGE[0]:
        low -= (low % 2) == (high % 2)  # the kernel docs advise ends of different parity
        if high - low + 1 - reserved_in_range(reserved, low, high) >= needed:
            return low
        low -= 1
    return None


def _delay_needed_ms(inputs: PlanInputs, model: CapacityModel) -> int | None:
    """The reuse delay (whole ms, at least 1) that reaches the rate, if any does."""
    per_rate = model.ports / inputs.rate if inputs.rate > 0 else math.inf
    delay_s = per_rate - model.lifetime_s
    if delay_s < 0.001:
        return None
    return int(min(delay_s * 1000, 60_000))


def _snippet(inputs: PlanInputs, levers: list[Lever]) -> str:
    """A sysctl.d file: the first kernel lever that reaches the goal, else all of them."""
    kernel = [lever for lever in levers if lever.kind == "kernel"]
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
        lines.append(f"# {lever.name}: up to {_fmt_rate(lever.max_rate_per_s)}")
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
        lines.append(f"# keep {_ports_text(exposed)} (services listen there) out of the range")
        lines.append(f"{reserved_key} = {merge_reserved(reserved, exposed)}")
    return "\n".join(lines) + "\n"


def _ports_text(ports: list[int]) -> str:
    shown = ", ".join(str(p) for p in ports[:8])
    return f"port{'s' if len(ports) > 1 else ''} {shown}" + (" ..." if len(ports) > 8 else "")


def _fmt_rate(rate: float | None) -> str:
    return "no port limit" if rate is None else f"{rate:,.0f}/s"


def render_text(plan: Plan, measured: dict[str, Any] | None = None) -> str:
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
        f"sustainable: {_fmt_rate(plan.max_rate_per_s)}  ="
        f" {plan.ports:,} ports / ({i.lifetime_s:g} s lifetime + hold {hold})"
    )
    if plan.meets_goal:
        headroom = "" if plan.headroom is None else f" (headroom {plan.headroom:+.0%})"
        lines.append(f"verdict: the goal fits{headroom}")
    else:
        lines.append(
            f"verdict: SHORT. At {i.rate:,.0f}/s the ports run out after"
            f" {plan.time_to_exhaustion_s:g} s (headroom {plan.headroom:+.0%})"
        )
    if measured:
        lines += ["", "model against this run:"]
        for name, (model, seen) in measured.items():
            lines.append(f"  {name:<32} model {_fmt(model):>12}  measured {_fmt(seen):>12}")
    lines += ["", "levers (each alone):"]
    for lever in plan.levers:
        mark = "reaches the goal" if lever.reaches_goal else "not enough"
        lines.append(f"  [{lever.kind}] {lever.name}: {_fmt_rate(lever.max_rate_per_s)} ({mark})")
        lines.append(f"      {lever.change}")
        if lever.caveat:
            lines.append(f"      note: {lever.caveat}")
    if plan.sysctl_snippet:
        lines += ["", plan.sysctl_snippet.rstrip()]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.4g}" if isinstance(value, float) else str(value)
