"""Locust's web UI gets a "Ports" tab whose numbers move while eph's locustfile runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .browser import Browser
from .conftest import EPH, ROOT

pytestmark = pytest.mark.e2e

SCENARIO = """
name = "ports-tab"
duration = "60s"
[target]
endpoints = ["{endpoint}"]
[load]
engine = "locust"
users = 4
spawn_rate = 4
rate = 150
close = "client"
"""

# every row of the Ports tab's table that names the listener's port, as text
ROWS = """
Array.from(document.querySelectorAll('tr'))
  .map(tr => Array.from(tr.querySelectorAll('td')).map(td => td.innerText))
  .filter(cells => cells.length && cells[0].includes(':{port}'))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_ports_tab_shows_live_occupancy_of_the_load_host(tmp_path: Path) -> None:
    listener = subprocess.Popen(
        [*EPH, "listen", "--endpoint", "127.0.0.1:0"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    web = _free_port()
    locust = None
    try:
        assert listener.stdout is not None
        endpoint = json.loads(listener.stdout.readline())["endpoints"][0]
        port = int(endpoint.rsplit(":", 1)[1])
        scenario = tmp_path / "tab.toml"
        scenario.write_text(SCENARIO.format(endpoint=endpoint))
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "harness" / "locustfile.py"),
             "--web-host", "127.0.0.1", "--web-port", str(web), "--autostart",
             "-u", "4", "-r", "4", "-t", "60s", "--host", endpoint],
            cwd=tmp_path,
            env={**os.environ, "EPH_SCENARIO": str(scenario), "EPH_RUN_DIR": str(tmp_path / "run"),
                 "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        with Browser(tmp_path / "profile") as browser:
            url = f"http://127.0.0.1:{web}/"
            deadline = time.monotonic() + 30
            while True:
                try:
                    browser.open(url)
                    browser.wait_for("document.querySelectorAll('[role=tab]').length > 0", 5)
                    break
                except (TimeoutError, RuntimeError):
                    assert locust.poll() is None, "locust exited"
                    assert time.monotonic() < deadline, "the web UI never came up"
            clicked = browser.evaluate(
                "(() => { const t = Array.from(document.querySelectorAll('[role=tab]'))"
                ".find(e => e.textContent.trim() === 'Ports'); if (t) t.click(); return !!t; })()"
            )
            assert clicked, "no Ports tab"
            first = browser.wait_for(ROWS.replace("{port}", str(port)), 20)
            time.sleep(3)
            second = browser.wait_for(ROWS.replace("{port}", str(port)), 10)
            browser.screenshot(
                Path(os.environ.get("EPH_SCREENSHOT_DIR", tmp_path)) / "ports-tab.png"
            )
        ports_then = int(first[0][1].replace(",", ""))
        ports_now = int(second[0][1].replace(",", ""))
        assert ports_now > ports_then, (first, second)  # TIME_WAIT piles up: client closes first
        assert "TIME_WAIT" in second[0][4]
        assert second[0][7] in {"ok", "filling", "warn", "danger", "full"}
    finally:
        for proc in (locust, listener):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if listener.stdout is not None:
            listener.stdout.close()


def test_eph_run_web_serves_the_ui_with_the_ports_tab(tmp_path: Path) -> None:
    """`eph run --web HOST:PORT`: Locust's UI during the run, the test started at once."""
    import urllib.request

    web = _free_port()
    scenario = tmp_path / "web.toml"
    scenario.write_text(
        SCENARIO.format(endpoint="127.0.0.1:0").replace('duration = "60s"', 'duration = "9s"')
        + "[listener]\n"
    )
    proc = subprocess.Popen(
        [*EPH, "run", str(scenario), "--web", f"127.0.0.1:{web}", "--out", str(tmp_path / "run")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: list[int] = []
    rps: list[float] = []
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web}/eph/ports.json") as answer:
                    rows = json.load(answer)
            except OSError:
                time.sleep(0.3)
                continue
            seen += [row["ports"] for row in rows if row["path"].startswith("127.0.0.1 -> ")]
            # Locust's own header: its current RPS, from the rows eph feeds its stats
            with urllib.request.urlopen(f"http://127.0.0.1:{web}/stats/requests") as answer:
                rps.append(float(json.load(answer).get("current_rps") or 0.0))
            if len(seen) > 3 and max(seen) > 50 and max(rps) >= 0.75 * 150:
                break
            time.sleep(1.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/") as answer:
            page = answer.read().decode()
        assert '"extended_tabs": [{"key": "eph-ports", "title": "Ports"}]' in page
    finally:
        out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-2000:]
    assert f"http://127.0.0.1:{web}/" in out
    assert seen and max(seen) > 50, seen  # the run's client TIME_WAIT, seen live
    # the header's RPS: the rows eph feeds reach Locust's current-RPS window, which
    # averages the seconds from 12 to 3 ago (and the page is cached 2 s): 0 for the first
    # 3 s, as for any locustfile, then the paced 150/s less the ramp still in the window
    assert 0.75 * 150 <= max(rps) <= 1.1 * 150, rps
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["connections"]["succeeded"] > 100
