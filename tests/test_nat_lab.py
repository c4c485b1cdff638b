"""The nat topology end to end: a router namespace SNATs the clients to a small pool,
and the client sees timeouts, never EADDRNOTAVAIL, while its own range stays empty."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.report.html import findings
from harness.summary import Summary

from .conftest import eph, lab_under_way, require_tools, run_dir_summary, write_scenario

pytestmark = [
    pytest.mark.netns,
    pytest.mark.e2e,
]

POOL_100 = "ports = [20000, 20099]"


def _nat_lab(
    tmp_path: Path,
    *,
    load: str,
    nat: str = POOL_100,
    endpoints: str = '["127.0.0.1:9000"]',
    duration: str = "4s",
) -> dict[str, Any]:
    require_tools("nft", "conntrack")  # under make test a missing one fails, never skips
    scenario = write_scenario(
        tmp_path / "nat.toml",
        f"""
name = "nat-test"
duration = "{duration}"
[target]
endpoints = {endpoints}
[listener]
[load]
spawn_rate = 1000
connect_timeout = "2s"
close = "client"
{load}
[lab]
topology = "nat"
[lab.nat]
{nat}
""",
    )
    out = tmp_path / "run"
    result = eph(["lab", str(scenario), "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = run_dir_summary(out)
    assert summary["conservation"]["ok"] is True, summary["conservation"]
    summary["findings"] = "\n".join(findings(Summary.load(out / "summary.json")))  # the report's
    return summary


def _held(users: int) -> str:
    """Every user connects once and holds its flow past the run's end."""
    return f'users = {users}\nhold = "6s"'


def _only_timeouts(summary: dict[str, Any]) -> None:
    """Connects the full pool dropped time out (2 s each); one still waiting when the
    run stops is cancelled, which depends on when each load process started."""
    errors = set(summary["connections"]["errors"])
    assert "ETIMEDOUT" in errors and errors <= {"ETIMEDOUT", "ECANCELED"}, summary["connections"]
    assert summary["exhaustion"]["exhausted"] is False  # never EADDRNOTAVAIL on the client


def test_a_100_port_pool_holds_100_flows_then_connects_time_out(tmp_path: Path) -> None:
    summary = _nat_lab(tmp_path, load=_held(120))
    assert summary["connections"]["succeeded"] == 100
    assert summary["listener"]["accepted"] == 100
    _only_timeouts(summary)
    nat = summary["nat"]
    assert nat["exhausted"] is True
    [pool] = nat["destinations"]
    assert (pool["pool_ports"], pool["peak_in_use"], pool["peak_live"]) == (100, 100, 100)
    assert nat["drops"]["insert_failed"] >= 20  # 20 users, each SYN and its retransmission
    assert nat["client_peak_fraction"] < 0.01  # the client's own range: nowhere near full
    assert "NAT pool exhausted: 198.51.100.1:20000-20099" in summary["findings"]
    assert "The target was unreachable" not in summary["findings"]  # not an outage


def test_two_nat_addresses_give_200(tmp_path: Path) -> None:
    nat = f'addresses = ["198.51.100.1", "198.51.100.2"]\n{POOL_100}'
    summary = _nat_lab(tmp_path, load=_held(220), nat=nat)
    assert summary["connections"]["succeeded"] == 200
    _only_timeouts(summary)
    assert summary["nat"]["destinations"][0]["peak_in_use"] == 200


def test_two_destinations_give_200(tmp_path: Path) -> None:
    endpoints = '["127.0.0.1:9000", "127.0.0.1:9001"]'
    summary = _nat_lab(tmp_path, load=_held(220), endpoints=endpoints)
    assert summary["connections"]["succeeded"] == 200
    _only_timeouts(summary)
    pools = {d["destination"]: d["peak_in_use"] for d in summary["nat"]["destinations"]}
    assert pools == {"198.19.0.2:9000": 100, "198.19.0.2:9001": 100}


@pytest.mark.parametrize("hold", [True, False])
def test_time_wait_holds_the_pool_only_where_the_nat_keeps_it(tmp_path: Path, hold: bool) -> None:
    """Short flows at 100/s on 100 ports with a 30 s NAT TIME_WAIT: a cloud NAT's pool is
    gone after 1 s; Linux 6.5+ hands each TIME_WAIT port to the next SYN instead."""
    nat = f'{POOL_100}\ntcp_timeout_time_wait = "30s"\nhold_time_wait = {str(hold).lower()}'
    summary = _nat_lab(tmp_path, load="users = 50\nrate = 100", nat=nat)
    nat_section = summary["nat"]
    [pool] = nat_section["destinations"]
    if hold:
        assert summary["connections"]["succeeded"] == 100
        _only_timeouts(summary)
        assert nat_section["exhausted_at_s"] == pytest.approx(1.0, rel=0.05)
        assert nat_section["drops"]["held_drops"] > 0
        assert pool["peak_held"] == 100
    else:
        assert summary["connections"]["failed"] == 0
        assert summary["connections"]["succeeded"] > 300
        assert pool["peak_time_wait"] >= 90  # held nothing: each was taken over
        assert nat_section["exhausted"] is False
        assert "TIME_WAIT entries held nothing" in summary["findings"]


@pytest.mark.parametrize(
    ("rate", "hold", "nat", "busy_s"),
    [
        (100, "2s", POOL_100, 2.0),  # Linux: live flows hold the pool
        (200, "1s", POOL_100, 1.0),
        (100, "0s", f'{POOL_100}\nhold_time_wait = true\ntcp_timeout_time_wait = "2s"', 2.0),
    ],
    ids=["live-flows-2s", "live-flows-1s", "held-time-wait-2s"],
)
@pytest.mark.paced  # the sustained rate, against the model's
def test_the_model_predicts_exhaustion_and_the_sustained_rate(
    tmp_path: Path, rate: int, hold: str, nat: str, busy_s: float
) -> None:
    # one process: two start their pacing tens of ms apart, which the time to exhaustion
    # measured shows; the model is the subject, not the spread over processes
    load = f'users = 400\nrate = {rate}\nhold = "{hold}"\nprocesses = 1'
    summary = _nat_lab(tmp_path, load=load, nat=nat, duration="8s")
    found = summary["nat"]
    assert found["exhausted"] is True
    assert found["exhausted_at_s"] == pytest.approx(found["model_exhausted_at_s"], rel=0.05)
    assert found["model_exhausted_at_s"] == pytest.approx(100 / rate, rel=0.01)
    sustained = found["sustained_rate_per_s"]
    assert sustained == pytest.approx(found["model_max_rate_per_s"], rel=0.05)
    assert found["model_max_rate_per_s"] == pytest.approx(100 / busy_s, rel=0.02)


def test_conntrack_max_limits_the_routers_flows(tmp_path: Path) -> None:
    summary = _nat_lab(tmp_path, load=_held(70), nat=f"{POOL_100}\nconntrack_max = 50")
    assert summary["connections"]["succeeded"] == 50
    _only_timeouts(summary)


def _eph_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.startswith("eph-")}


def test_sigint_removes_the_router_its_rules_and_every_namespace(tmp_path: Path) -> None:
    require_tools("nft", "conntrack")
    scenario = write_scenario(
        tmp_path / "long.toml",
        f"""
name = "long-nat"
duration = "60s"
[target]
endpoints = ["127.0.0.1:9000"]
[listener]
[load]
users = 5
rate = 100
[lab]
topology = "nat"
[lab.nat]
{POOL_100}
hold_time_wait = true
""",
    )
    out = tmp_path / "run"
    proc = lab_under_way(scenario, out)
    try:
        namespaces = json.loads((out / "lab.json").read_text())["namespaces"]
        assert len(namespaces) == 3 and set(namespaces) <= _eph_namespaces()
        router = namespaces[2]
        rules = subprocess.run(
            ["ip", "netns", "exec", router, "nft", "list", "table", "ip", "eph_nat"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert "set busy" in rules.stdout, rules.stderr
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-2000:]
    summary = run_dir_summary(out)
    assert summary["interrupted"] is True
    assert summary["nat"]["destinations"][0]["peak_in_use"] > 0
    assert not set(namespaces) & _eph_namespaces()
    host = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    assert "eph_nat" not in host.stdout  # the rules lived in the router only
