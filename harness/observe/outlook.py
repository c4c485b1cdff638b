"""How long each observed path has before its ports run out, from the capacity model.

Per path the model needs a rate, a hold and a lifetime; observation gives them:

- rate: new connections per second (``PathSnapshot.new_per_s``);
- hold: TIME_WAIT sits on the client only when the client closes first, which
  shows as TIME_WAIT sockets on the path. It lasts 60 s, or the reuse delay
  when ``tcp_tw_reuse`` applies to the path (1, or 2 toward loopback, with
  timestamps on: ``harness.capacity.port_model.reuse_applies``);
- lifetime: sockets open on the path / rate (Little's law).

A path fills when ``rate x (lifetime + hold)`` exceeds its usable ports. The time
left is then ``(usable - held) / rate``: at the current rate, assuming none of
the ports held now comes back first (the model's own assumption from empty,
``CapacityModel.time_to_exhaustion_s``). None means the rate fits the range.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from dataclasses import dataclass

import numpy as np

from harness.capacity.port_model import DEFAULT_REUSE_DELAY_S, TIME_WAIT_S, reuse_applies
from harness.kernel.sockdiag import TcpState
from harness.observe.paths import STATES, PathSnapshot

__all__ = ["Outlook", "Verdict", "outlook"]

_TIME_WAIT = STATES.index(TcpState.TIME_WAIT)
_OPEN = [STATES.index(s) for s in (TcpState.SYN_SENT, TcpState.ESTABLISHED)]
WARN_FRACTION = 0.5  # the parity cliff: connect() slows once the first half is used
DANGER_FRACTION = 0.8


class Verdict(enum.StrEnum):
    OK = "ok"
    FILLING = "filling"  # heading for exhaustion at the current rate
    WARN = "warn"  # past half: connect() is already slower (docs/kernel.md, "Parity")
    DANGER = "danger"
    FULL = "full"


@dataclass(frozen=True)
class Outlook:
    """Per path, the same order as the snapshot's rows."""

    hold_s: np.ndarray  # 0 where the client does not close first
    lifetime_s: np.ndarray
    sustainable_per_s: np.ndarray  # inf where nothing holds a port
    time_to_exhaustion_s: np.ndarray  # nan: not heading there
    verdicts: list[Verdict]


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def outlook(
    snap: PathSnapshot, *, tw_reuse: int, timestamps: int, reuse_delay_ms: int | None
) -> Outlook:
    """The capacity model applied to each path of ``snap`` (``other`` included)."""
    delay = DEFAULT_REUSE_DELAY_S if reuse_delay_ms is None else reuse_delay_ms / 1000
    rate = np.nan_to_num(snap.new_per_s, nan=0.0)
    closes_first = snap.states[:, _TIME_WAIT] > 0
    reuse = np.array(
        [reuse_applies(tw_reuse, timestamps, _loopback(r)) for r in snap.remote], dtype=bool
    )
    hold = np.where(closes_first, np.where(reuse, delay, TIME_WAIT_S), 0.0)
    open_now = snap.states[:, _OPEN].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lifetime = np.where(rate > 0, open_now / rate, 0.0)
        busy = hold + lifetime
        sustainable = np.where(busy > 0, snap.usable / busy, math.inf)
        free = np.maximum(snap.usable - snap.ports, 0)
        filling = (rate > sustainable) & (rate > 0)
        tte = np.where(filling, free / rate, np.nan)
    verdicts = [
        _verdict(float(f), bool(fill))
        for f, fill in zip(snap.occupancy.tolist(), filling.tolist(), strict=True)
    ]
    return Outlook(hold, lifetime, sustainable, tte, verdicts)


def _verdict(fraction: float, filling: bool) -> Verdict:
    if fraction >= 1.0:
        return Verdict.FULL
    if fraction >= DANGER_FRACTION:
        return Verdict.DANGER
    if fraction >= WARN_FRACTION:
        return Verdict.WARN
    return Verdict.FILLING if filling else Verdict.OK
