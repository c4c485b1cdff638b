"""The nat topology: a client, a router and a server namespace; the router SNATs the
clients' flows to ``[lab.nat]``'s pool, with nftables and conntrack in its namespace only.

::

    client 198.18.0.1 --eph0-- 198.18.0.254 router 198.19.0.254 --eph1-- 198.19.0.2 server
                                            NAT addresses on eph1

The server has routes to the NAT addresses only, never to the clients' subnet: a
flow that escaped the NAT gets no answer. Everything the router is told (its
nftables table, conntrack timeouts, forwarding) lives in its namespace and goes
with it, on every exit path of the lab's ``with`` blocks.

The nftables table ``eph_nat`` (one per router namespace):

- ``postrouting`` SNATs TCP and UDP leaving on ``eph1`` to the pool: one address,
  or several taken in turn (``numgen inc``); ``random_fully`` adds ``fully-random``,
  kube-proxy's flag against conntrack insert races;
- ``hold_time_wait``: Linux 6.5+ lets a new SYN take over a NAT port whose
  conntrack entry is in TIME_WAIT once its sequence number has advanced
  (docs/kernel.md, "NAT and conntrack"), where a cloud NAT keeps the port for its
  TIME_WAIT timeout. So eph picks the ports itself: the ``busy`` set holds
  (destination, port) while a flow lives and for ``tcp_timeout_time_wait`` after its
  first FIN or RST; a new flow takes the first port not busy, filling one address
  before the next (as Azure does), and a SYN that finds none is dropped (counter
  ``held_drops``): the client retransmits and times out, as behind a cloud NAT.
  Letting the kernel pick and dropping the SYNs that landed on a held port drops
  them early instead: the kernel's last 32 tries evict a TIME_WAIT entry before they
  look further for a free port;
- ``conntrack_max``: a ``ct count`` limit on new flows, since the host's
  ``nf_conntrack_max`` cannot be written from a namespace.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence

from harness.capacity.nat_model import CONNTRACK_TIME_WAIT_S
from harness.errors import RunError
from harness.kernel.netns import Namespace, run_checked
from harness.lab.link import targets_at
from harness.scenario import NatConfig, Scenario

__all__ = [
    "NAT_CLIENT_ADDRESS",
    "NAT_SERVER_ADDRESS",
    "NAT_TABLE",
    "build_nat",
    "describe_pool",
    "hold_seconds",
    "nat_ruleset",
    "pool_arguments",
    "pool_mark",
    "router_sysctls",
]

logger = logging.getLogger(__name__)

NAT_CLIENT_ADDRESS = "198.18.0.1"
NAT_SERVER_ADDRESS = "198.19.0.2"
_ROUTER_INSIDE = "198.18.0.254"
_ROUTER_OUTSIDE = "198.19.0.254"
_PREFIX_LENGTH = 24
_INSIDE, _OUTSIDE = "eph0", "eph1"  # the router's devices; each other side's is eph0
NAT_TABLE = "eph_nat"
_TIME_WAIT_SYSCTL = "net.netfilter.nf_conntrack_tcp_timeout_time_wait"
_LIVE_S = 86400  # how long a live flow keeps its busy entry at most (runs are shorter)
_SYN_S = 5  # a SYN's port until the server answers: a SYN dropped further on lets it go


def build_nat(
    client: Namespace, router: Namespace, server: Namespace, scenario: Scenario
) -> Scenario:
    """Link the three namespaces, set up the router's NAT; the scenario with its targets
    on the server's address (ports kept)."""
    nat = scenario.lab.nat_pool
    _veth(client, "eph0", router, _INSIDE)
    _veth(router, _OUTSIDE, server, "eph0")
    _address(client, "eph0", NAT_CLIENT_ADDRESS)
    _address(router, _INSIDE, _ROUTER_INSIDE)
    _address(router, _OUTSIDE, _ROUTER_OUTSIDE)
    _address(server, "eph0", NAT_SERVER_ADDRESS)
    _ip("-n", client.name, "route", "add", "default", "via", _ROUTER_INSIDE)
    for address in nat.addresses:
        _ip("-n", router.name, "addr", "add", f"{address}/32", "dev", _OUTSIDE)
        _ip("-n", server.name, "route", "add", f"{address}/32", "via", _ROUTER_OUTSIDE)
    for source in scenario.load.source_addresses:
        client.add_address(f"{source}/32", "eph0")
        _ip("-n", router.name, "route", "add", f"{source}/32", "via", NAT_CLIENT_ADDRESS)
    router.set_sysctl("net.ipv4.ip_forward", 1)
    _nft(router, nat_ruleset(nat))
    for name, value in router_sysctls(nat).items():  # conntrack's, there once nft loaded it
        router.set_sysctl(name, value)
    logger.info("NAT pool: %s", describe_pool(nat))
    return targets_at(scenario, NAT_SERVER_ADDRESS, "nat")


def describe_pool(nat: NatConfig) -> str:
    """``198.51.100.1:20000-20099 (100 ports)``: how reports name a pool."""
    lo, hi = nat.ports
    addresses = ",".join(nat.addresses)
    ports = nat.pool_ports * len(nat.addresses)
    return f"{addresses}:{lo}-{hi} ({ports} ports per destination)"


def router_sysctls(nat: NatConfig) -> dict[str, str]:
    """The router's conntrack settings: [lab.nat]'s timeouts, in whole seconds. With
    ``hold_time_wait`` the ``busy`` set holds the port, and conntrack's own TIME_WAIT
    is cut to 1 s so that it never keeps a port the set has let go."""
    out = {name: str(value) for name, value in nat.timeouts().items()}
    if nat.hold_time_wait:
        out[_TIME_WAIT_SYSCTL] = "1"
    return out


def hold_seconds(nat: NatConfig) -> int:
    """How long a closed flow keeps its port with ``hold_time_wait``."""
    value = nat.tcp_timeout_time_wait
    return round(value if value is not None else CONNTRACK_TIME_WAIT_S)


def nat_ruleset(nat: NatConfig) -> str:
    """The router's nftables table, as ``nft -f`` reads it."""
    lines = [f"table ip {NAT_TABLE} {{"]
    if nat.hold_time_wait:
        lines += _hold_rules(nat)
    else:
        lines += _kernel_rules(nat)
    if nat.conntrack_max is not None:
        lines += [
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            f"    ct state new ct count over {nat.conntrack_max} counter drop"
            ' comment "conntrack_max"',
            "  }",
        ]
    return "\n".join([*lines, "}", ""])


def _kernel_rules(nat: NatConfig) -> list[str]:
    """The kernel picks each flow's port in the range: Linux's own SNAT."""
    lo, hi = nat.ports
    if len(nat.addresses) == 1:
        to = nat.addresses[0]
    else:
        pairs = ", ".join(f"{i} : {a}" for i, a in enumerate(nat.addresses))
        to = f"numgen inc mod {len(nat.addresses)} map {{ {pairs} }}"
    flags = " fully-random" if nat.random_fully else ""
    return [
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "{_OUTSIDE}" meta l4proto {{ tcp, udp }} counter'
        f" snat ip to {to}:{lo}-{hi}{flags}",
        "  }",
    ]


def _hold_rules(nat: NatConfig) -> list[str]:
    """A cloud NAT's pool: each TCP flow takes the first (address, port) not ``busy``
    toward its destination, and keeps it busy while it lives (from the server's
    SYN-ACK; a SYN unanswered gives it back after ``_SYN_S``) and for the hold after
    its first FIN or RST; with none left, its SYN is dropped (``held_drops``).

    One rule per pool port, since nftables can look a constant up in a set only
    through a packet field: the port's mark (address index << 16 | port) goes into
    ``ct mark``, and the set is keyed by destination . port . mark.
    """
    key = "ip daddr . tcp dport . ct mark"
    closed = "ct original ip daddr . ct original proto-dst . ct mark"
    lines = [
        "  set busy {",
        "    type ipv4_addr . inet_service . mark",
        f"    flags timeout; timeout {_LIVE_S}s; size {1 << 20};",
        "  }",
        "  counter held_drops { }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
    ]
    lo, hi = nat.ports
    for index, address in enumerate(nat.addresses):
        for port in range(lo, hi + 1):
            lines.append(
                f'    oifname "{_OUTSIDE}" meta l4proto tcp ct mark set {pool_mark(index, port)}'
                f" {key} != @busy snat ip to {address}:{port}"
            )
    lines += [
        f'    oifname "{_OUTSIDE}" meta l4proto tcp counter name "held_drops" drop',
        f'    oifname "{_OUTSIDE}" meta l4proto udp snat ip to {nat.addresses[0]}:{lo}-{hi}',
        "  }",
        "  chain hold {",
        "    type filter hook postrouting priority srcnat + 1; policy accept;",
        f'    oifname "{_OUTSIDE}" tcp flags & (syn | ack) == syn ct state new'
        f" add @busy {{ {key} timeout {_SYN_S}s }}",
        "    ct direction reply tcp flags & (syn | ack) == syn | ack"
        f" update @busy {{ {closed} timeout {_LIVE_S}s }}",
        f"    tcp flags & (fin | rst) != 0 update @busy {{ {closed} timeout"
        f" {hold_seconds(nat)}s }}",
        "  }",
    ]
    return lines


def pool_mark(index: int, port: int) -> int:
    """The ``ct mark`` of NAT address ``index``'s ``port`` (``hold_time_wait``)."""
    return index << 16 | port


def _nft(ns: Namespace, ruleset: str) -> None:
    result = subprocess.run(
        ns.command(["nft", "-f", "-"]), input=ruleset, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RunError(
            f"nft could not load the NAT rules in {ns.name}: {result.stderr.strip()}"
            " (the nat topology needs nftables: Debian package nftables)"
        )


def _veth(a: Namespace, a_name: str, b: Namespace, b_name: str) -> None:
    _ip("link", "add", a_name, "netns", a.name, "type", "veth", "peer", "name", b_name,
        "netns", b.name)  # fmt: skip


def _address(ns: Namespace, device: str, address: str) -> None:
    _ip("-n", ns.name, "addr", "add", f"{address}/{_PREFIX_LENGTH}", "dev", device)
    _ip("-n", ns.name, "link", "set", device, "up")


def _ip(*args: str) -> None:
    run_checked(["ip", *args])


def pool_arguments(nat: NatConfig) -> Sequence[str]:
    """The NAT collector's arguments that describe the pool."""
    lo, hi = nat.ports
    args = ["--nat-addresses", ",".join(nat.addresses), "--nat-ports", f"{lo}-{hi}"]
    return [*args, "--hold", NAT_TABLE] if nat.hold_time_wait else args
