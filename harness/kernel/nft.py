"""The source-NAT pools that this namespace's nftables rules define.

A router's conntrack table says which NAT ports are in use; only its rules say how
many there are. ``nft -j list ruleset`` gives every ``snat`` and ``masquerade``
statement with its addresses and port range, as JSON:

- ``snat to 198.51.100.1:20000-20099``: ``{"addr": "198.51.100.1", "port":
  {"range": [20000, 20099]}}``; one port is ``"port": 20000``;
- an address range (``10.0.0.1-10.0.0.4``) or a map (``numgen ... map { 0 :
  10.1.0.1, ... }``) lists its addresses; each has the whole port range;
- ``masquerade`` takes the outgoing interface's address: any address here;
- no port range: Linux keeps the source port if it is free, else picks one in
  1024-65535 (for a source port of 1024 or above), so the pool is those 64,512.

Read every :data:`NFT_RECHECK_S` by the NAT view (one ``nft`` run, ~10 ms), since
rules change rarely. Without nft, or without the privilege, there is no pool size
and the view says so once.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = ["DEFAULT_PORTS", "NFT_RECHECK_S", "NatRule", "pool_ports", "read_nat_rules"]

logger = logging.getLogger(__name__)

DEFAULT_PORTS = (1024, 65535)  # an snat or masquerade without a port range
NFT_RECHECK_S = 30.0
_EXPANDED = 4096  # addresses of a range listed one by one, at most


class NatRule(NamedTuple):
    """One snat or masquerade statement: its addresses (None: any, as masquerade's)
    and its ports, ``low`` to ``high``."""

    addresses: frozenset[str] | None
    low: int
    high: int

    @property
    def ports(self) -> int:
        return self.high - self.low + 1


def nat_rules(ruleset: dict[str, Any]) -> list[NatRule]:
    """The snat and masquerade statements of ``nft -j list ruleset``'s output, in order."""
    rules = []
    for item in ruleset.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        for expr in rule.get("expr", []) if isinstance(rule, dict) else []:
            for kind in ("snat", "masquerade"):
                if isinstance(expr, dict) and kind in expr:
                    stmt = expr[kind] if isinstance(expr[kind], dict) else {}
                    low, high = _ports(stmt.get("port"))
                    rules.append(NatRule(_addresses(stmt.get("addr")), low, high))
    return rules


def pool_ports(rules: Sequence[NatRule], address: str) -> int | None:
    """The ports of the first rule that can translate to ``address``; None if none."""
    for rule in rules:
        if rule.addresses is None or address in rule.addresses:
            return rule.ports
    return None


def read_nat_rules(nft: str = "nft") -> list[NatRule] | str:
    """This namespace's NAT rules, or why they cannot be read (one line)."""
    try:
        done = subprocess.run(
            [nft, "-j", "list", "ruleset"], capture_output=True, text=True, timeout=10, check=False
        )
    except FileNotFoundError:
        return "nft is not installed (Debian package nftables)"
    except subprocess.TimeoutExpired:
        return "nft list ruleset took more than 10 s"
    if done.returncode != 0:
        return f"nft list ruleset failed: {done.stderr.strip() or done.returncode}"
    try:
        return nat_rules(json.loads(done.stdout or "{}"))
    except ValueError as exc:
        return f"nft printed no JSON: {exc}"


def _ports(port: object) -> tuple[int, int]:
    if isinstance(port, int):
        return port, port
    if isinstance(port, dict) and isinstance(port.get("range"), list):
        low, high = port["range"]
        if isinstance(low, int) and isinstance(high, int):
            return low, high
    return DEFAULT_PORTS


def _addresses(addr: object) -> frozenset[str] | None:
    """The addresses an ``addr`` can be; None where any (or where nft's form is one
    this does not read: the pool is then counted for every address)."""
    if isinstance(addr, str):
        return frozenset([_text(addr)])
    if isinstance(addr, dict) and isinstance(addr.get("range"), list):
        first, last = (ipaddress.ip_address(a) for a in addr["range"])
        span = int(last) - int(first)
        if 0 <= span < _EXPANDED:
            return frozenset(str(first + i) for i in range(span + 1))
    if isinstance(addr, dict) and isinstance(addr.get("map"), dict):
        pairs = addr["map"].get("data", {}).get("set", [])
        found = [p[1] for p in pairs if isinstance(p, list) and len(p) == 2]
        if found and all(isinstance(a, str) for a in found):
            return frozenset(_text(a) for a in found)
    return None


def _text(address: str) -> str:
    """An address as the conntrack view writes it (``ipaddress``'s compressed form)."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address
