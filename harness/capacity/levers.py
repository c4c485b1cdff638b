"""The levers ``eph plan`` tries, each alone: what it changes and the rate it gives.

The kernel's (a wider range, TIME_WAIT reuse, a shorter reuse delay: sysctls to
apply by hand, never applied here) and the code's (more source addresses,
destinations or hosts, keep-alive or pooling, server-first close).

Each says whether it is practical at the size it needs (:data:`PRACTICAL`, the
bounds in docs/concepts/capacity.md), and they come ranked: practical ones that
reach the goal first. A lever's figure never counts on TIME_WAIT overflowing the
host's ``tcp_max_tw_buckets`` (past them the kernel skips TIME_WAIT and its
protection): where the model's rate does, the lever shows the rate without it
and names the other as ``overflow_rate_per_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from harness.capacity.plan_inputs import PlanInputs
from harness.capacity.port_model import (
    DEFAULT_REUSE_DELAY_S,
    CapacityModel,
    merge_reserved,
    reserved_in_range,
    unreserved_in_range,
)
from harness.scenario import ClosePolicy

__all__ = ["FULL_RANGE", "PRACTICAL", "Lever", "fmt_rate", "levers", "ports_text"]

FULL_RANGE = (1024, 65535)  # the widest range the kernel accepts a low end of 1024 for

# How far a code lever goes before no team would take it (docs/concepts/capacity.md):
# addresses on one host's interfaces (clouds cap secondary addresses per interface at
# 15 to 50), destinations a client can spread over (listeners, VIPs, backends), hosts
# generating one service's traffic, requests per kept-alive connection (nginx's
# keepalive_requests default)
PRACTICAL = {"sources": 16, "destinations": 32, "hosts": 16, "requests_per_connection": 1000}
# the shortest tcp_tw_reuse_delay to advise: ten long round trips, so old segments of
# the last connection on a 4-tuple are gone before PAWS has to tell them apart
PRACTICAL_REUSE_DELAY_MS = 100


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
    soft_rate_per_s: float | None = None  # where connects slow down with it; None: never
    practical: bool = True  # False: it needs more than PRACTICAL allows (``limit`` says)
    limit: str = ""  # why it is not practical, and what the practical bound gives
    # the rate with TIME_WAIT overflowing tcp_max_tw_buckets, when that is higher than
    # ``max_rate_per_s`` (which never counts on it); None: no overflow at this rate
    overflow_rate_per_s: float | None = None


@dataclass(frozen=True)
class _Trial:
    """The setup as it is, and how to try a change to it."""

    inputs: PlanInputs
    model: CapacityModel

    @property
    def goal(self) -> float:
        return self.inputs.rate

    def rate_with(self, **changes: Any) -> float | None:
        return replace(self.inputs, **changes).model().max_rate_per_s

    def soft_with(self, **changes: Any) -> float | None:
        return replace(self.inputs, **changes).model().soft_rate_per_s

    def reaches(self, rate: float | None) -> bool:
        return rate is None or rate >= self.goal


def levers(inputs: PlanInputs, model: CapacityModel) -> list[Lever]:
    """Every lever that applies to this setup: the practical ones that reach the goal
    first, then the practical ones that fall short, then the rest; kernel's first in
    each."""
    trial = _Trial(inputs, model)
    found: list[Lever | None] = [
        _wider_range(trial),
        _tw_reuse(trial),
        _shorter_delay(trial),
        *_more_paths(trial),
        _random_window(trial),
        _pooling(trial),
        _server_close(trial),
    ]
    ready = [_without_overflow(trial, _with_soft(trial, lever)) for lever in found if lever]
    return sorted(ready, key=lambda lever: (not lever.practical, not lever.reaches_goal))


def _without_overflow(trial: _Trial, lever: Lever) -> Lever:
    """The lever's rate as TIME_WAIT keeps it: where the model's rate holds only because
    closes past tcp_max_tw_buckets skip TIME_WAIT, that rate is named, not counted."""
    if trial.inputs.tw_buckets is None or not lever.applies:
        return lever
    held = trial.rate_with(tw_buckets=None, **lever.applies)
    overflow = lever.max_rate_per_s
    if held is None or (overflow is not None and (_round(held) or 0) >= overflow):
        return lever
    return replace(
        lever,
        max_rate_per_s=_round(held),
        reaches_goal=trial.reaches(held),
        overflow_rate_per_s=overflow,
        caveat=(lever.caveat + "; " if lever.caveat else "")
        + f"past the host's tcp_max_tw_buckets ({trial.inputs.tw_buckets:,}) the kernel"
        f" skips TIME_WAIT (TCPTimeWaitOverflow) and gives {fmt_rate(overflow)}: a rate that"
        " holds only by dropping TIME_WAIT's guard against old segments, not one to plan on",
    )


def _with_soft(trial: _Trial, lever: Lever) -> Lever:
    """The lever's soft limit, where connects slow down with it applied (set already by a
    lever that changes no input, and none where it leaves no port limit)."""
    if not lever.applies or lever.max_rate_per_s is None:
        return lever
    return replace(lever, soft_rate_per_s=_round(trial.soft_with(**lever.applies)))


def _random_window(trial: _Trial) -> Lever | None:
    """The cliff's own fix: a random narrow IP_LOCAL_PORT_RANGE window per socket."""
    soft = trial.model.soft_rate_per_s
    if soft is None or soft >= trial.goal:
        return None
    rate = trial.rate_with(socket_window=64)
    return Lever(
        "code",
        "random port window per socket",
        "set IP_LOCAL_PORT_RANGE (Linux 6.3+) on each socket to a random aligned window"
        " of 64 ports of the range (eph: load.socket_port_window = 64): connect() scans"
        " one window, not the whole even half",
        _round(rate),
        trial.reaches(rate),
        caveat="a full window fails with EADDRNOTAVAIL while others have room: retry"
        " connect() on a new socket with another window",
        applies={"socket_window": 64},
    )


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _wider_range(trial: _Trial) -> Lever | None:
    """The least widening of ip_local_port_range that reaches the goal, else the widest."""
    inputs, model = trial.inputs, trial.model
    high = inputs.port_range[1]
    per_port = model.paths * model.hosts / model.busy_s if model.busy_s > 0 else math.inf
    needed = math.ceil(trial.goal / per_port) if per_port != math.inf else 0
    if needed <= model.usable_ports:
        return None
    # the services' ports get reserved first, so the count is of ports clients can use
    keep = merge_reserved(inputs.reserved, inputs.keep_ports)
    new_low = _widened_low(needed, high, keep)
    new_range = (new_low, high) if new_low is not None else FULL_RANGE
    kept = unreserved_in_range(inputs.reserved, inputs.keep_ports, *new_range)
    reserved = merge_reserved(inputs.reserved, kept) if kept else inputs.reserved
    rate = trial.rate_with(port_range=new_range, reserved=reserved)
    sysctls = {"net.ipv4.ip_local_port_range": f"{new_range[0]} {new_range[1]}"}
    if kept:
        sysctls["net.ipv4.ip_local_reserved_ports"] = reserved
    return Lever(
        "kernel",
        "wider ip_local_port_range",
        f"net.ipv4.ip_local_port_range = {new_range[0]} {new_range[1]}"
        f" ({new_range[1] - new_range[0] + 1} ports"
        + (f"; reserving {ports_text(kept)}, where services listen)" if kept else ")"),
        _round(rate),
        trial.reaches(rate),
        sysctls,
        "ports below 32768 may collide with services that listen on them: eph"
        " reserved the ones listening now; reserve any other service's port too",
        {"port_range": new_range, "reserved": reserved},
    )


def _tw_reuse(trial: _Trial) -> Lever | None:
    inputs, model = trial.inputs, trial.model
    if inputs.close is not ClosePolicy.CLIENT or model.hold_s is None or model.reuse:
        return None
    rate = trial.rate_with(tw_reuse=1, timestamps=1)
    sysctls = {"net.ipv4.tcp_tw_reuse": "1"}
    if not inputs.timestamps:
        sysctls["net.ipv4.tcp_timestamps"] = "1"
    return Lever(
        "kernel",
        "TIME_WAIT reuse",
        "net.ipv4.tcp_tw_reuse = 1: a port comes back"
        f" {inputs.reuse_delay_ms or DEFAULT_REUSE_DELAY_S * 1000:g} ms after close"
        " instead of 60 s (needs TCP timestamps, on by default)",
        _round(rate),
        trial.reaches(rate),
        sysctls,
        "outgoing connections only; the server side is unaffected",
        {"tw_reuse": 1, "timestamps": 1},
    )


def _shorter_delay(trial: _Trial) -> Lever | None:
    """tcp_tw_reuse_delay (Linux 6.14+), when reuse at the current delay falls short."""
    inputs = trial.inputs
    if inputs.close is not ClosePolicy.CLIENT or not inputs.reuse_delay_settable:
        return None
    delay_ms = _delay_needed_ms(inputs, trial.model)
    current = inputs.reuse_delay_ms or DEFAULT_REUSE_DELAY_S * 1000
    reuse_rate = trial.rate_with(tw_reuse=1, timestamps=1)
    if delay_ms is None or delay_ms >= current or trial.reaches(reuse_rate):
        return None
    rate = trial.rate_with(tw_reuse=1, timestamps=1, reuse_delay_ms=delay_ms)
    floor = PRACTICAL_REUSE_DELAY_MS
    at_floor = trial.rate_with(tw_reuse=1, timestamps=1, reuse_delay_ms=floor)
    return Lever(
        "kernel",
        "shorter reuse delay",
        f"net.ipv4.tcp_tw_reuse = 1 with net.ipv4.tcp_tw_reuse_delay ="
        f" {delay_ms} (Linux 6.14+; {fmt_rate(reuse_rate)} at {current:g} ms)",
        _round(rate),
        trial.reaches(rate),
        {"net.ipv4.tcp_tw_reuse": "1", "net.ipv4.tcp_tw_reuse_delay": str(delay_ms)},
        "keep it well above the path's round trip: PAWS needs the old segments gone",
        {"tw_reuse": 1, "timestamps": 1, "reuse_delay_ms": delay_ms},
        practical=delay_ms >= floor,
        limit=""
        if delay_ms >= floor
        else f"a {delay_ms} ms reuse delay is shorter than is safe on most paths"
        f" ({floor} ms: {fmt_rate(at_floor)})",
    )


_PATHS = (
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
)


def _more_paths(trial: _Trial) -> list[Lever]:
    """More of what multiplies the ports: source addresses, destinations, hosts."""
    model = trial.model
    if model.busy_s <= 0:
        return []
    out = []
    for name, attr, code in _PATHS:
        current_n = getattr(trial.inputs, attr)
        per_unit = model.ports / current_n / model.busy_s
        n = max(current_n + 1, math.ceil(trial.goal / per_unit))
        rate = trial.rate_with(**{attr: n})
        bound = PRACTICAL[attr]
        limit = ""
        if n > bound:
            at_bound = trial.rate_with(tw_buckets=None, **{attr: max(bound, current_n)})
            limit = f"{n:,} {attr} is past what is practical ({bound}: {fmt_rate(at_bound)})"
        out.append(
            Lever(
                "code",
                name,
                code.format(n=f"{n:,}"),
                _round(rate),
                trial.reaches(rate),
                applies={attr: n},
                practical=n <= bound,
                limit=limit,
            )
        )
    return out


def _pooling(trial: _Trial) -> Lever | None:
    # as TIME_WAIT holds the ports: the base rate never counts on overflowing buckets
    limit = trial.rate_with(tw_buckets=None)
    if not limit:
        return None
    per_connection = max(2, math.ceil(trial.goal / limit))
    soft = trial.model.soft_rate_per_s  # fewer new connections on the same ports
    bound = PRACTICAL["requests_per_connection"]
    return Lever(
        "code",
        "keep-alive or pooling",
        f"reuse each connection for {per_connection:,} or more requests (HTTP keep-alive,"
        " a connection pool): new connections/s fall by that factor",
        _round(limit * per_connection),
        True,
        soft_rate_per_s=_round(soft * per_connection if soft is not None else None),
        practical=per_connection <= bound,
        limit=""
        if per_connection <= bound
        else f"{per_connection:,} requests per connection is past what is practical"
        f" ({bound:,}: {fmt_rate(limit * bound)})",
    )


def _server_close(trial: _Trial) -> Lever | None:
    if trial.inputs.close is not ClosePolicy.CLIENT or not trial.model.hold_s:
        return None
    rate = trial.rate_with(close=ClosePolicy.SERVER)
    return Lever(
        "code",
        "server-first close",
        "let the server close first (or the client reset with SO_LINGER 0): the"
        " TIME_WAIT lands on the server, which does not spend ephemeral ports on it"
        + ("" if rate is None else "; only a connection's life holds its port"),
        _round(rate),
        trial.reaches(rate),
        caveat="a reset skips TIME_WAIT's protection against stray old segments",
        applies={"close": ClosePolicy.SERVER},
    )


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


def ports_text(ports: list[int]) -> str:
    shown = ", ".join(str(p) for p in ports[:8])
    return f"port{'s' if len(ports) > 1 else ''} {shown}" + (" ..." if len(ports) > 8 else "")


def fmt_rate(rate: float | None) -> str:
    return "no client-side port limit" if rate is None else f"{rate:,.0f}/s"
