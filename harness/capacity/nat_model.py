"""The NAT capacity model: what connection rate a source NAT passes before its pool runs out.

A source NAT (a router's MASQUERADE, a cloud NAT gateway) maps each flow to a
(NAT address, NAT port) per destination address:port, so toward one destination
it has::

    pool = ports per NAT address x NAT addresses

A flow holds its NAT port for its lifetime (connect to close) and, on a NAT that
keeps TIME_WAIT (AWS NAT Gateway, GCP Cloud NAT, Azure's outbound SNAT), for the
NAT's TIME_WAIT timeout after it closes, **whoever closes first**: the NAT's
connection tracking keeps the TIME_WAIT, so a server-first close, which spares
the client host's ports, spares none of the NAT's. A Linux SNAT (6.5 and later)
hands a port in TIME_WAIT to a new SYN whose sequence number has advanced: only
live flows hold its pool. So::

    busy     = lifetime + (NAT TIME_WAIT if the NAT holds it, else 0)
    max rate = pool x destinations / busy          (new connections/s, all destinations)
    at most    pool x destinations flows open at once

At a rate above the maximum the pool toward a destination is full after
``pool / (rate / destinations)`` seconds (none has come back by then, since
that is less than ``busy``). A full pool drops the SYN: the client gets no
EADDRNOTAVAIL, its connect() times out after SYN retransmits (1 s, 3 s, ...).
With keep-alive or a pool of connections each carrying ``requests_per_connection``
requests, an offered rate of requests/s is ``rate / requests_per_connection``
new connections/s. ``eph plan --nat`` tries each lever alone (more NAT addresses or
ports, a shorter or no held TIME_WAIT, more destinations, pooling, and a server-first
close, which does not help a NAT) and says the rate it reaches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from harness.capacity.levers import Lever

if TYPE_CHECKING:
    from harness.scenario import Scenario

__all__ = [
    "CONNTRACK_TIME_WAIT_S",
    "MAX_NAT_PORTS",
    "NatCapacityModel",
    "NatPlan",
    "fmt_nat_rate",
    "make_nat_plan",
    "nat_levers",
    "render_nat_text",
]

CONNTRACK_TIME_WAIT_S = 120.0  # nf_conntrack_tcp_timeout_time_wait's default
MAX_NAT_PORTS = 65535 - 1024 + 1  # every port above the privileged ones, per address


@dataclass(frozen=True)
class NatCapacityModel:
    ports: int  # per NAT address
    addresses: int = 1  # NAT addresses
    destinations: int = 1  # distinct destination address:port pairs, load spread evenly
    lifetime_s: float = 0.0  # connect to close
    time_wait_s: float = CONNTRACK_TIME_WAIT_S  # the NAT's TIME_WAIT hold after close
    holds_time_wait: bool = True  # a cloud NAT's rule; False: a Linux 6.5+ SNAT evicts
    requests_per_connection: int = 1  # keep-alive or pooling

    def __post_init__(self) -> None:
        for name in ("ports", "addresses", "destinations", "requests_per_connection"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r}: expected a whole number of 1 or more")
        for name in ("lifetime_s", "time_wait_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name} = {value!r}: expected seconds, 0 or more")

    @classmethod
    def from_scenario(cls, scenario: Scenario, lifetime_s: float) -> NatCapacityModel:
        """``[lab.nat]`` (or its defaults), the scenario's distinct endpoints and pooling."""
        nat = scenario.lab.nat_pool
        time_wait = nat.tcp_timeout_time_wait
        return cls(
            ports=nat.pool_ports,
            addresses=len(nat.addresses),
            destinations=len(set(scenario.target.endpoints)),
            lifetime_s=lifetime_s,
            time_wait_s=CONNTRACK_TIME_WAIT_S if time_wait is None else float(time_wait),
            holds_time_wait=nat.hold_time_wait,
            requests_per_connection=scenario.load.requests_per_connection,
        )

    @property
    def pool(self) -> int:
        """NAT ports toward one destination: ports x addresses."""
        return self.ports * self.addresses

    @property
    def concurrent_limit(self) -> int:
        """Flows open at once, over every destination, before a SYN is dropped."""
        return self.pool * self.destinations

    @property
    def hold_s(self) -> float:
        """How long the NAT keeps a closed flow's port: its TIME_WAIT, or nothing."""
        return self.time_wait_s if self.holds_time_wait else 0.0

    @property
    def busy_s(self) -> float:
        """How long one flow keeps its NAT port from the next: lifetime + hold."""
        return self.lifetime_s + self.hold_s

    @property
    def max_rate_per_s(self) -> float | None:
        """Sustained new connections/s over every destination; None: nothing holds a port."""
        if self.busy_s <= 0:
            return None
        return self.concurrent_limit / self.busy_s

    @property
    def max_request_rate_per_s(self) -> float | None:
        """The same in requests/s: each connection carries ``requests_per_connection``."""
        limit = self.max_rate_per_s
        return None if limit is None else limit * self.requests_per_connection

    def connection_rate(self, rate: float) -> float:
        """New connections/s for an offered ``rate`` of requests/s."""
        return rate / self.requests_per_connection

    def time_to_exhaustion_s(self, rate: float) -> float | None:
        """At ``rate`` requests/s (connections/s unless pooled), when the pool toward each
        destination is full and SYNs start to be dropped (None: never)."""
        limit = self.max_rate_per_s
        connections = self.connection_rate(rate)
        if limit is None or connections <= limit or connections <= 0:
            return None
        return self.pool / (connections / self.destinations)


def fmt_nat_rate(rate: float | None) -> str:
    if rate is None:
        return "no NAT port limit"
    return f"{rate:,.0f}/s" if rate >= 1000 else f"{rate:.4g}/s"


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(frozen=True)
class _NatTrial:
    model: NatCapacityModel
    goal: float  # requests/s (connections/s unless pooled)

    def rate_with(self, **changes: Any) -> float | None:
        """The request rate the model sustains with ``changes``."""
        return replace(self.model, **changes).max_request_rate_per_s

    def lever(self, kind: str, name: str, change: str, caveat: str = "", **changes: Any) -> Lever:
        rate = self.rate_with(**changes)
        reaches = rate is None or rate >= self.goal * (1 - 1e-9)  # float error at the edge
        return Lever(kind, name, change, _round(rate), reaches, caveat=caveat, applies=changes)

    def needed(self, attr: str) -> int:
        """The least count of ``attr`` (a multiplier of the rate) that reaches the goal."""
        current = int(getattr(self.model, attr))
        rate = self.model.max_request_rate_per_s
        if rate is None:
            return current + 1
        return max(current + 1, math.ceil(self.goal / (rate / current)))


def nat_levers(model: NatCapacityModel, goal: float) -> list[Lever]:
    """Each change tried alone at ``goal`` requests/s: the NAT's first, then the code's."""
    trial = _NatTrial(model, goal)
    found = [
        _multiplier(trial, 0),
        _more_ports(trial),
        _shorter_time_wait(trial),
        _evicting_nat(trial),
        _multiplier(trial, 1),
        _pooling(trial),
        _server_close(trial),
    ]
    return [lever for lever in found if lever is not None]


_MULTIPLIERS = (  # kind, name, the input it raises, what to do, caveat
    (
        "nat",
        "more NAT addresses",
        "addresses",
        "give the NAT {n} addresses (a cloud NAT gateway's secondary or manually"
        " allocated IPs, more SNAT frontend IPs, more addresses in the MASQUERADE/SNAT"
        " pool): each adds a whole port range toward every destination",
        "a destination that allow-lists sources must allow every new address",
    ),
    (
        "code",
        "more destinations",
        "destinations",
        "spread connections over {n} destination address:port pairs (more listener"
        " ports or addresses): the NAT keeps a whole pool per destination",
        "",
    ),
)


def _multiplier(trial: _NatTrial, index: int) -> Lever:
    """More NAT addresses or destinations: each multiplies the pool the flows share."""
    kind, name, attr, change, caveat = _MULTIPLIERS[index]
    n = trial.needed(attr)
    return trial.lever(kind, name, change.format(n=n), caveat, **{attr: n})


def _more_ports(trial: _NatTrial) -> Lever | None:
    if trial.model.ports >= MAX_NAT_PORTS:
        return None
    n = min(MAX_NAT_PORTS, trial.needed("ports"))
    return trial.lever(
        "nat",
        "more ports per NAT address",
        f"{n} ports per address for this client (a cloud NAT's ports per VM or per"
        " instance, the SNAT rule's port range)",
        "a cloud NAT shares an address's ports among its clients: more for one leaves"
        " fewer addresses' worth for the others",
        ports=n,
    )


def _shorter_time_wait(trial: _NatTrial) -> Lever | None:
    """The NAT's TIME_WAIT timeout (whole seconds, 1 or more) that reaches the goal."""
    model = trial.model
    if not model.holds_time_wait or model.time_wait_s <= 1:
        return None
    limit = model.max_request_rate_per_s
    if limit is not None and limit >= trial.goal:
        return None
    per_flow = model.concurrent_limit * model.requests_per_connection / trial.goal
    seconds = float(max(1, math.floor(per_flow - model.lifetime_s)))
    if seconds >= model.time_wait_s:
        return None
    return trial.lever(
        "nat",
        "shorter NAT TIME_WAIT",
        f"a NAT TIME_WAIT timeout of {seconds:g} s instead of {model.time_wait_s:g} s"
        " (GCP Cloud NAT: --tcp-time-wait-timeout; a Linux NAT:"
        f" net.netfilter.nf_conntrack_tcp_timeout_time_wait = {seconds:g})",
        "TIME_WAIT keeps a late segment of the old flow out of the next one that gets"
        " the same port; not every provider lets you set it",
        time_wait_s=seconds,
    )


def _evicting_nat(trial: _NatTrial) -> Lever | None:
    if not trial.model.holds_time_wait:
        return None
    return trial.lever(
        "nat",
        "a NAT that reuses closing ports",
        "a Linux 6.5+ SNAT hands a port in TIME_WAIT to a new SYN whose sequence"
        " number has advanced: only live flows hold its pool",
        "the cloud NATs keep TIME_WAIT: this means running your own Linux NAT",
        holds_time_wait=False,
    )


def _pooling(trial: _NatTrial) -> Lever | None:
    model = trial.model
    if model.max_rate_per_s is None:
        return None
    n = max(model.requests_per_connection + 1, math.ceil(trial.goal / model.max_rate_per_s))
    return trial.lever(
        "code",
        "keep-alive or pooling",
        f"carry {n} requests on each connection (HTTP keep-alive, a connection pool):"
        " new connections/s, and the NAT ports they take, fall by that factor",
        "an idle pooled connection still holds its NAT port, and a cloud NAT drops it"
        " after its idle timeout: keep the pool's idle time below it",
        requests_per_connection=n,
    )


def _server_close(trial: _NatTrial) -> Lever:
    why = (
        "the NAT's connection tracking keeps the flow in TIME_WAIT for"
        f" {trial.model.time_wait_s:g} s whoever closes first: a server-first close moves"
        " TIME_WAIT off the client host, not off the NAT's pool"
        if trial.model.holds_time_wait
        else "on a NAT that reuses closing ports only live flows hold the pool: who"
        " closes first changes nothing there"
    )
    return trial.lever("code", "server-first close", f"does not help here: {why}")


@dataclass(frozen=True)
class NatPlan:
    model: NatCapacityModel
    rate: float  # requests/s wanted (connections/s unless pooled)
    levers: list[Lever]

    @property
    def max_rate_per_s(self) -> float | None:
        return self.model.max_request_rate_per_s

    @property
    def time_to_exhaustion_s(self) -> float | None:
        return self.model.time_to_exhaustion_s(self.rate)

    @property
    def meets_goal(self) -> bool:
        return self.max_rate_per_s is None or self.max_rate_per_s >= self.rate

    @property
    def headroom(self) -> float | None:
        limit = self.max_rate_per_s
        return round(limit / self.rate - 1, 4) if limit is not None and self.rate > 0 else None

    def to_json(self) -> dict[str, Any]:
        model = self.model
        return {
            "nat": True,
            "inputs": {**asdict(model), "rate": self.rate},
            "pool": model.pool,
            "concurrent_limit": model.concurrent_limit,
            "hold_s": model.hold_s,
            "busy_s": model.busy_s,
            "connection_rate_per_s": _round(model.connection_rate(self.rate)),
            "max_connection_rate_per_s": _round(model.max_rate_per_s),
            "max_rate_per_s": _round(self.max_rate_per_s),
            "time_to_exhaustion_s": _round(self.time_to_exhaustion_s),
            "headroom": self.headroom,
            "meets_goal": self.meets_goal,
            "levers": [asdict(lever) for lever in self.levers],
        }


def make_nat_plan(model: NatCapacityModel, rate: float) -> NatPlan:
    """The NAT's numbers at ``rate`` requests/s (connections/s unless pooled), and its levers."""
    if not rate > 0:
        raise ValueError(f"rate = {rate!r}: expected requests/s above 0")
    return NatPlan(model, rate, nat_levers(model, rate))


def render_nat_text(plan: NatPlan) -> str:
    """The NAT plan for people: the setup, the verdict, the levers."""
    m = plan.model
    pooled = m.requests_per_connection > 1
    goal = (
        f"{fmt_nat_rate(plan.rate)} requests = {fmt_nat_rate(m.connection_rate(plan.rate))}"
        f" new connections ({m.requests_per_connection} requests each)"
        if pooled
        else f"{fmt_nat_rate(plan.rate)} new connections"
    )
    rule = (
        f"holds TIME_WAIT {m.time_wait_s:g} s after close (the clouds' rule)"
        if m.holds_time_wait
        else "reuses closing ports (Linux 6.5+ SNAT)"
    )
    lines = [
        f"goal: {goal}; connections live {m.lifetime_s * 1000:g} ms",
        f"NAT: {m.ports:,} ports x {m.addresses} address(es) = pool {m.pool:,} per"
        f" destination, {m.destinations} destination(s); the NAT {rule}",
        "",
        f"sustainable: {fmt_nat_rate(m.max_rate_per_s)} new connections  ="
        f" {m.concurrent_limit:,} ports / ({m.lifetime_s:g} s lifetime + {m.hold_s:g} s hold)"
        + (f" = {fmt_nat_rate(plan.max_rate_per_s)} requests" if pooled else ""),
        f"at most {m.concurrent_limit:,} flows open at once",
        _verdict(plan),
        "",
        "levers (each alone; rates in the goal's unit):" if pooled else "levers (each alone):",
    ]
    for lever in plan.levers:
        mark = "reaches the goal" if lever.reaches_goal else "not enough"
        lines.append(
            f"  [{lever.kind}] {lever.name}: {fmt_nat_rate(lever.max_rate_per_s)} ({mark})"
        )
        lines.append(f"      {lever.change}")
        if lever.caveat:
            lines.append(f"      note: {lever.caveat}")
    return "\n".join(lines) + "\n"


def _verdict(plan: NatPlan) -> str:
    if plan.meets_goal:
        headroom = "" if plan.headroom is None else f" (headroom {plan.headroom:+.0%})"
        return f"verdict: the goal fits{headroom}"
    return (
        f"verdict: SHORT. At {fmt_nat_rate(plan.rate)} the pool toward each destination is full"
        f" after {plan.time_to_exhaustion_s or 0:g} s (headroom {plan.headroom or 0:+.0%}):"
        " the NAT drops SYNs, the client sees no EADDRNOTAVAIL, its connects time out"
        " after SYN retransmits (1 s, 3 s, ...)"
    )
