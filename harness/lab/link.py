"""The pair topology's link: a veth pair (netem on it when impaired) or two TUN
devices and ``harness.lab.relay`` between them; addresses and routes on each side.

The client namespace gets 198.18.0.1, the server 198.18.0.2 (the RFC 2544
benchmarking range), both on a device named ``eph0`` (names are per namespace).
netem puts half the round trip on each end; where the kernel has no netem
(``emulation = "auto"``) or when asked (``"relay"``), the userspace relay does the
same in between, started through the lab's supervisor so that it dies with eph.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import subprocess
import sys
from collections.abc import Sequence

from harness.endpoints import Endpoint
from harness.errors import RunError, ScenarioError
from harness.kernel.netns import Namespace, run_checked
from harness.rundir import RunDir
from harness.scenario import Emulation, Scenario
from harness.supervisor import Stage, Supervisor

__all__ = [
    "CLIENT_ADDRESS",
    "SERVER_ADDRESS",
    "add_sources",
    "build_pair_link",
    "link_kind",
    "netem_args",
    "route_pair",
    "targets_at",
]

logger = logging.getLogger(__name__)

CLIENT_ADDRESS = "198.18.0.1"
SERVER_ADDRESS = "198.18.0.2"
_PREFIX_LENGTH = 24
_VETH = "eph0"  # the same name in each namespace: names are per namespace
_RELAY_GRACE = 300.0  # seconds the relay outlives the run's duration at most (ramp, drain)
_RELAY_STOP_GRACE = 5.0


def build_pair_link(
    children: Supervisor, client: Namespace, server: Namespace, scenario: Scenario, run: RunDir
) -> tuple[Scenario, str]:
    """Join the two namespaces; the scenario with its targets on the server's address,
    and what makes the link: "veth", "netem" or "relay"."""
    link = link_kind(scenario, client)
    if link == "relay":
        _build_tun_link(children, client, server, scenario, run)
    else:
        _build_veth_link(client, server, scenario)
    return route_pair(client, server, scenario), link


def link_kind(scenario: Scenario, client: Namespace) -> str:
    lab = scenario.lab
    if not lab.impaired:
        return "veth"
    if lab.emulation is Emulation.RELAY:
        return "relay"
    if lab.emulation is Emulation.NETEM or _has_netem(client):
        return "netem"
    logger.info("this kernel has no netem: the pair's link is eph's userspace relay")
    return "relay"


def _has_netem(ns: Namespace) -> bool:
    """Probe on the namespace's own lo: add a netem qdisc, then remove it."""
    probe = ["tc", "-n", ns.name, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
    if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
        return False
    run_checked(["tc", "-n", ns.name, "qdisc", "del", "dev", "lo", "root"])
    return True


def _build_veth_link(client: Namespace, server: Namespace, scenario: Scenario) -> None:
    _ip(
        "link",
        "add",
        _VETH,
        "netns",
        client.name,
        "type",
        "veth",
        "peer",
        "name",
        _VETH,
        "netns",
        server.name,
    )
    for ns, address in ((client, CLIENT_ADDRESS), (server, SERVER_ADDRESS)):
        _ip("-n", ns.name, "addr", "add", f"{address}/{_PREFIX_LENGTH}", "dev", _VETH)
        _ip("-n", ns.name, "link", "set", _VETH, "up")
        netem = netem_args(scenario)
        if netem:
            _add_netem(ns, netem)


def _build_tun_link(
    children: Supervisor,
    client: Namespace,
    server: Namespace,
    scenario: Scenario,
    run: RunDir,
) -> None:
    """A TUN device on each side and the relay between them (a child of ``children``)."""
    for ns, address in ((client, CLIENT_ADDRESS), (server, SERVER_ADDRESS)):
        _ip("-n", ns.name, "tuntap", "add", "dev", _VETH, "mode", "tun")
        _ip("-n", ns.name, "addr", "add", f"{address}/{_PREFIX_LENGTH}", "dev", _VETH)
        _ip("-n", ns.name, "link", "set", _VETH, "up")
    relay = children.start(
        "relay",
        _relay_command(client, server, scenario, run),
        stage=Stage.LINK,
        grace=_RELAY_STOP_GRACE,
        death_signal=signal.SIGTERM,  # it writes its stats, then exits
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert relay.proc.stdout is not None and relay.proc.stderr is not None
    if relay.proc.stdout.readline().strip() != "ready":
        children.stop(relay)
        raise RunError(f"the lab's packet relay did not start: {relay.proc.stderr.read().strip()}")


def _relay_command(
    client: Namespace, server: Namespace, scenario: Scenario, run: RunDir
) -> list[str]:
    lab = scenario.lab
    return [
        sys.executable,
        "-m",
        "harness.lab.relay",
        client.name,
        server.name,
        "--device",
        _VETH,
        "--delay",
        str(lab.delay),
        "--jitter",
        str(lab.jitter),
        "--loss",
        str(lab.loss),
        "--max-seconds",
        str(scenario.duration + _RELAY_GRACE),
        "--stats",
        str(run.path / "relay.json"),
    ]


def route_pair(client: Namespace, server: Namespace, scenario: Scenario) -> Scenario:
    """Extra source addresses on the client, routes back to them on the server, and the
    targets moved to the server's address (ports kept)."""
    sources = scenario.load.source_addresses
    add_sources(client, sources, _VETH)
    for source in sources:  # the server answers them through the client
        if ipaddress.ip_address(source) not in ipaddress.ip_network(
            f"{CLIENT_ADDRESS}/24", strict=False
        ):
            _ip("-n", server.name, "route", "add", f"{source}/32", "via", CLIENT_ADDRESS)
    return targets_at(scenario, SERVER_ADDRESS, "pair")


def targets_at(scenario: Scenario, address: str, topology: str) -> Scenario:
    """The scenario with every target endpoint moved to ``address``, ports kept."""
    endpoints = []
    for endpoint in scenario.target.endpoints:
        if endpoint.is_ipv6:
            raise ScenarioError(
                f"the {topology} topology is IPv4 only",
                key="target.endpoints",
                value=str(endpoint),
            )
        endpoints.append(Endpoint(address, endpoint.port))
    return scenario.with_endpoints(endpoints)


def netem_args(scenario: Scenario) -> list[str]:
    """netem for one end of the link: half the round trip each way; loss each way."""
    lab = scenario.lab
    args: list[str] = []
    if lab.delay or lab.jitter:
        args += ["delay", f"{lab.delay * 1000 / 2:g}ms"]
        if lab.jitter:
            args += [f"{lab.jitter * 1000 / 2:g}ms"]
    if lab.loss:
        args += ["loss", f"{lab.loss:g}%"]
    return args


def _add_netem(ns: Namespace, netem: list[str]) -> None:
    args = ["tc", "-n", ns.name, "qdisc", "add", "dev", _VETH, "root", "netem", *netem]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return
    if "unknown" in result.stderr.lower():
        raise RunError(
            '[lab] emulation = "netem" needs the kernel\'s netem qdisc'
            " (CONFIG_NET_SCH_NETEM), which this kernel does not have; use"
            ' emulation = "auto" or "relay" (eph\'s userspace relay) instead'
        )
    raise RunError(f"{' '.join(args)}: {result.stderr.strip()}")


def add_sources(ns: Namespace, sources: Sequence[str], device: str) -> None:
    for source in sources:
        address = ipaddress.ip_address(source)
        if address.is_loopback and device == "lo":
            continue  # 127.0.0.0/8 and ::1 are already local on lo
        ns.add_address(f"{source}/{address.max_prefixlen}", device)


def _ip(*args: str) -> None:
    run_checked(["ip", *args])
