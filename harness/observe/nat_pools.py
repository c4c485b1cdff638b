"""``eph observe`` on a NAT router: how full each source-NAT pool is, per destination.

Where this namespace's conntrack table can be read and holds source-NATed TCP
flows (``IPS_SRC_NAT``), each sample groups them by destination (the original
tuple's address:port) and NAT address (the reply tuple's destination): ports
held by live flows, ports in TIME_WAIT, and the growth of conntrack's
``insert_failed`` and ``drop`` since the previous sample (a SYN that found no
free port in the pool is dropped and counted in both: docs/kernel.md, "NAT and
conntrack: a first look"). Nothing is shown when conntrack is not loaded or
holds no SNAT flow; the log says so once (at debug level: most hosts are no
routers).

Cost, measured in the tests' NAT lab (median of 7 samples, 2 shared cores):
10.6 ms a sample at 1,000 SNAT entries, 38.8 ms at 10,000, nearly all of it the
ctnetlink dump (docs/kernel.md, "Reading conntrack"); each snapshot carries its
own ``sample_ms``, and the views show it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from harness.kernel.conntrack import (
    IPS_SRC_NAT,
    CtState,
    conntrack_available,
    dump_conntrack,
    read_conntrack_stats,
)
from harness.kernel.nft import NFT_RECHECK_S, NatRule, pool_ports, read_nat_rules
from harness.observe.paths import text_addresses

__all__ = ["NatPoolRow", "NatSampler", "NatSnapshot", "nat_lines", "nat_pools"]

logger = logging.getLogger(__name__)

_IDLE = (CtState.TIME_WAIT, CtState.CLOSE)  # entries that hold a port but carry no flow
_COUNTS = ("insert_failed", "drop")
NAT_RECHECK_S = 10.0  # without SNAT flows: seconds until the table is read again


class NatPoolRow(NamedTuple):
    """One destination's flows through one NAT address."""

    destination: str  # "addr:port", as the client addressed it
    nat_address: str
    in_use: int  # ports held by flows not in TIME_WAIT or CLOSE
    time_wait: int  # ports held by flows in TIME_WAIT
    low_port: int  # the lowest and highest NAT port seen
    high_port: int
    pool: int | None = None  # the NAT address's ports by the nftables rules; None: unknown

    @property
    def pool_used(self) -> float | None:
        """Ports in use over the pool's (0 to 1), where the rules give the pool."""
        return None if not self.pool else self.in_use / self.pool


class NatSnapshot(NamedTuple):
    rows: list[NatPoolRow]  # most ports in use first
    insert_failed: int | None  # growth since the previous sample (None on the first)
    drop: int | None
    sample_ms: float


def nat_pools(entries: np.ndarray) -> list[NatPoolRow]:
    """The SNAT entries of a conntrack dump (``CT_DTYPE``), grouped per destination
    and NAT address; most ports in use first."""
    snat = entries[(entries["status"] & IPS_SRC_NAT) != 0]
    if not len(snat):
        return []
    # sorted by integer key columns, not np.unique on structured rows: a sample at
    # 10,000 entries took 76 ms with that, 39 ms with this
    dst, nat = _halves(snat["orig_dst"]), _halves(snat["reply_dst"])
    keys = (snat["family"], *nat, snat["orig_dport"], *dst)  # lexsort: the last sorts first
    order = np.lexsort(keys)
    snat = snat[order]
    changed = np.zeros(len(snat), dtype=bool)
    changed[0] = True
    for column in keys:
        changed[1:] |= column[order][1:] != column[order][:-1]
    starts = np.flatnonzero(changed)
    in_use = np.add.reduceat(~np.isin(snat["state"], _IDLE), starts)
    time_wait = np.add.reduceat(snat["state"] == CtState.TIME_WAIT, starts)
    low = np.minimum.reduceat(snat["reply_dport"], starts)
    high = np.maximum.reduceat(snat["reply_dport"], starts)
    first = snat[starts]
    destinations = text_addresses(first["family"], first["orig_dst"])
    nat_addresses = text_addresses(first["family"], first["reply_dst"])
    rows = [
        NatPoolRow(
            f"{_bracketed(destinations[i])}:{first['orig_dport'][i]}",
            nat_addresses[i],
            int(in_use[i]),
            int(time_wait[i]),
            int(low[i]),
            int(high[i]),
        )
        for i in range(len(starts))
    ]
    return sorted(rows, key=lambda r: (-r.in_use, -r.time_wait, r.destination))


def _halves(addresses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """16-byte addresses as two integer columns, for sorting."""
    words = np.frombuffer(addresses.tobytes(), dtype="<u8").reshape(-1, 2)
    return words[:, 0], words[:, 1]


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address else address


class NatSampler:
    """One :class:`NatSnapshot` per call, or None when there is nothing to show.

    Where conntrack holds no SNAT flow, it looks again only after ``recheck_s``
    (a host that is no router pays a dump every ``recheck_s``, not every
    interval). ``available``, ``dump``, ``stats`` and ``clock`` are replaceable
    in tests.
    """

    def __init__(
        self,
        available: Callable[[], str | None] = conntrack_available,
        dump: Callable[[], np.ndarray] = dump_conntrack,
        stats: Callable[[Path], dict[str, int]] = read_conntrack_stats,
        clock: Callable[[], float] = time.monotonic,
        recheck_s: float = NAT_RECHECK_S,
        rules: Callable[[], list[NatRule] | str] = read_nat_rules,
    ) -> None:
        self._available, self._dump, self._stats = available, dump, stats
        self._clock, self.recheck_s = clock, recheck_s
        self._read_rules = rules
        self._rules: list[NatRule] = []
        self._rules_at = -math.inf
        self._rules_said = False
        self._reason: str | None = None
        self._checked = self._said_empty = False
        self._idle_until = -math.inf
        self._last: dict[str, int] | None = None

    def sample(self) -> NatSnapshot | None:
        if not self._checked:
            self._checked, self._reason = True, self._available()
            if self._reason is not None:
                logger.debug("no NAT view: %s", self._reason)
        if self._reason is not None or self._clock() < self._idle_until:
            return None
        began = time.perf_counter()
        try:
            rows = nat_pools(self._dump())
            counts = self._stats(Path("/proc"))
        except OSError as exc:
            logger.warning("no NAT pool this sample: %s", exc)
            return None
        growth = {n: _growth(self._last, counts, n) for n in _COUNTS}
        self._last = counts
        if not rows:
            self._idle_until = self._clock() + self.recheck_s
            if not self._said_empty:
                self._said_empty = True
                logger.debug("no NAT view: conntrack holds no source-NATed flow (yet)")
            return None
        rules = self._nat_rules()
        rows = [r._replace(pool=pool_ports(rules, r.nat_address)) for r in rows]
        ms = (time.perf_counter() - began) * 1000
        return NatSnapshot(rows, growth["insert_failed"], growth["drop"], ms)

    def _nat_rules(self) -> list[NatRule]:
        """The nftables NAT rules, read again every :data:`NFT_RECHECK_S`."""
        if self._clock() - self._rules_at >= NFT_RECHECK_S:
            self._rules_at = self._clock()
            found = self._read_rules()
            if isinstance(found, str):
                if not self._rules_said:
                    self._rules_said = True
                    logger.info("NAT pools without their size: %s", found)
                found = []
            self._rules = found
        return self._rules


def _growth(last: dict[str, int] | None, now: dict[str, int], name: str) -> int | None:
    if last is None or name not in last or name not in now:
        return None
    return now[name] - last[name]


def nat_lines(nat: NatSnapshot, rows: int = 5) -> list[str]:
    """A headline and one line per destination and NAT address, for the views."""

    def grown(value: int | None) -> str:
        return "-" if value is None else f"+{value}"

    lines = [
        f"NAT pool (conntrack): insert_failed {grown(nat.insert_failed)},"
        f" drop {grown(nat.drop)}; sample {nat.sample_ms:.1f} ms"
    ]
    lines += [
        f"{r.destination} via {r.nat_address}: {r.in_use} ports in use"
        + (f" of {r.pool} ({r.pool_used:.0%})" if r.pool_used is not None else "")
        + f", {r.time_wait} in TIME_WAIT (ports {r.low_port}-{r.high_port})"
        for r in nat.rows[:rows]
    ]
    if any(r.time_wait for r in nat.rows[:rows]):
        lines.append(
            "TIME_WAIT entries hold no port on Linux's own SNAT: a new flow takes theirs"
            " (docs: kernel, NAT)"
        )
    return lines
