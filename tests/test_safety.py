"""Safety: nothing exposed beyond loopback unless asked, no shell strings, private run
directories. (Host sysctls staying untouched is checked around every lab run, in
test_lab; bounded runs in test_faults.)"""

from __future__ import annotations

import ast
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.rundir import RunDir

from .conftest import ROOT

pytestmark = pytest.mark.e2e


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = (
                f"{getattr(func.value, 'id', '?')}.{func.attr}"
                if isinstance(func, ast.Attribute)
                else getattr(func, "id", "?")
            )
            found.append((name, node))
    return found


def test_no_shell_strings_anywhere_in_the_code() -> None:
    offences = []
    for path in sorted((ROOT / "harness").rglob("*.py")):
        for name, call in _calls(ast.parse(path.read_text())):
            if name in ("os.system", "os.popen", "subprocess.getoutput"):
                offences.append(f"{path.name}:{call.lineno} {name}")
            for keyword in call.keywords:
                if keyword.arg == "shell" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    offences.append(f"{path.name}:{call.lineno} shell=")
    assert not offences


def test_run_directories_are_not_world_accessible(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "t")
    for path in (run.path, run.parts, run.progress, run.logs):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert not mode & 0o007, f"{path} is {oct(mode)}"


def _listening(port: int) -> list[str]:
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    )
    return [line.split()[3] for line in out.stdout.splitlines()]


def test_locust_web_ui_and_master_bind_loopback_by_default(tmp_path: Path) -> None:
    """Plain `locust -f harness/locustfile.py` (web UI) and a `--master` listen on
    127.0.0.1 only, unless --web-host / --master-bind-host say otherwise."""
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    web, master = ports
    proc = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "harness" / "locustfile.py"),
         "--web-port", str(web), "--master", "--master-bind-port", str(master)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "EPH_RUN_DIR": str(tmp_path / "run")},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (_listening(web) and _listening(master)) and time.monotonic() < deadline:
            assert proc.poll() is None, "locust exited"
            time.sleep(0.2)
        assert _listening(web) == [f"127.0.0.1:{web}"]
        assert _listening(master) == [f"127.0.0.1:{master}"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_child_process_starts_through_the_supervisor() -> None:
    """A child started elsewhere would not die with eph (no parent-death signal) nor stop
    in the supervisor's order. Short commands that eph waits for (ip, tc) are runs."""
    offences = []
    for path in sorted((ROOT / "harness").rglob("*.py")):
        if path == ROOT / "harness" / "supervisor.py":
            continue
        for name, call in _calls(ast.parse(path.read_text())):
            if name.endswith("Popen") or name in ("os.fork", "gevent.fork", "os.posix_spawn"):
                offences.append(f"{path.relative_to(ROOT)}:{call.lineno} {name}")
    assert not offences


def test_the_supervisor_imports_neither_locust_nor_gevent() -> None:
    code = "import sys, harness.supervisor; print(sorted({'locust', 'gevent'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
