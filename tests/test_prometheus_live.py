"""A real Prometheus (Debian's) scraping `eph observe` while a plain Python client
exhausts a 600-port range in a namespace: the shipped alert fires for that path
before the client's first EADDRNOTAVAIL, every panel of the shipped dashboard
returns data, and promtool accepts the scrape taken at exhaustion."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness.kernel.netns import Namespace

from .conftest import EPH, ROOT, require_tools, stop_process

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
DEPLOY = ROOT / "deploy"
EPH_PORT, PROMETHEUS_PORT = 9465, 19090  # a fresh namespace: nothing else listens there
RATE = 50  # connects a second: 600 ports last 12 s, the alert's lead time to show in

# A plain client: a new connection per request, closed first by the client (so each
# port waits in TIME_WAIT), RATE a second toward 127.0.0.1:7000, until the range
# refuses 20 connects or 40 s pass. Prints when the first refusal came.
CLIENT = r"""
import errno, json, socket, sys, threading, time
rate = int(sys.argv[1])
server = socket.socket(); server.bind(("127.0.0.1", 7000)); server.listen(512)
def serve():
    while True:
        a, _ = server.accept()
        a.recv(1)
        a.close()
threading.Thread(target=serve, daemon=True).start()
made, refused, first = 0, 0, None
start = time.time()
while refused < 20 and time.time() - start < 40:
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", 7000))
        made += 1
    except OSError as e:
        if e.errno != errno.EADDRNOTAVAIL:
            raise
        refused += 1
        first = first or time.time()
    finally:
        s.close()
    time.sleep(max(0.0, start + (made + refused) / rate - time.time()))
print(json.dumps({"made": made, "refused": refused, "first_refusal": first}), flush=True)
"""


def _rules_for_a_test(tmp_path: Path) -> Path:
    """The shipped rules with every ``for:`` cut to 1 s: minutes would outlast the test."""
    text = (DEPLOY / "prometheus" / "eph-rules.yml").read_text()
    quick, n = re.subn(r"(?m)^(\s+)for: \S+$", r"\1for: 1s", text)
    assert n >= 3, "the rules lost their for: clauses"
    path = tmp_path / "eph-rules.yml"
    path.write_text(quick)
    return path


def _get(netns: Namespace, path: str, port: int = PROMETHEUS_PORT) -> str:
    done = subprocess.run(
        netns.command(["curl", "-sfg", f"http://127.0.0.1:{port}{path}"]),
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    return done.stdout


def _query(netns: Namespace, expr: str) -> list[Any]:
    done = subprocess.run(
        netns.command(
            ["curl", "-sfG", f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query",
             "--data-urlencode", f"query={expr}"]
        ),
        capture_output=True, text=True, timeout=20, check=True,
    )  # fmt: skip
    answer = json.loads(done.stdout)
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def _has_data(netns: Namespace, expr: str, start: float) -> bool:
    """As Grafana draws a panel: the expression over a time range, any point in it."""
    done = subprocess.run(
        netns.command(
            ["curl", "-sfG", f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query_range",
             "--data-urlencode", f"query={expr}", "--data-urlencode", f"start={start}",
             "--data-urlencode", f"end={time.time()}", "--data-urlencode", "step=1"]
        ),
        capture_output=True, text=True, timeout=20, check=True,
    )  # fmt: skip
    answer = json.loads(done.stdout)
    assert answer["status"] == "success", answer
    return any(series["values"] for series in answer["data"]["result"])


def _firing(netns: Namespace, alert: str, remote: str) -> bool:
    alerts = json.loads(_get(netns, "/api/v1/alerts"))["data"]["alerts"]
    return any(
        a["labels"].get("alertname") == alert
        and a["labels"].get("remote") == remote
        and a["state"] == "firing"
        for a in alerts
    )


def _panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "eph-observe.json").read_text())
    return [
        (panel["title"], target["expr"].replace("$instance", ".*"))
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def test_a_real_prometheus_fires_the_alert_before_the_first_refusal_and_fills_the_dashboard(
    netns: Namespace, tmp_path: Path
) -> None:
    with contextlib.ExitStack() as stack:
        _alert_and_dashboard(netns, tmp_path, stack)


def _alert_and_dashboard(netns: Namespace, tmp_path: Path, stack: contextlib.ExitStack) -> None:
    require_tools("prometheus", "promtool", "curl")
    for name, value in (("ip_local_port_range", "40000 40599"), ("tcp_tw_reuse", "0")):
        subprocess.run(netns.command(["sysctl", "-qw", f"net.ipv4.{name}={value}"]), check=True)
    subprocess.run(netns.command(["ip", "link", "set", "lo", "up"]), check=True)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{_rules_for_a_test(tmp_path)}]\n"
        "scrape_configs:\n"
        f"  - job_name: eph\n    static_configs: [{{targets: ['127.0.0.1:{EPH_PORT}']}}]\n"
    )
    logs = {
        name: stack.enter_context((tmp_path / f"{name}.log").open("w"))
        for name in ("observe", "prometheus")
    }
    observer = subprocess.Popen(
        netns.command(
            [*EPH, "observe", "--interval", "250ms", "--plain",
             "--prometheus", f"127.0.0.1:{EPH_PORT}"]
        ),
        stdout=subprocess.DEVNULL, stderr=logs["observe"], env=ENV,
    )  # fmt: skip
    prometheus = subprocess.Popen(
        netns.command(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}", "--log.level=warn"]
        ),
        stdout=subprocess.DEVNULL, stderr=logs["prometheus"],
    )  # fmt: skip
    client: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 60  # a bound on the test, not a figure
        while True:  # Prometheus has scraped eph once: the path will be seen from its start
            assert observer.poll() is None and prometheus.poll() is None, (
                tmp_path / "prometheus.log"
            ).read_text()
            try:
                if _query(netns, "eph_build_info"):
                    break
            except subprocess.CalledProcessError:
                pass  # not listening yet
            assert time.monotonic() < deadline, "Prometheus never scraped eph"
            time.sleep(0.3)
        began = time.time()
        client = subprocess.Popen(
            netns.command([sys.executable, "-c", CLIENT, str(RATE)]),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        fired_at = None
        while client.poll() is None:
            if fired_at is None and _firing(netns, "EphPathExhaustionSoon", "127.0.0.1:7000"):
                fired_at = time.time()  # the poll's time: the alert fired at or before it
            if fired_at is not None and _query(
                netns, 'eph_path_occupancy_ratio{remote="127.0.0.1:7000"} > 0.95'
            ):
                break  # at exhaustion: the scrape promtool reads
            assert time.monotonic() < deadline + 60, "the client never exhausted the range"
            time.sleep(0.5)
        scrape = _get(netns, "/metrics", port=EPH_PORT)
        outcome = json.loads(client.communicate(timeout=60)[0])
        time.sleep(2.0)  # the last samples, scraped: every panel has its series
        empty = [t for t, expr in _panel_queries() if not _has_data(netns, expr, began)]
    finally:
        for proc in (client, observer, prometheus):
            stop_process(proc)
    assert outcome["refused"] > 0 and outcome["first_refusal"] is not None, outcome
    # about the range's 600: the client did exhaust it (the exact count is test_lab's)
    assert 550 <= outcome["made"] <= 620, outcome
    assert fired_at is not None, "EphPathExhaustionSoon never fired"
    lead = outcome["first_refusal"] - fired_at
    print(f"EphPathExhaustionSoon fired {lead:.1f} s before the first EADDRNOTAVAIL")
    assert lead > 0, (fired_at, outcome)
    assert not empty, f"panels without data: {empty}"
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert 'remote="127.0.0.1:7000"' in scrape
