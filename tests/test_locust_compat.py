"""What eph relies on in Locust beyond its documented API still holds in the installed one.

When this fails after a Locust upgrade, the message names what went missing and
the installed version; ``harness/load/locust_compat.py`` is the one place to adapt.
Runs in subprocesses: importing locust monkey-patches the process with gevent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from .conftest import ROOT


def _run(script: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_installed_locust_has_what_eph_relies_on() -> None:
    result = _run(
        "import json, locust\n"
        "from harness.load import locust_compat\n"
        "try:\n"
        "    locust_compat.check()\n"
        "    problem = None\n"
        "except locust_compat.LocustChanged as exc:\n"
        "    problem = str(exc)\n"
        "print(json.dumps({'problem': problem, 'version': locust.__version__}))\n"
    )
    assert result["problem"] is None, result["problem"]
    major = int(result["version"].split(".")[0])
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"locust>=2.30,<{major + 1}"' in pyproject, "pin Locust below its next major"


CHANGED = r"""
import json
from locust.runners import WorkerRunner
from harness.load import locust_compat

def problem():
    try:
        locust_compat.check()
    except locust_compat.LocustChanged as exc:
        return {"message": str(exc), "needed": exc.needed, "version": exc.version}
    return None

found = {}
send = WorkerRunner.send_message
del WorkerRunner.send_message  # a Locust that renamed it
found["send_message"] = problem()
WorkerRunner.send_message = send
locust_compat.WORKER_REPORT = "worker_stats"  # a master that expects another message
found["message"] = problem()
print(json.dumps(found))
"""


def test_a_changed_locust_fails_naming_what_and_which_version() -> None:
    found = _run(CHANGED)
    import_version = _run("import json, locust; print(json.dumps(locust.__version__))")
    for key, needed in (
        ("send_message", "WorkerRunner.send_message"),
        ("message", '"worker_stats" message handled by MasterRunner'),
    ):
        assert found[key] is not None, key
        assert found[key]["needed"] == needed
        assert needed in found[key]["message"]
        assert f"Locust {import_version} " in found[key]["message"]


ROUND_TRIP = r"""
import json
from types import SimpleNamespace
from locust.env import Environment
from locust.stats import setup_distributed_stats_event_listeners
from harness.load.locust_compat import report_stats_now

worker, master = Environment(), Environment()
for env in (worker, master):
    setup_distributed_stats_event_listeners(env.events, env.stats)
for ms in (1.0, 2.0, 3.0):
    worker.stats.log_request("TCP", "127.0.0.1:9000", ms, 0)
worker.stats.log_error("TCP", "127.0.0.1:9000", "EADDRNOTAVAIL")

sent = []
runner = SimpleNamespace(environment=worker, client_id="w1",
                         send_message=lambda kind, data: sent.append((kind, data)))
report_stats_now(runner)
# the master's handler for that message fires worker_report with the data as sent
for kind, data in sent:
    if kind == "stats":
        master.events.worker_report.fire(client_id="w1", data=data)
print(json.dumps({"kinds": [k for k, _ in sent], "requests": master.stats.total.num_requests,
                  "errors": sum(e.occurrences for e in master.stats.errors.values())}))
"""


def test_report_stats_now_reaches_the_master_stats() -> None:
    result = _run(ROUND_TRIP)
    assert result == {"kinds": ["stats"], "requests": 3, "errors": 1}
