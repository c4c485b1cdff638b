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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from harness.capacity.nat import NatCapacityModel
from harness.scenario import Scenario
from harness.summary import Nat, NatDestination

if TYPE_CHECKING:
    from harness.summary import Summary

__all__ = [
    "SYN_RETRANSMIT_US",
    "nat_findings",
    "nat_section",
    "with_nat_model",
]

SYN_RETRANSMIT_US = 900_000  # a connect this slow had its SYN sent again (the first RTO: 1 s)
_STATS = ("insert_failed", "drop", "early_drop", "search_restart", "clash_resolve", "held_drops")


def nat_section(run: Path, table: pa.Table, hold_s: float = 0.0) -> Nat | None:
    """The section from ``run/router``; None when the run had no NAT collector.
    ``hold_s``: how long the NAT keeps a closed flow's port (its held TIME_WAIT)."""
    path = run / "router" / "nat.parquet"
    if not path.exists():
        return None
    meta = json.loads((run / "router" / "nat.json").read_text())
    samples = pq.read_table(path)
    lo, hi = meta["ports"]
    per_destination = (hi - lo + 1) * len(meta["addresses"])
    begun = table.column("start_ns").to_numpy() if table.num_rows else None
    start = int(begun.min()) if begun is not None else _first(samples)
    destinations = _destinations(samples, per_destination, start)
    drops = _drops(samples)
    slow, timeouts, at = _connect_signature(table, start)
    steps = _steps(table)
    full = any(d.full_at_s is not None for d in destinations)
    dropped = sum(drops.values()) > 0
    exhausted = full and dropped and at is not None
    addresses = ",".join(meta["addresses"])
    sustained = _sustained(table, at, hold_s) if exhausted and at is not None else None
    return Nat(
        pool=f"{addresses}:{lo}-{hi} ({per_destination} ports per destination)",
        hold_time_wait=bool(meta.get("hold")),
        destinations=destinations,
        drops=drops,
        slow_connects=slow,
        retransmission_steps=steps,
        connect_timeouts=timeouts,
        exhausted=exhausted,
        exhausted_at_s=at if exhausted else None,
        sustained_rate_per_s=sustained,
    )


def with_nat_model(nat: Nat, summary: Summary, scenario: Scenario, table: pa.Table) -> Nat:
    """``nat`` with the client's peak occupancy beside it and the NAT model's answers."""
    out = nat.model_copy()
    if summary.occupancy is not None:
        out.client_peak_fraction = summary.occupancy.peak_fraction
    model = NatCapacityModel.from_scenario(scenario, _lifetime_s(table, scenario))
    out.model_max_rate_per_s = _round(model.max_rate_per_s)
    if scenario.load.rate > 0:
        out.model_exhausted_at_s = _round(model.time_to_exhaustion_s(scenario.load.rate))
    return out


def _lifetime_s(table: pa.Table, scenario: Scenario) -> float:
    """How long a successful connection held its NAT port, median: from the connect's
    answer to the close (a connect slowed by a dropped SYN had no port until its last
    try), else load.hold."""
    ok = table.column("errno").to_numpy() == 0 if table.num_rows else np.zeros(0, bool)
    if not ok.any():
        return scenario.load.hold
    close = table.column("close_us").to_numpy()[ok].astype(np.int64)
    connect = table.column("connect_us").to_numpy()[ok].astype(np.int64)
    return float(np.median(close - connect)) / 1e6


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


def _connect_signature(table: pa.Table, start: int | None) -> tuple[int, int, float | None]:
    """Slowed connects, timed-out connects, and when the first of either started."""
    if not table.num_rows or start is None:
        return 0, 0, None
    err = table.column("errno").to_numpy()
    connect_us = table.column("connect_us").to_numpy()
    begun = table.column("start_ns").to_numpy()
    slow = (err == 0) & (connect_us >= SYN_RETRANSMIT_US)
    timeout = err == errno.ETIMEDOUT
    hit = slow | timeout
    at = round(float(begun[hit].min() - start) / 1e9, 3) if hit.any() else None
    return int(slow.sum()), int(timeout.sum()), at


def _steps(table: pa.Table) -> dict[str, int]:
    """Successful connects by how many SYN retransmissions their time implies."""
    if not table.num_rows:
        return {}
    ok = table.column("errno").to_numpy() == 0
    seconds = table.column("connect_us").to_numpy()[ok] / 1e6
    counts = np.histogram(seconds, bins=[0.9, 2.9, 6.9, np.inf])[0]
    return {k: int(v) for k, v in zip(("1", "2", "3+"), counts, strict=True) if v}


def _sustained(table: pa.Table, at_s: float, hold_s: float) -> float | None:
    """Ports taken per second once exhausted: the connects that got their answer in
    whole busy times (lifetime + ``hold_s``) from the moment the first flow gave its
    port back (one busy time after the first connect; flows that start together end
    together, so ports come back in waves one busy time apart), over that span."""
    ok = table.column("errno").to_numpy() == 0
    begun = table.column("start_ns").to_numpy().astype(np.int64)
    connect = table.column("connect_us").to_numpy()[ok].astype(np.int64) * 1000
    close = table.column("close_us").to_numpy()[ok].astype(np.int64) * 1000
    if not ok.any():
        return 0.0
    taken = begun[ok] + connect
    busy = int(np.median(close - connect)) + int(hold_s * 1e9)
    since = int(begun.min()) + max(busy, int(at_s * 1e9))
    span = int(begun.max()) - since
    waves = span // busy if busy > 0 else 0
    if waves < 1:
        return None  # under one lifetime after exhaustion: too short to say
    window = waves * busy
    return round(float(((taken >= since) & (taken < since + window)).sum()) / (window / 1e9), 1)


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
        return [
            f"NAT pool exhausted: {nat.pool}, {where}. From {nat.exhausted_at_s:g} s the NAT"
            f" dropped SYNs ({drops}): {nat.slow_connects:,} connects took a SYN"
            f" retransmission{_step_text(nat)} and {nat.connect_timeouts:,} timed out.{client}"
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
