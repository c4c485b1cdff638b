"""[lab.nat] read and checked, and the router's nftables table it makes."""

from __future__ import annotations

import os
import subprocess

import pytest

from harness.errors import ScenarioError
from harness.lab.nat_router import nat_ruleset, pool_mark, router_sysctls
from harness.scenario import NatConfig, parse_scenario

from .conftest import require, require_tools

_BASE = """
name = "n"
[target]
endpoints = ["127.0.0.1:9000"]
[listener]
[lab]
topology = "{topology}"
[lab.nat]
{nat}
"""


def _nat(nat: str, topology: str = "nat") -> NatConfig:
    scenario = parse_scenario(_BASE.format(nat=nat, topology=topology), source="nat.toml")
    return scenario.lab.nat_pool


def _nft_accepts(ruleset: str) -> None:
    """``nft --check`` in a throwaway network namespace: the syntax and the kernel's
    acceptance, nothing applied anywhere."""
    require(None if os.geteuid() == 0 else "nft --check in a namespace needs root")
    require_tools("nft", "unshare")
    result = subprocess.run(
        ["unshare", "--net", "nft", "--check", "-f", "-"],
        input=ruleset,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_kernel_picks_ports_unless_the_time_wait_is_held() -> None:
    ruleset = nat_ruleset(_nat("ports = [20000, 20099]"))
    assert "snat ip to 198.51.100.1:20000-20099\n" in ruleset
    assert "busy" not in ruleset
    _nft_accepts(ruleset)


def test_random_fully_and_several_addresses() -> None:
    nat = _nat('addresses = ["198.51.100.1", "198.51.100.2"]\nrandom_fully = true')
    ruleset = nat_ruleset(nat)
    assert "numgen inc mod 2 map { 0 : 198.51.100.1, 1 : 198.51.100.2 }" in ruleset
    assert ruleset.count("fully-random") == 1
    _nft_accepts(ruleset)


def test_a_held_time_wait_gives_each_pool_port_its_rule_in_address_order() -> None:
    nat = _nat(
        'addresses = ["198.51.100.1", "198.51.100.2"]\nports = "20000-20009"\n'
        'hold_time_wait = true\ntcp_timeout_time_wait = "30s"'
    )
    ruleset = nat_ruleset(nat)
    rules = [line for line in ruleset.splitlines() if "meta l4proto tcp ct mark set" in line]
    assert len(rules) == 20
    assert rules[0].endswith("snat ip to 198.51.100.1:20000")
    assert rules[-1].endswith("snat ip to 198.51.100.2:20009")
    assert f"ct mark set {pool_mark(1, 20009)} " in rules[-1]
    assert "timeout 30s }" in ruleset  # the hold after FIN or RST
    # conntrack's own TIME_WAIT must not outlast the set's hold
    assert router_sysctls(nat)["net.netfilter.nf_conntrack_tcp_timeout_time_wait"] == "1"
    _nft_accepts(ruleset)


def test_conntrack_timeouts_and_max() -> None:
    nat = _nat('tcp_timeout_established = "300s"\nconntrack_max = 50')
    assert router_sysctls(nat) == {"net.netfilter.nf_conntrack_tcp_timeout_established": "300"}
    assert "ct count over 50" in nat_ruleset(nat)
    _nft_accepts(nat_ruleset(nat))


@pytest.mark.parametrize(
    ("nat", "topology", "says"),
    [
        ("ports = [20099, 20000]", "nat", "ports low end 20099 is above high end 20000"),
        ('addresses = ["198.51.100.1", "198.51.100.1"]', "nat", "repeat an address"),
        ('addresses = ["127.0.0.1"]', "nat", "cannot be a NAT address"),
        ('addresses = ["fd00::1"]', "nat", "not an IPv4 address"),
        ('tcp_timeout_time_wait = "1500ms"', "nat", "conntrack counts whole seconds"),
        ("hold_time_wait = true\nrandom_fully = true", "nat", "exclude each other"),
        ("hold_time_wait = true\nports = [1024, 65535]", "nat", "at most 4096"),
        ("ports = [20000, 20099]", "pair", 'topology = "nat" only'),
    ],
)
def test_bad_lab_nat_says_what_and_where(nat: str, topology: str, says: str) -> None:
    with pytest.raises(ScenarioError) as error:
        _nat(nat, topology)
    assert says in str(error.value)
    assert "nat.toml" in str(error.value) and "lab" in str(error.value)
