"""``eph lab SCENARIO --exec 'CMD ...'``: the user's own client, in the lab, observed.

Does my client pool its connections? Run it against a 100-port range and see,
in seconds. The lab is built as for a run (namespaces, the scenario's [kernel]
settings, the stand-in service when asked); eph's listener serves the
scenario's endpoints; then, instead of Locust, the command runs in the client
namespace with the target handed over in the environment:

- ``EPH_TARGET``: the first endpoint, ``host:port``;
- ``EPH_TARGETS``: every endpoint, comma-separated;
- ``EPH_RUN_DIR``: the run directory, for a client that wants to leave files;
- ``EPH_CA_FILE``: when the listener serves TLS (``listener.tls``), the CA of its
  throwaway certificate, e.g. ``curl --cacert "$EPH_CA_FILE" https://$EPH_TARGET/``.

``eph observe`` samples the client namespace's paths all along (every
``collector.interval``), so the run directory is an observation: ``eph report``
and ``eph plan --from`` read it. The command's exit code, how it ended, and
its stdout and stderr (``exec.stdout``, ``exec.stderr``) go into ``exec.json``
beside it. The command is stopped at the scenario's ``duration`` if still
running, and that is said; one that cannot be found, or exits at once with an
error, is a clear error, and the run directory is kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import RunError, ScenarioError
from harness.kernel.netns import netns_available
from harness.lab.topology import build_lab
from harness.observe.nat_collector import finish_nat
from harness.run.placement import start_listener, start_nat_collector
from harness.rundir import RunDir
from harness.scenario import Scenario
from harness.scenario.named_inputs import check_command
from harness.supervisor import Child, Stage, Supervisor

__all__ = ["AT_ONCE_S", "ExecResult", "failure", "parse_command", "run_exec"]

logger = logging.getLogger(__name__)

AT_ONCE_S = 1.0  # a command that fails within this long did not get to make connections
STOP_GRACE_S = 3.0  # between SIGTERM and SIGKILL for a command still running at duration
OBSERVER_START_S = 30.0  # for eph observe's first sample (imports, the first dump)
OBSERVER_STOP_GRACE_S = 60.0  # it writes its streams, summary.json and report.html
MIN_INTERVAL_S = 0.1


@dataclass(frozen=True)
class ExecResult:
    """How the command ended; written to ``exec.json``."""

    command: list[str]
    target: str
    exit_code: int | None  # None: stopped by eph at duration
    ran_s: float
    stopped_at_duration: bool
    exited_at_once: bool
    stdout: str = "exec.stdout"
    stderr: str = "exec.stderr"

    @property
    def verdict(self) -> str:
        """One line for a person."""
        what = (
            self.command[-1] if self.command[:2] == ["/bin/sh", "-c"] else shlex.join(self.command)
        )
        if self.stopped_at_duration:
            return f"`{what}` was still running after {self.ran_s:.1f} s: stopped at duration"
        if self.exited_at_once:
            return f"`{what}` exited with code {self.exit_code} at once ({self.ran_s:.2f} s)"
        return f"`{what}` exited with code {self.exit_code} after {self.ran_s:.1f} s"


def parse_command(text: str | Sequence[str]) -> list[str]:
    """The argv to run (a command line runs through ``/bin/sh -c``, so ``$EPH_TARGET``
    expands); its program must exist. The CLI checks it before any lab; this checks
    again for callers of :func:`run_exec`."""
    return check_command(text)


def run_exec(
    scenario: Scenario,
    command: str | Sequence[str],
    *,
    out: Path | None = None,
    trace: bool = False,
) -> tuple[RunDir, ExecResult]:
    """Run ``command`` in the scenario's lab, observed (``trace``: and recorded from the
    kernel, every connection, in ``connections.parquet``); the run directory and how it
    ended. A command that failed at once is :func:`failure`'s to report, after the
    observation is rendered: nothing recorded is lost."""
    problem = netns_available()
    if problem:
        raise RunError(f"eph lab --exec needs named network namespaces (root): {problem}")
    argv = parse_command(command)  # before any directory or namespace is made
    run = RunDir.open(out, create=True) if out else RunDir.create(Path("reports"), scenario.name)
    run.write_scenario(scenario, replace=True)
    with contextlib.ExitStack() as stack:
        scenario, placement = build_lab(stack, scenario, run)
        children = stack.enter_context(Supervisor())  # closes before the namespaces go
        target = _target(children, scenario, run, placement.listener)
        observer = _start_observer(children, scenario, run, placement.load, trace)
        # the NAT topology's router: its pool sampled as in a run (router/nat.parquet)
        router = (
            start_nat_collector(children, scenario, run, placement, scenario.duration + 60)
            if placement.router
            else None
        )
        result = _run_command(children, scenario, run, placement.load, argv, target)
        _settle(scenario)
        children.stop(observer, grace=OBSERVER_STOP_GRACE_S)
        if router is not None:
            children.stop(router)
    if (run.path / "router" / "nat.arrows").exists():
        finish_nat(run.path / "router")
    run.write_json("exec.json", {**asdict(result), "verdict": result.verdict})
    logger.info("%s", result.verdict)
    return run, result


def failure(run: RunDir, result: ExecResult) -> RunError | None:
    """The error to report when the command failed at once (it made no real attempt)."""
    if not (result.exited_at_once and result.exit_code):
        return None
    return RunError(
        f"{result.verdict}; its stderr: {_tail(run.path / result.stderr)}"
        f" (the run directory is kept: {run.path})"
    )


def _target(children: Supervisor, scenario: Scenario, run: RunDir, prefix: Sequence[str]) -> str:
    """Start eph's listener (when the scenario has one); the endpoints, comma-separated."""
    if scenario.listener is not None:
        listener, _ = start_listener(children, scenario, run, prefix)
        return ",".join(str(e) for e in listener.endpoints)
    if scenario.lab.service_port is not None:
        return f"127.0.0.1:{scenario.lab.service_port}"
    raise ScenarioError(
        "eph lab --exec needs a target: a [listener], or lab.service_port",
        key="listener",
        expected="a [listener] table",
    )


def _start_observer(
    children: Supervisor, scenario: Scenario, run: RunDir, prefix: Sequence[str], trace: bool
) -> Child:
    interval = max(MIN_INTERVAL_S, scenario.collector.interval)
    bound = scenario.duration + OBSERVER_START_S + STOP_GRACE_S + 30
    args = [*prefix, sys.executable, "-m", "harness", "observe", "--plain", "--no-report"]
    args += ["--in-run"]  # the lab's own run directory, made for it
    args += ["--duration", f"{bound:g}s", "--interval", f"{interval:g}s", "--out", str(run.path)]
    args += ["--trace"] if trace else []
    with open(run.logs / "observe.log", "ab") as log:
        child = children.start(
            "observe",
            args,
            stage=Stage.OBSERVE,
            grace=OBSERVER_STOP_GRACE_S,
            death_signal=signal.SIGTERM,  # it keeps what it saw, then exits
            stdout=log,
            stderr=log,
        )
    deadline = time.monotonic() + OBSERVER_START_S
    meta = run.path / "observe.json"
    while not _sampling(meta):  # the first sample is in: the command may start
        if child.poll() is not None or time.monotonic() > deadline:
            raise RunError(f"eph observe did not start in the lab: see {run.logs}/observe.log")
        time.sleep(0.05)
    return child


def _sampling(meta: Path) -> bool:
    try:
        return int(json.loads(meta.read_text()).get("samples", 0)) > 0 or _has_rows(meta)
    except (OSError, ValueError):
        return False


def _has_rows(meta: Path) -> bool:
    stream = meta.with_name("host.arrows")
    return stream.exists() and stream.stat().st_size > 0


def _run_command(
    children: Supervisor,
    scenario: Scenario,
    run: RunDir,
    prefix: Sequence[str],
    command: Sequence[str],
    target: str,
) -> ExecResult:
    env = {
        **os.environ,
        "EPH_TARGET": target.split(",")[0],
        "EPH_TARGETS": target,
        "EPH_RUN_DIR": str(run.path),
    }
    ca_file = run.path / "tls" / "ca.pem"  # the listener's throwaway CA (listener.tls)
    if ca_file.exists():
        env["EPH_CA_FILE"] = str(ca_file)
    began = time.monotonic()
    with open(run.path / "exec.stdout", "wb") as out, open(run.path / "exec.stderr", "wb") as err:
        child = children.start(
            "exec", [*prefix, *command], stage=Stage.LOAD, grace=STOP_GRACE_S,
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
        )  # fmt: skip
    logger.info("running %s against %s", shlex.join(command), target)
    code = _wait(child, began + scenario.duration)
    ran = time.monotonic() - began
    stopped = code is None
    if stopped:
        children.stop(child, grace=STOP_GRACE_S)
    return ExecResult(
        command=list(command),
        target=target,
        exit_code=code,
        ran_s=round(ran, 3),
        stopped_at_duration=stopped,
        exited_at_once=not stopped and ran < AT_ONCE_S,
    )


def _wait(child: Child, deadline: float) -> int | None:
    """The command's exit code, or None if it still runs at ``deadline``."""
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            return code
        time.sleep(0.02)
    return child.poll()


def _settle(scenario: Scenario) -> None:
    """Two more samples after the command: the observation sees where it left the ports."""
    time.sleep(2 * max(MIN_INTERVAL_S, scenario.collector.interval))


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(unreadable)"
    return " | ".join(text[-lines:]) if text else "(empty)"
