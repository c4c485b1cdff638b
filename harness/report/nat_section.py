"""The summary's ``nat`` section: the router's SNAT pool, beside the client's own ports.

A NAT whose pool is full drops new flows' SYNs: the client sees no EADDRNOTAVAIL
but connects that take a retransmission (1 s, then 3 s, ...) or time out. Those
look like a server outage, so this section puts what the NAT collector saw
(``router/nat.parquet``: ports in use per destination against the pool's size,
conntrack's ``insert_failed`` and ``drop``, the lab's ``held_drops``) beside the
records, and :func:`nat_findings` names the pool when it was the cause.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from harness.capacity.nat_model import NatCapacityModel
from harness.report.counts import ValueCounts
from harness.report.ondisk import Records, record_batches
from harness.scenario import Scenario
from harness.summary import Nat, NatDestination

if TYPE_CHECKING:
    from harness.summary import Summary

__all__ = [
    "SYN_RETRANSMIT_US",
    "nat_findings",
    "nat_section",
    "scan_for_nat",
    "with_nat_model",
]

SYN_RETRANSMIT_US = 900_000  # a connect this slow had its SYN sent again (the first RTO: 1 s)
_STATS = ("insert_failed", "drop", "early_drop", "search_restart", "clash_resolve", "held_drops")


_SCAN = ("start_ns", "connect_us", "close_us", "errno")


@dataclass
class NatRecordScan:
    """What the section needs of the records, gathered a batch at a time."""

    first_ns: int | None = None
    last_ns: int | None = None
    slow: int = 0  # connects a dropped SYN slowed (over SYN_RETRANSMIT_US)
    timeouts: int = 0  # connects that timed out
    first_hit_ns: int | None = None  # the start of the first of either
    steps: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))
    held_us: ValueCounts = field(default_factory=ValueCounts)  # connect's answer to close

    def add(self, batch: pa.RecordBatch) -> None:
        if not batch.num_rows:
            return
        begun = batch.column("start_ns").to_numpy().astype(np.int64)
        err = batch.column("errno").to_numpy()
        connect_us = batch.column("connect_us").to_numpy().astype(np.int64)
        close_us = batch.column("close_us").to_numpy().astype(np.int64)
        self.first_ns = _lowest(self.first_ns, int(begun.min()))
        self.last_ns = max(self.last_ns or 0, int(begun.max()))
        ok = err == 0
        slow = ok & (connect_us >= SYN_RETRANSMIT_US)
        timeout = err == errno.ETIMEDOUT
        self.slow += int(slow.sum())
        self.timeouts += int(timeout.sum())
        hit = slow | timeout
        if hit.any():
            self.first_hit_ns = _lowest(self.first_hit_ns, int(begun[hit].min()))
        self.steps += np.histogram(connect_us[ok] / 1e6, bins=[0.9, 2.9, 6.9, np.inf])[0]
        self.held_us.add(close_us[ok] - connect_us[ok])

    def lifetime_s(self, otherwise: float) -> float:
        """How long a successful connection held its NAT port, median: from the
        connect's answer to the close (a connect slowed by a dropped SYN had no port
        until its last try); ``otherwise`` when none succeeded."""
        return self.held_us.percentile(50) / 1e6 if self.held_us.total else otherwise


def _lowest(current: int | None, value: int) -> int:
    return value if current is None else min(current, value)


def scan_for_nat(records: Records) -> NatRecordScan:
    """One pass over the records, of any size, a batch at a time."""
    scan = NatRecordScan()
    for batch in record_batches(records, _SCAN):
        scan.add(batch)
    return scan


def nat_section(
    run: Path, records: Records, hold_s: float = 0.0, scan: NatRecordScan | None = None
) -> Nat | None:
    """The section from ``run/router``; None when the run had no NAT collector.
    ``records``: the run's, held or on disk (``scan``: their :func:`scan_for_nat`, when
    the caller has it). ``hold_s``: how long the NAT keeps a closed flow's port (its
    held TIME_WAIT)."""
    path = run / "router" / "nat.parquet"
    if not path.exists():
        return None
    meta = json.loads((run / "router" / "nat.json").read_text())
    samples = pq.read_table(path)
    lo, hi = meta["ports"]
    per_destination = (hi - lo + 1) * len(meta["addresses"])
    scan = scan if scan is not None else scan_for_nat(records)
    start = scan.first_ns if scan.first_ns is not None else _first(samples)
    destinations = _destinations(samples, per_destination, start)
    drops = _drops(samples)
    at = None
    if scan.first_hit_ns is not None:
        at = round(float(scan.first_hit_ns - start) / 1e9, 3)
    full = any(d.full_at_s is not None for d in destinations)
    dropped = sum(drops.values()) > 0
    if at is None and scan.first_ns is None and full and dropped:
        # no client rows (eph lab --exec without --trace): the pool's own account
        at = min(d.full_at_s for d in destinations if d.full_at_s is not None)
    exhausted = full and dropped and at is not None
    addresses = ",".join(meta["addresses"])
    sustained = None
    if exhausted and at is not None:
        sustained = _sustained(records, scan, at, hold_s)
    steps = {k: int(v) for k, v in zip(("1", "2", "3+"), scan.steps, strict=True) if v}
    return Nat(
        pool=f"{addresses}:{lo}-{hi} ({per_destination} ports per destination)",
        hold_time_wait=bool(meta.get("hold")),
        destinations=destinations,
        drops=drops,
        slow_connects=scan.slow,
        retransmission_steps=steps,
        connect_timeouts=scan.timeouts,
        exhausted=exhausted,
        exhausted_at_s=at if exhausted else None,
        sustained_rate_per_s=sustained,
    )


def with_nat_model(nat: Nat, summary: Summary, scenario: Scenario, lifetime_s: float) -> Nat:
    """``nat`` with the client's peak occupancy beside it and the NAT model's answers;
    ``lifetime_s``: how long a flow held its port (:meth:`NatRecordScan.lifetime_s`)."""
    out = nat.model_copy()
    if summary.occupancy is not None:
        out.client_peak_fraction = summary.occupancy.peak_fraction
    model = NatCapacityModel.from_scenario(scenario, lifetime_s)
    out.model_max_rate_per_s = _round(model.max_rate_per_s)
    if scenario.load.rate > 0:
        out.model_exhausted_at_s = _round(model.time_to_exhaustion_s(scenario.load.rate))
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _first(samples: pa.Table) -> int:
    return int(pc.min(samples.column("t_ns")).as_py() or 0)


def _destinations(samples: pa.Table, pool: int, start: int) -> list[NatDestination]:
    rows = samples.filter(pc.not_equal(samples.column("destination"), "all"))
    out = []
    for name in sorted(set(rows.column("destination").to_pylist())):
        mine = rows.filter(pc.equal(rows.column("destination"), name))
        t = mine.column("t_ns").to_numpy()
        times = np.unique(t)
        index = np.searchsorted(times, t)

        peaks = {
            name: _per_sample(mine, index, len(times), name)
            for name in ("in_use", "live", "time_wait", "held")
        }
        in_use = peaks["in_use"]
        full = np.flatnonzero(in_use >= pool)
        out.append(
            NatDestination(
                destination=name,
                pool_ports=pool,
                peak_in_use=int(in_use.max(initial=0)),
                peak_live=int(peaks["live"].max(initial=0)),
                peak_time_wait=int(peaks["time_wait"].max(initial=0)),
                peak_held=int(peaks["held"].max(initial=0)),
                full_at_s=round((times[full[0]] - start) / 1e9, 3) if len(full) else None,
            )
        )
    return out


def _per_sample(rows: pa.Table, index: np.ndarray, n: int, column: str) -> np.ndarray:
    """``column`` summed over NAT addresses, one value per sample."""
    values = rows.column(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.bincount(index, weights=values, minlength=n).astype(np.int64)


def _drops(samples: pa.Table) -> dict[str, int]:
    stats = samples.filter(pc.equal(samples.column("destination"), "all"))
    out = {}
    for name in _STATS:
        values = stats.column(name).drop_null().to_numpy()
        if len(values):
            out[name] = int(values.max() - values.min())
    return out


def _sustained(records: Records, scan: NatRecordScan, at_s: float, hold_s: float) -> float | None:
    """Ports taken per second once exhausted: the connects that got their answer in
    whole busy times (lifetime + ``hold_s``) from the moment the first flow gave its
    port back (one busy time after the first connect; flows that start together end
    together, so ports come back in waves one busy time apart), over that span. A
    second pass over the records, a batch at a time."""
    if not scan.held_us.total or scan.first_ns is None or scan.last_ns is None:
        return 0.0
    busy = int(scan.held_us.percentile(50) * 1000) + int(hold_s * 1e9)
    since = scan.first_ns + max(busy, int(at_s * 1e9))
    span = scan.last_ns - since
    waves = span // busy if busy > 0 else 0
    if waves < 1:
        return None  # under one lifetime after exhaustion: too short to say
    window = waves * busy
    taken = 0
    for batch in record_batches(records, ("start_ns", "connect_us", "errno")):
        ok = batch.column("errno").to_numpy() == 0
        begun = batch.column("start_ns").to_numpy().astype(np.int64)[ok]
        answered = begun + batch.column("connect_us").to_numpy()[ok].astype(np.int64) * 1000
        taken += int(((answered >= since) & (answered < since + window)).sum())
    return round(float(taken) / (window / 1e9), 1)


def _step_text(nat: Nat) -> str:
    steps = nat.retransmission_steps
    if not steps:
        return ""
    at = {"1": "~1 s", "2": "~3 s", "3+": "7 s or more"}
    return " (" + ", ".join(f"{n:,} at {at[k]}" for k, n in steps.items()) + ")"


def nat_findings(nat: Nat | None) -> list[str]:
    """The NAT in plain words: exhausted (named, not an outage), or dropping SYNs."""
    if nat is None:
        return []
    drops = ", ".join(f"{k} {v:,}" for k, v in nat.drops.items() if v)
    if nat.exhausted:
        full = [d for d in nat.destinations if d.full_at_s is not None]
        where = "; ".join(f"toward {d.destination} full at {d.full_at_s:g} s" for d in full)
        client = (
            f" The client's own port range was at most {nat.client_peak_fraction:.0%} in use:"
            if nat.client_peak_fraction is not None
            else ""
        )
        waited = (
            f": {nat.slow_connects:,} connects took a SYN retransmission{_step_text(nat)} and"
            f" {nat.connect_timeouts:,} timed out"
            if nat.slow_connects or nat.connect_timeouts
            else " (trace the client, --trace, to count the connects that waited)"
        )
        return [
            f"NAT pool exhausted: {nat.pool}, {where}. From {nat.exhausted_at_s:g} s the NAT"
            f" dropped SYNs ({drops}){waited}.{client}"
            " this is the"
            " NAT's port pool, not the client's ports and not a server outage."
        ]
    if drops:
        return [
            f"The NAT dropped SYNs without its pool being full ({drops}): conntrack insert"
            " races, which random_fully (kube-proxy's --random-fully) makes rarer."
        ]
    busiest = max(nat.destinations, key=lambda d: d.peak_in_use, default=None)
    if busiest is None:
        return []
    text = (
        f"NAT pool {nat.pool}: no SYN dropped; at most {busiest.peak_in_use} ports in use"
        f" toward {busiest.destination}, {busiest.peak_live} of them by open flows"
    )
    if not nat.hold_time_wait and busiest.peak_time_wait:
        text += (
            f". Its {busiest.peak_time_wait} TIME_WAIT entries held nothing: Linux hands"
            " them to new flows (hold_time_wait = true holds them, as the clouds do)"
        )
    return [text + "."]
