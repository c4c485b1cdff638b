"""`eph lab --exec`: the user's own client in a lab, observed. Clients are curl and sh."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import eph, write_scenario

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

# an HTTP/1.1 keep-alive server on eph's listener: every request gets an answer, the
# client closes first (TIME_WAIT on the client side); 100 ports, no reuse
SCENARIO = r"""
name = "exec"
duration = "{duration}"

[target]
endpoints = ["127.0.0.1:9000"]

[listener]
response = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
read_request = true
keep_alive = true
close = "wait"

[kernel]
ip_local_port_range = [40000, 40099]
tcp_tw_reuse = 0

[collector]
interval = "100ms"
"""

PER_REQUEST = (
    "bash -c 'ok=0; for i in $(seq 140); do"
    ' curl -s -o /dev/null --max-time 2 "http://$EPH_TARGET/$i" && ok=$((ok+1)); done;'
    " echo $ok'"
)
# one curl, 140 URLs: curl keeps the connection alive between them
POOLED = (
    "curl -s -o /dev/null --max-time 20 -w '%{http_code} %{num_connects}\\n'"
    ' "http://${EPH_TARGET}/[1-140]"'
)


def _lab(tmp_path: Path, command: str, duration: str = "30s") -> tuple[int, str, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    scenario = write_scenario(tmp_path / "exec.toml", SCENARIO.format(duration=duration))
    out = tmp_path / "run"
    result = eph(["lab", str(scenario), "--exec", command, "--out", str(out)], cwd=tmp_path)
    return result.returncode, result.stderr, out


def test_a_client_per_request_exhausts_and_a_pooled_one_does_not(tmp_path: Path) -> None:
    code, stderr, out = _lab(tmp_path / "per-request", PER_REQUEST)
    assert code == 0, stderr
    # 100 ports, then EADDRNOTAVAIL (a few more when a reset ends a TIME_WAIT early)
    assert 100 <= int((out / "exec.stdout").read_text()) <= 105
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "observe"
    assert summary["exhaustion"]["exhausted"] is True
    assert summary["exhaustion"]["path"] == "127.0.0.1 -> 127.0.0.1:9000"
    assert summary["paths"][0]["peak_ports"] == 100
    assert summary["exec"]["exit_code"] == 0
    assert "Ports exhausted on 127.0.0.1 -> 127.0.0.1:9000" in stderr
    lab = json.loads((out / "lab.json").read_text())
    assert lab["sysctls"]["net.ipv4.ip_local_port_range"] == "40000 40099"

    code, stderr, out = _lab(tmp_path / "pooled", POOLED)
    assert code == 0, stderr
    transfers = (out / "exec.stdout").read_text().split("\n")[:-1]
    assert transfers.count("200 0") == 139 and transfers[0] == "200 1"  # one connect, reused
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exhaustion"]["exhausted"] is False
    assert summary["paths"][0]["peak_ports"] == 1  # one connection for 140 requests
    assert (out / "report.html").exists()


def test_a_command_that_is_not_there_is_a_clear_error(tmp_path: Path) -> None:
    code, stderr, out = _lab(tmp_path, "no-such-client --flag")
    assert code == 2
    assert "command not found: 'no-such-client'" in stderr and "Traceback" not in stderr
    assert "--exec 'no-such-client --flag'" in stderr  # what was typed, and where
    assert not out.exists()  # said before any directory, namespace or process was made


def test_a_command_that_fails_at_once_says_so_and_keeps_the_run(tmp_path: Path) -> None:
    code, stderr, out = _lab(tmp_path, "sh -c 'echo no target configured >&2; exit 3'")
    assert code == 2
    assert "exited with code 3 at once" in stderr and "no target configured" in stderr
    assert "Traceback" not in stderr
    recorded = json.loads((out / "exec.json").read_text())
    assert recorded["exit_code"] == 3 and recorded["exited_at_once"] is True
    assert (out / "summary.json").exists()  # the observation is kept


def test_a_command_still_running_at_duration_is_stopped_and_said(tmp_path: Path) -> None:
    code, stderr, out = _lab(tmp_path, "sleep 60", duration="2s")
    assert code == 0, stderr
    assert "still running" in stderr and "stopped at duration" in stderr
    recorded = json.loads((out / "exec.json").read_text())
    assert recorded["stopped_at_duration"] is True and recorded["exit_code"] is None
    assert 1.9 < recorded["ran_s"] < 10


def test_a_tls_listener_hands_its_ca_to_the_command(tmp_path: Path) -> None:
    """listener.tls: the command gets EPH_CA_FILE and curl verifies the listener with it
    (over HTTP/1.1, keep-alive: one connection for three requests)."""
    text = SCENARIO.format(duration="20s").replace(
        'response = "HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok"\n'
        "read_request = true\nkeep_alive = true\n",
        "http = true\ntls = true\n",
    )
    assert "tls = true" in text
    scenario = write_scenario(tmp_path / "tls.toml", text)
    command = (
        'curl -s -o /dev/null --max-time 10 --cacert "$EPH_CA_FILE"'
        " -w '%{http_code} %{num_connects}\\n'"
        ' "https://${EPH_TARGET}/[1-3]"'
    )
    out = tmp_path / "run"
    result = eph(["lab", str(scenario), "--exec", command, "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (out / "exec.stdout").read_text().splitlines()
    assert lines == ["200 1", "200 0", "200 0"], lines


NAT_EXEC = r"""
name = "exec-nat"
duration = "30s"

[target]
endpoints = ["127.0.0.1:9000"]

[listener]
response = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
read_request = true
close = "wait"

[collector]
interval = "100ms"

[lab]
topology = "nat"

[lab.nat]
ports = [20000, 20019]
hold_time_wait = true
tcp_timeout_time_wait = "60s"
"""

# 40 connections through a 20-port pool that holds each port 60 s after close: the
# first 20 get through, the NAT drops the SYNs of the rest (curl gives up after 0.3 s)
THROUGH_THE_NAT = (
    "bash -c 'ok=0; for i in $(seq 40); do curl -s -o /dev/null --connect-timeout 0.3"
    ' "http://$EPH_TARGET/$i" && ok=$((ok+1)); done; echo $ok\''
)


def test_a_client_through_the_nat_topology_gets_the_nat_section(tmp_path: Path) -> None:
    """eph lab --exec in the nat topology samples the router's pool as a run does: the
    observation's summary and report name the NAT's exhaustion, not the client's ports."""
    from .conftest import require_tools

    require_tools("nft", "conntrack")
    scenario = write_scenario(tmp_path / "nat-exec.toml", NAT_EXEC)
    out = tmp_path / "run"
    result = eph(["lab", str(scenario), "--exec", THROUGH_THE_NAT, "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int((out / "exec.stdout").read_text()) == 20
    nat = json.loads((out / "summary.json").read_text())["nat"]
    assert nat is not None and nat["exhausted"] is True, nat
    (pool,) = nat["destinations"]
    assert pool["peak_in_use"] == 20 and pool["pool_ports"] == 20
    assert sum(nat["drops"].values()) > 0
    assert "NAT pool exhausted" in result.stderr  # the findings, echoed
    assert "NAT pool exhausted" in (out / "report.html").read_text()
