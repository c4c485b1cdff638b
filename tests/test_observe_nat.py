"""``eph observe`` on a NAT router: the SNAT pool per destination."""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from harness.kernel.conntrack import CT_DTYPE, IPS_SRC_NAT, CtState
from harness.observe.nat_pools import NatPoolRow, NatSampler, NatSnapshot, nat_lines, nat_pools
from harness.observe.outlook import outlook
from harness.observe.views import PlainView, TerminalView

from .conftest import EPH, ROOT
from .natlab import NAT_ADDRESS, SERVER, hold, nat_lab
from .test_outlook import _host, _snapshot


def _table(rows: list[tuple[str, int, str, int, CtState, int]]) -> np.ndarray:
    """(dst, dport, nat address, nat port, state, status) rows as a conntrack dump."""
    out = np.zeros(len(rows), CT_DTYPE)
    for i, (dst, dport, nat, port, state, status) in enumerate(rows):
        out[i]["family"] = 2
        out[i]["orig_dst"] = ipaddress.ip_address(dst).packed + bytes(12)
        out[i]["orig_dport"] = dport
        out[i]["reply_dst"] = ipaddress.ip_address(nat).packed + bytes(12)
        out[i]["reply_dport"] = port
        out[i]["state"] = state
        out[i]["status"] = status
    return out


EST, TW = CtState.ESTABLISHED, CtState.TIME_WAIT
TABLE = _table(
    [
        ("10.0.0.1", 80, "198.51.100.1", 20000, EST, IPS_SRC_NAT),
        ("10.0.0.1", 80, "198.51.100.1", 20001, EST, IPS_SRC_NAT),
        ("10.0.0.1", 80, "198.51.100.1", 20002, TW, IPS_SRC_NAT),
        ("10.0.0.1", 80, "198.51.100.1", 20003, CtState.CLOSE, IPS_SRC_NAT),
        ("10.0.0.1", 443, "198.51.100.1", 20000, TW, IPS_SRC_NAT),
        ("10.0.0.1", 80, "198.51.100.2", 20009, EST, IPS_SRC_NAT),
        ("10.0.0.9", 80, "10.0.0.9", 5000, EST, 0),  # not NATed: not a pool's
    ]
)


def test_snat_flows_group_per_destination_and_nat_address() -> None:
    assert nat_pools(TABLE) == [
        NatPoolRow("10.0.0.1:80", "198.51.100.1", 2, 1, 20000, 20003),
        NatPoolRow("10.0.0.1:80", "198.51.100.2", 1, 0, 20009, 20009),
        NatPoolRow("10.0.0.1:443", "198.51.100.1", 0, 1, 20000, 20000),
    ]
    assert nat_pools(TABLE[-1:]) == []


def test_the_sampler_reports_growth_and_says_once_when_there_is_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tables = [TABLE, TABLE[-1:], TABLE[-1:], TABLE]
    counts = iter([{"insert_failed": 5, "drop": 9}, *[{"insert_failed": 8, "drop": 20}] * 3])
    sampler = NatSampler(lambda: None, lambda: tables.pop(0), lambda proc: next(counts))
    sampler.recheck_s = 0.0
    with caplog.at_level(logging.DEBUG, logger="harness.observe.nat_pools"):
        first = sampler.sample()
        assert first is not None and first.insert_failed is None
        assert sampler.sample() is None and sampler.sample() is None
        last = sampler.sample()
    assert last is not None and (last.insert_failed, last.drop) == (0, 0)
    assert sum("no source-NATed flow" in r.message for r in caplog.records) == 1
    lines = nat_lines(last)
    busiest = "10.0.0.1:80 via 198.51.100.1: 2 ports in use, 1 in TIME_WAIT (ports 20000-20003)"
    assert lines[1] == busiest


def test_without_conntrack_the_sampler_looks_once(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def dump() -> np.ndarray:
        calls.append(1)
        return TABLE

    sampler = NatSampler(lambda: "conntrack is not loaded", dump, lambda proc: {})
    with caplog.at_level(logging.DEBUG, logger="harness.observe.nat_pools"):
        assert [sampler.sample() for _ in range(3)] == [None] * 3
    assert calls == []
    assert sum("not loaded" in r.message for r in caplog.records) == 1


def test_without_snat_flows_the_table_is_read_again_only_after_recheck_s() -> None:
    now = [0.0]
    dumps: list[float] = []

    def dump() -> np.ndarray:
        dumps.append(now[0])
        return TABLE[-1:] if now[0] < 25 else TABLE

    sampler = NatSampler(lambda: None, dump, lambda proc: {}, clock=lambda: now[0])
    seen = []
    for step in range(31):
        now[0] = float(step)
        seen.append(sampler.sample() is not None)
    assert dumps[:3] == [0.0, 10.0, 20.0] and dumps[3] == 30.0
    assert seen.index(True) == 30


def test_both_views_show_the_pools_under_the_host_line() -> None:
    snap = _snapshot("10.0.0.9", ports=4, time_wait=0, established=4, new=1)
    look = outlook(snap, tw_reuse=0, timestamps=1, reuse_delay_ms=None)
    pools = NatSnapshot(nat_pools(TABLE), 10, 12, 4.2)
    host = dataclasses.replace(_host(), nat=pools)
    plain = io.StringIO()
    PlainView(stream=plain, every_s=0).show(snap, look, host)
    console = Console(file=io.StringIO(), width=160, record=True, force_terminal=True)
    view = TerminalView(console=console)
    view.show(snap, look, host)
    view.close()
    for text in (plain.getvalue(), console.export_text()):
        assert "NAT pool (conntrack): insert_failed +10, drop +12; sample 4.2 ms" in text
        assert "10.0.0.1:443 via 198.51.100.1: 0 ports in use, 1 in TIME_WAIT" in text


@pytest.mark.netns
@pytest.mark.e2e
def test_observe_in_the_router_shows_the_held_connections(tmp_path: Path) -> None:
    count = 30
    with nat_lab() as lab, hold(lab, count) as (connected, _):
        assert connected == count
        result = subprocess.run(
            lab.router.command([*EPH, "observe", "--duration", "1s", "--interval", "250ms"]),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
    assert result.returncode == 0, result.stderr
    line = f"{SERVER}:{lab.port} via {NAT_ADDRESS}: {count} ports in use, 0 in TIME_WAIT"
    assert line in result.stdout, result.stdout
    assert "NAT pool (conntrack): insert_failed -, drop -" in result.stdout
