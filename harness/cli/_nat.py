"""``eph plan --nat``: the source NAT's pool, planned from options or a scenario's [lab.nat].

Precedence, highest first: the command line > the scenario (``--scenario``: its
``[lab.nat]``, endpoints, ``load.rate``, ``load.hold`` and
``load.requests_per_connection``) > ``[lab.nat]``'s defaults, except the TIME_WAIT
rule: without a scenario the NAT holds TIME_WAIT, as the clouds' NATs do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from harness.cli._base import duration_value

if TYPE_CHECKING:
    from harness.capacity.nat_model import NatCapacityModel
    from harness.scenario import Scenario

__all__ = ["CLIENT_ONLY", "nat_options", "nat_ports_value", "plan_nat", "run_nat_plan"]

F = TypeVar("F", bound=Callable[..., Any])

# plan's options that describe the client host's ports, not the NAT's pool: parameter -> flag
CLIENT_ONLY = {
    "close": "--close",
    "port_range": "--port-range",
    "reserved": "--reserved",
    "tw_reuse": "--tw-reuse",
    "reuse_delay": "--reuse-delay",
    "sources": "--sources",
    "loopback": "--loopback",
    "hosts": "--hosts",
    "keep_ports": "--keep-port",
}

# the options that describe only the NAT
_NAT_ONLY = (
    "nat_ports",
    "nat_addresses",
    "nat_time_wait",
    "nat_holds",
    "requests_per_connection",
)


def nat_ports_value(_ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``--nat-ports``: a count of ports per address (``64``) or their range (``20000-20063``)."""
    if value is None:
        return None
    text = value.strip()
    low, sep, high = text.partition("-")
    if text.isdigit() and 1 <= int(text) <= 65535:
        return int(text)
    if sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535:
        return int(high) - int(low) + 1
    raise click.BadParameter(
        f"{value!r} is neither a port count (1-65535, e.g. 64) nor a range LOW-HIGH"
        " within 1-65535 (e.g. 20000-20063)",
        param=param,
    )


_OPTIONS = (
    click.option(
        "--nat",
        is_flag=True,
        help="Plan a source NAT's pool (a cloud NAT gateway, a router's MASQUERADE)"
        " instead of this host's ports: --rate, --lifetime, --destinations and --json"
        " apply, with the --nat-* options or --scenario.",
    ),
    click.option(
        "--scenario",
        "nat_scenario",
        type=click.Path(path_type=Path),
        metavar="FILE",
        help='With --nat (implied): a scenario with topology = "nat"; its [lab.nat],'
        " endpoints, load.rate, load.hold (as the lifetime) and"
        " load.requests_per_connection, under the options given.",
    ),
    click.option(
        "--nat-ports",
        callback=nat_ports_value,
        metavar="COUNT|LOW-HIGH",
        help="NAT ports per NAT address, e.g. 64 or 20000-20063. [default: 1024-65535]",
    ),
    click.option(
        "--nat-addresses",
        type=click.IntRange(min=1),
        help="NAT addresses; each adds its ports toward every destination. [default: 1]",
    ),
    click.option(
        "--nat-time-wait",
        callback=duration_value,
        help="How long the NAT keeps a closed flow's port (its TIME_WAIT timeout)."
        " [default: 120s, conntrack's]",
    ),
    click.option(
        "--hold-time-wait/--linux-nat",
        "nat_holds",
        default=None,
        help="Whether the NAT holds a port for its TIME_WAIT after close whoever closes"
        " first (the clouds' rule), or hands it to a new SYN as a Linux 6.5+ SNAT does."
        " [default: hold, or the scenario's lab.nat.hold_time_wait]",
    ),
    click.option(
        "--requests-per-connection",
        type=click.IntRange(1, 65535),
        help="With --nat: requests each connection carries (keep-alive, pooling);"
        " --rate then counts requests. [default: 1]",
    ),
)


def nat_options(command: F) -> F:
    """Add ``--nat`` and its options to ``eph plan``."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def plan_nat(params: dict[str, Any]) -> bool:
    """``eph plan``'s NAT half: with --nat or --scenario, plan the NAT and say True."""
    nat_only = [name for name in _NAT_ONLY if params[name] is not None]
    if not (params["nat"] or params["nat_scenario"] is not None):
        if nat_only:
            raise click.UsageError("the --nat-* and --requests-per-connection options need --nat")
        return False
    client = [flag for name, flag in CLIENT_ONLY.items() if params[name] not in (None, False, ())]
    if client:
        raise click.UsageError(
            f"{', '.join(client)}: the client host's setup, which --nat does not read"
            " (plan the client without --nat)"
        )
    given = {name: params[name] for name in ("nat_scenario", "destinations", *_NAT_ONLY)}
    rate, lifetime, scenario = params["rate"], params["lifetime"], None
    if params["run_dir"] is not None:
        if params["nat_scenario"] is not None:
            raise click.UsageError("--from and --scenario: give one (the run holds its scenario)")
        scenario, run_rate, run_lifetime = _from_run(params["run_dir"])
        rate = rate if rate is not None else run_rate
        lifetime = lifetime if lifetime is not None else run_lifetime
    run_nat_plan(given, rate, lifetime, params["as_json"], scenario)
    return True


def _from_run(run_dir: Path) -> tuple[Scenario, float | None, float | None]:
    """A NAT lab run's scenario, its offered (else measured) rate and its connections'
    measured lifetime: what ``eph plan --from RUN --nat`` plans for."""
    from harness.scenario import Scenario, Topology
    from harness.summary import Summary

    try:
        scenario = Scenario.model_validate(
            json.loads((run_dir / "scenario.json").read_text(encoding="utf-8"))
        )
        summary = Summary.load(run_dir / "summary.json")
    except (OSError, ValueError) as exc:  # missing, unreadable, or not a run of this eph
        raise click.UsageError(f"--from {run_dir}: {exc}") from None
    if scenario.lab.topology is not Topology.NAT:
        raise click.UsageError(
            f"--from {run_dir}: a run of lab.topology = {scenario.lab.topology.value!r}, not"
            ' "nat": --nat plans the router\'s pool (plan the client without --nat)'
        )
    rate = summary.capacity.offered_rate_per_s or summary.connections.rate_per_s or None
    return scenario, rate, summary.capacity.model_lifetime_s


def run_nat_plan(
    given: dict[str, Any],
    rate: float | None,
    lifetime: float | None,
    as_json: bool,
    scenario: Scenario | None = None,
) -> None:
    """``eph plan --nat``: ``given`` holds ``destinations`` and the NAT options; a run's
    ``scenario`` (--from) stands for --scenario's."""
    from harness.capacity.nat_model import make_nat_plan, render_nat_text

    scenario = scenario or _scenario(given.get("nat_scenario"))
    if rate is None and scenario is not None and scenario.load.rate > 0:
        rate = scenario.load.rate
    if rate is None:
        raise click.UsageError(
            "eph plan --nat: give --rate N (new connections/s, or requests/s with"
            " --requests-per-connection), or a --scenario whose load.rate is set"
        )
    if lifetime is None:
        lifetime = scenario.load.hold if scenario is not None else 0.0
    result = make_nat_plan(_model(scenario, lifetime, given), rate)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(render_nat_text(result), nl=False)


def _scenario(path: Path | None) -> Scenario | None:
    from harness.scenario import Topology, load_scenario

    if path is None:
        return None
    scenario = load_scenario(path)
    if scenario.lab.topology is not Topology.NAT:
        raise click.UsageError(
            f"--scenario {path}: lab.topology = {scenario.lab.topology.value!r}, expected"
            ' "nat": the NAT plan reads the router\'s [lab.nat]'
        )
    return scenario


def _model(scenario: Scenario | None, lifetime: float, given: dict[str, Any]) -> NatCapacityModel:
    """The scenario's NAT (else [lab.nat]'s defaults, holding TIME_WAIT), under ``given``."""
    from harness.capacity.nat_model import NatCapacityModel
    from harness.scenario import NatConfig

    if scenario is not None:
        base = NatCapacityModel.from_scenario(scenario, lifetime)
    else:
        defaults = NatConfig()
        base = NatCapacityModel(
            ports=defaults.pool_ports, addresses=len(defaults.addresses), lifetime_s=lifetime
        )
    changes = {
        "ports": given.get("nat_ports"),
        "addresses": given.get("nat_addresses"),
        "destinations": given.get("destinations"),
        "time_wait_s": given.get("nat_time_wait"),
        "holds_time_wait": given.get("nat_holds"),
        "requests_per_connection": given.get("requests_per_connection"),
    }
    try:
        return replace(
            base, lifetime_s=lifetime, **{k: v for k, v in changes.items() if v is not None}
        )
    except ValueError as exc:
        raise click.UsageError(f"eph plan --nat: {exc}") from None
