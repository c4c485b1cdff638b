"""``eph observe`` on a NAT router: the SNAT pool per destination."""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from harness.kernel.conntrack import CT_DTYPE, IPS_SRC_NAT, CtState
from harness.kernel.netns import Namespace
from harness.kernel.nft import DEFAULT_PORTS, NatRule, pool_ports
from harness.observe.nat_pools import NatPoolRow, NatSampler, NatSnapshot, nat_lines, nat_pools
from harness.observe.outlook import outlook
from harness.observe.views import PlainView, TerminalView

from .conftest import EPH, ROOT, require_tools
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
    sampler = NatSampler(
        lambda: None, lambda: tables.pop(0), lambda proc: next(counts), rules=lambda: []
    )
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

    sampler = NatSampler(
        lambda: None, dump, lambda proc: {}, clock=lambda: now[0], rules=lambda: []
    )
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
    """Held through an nft `snat to NAT_ADDRESS:20000-20099`: the pool's 100 ports, 30
    of them used, in the terminal's lines, Prometheus and --out."""
    count, out = 30, tmp_path / "obs"
    args = ["observe", "--duration", "3s", "--interval", "250ms", "--out", str(out),
            "--no-report", "--prometheus", "127.0.0.1:0"]  # fmt: skip
    with nat_lab() as lab, hold(lab, count) as (connected, _):
        assert connected == count
        observer = subprocess.Popen(
            lab.router.command([*EPH, *args]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        try:
            assert observer.stderr is not None
            found = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", observer.stderr.readline())
            assert found
            time.sleep(0.8)  # a few samples
            scrape = subprocess.run(
                lab.router.command(
                    [sys.executable, "-c", "import sys, urllib.request; sys.stdout.write("
                     f"urllib.request.urlopen('http://127.0.0.1:{found.group(1)}/metrics')"
                     ".read().decode())"]
                ),
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout  # fmt: skip
            stdout, stderr = observer.communicate(timeout=30)
        finally:
            observer.kill()
            observer.wait()
    assert observer.returncode == 0, stderr
    line = f"{SERVER}:{lab.port} via {NAT_ADDRESS}: {count} ports in use of 100 (30%), 0 in"
    assert line in stdout, stdout
    assert "NAT pool (conntrack): insert_failed -, drop -" in stdout
    labels = f'destination="{SERVER}:{lab.port}",nat_address="{NAT_ADDRESS}"'
    assert f"eph_nat_ports_in_use{{{labels}}} {count}.0" in scrape, scrape
    assert f"eph_nat_pool_ports{{{labels}}} 100.0" in scrape, scrape
    last = pq.read_table(out / "host.parquet").to_pylist()[-1]
    assert last["nat"] == [
        {"destination": f"{SERVER}:{lab.port}", "nat_address": NAT_ADDRESS, "in_use": count,
         "time_wait": 0, "low_port": last["nat"][0]["low_port"],
         "high_port": last["nat"][0]["high_port"], "pool": 100}
    ]  # fmt: skip
    assert 20000 <= last["nat"][0]["low_port"] <= last["nat"][0]["high_port"] <= 20099
    assert (last["nat_insert_failed"], last["nat_drop"]) == (0, 0)


# every form of source NAT nft has, as nft itself prints it back as JSON
RULESET = """
table ip t {
 chain post {
  type nat hook postrouting priority srcnat;
  oifname "x0" meta l4proto tcp snat to 198.51.100.1:20000-20099
  oifname "x1" meta l4proto tcp masquerade to :30000-30099
  oifname "x2" masquerade
  oifname "x3" snat ip to 10.0.0.1-10.0.0.4
  tcp dport 9 snat ip to numgen inc mod 2 map { 0 : 10.1.0.1, 1 : 10.1.0.2 } : 40000-40999
  oifname "x5" meta l4proto tcp snat ip to 10.2.0.1:50000
 }
}
table ip6 t6 {
 chain post {
  type nat hook postrouting priority srcnat;
  meta l4proto tcp snat ip6 to [2001:db8::1]:5000-5999
 }
}
"""


@pytest.mark.netns
def test_the_pools_are_read_from_nfts_own_rules(netns: Namespace) -> None:
    require_tools("nft")
    subprocess.run(netns.command(["nft", "-f", "-"]), input=RULESET, text=True, check=True)
    script = (
        "import json; from harness.kernel.nft import read_nat_rules;"
        "print(json.dumps([[sorted(r.addresses or []), r.low, r.high] for r in read_nat_rules()]))"
    )
    found = subprocess.run(
        netns.command([sys.executable, "-c", script]), capture_output=True, text=True,
        check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    rules = [NatRule(frozenset(a) or None, low, high) for a, low, high in json.loads(found.stdout)]
    assert rules == [
        NatRule(frozenset({"198.51.100.1"}), 20000, 20099),
        NatRule(None, 30000, 30099),  # masquerade: the outgoing interface's address
        NatRule(None, *DEFAULT_PORTS),
        NatRule(frozenset(f"10.0.0.{i}" for i in range(1, 5)), *DEFAULT_PORTS),
        NatRule(frozenset({"10.1.0.1", "10.1.0.2"}), 40000, 40999),
        NatRule(frozenset({"10.2.0.1"}), 50000, 50000),
        NatRule(frozenset({"2001:db8::1"}), 5000, 5999),
    ]
    assert pool_ports(rules, "198.51.100.1") == 100
    assert pool_ports(rules[3:], "10.0.0.3") == 64512
    assert pool_ports(rules[4:], "2001:db8::1") == 1000
    assert pool_ports(rules[4:], "192.0.2.1") is None
    assert pool_ports(rules, "192.0.2.1") == 100  # the first masquerade takes any address


def test_the_view_gives_each_pool_its_size_and_says_time_wait_holds_nothing() -> None:
    sampler = NatSampler(
        lambda: None, lambda: TABLE, lambda proc: {},
        rules=lambda: [NatRule(frozenset({"198.51.100.1"}), 20000, 20003)],
    )  # fmt: skip
    snapshot = sampler.sample()
    assert snapshot is not None
    assert [r.pool for r in snapshot.rows] == [4, None, 4]
    lines = nat_lines(snapshot)
    assert lines[1] == (
        "10.0.0.1:80 via 198.51.100.1: 2 ports in use of 4 (50%), 1 in TIME_WAIT"
        " (ports 20000-20003)"
    )
    assert lines[2].startswith("10.0.0.1:80 via 198.51.100.2: 1 ports in use, 0 in TIME_WAIT")
    assert lines[-1].startswith("TIME_WAIT entries hold no port on Linux's own SNAT")
    unreadable = NatSampler(lambda: None, lambda: TABLE, lambda proc: {}, rules=lambda: "no nft")
    assert unreadable.sample() is not None  # the pools, without their size
