"""The outlook per path (hold, lifetime, time to exhaustion, verdict) and how views show it."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from rich.console import Console

from harness.kernel.sockdiag import TcpState
from harness.observe.outlook import Verdict, outlook
from harness.observe.paths import STATES, PathSnapshot
from harness.observe.session import HostView, Settings
from harness.observe.views import PlainView, TerminalView

TW = STATES.index(TcpState.TIME_WAIT)
EST = STATES.index(TcpState.ESTABLISHED)


def _snapshot(remote: str, ports: int, time_wait: int, established: int, new: int) -> PathSnapshot:
    states = np.zeros((1, len(STATES)), dtype=np.int64)
    states[0, TW], states[0, EST] = time_wait, established
    return PathSnapshot(
        time=100.0,
        protocol=np.array([6], np.uint8),
        local=["10.0.0.1"],
        remote=[remote],
        remote_port=np.array([443], np.uint16),
        states=states,
        ports=np.array([ports]),
        new=np.array([new]),
        usable=1000,
        paths_total=1,
        sockets=ports,
        interval_s=1.0,
    )


def test_client_closing_first_without_reuse_holds_sixty_seconds_and_fills() -> None:
    snap = _snapshot("10.0.0.9", ports=400, time_wait=390, established=10, new=100)
    look = outlook(snap, tw_reuse=0, timestamps=1, reuse_delay_ms=None)
    assert look.hold_s[0] == 60.0
    assert look.lifetime_s[0] == pytest.approx(0.1)  # 10 open / 100 per second
    assert look.sustainable_per_s[0] == pytest.approx(1000 / 60.1)
    assert look.time_to_exhaustion_s[0] == pytest.approx(6.0)  # 600 free at 100/s
    assert look.verdicts == [Verdict.FILLING]


@pytest.mark.parametrize(
    ("remote", "tw_reuse", "timestamps", "hold"),
    [
        ("127.0.0.1", 2, 1, 1.0),  # 2: loopback only, and this is loopback
        ("10.0.0.9", 2, 1, 60.0),  # 2 does not apply off loopback
        ("10.0.0.9", 1, 1, 1.0),
        ("10.0.0.9", 1, 0, 60.0),  # reuse needs timestamps
    ],
)
def test_reuse_rules_set_the_hold(remote: str, tw_reuse: int, timestamps: int, hold: float) -> None:
    snap = _snapshot(remote, ports=100, time_wait=100, established=0, new=50)
    look = outlook(snap, tw_reuse=tw_reuse, timestamps=timestamps, reuse_delay_ms=None)
    assert look.hold_s[0] == hold


def test_server_closing_first_holds_nothing_and_never_fills() -> None:
    snap = _snapshot("10.0.0.9", ports=5, time_wait=0, established=5, new=5000)
    look = outlook(snap, tw_reuse=0, timestamps=1, reuse_delay_ms=None)
    assert look.hold_s[0] == 0.0
    assert math.isnan(look.time_to_exhaustion_s[0])
    assert look.verdicts == [Verdict.OK]


@pytest.mark.parametrize(
    ("ports", "verdict"),
    [(499, Verdict.FILLING), (500, Verdict.WARN), (800, Verdict.DANGER), (1000, Verdict.FULL)],
)
def test_verdicts_follow_occupancy(ports: int, verdict: Verdict) -> None:
    snap = _snapshot("10.0.0.9", ports=ports, time_wait=ports, established=0, new=100)
    assert outlook(snap, tw_reuse=0, timestamps=1, reuse_delay_ms=None).verdicts == [verdict]


def _host() -> HostView:
    settings = Settings((40000, 40999), "40100", 0, 1, None, 262144)
    counters: dict[str, int | None] = {
        "sockstat_tw": 400,
        "timewait_overflow": 0,
        "conntrack_count": 7,
    }
    return HostView(settings, counters, {"tw_recycled": 0.0, "active_opens": 100.0}, 3.2)


def test_the_views_show_path_occupancy_rate_and_verdict() -> None:
    snap = _snapshot("10.0.0.9", ports=400, time_wait=390, established=10, new=100)
    look = outlook(snap, tw_reuse=0, timestamps=1, reuse_delay_ms=None)
    plain = io.StringIO()
    PlainView(stream=plain, every_s=0).show(snap, look, _host())
    text = plain.getvalue()
    assert "10.0.0.1 -> 10.0.0.9:443: 400/1000 ports (40%)" in text
    assert "new 100/s, exhausted in 6.0 s: filling" in text
    assert "reserved 40100" in text and "conntrack 7/262144" in text

    console = Console(file=io.StringIO(), width=160, record=True, force_terminal=True)
    view = TerminalView(console=console)
    view.show(snap, look, _host())
    view.close()
    screen = console.export_text()
    for shown in ("10.0.0.1 -> 10.0.0.9:443", "400/1,000", "tw 390", "6.0 s", "filling", "40%"):
        assert shown in screen, shown
