"""What deploy/ ships, checked by the tools that will read it: Prometheus' own
(promtool) for the alert rules and their tests, systemd's for the unit, and the
Kubernetes API's schemas (kubernetes-validate, offline) for the manifest."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from harness.kernel.namespaces import host_namespaces

from .conftest import ROOT, require_tools

DEPLOY = ROOT / "deploy"


def _run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


# what the rules must cover: exhaustion soon, past half the range, failed connects
# (counted and traced), a NAT pool past 90 % and NAT insert failures, conntrack past 75 %
ALERTS = [
    "EphPathExhaustionSoon",
    "EphPathPastHalfRange",
    "EphConnectFailures",
    "EphTracedConnectFailures",
    "EphNatPortsExhausted",
    "EphNatPoolNearlyFull",
    "EphConntrackNearlyFull",
]


def test_the_alert_rules_load_in_prometheus() -> None:
    require_tools("promtool")
    done = _run(["promtool", "check", "rules", "eph-rules.yml"], cwd=DEPLOY / "prometheus")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout, done.stdout


def test_each_alert_fires_and_stays_quiet_in_promtools_own_tests() -> None:
    require_tools("promtool")
    done = _run(["promtool", "test", "rules", "eph-rules.test.yml"], cwd=DEPLOY / "prometheus")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout, done.stdout


def test_every_alert_has_a_test_of_its_own() -> None:
    rules = (DEPLOY / "prometheus" / "eph-rules.yml").read_text()
    tests = (DEPLOY / "prometheus" / "eph-rules.test.yml").read_text()
    alerts = [line.split(":", 1)[1].strip() for line in rules.splitlines() if "- alert:" in line]
    assert sorted(alerts) == sorted(ALERTS)
    for alert in alerts:
        assert f"alertname: {alert}" in tests, alert


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze only warns on an unknown key: any word from it fails the test.
    ExecStart points at this checkout's eph, so that verify can find it."""
    require_tools("systemd-analyze")
    unit = (DEPLOY / "systemd" / "eph-observe.service").read_text()
    eph = Path(sys.executable).with_name("eph")
    assert "ExecStart=/opt/eph/.venv/bin/eph observe" in unit
    here = tmp_path / "eph-observe.service"
    here.write_text(unit.replace("/opt/eph/.venv/bin/eph", str(eph)))
    done = _run(["systemd-analyze", "verify", str(here)])
    assert done.returncode == 0 and not done.stderr.strip(), done.stdout + done.stderr


@pytest.mark.e2e
def test_the_systemd_units_command_runs_as_eph_observe(tmp_path: Path) -> None:
    """The unit's own arguments, run for 2 s: its state directory and Prometheus
    address moved to this test's (any free port), and --duration added, which the unit
    leaves out so that it runs until stopped. --help would not check the values."""
    unit = (DEPLOY / "systemd" / "eph-observe.service").read_text()
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    assert "--duration" not in line
    args = line.split()[1:]  # after the program
    args = [a.replace("/var/lib/eph", str(tmp_path)).replace("0.0.0.0:9465", "127.0.0.1:0")
            for a in args]  # fmt: skip
    eph = Path(sys.executable).with_name("eph")
    done = _run([str(eph), *args, "--duration", "2s", "--no-report"])
    assert done.returncode == 0, done.stderr
    assert "stopped by duration" in done.stderr
    assert (tmp_path / "observe" / "host.parquet").exists()


def test_the_kubernetes_manifest_validates() -> None:
    validate = shutil.which("kubernetes-validate") or str(
        Path(sys.executable).with_name("kubernetes-validate")
    )
    done = _run([validate, "--strict", str(DEPLOY / "kubernetes" / "eph-observe.yaml")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "daemonset/eph-observe" in done.stdout + done.stderr


@pytest.mark.e2e
def test_the_daemonsets_arguments_run_as_eph_observe(tmp_path: Path) -> None:
    """The container's own arguments (every namespace, Prometheus), run for 2 s here:
    the Prometheus address moved to any free loopback port; --duration, --out and a
    wide --top added to find this test's own connection among the host's."""
    manifest = (DEPLOY / "kubernetes" / "eph-observe.yaml").read_text()
    block = manifest.split("args:\n", 1)[1].split("ports:", 1)[0]
    args = [line.split("#")[0].strip()[2:].strip() for line in block.splitlines()]
    args = [a.replace("0.0.0.0:9465", "127.0.0.1:0") for a in args if a]
    assert args[0] == "observe" and "--all-namespaces" in args and "--duration" not in args
    eph = Path(sys.executable).with_name("eph")
    out = tmp_path / "obs"
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)), server.accept()[0]:
            done = _run(
                [str(eph), *args, "--duration", "2s", "--top", "1000", "--out", str(out),
                 "--no-report"], cwd=tmp_path,
            )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "stopped by duration" in done.stderr
    rows = pq.read_table(out / "paths.parquet").to_pylist()
    mine = [r for r in rows if r["remote_port"] == port and r["local"] == "127.0.0.1"]
    own = os.stat("/proc/self/ns/net").st_ino
    (label,) = [ns.label for ns in host_namespaces() if ns.inode == own]
    assert mine and {r["netns"] for r in mine} == {label}
    assert all(r["label"] == f"{r['netns']}: 127.0.0.1 -> 127.0.0.1:{port}" for r in mine)
