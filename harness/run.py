"""``eph run``: listener, collector and Locust as separate processes.

This process never imports locust. It starts the embedded listener when the
scenario has ``[listener]`` and the collector, then Locust headless on
``harness/locustfile.py``; it shows progress, stops Locust at the scenario's
duration with SIGTERM (handled by Locust in a gevent handler, not raised in a
running greenlet as SIGINT would be), stops the collector, drains and stops the
listener, and finalizes the run directory. SIGINT/SIGTERM to ``eph run`` takes
the same path, marked ``interrupted``. A :class:`Placement` puts each child in
a namespace (``eph lab``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from harness.endpoints import Endpoint
from harness.errors import RunError
from harness.finalize import finalize
from harness.kernel.sysctls import read_kernel
from harness.load.progress import Progress, read_progress
from harness.observe.collector import collect_command
from harness.report.model import Summary
from harness.rundir import RunDir
from harness.scenario import Protocol, Scenario
from harness.units import format_duration

__all__ = ["Master", "Placement", "RunResult", "run_scenario", "run_worker"]

logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds for Locust to start its test (first start installs nothing)
LISTENER_START_TIMEOUT = 15.0
STOP_GRACE = 30.0  # seconds past the close timeouts for Locust to write its stats
LOCUSTFILE = Path(__file__).with_name("locustfile.py")


@dataclass(frozen=True)
class Placement:
    """Where each process of a run lives: a command prefix such as ``ip netns exec NAME``.

    Empty prefixes (the default) run everything here, on the host. ``collectors``
    pairs a subdirectory of the run directory ("" for its root) with a prefix.
    """

    load: tuple[str, ...] = ()
    listener: tuple[str, ...] = ()
    collectors: tuple[tuple[str, tuple[str, ...]], ...] = (("", ()),)

    @property
    def on_host(self) -> bool:
        return not self.load


@dataclass(frozen=True)
class Master:
    """``eph run --master``: Locust's master here, its workers (``eph worker``) elsewhere.

    The master binds ``bind_host:bind_port`` (loopback unless told otherwise), waits
    up to ``wait`` seconds for ``workers`` workers, runs no users and no collector
    itself, and merges what each worker ships into the run directory.
    """

    workers: int = 1
    bind_host: str = "127.0.0.1"
    bind_port: int = 5557
    wait: float = 120.0

    def locust_args(self) -> list[str]:
        return [
            "--master",
            "--expect-workers",
            str(self.workers),
            "--expect-workers-max-wait",
            f"{self.wait:g}",
            "--master-bind-host",
            self.bind_host,
            "--master-bind-port",
            str(self.bind_port),
        ]


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    summary: Summary


ProgressSink = Callable[[float, float, Progress], None]


class _ListenerProcess:
    """``eph listen`` in a child process, speaking JSON lines on stdout."""

    def __init__(self, scenario: Scenario, run: RunDir, prefix: Sequence[str] = ()) -> None:
        listener = scenario.listener
        assert listener is not None
        args = [
            *prefix,
            sys.executable,
            "-m",
            "harness",
            "listen",
            "--close",
            scenario.listener_close.value,
            "--backlog",
            str(listener.backlog),
        ]
        for endpoint in scenario.target.endpoints:
            args += ["--endpoint", str(endpoint)]
        if listener.response:
            args += ["--response", listener.response]
        if scenario.listener_reads_request:
            args.append("--read-request")
        if scenario.load.protocol is Protocol.UDP:
            args.append("--udp")
        self._log = open(run.logs / "listener.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log, start_new_session=True
        )
        self.endpoints = [Endpoint.parse(e) for e in self._read_event("listening")["endpoints"]]

    def _read_event(self, name: str, timeout: float = LISTENER_START_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    break
                line = self.proc.stdout.readline()
                if not line:
                    break
                event = json.loads(line)
                if event.get("event") == name:
                    return dict(event)
        self.proc.kill()
        self.proc.wait()
        raise RunError(f"the embedded listener failed ({name!r} never came): {self._tail()}")

    def _tail(self) -> str:
        self._log.flush()
        try:
            text = Path(self._log.name).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return text[-1].removeprefix("error: ") if text else f"exit code {self.proc.poll()}"

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            stats = self._read_event("stopped", timeout=10.0)
        finally:
            _reap(self.proc, 5.0)
            self._log.close()
        stats.pop("event", None)
        return stats


class _CollectorProcess:
    """``eph collect`` into the run directory, for the whole run."""

    def __init__(
        self, scenario: Scenario, run: RunDir, subdir: str = "", prefix: Sequence[str] = ()
    ) -> None:
        bound = math.ceil(scenario.duration) + START_TIMEOUT + STOP_GRACE
        log_name = f"collector-{subdir}.log" if subdir else "collector.log"
        args = [
            *prefix,
            *collect_command(
                run.path / subdir,
                format_duration(scenario.collector.interval),
                bound,
                scenario.target.endpoints,
                udp=scenario.load.protocol is Protocol.UDP,
            ),
        ]
        with open(run.logs / log_name, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = _reap(self.proc, 10.0)
        if code not in (0, -signal.SIGTERM):
            logger.error("the collector exited with code %s; see logs/collector.log", code)


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        logger.error("process %d did not stop in %.0f s; killing it", proc.pid, timeout)
        proc.kill()
        return proc.wait()


def _locust_command(
    scenario: Scenario, run: RunDir, extra: Sequence[str], master: Master | None = None
) -> list[str]:
    load = scenario.load
    backstop = math.ceil(scenario.duration) + 30  # eph stops it first; this bounds a lost parent
    if master is not None:
        spread = master.locust_args()
    elif load.process_count > 1:
        spread = _processes_args(load.process_count)
    else:
        spread = []
    # users finish the attempt they are in before stopping (then Locust kills them)
    stop_timeout = math.ceil(load.connect_timeout + load.io_timeout + load.hold + 1)
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(load.users),
        "-r",
        f"{load.spawn_rate:g}",
        "-t",
        f"{backstop}s",
        "--csv",
        str(run.path / "locust"),
        "--json-file",
        str(run.path / "locust"),
        "--logfile",
        str(run.logs / "locust.log"),
        "--only-summary",
        "--exit-code-on-error",
        "0",
        "--stop-timeout",
        str(stop_timeout),
        *spread,
        *extra,
    ]


def _processes_args(count: int) -> list[str]:
    """Locust forks ``count`` workers that talk to its master over TCP: a port of this
    run's own, so that two runs on one host (parallel tests) never mix workers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    return ["--processes", str(count), "--master-bind-port", port, "--master-port", port]


class _Interrupt:
    """Turns SIGINT/SIGTERM into a flag for the duration of a run."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.set:
            logger.warning(
                "%s: stopping the run and keeping what was recorded", signal.Signals(signum).name
            )
        self.set = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run_scenario(
    scenario: Scenario,
    *,
    out: Path | None = None,
    progress: ProgressSink | None = None,
    locust_args: Sequence[str] = (),
    placement: Placement = Placement(),
    master: Master | None = None,
    on_preflight: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    run = RunDir.open(out, create=True) if out else RunDir.create(Path("reports"), scenario.name)
    if master is None:  # a master makes no connections: its workers' hosts matter
        report = _preflight(scenario, placement)
        if report is not None:
            run.write_json("preflight.json", report)
            if on_preflight is not None:
                on_preflight(report)
    if master is not None:
        # the master host makes no connections: each worker samples its own host
        placement = Placement(placement.load, placement.listener, ())
        loopback = [e for e in scenario.target.endpoints if _is_loopback(e.host)]
        if loopback and master.bind_host not in ("127.0.0.1", "::1", "localhost"):
            logger.warning(
                "target %s is a loopback address: each worker connects to its own host's"
                " loopback, not to this one (give an address the workers reach)",
                ", ".join(str(e) for e in loopback),
            )
        logger.info(
            "waiting up to %.0f s for %d worker(s): eph worker --master-host %s --master-port %d",
            master.wait,
            master.workers,
            master.bind_host,
            master.bind_port,
        )
    kernel: dict[str, Any] | None = None  # in a lab, the collector reads the lab's kernel
    if placement.on_host and master is None:  # a master's kernel is not the workers'
        kernel = read_kernel()
        for note in kernel_differences(scenario, kernel):
            logger.warning("%s", note)
    listener: _ListenerProcess | None = None
    listener_stats: dict[str, Any] | None = None
    started_at = time.time()
    load_started = load_ended = time.monotonic()
    stop_reason = "interrupted"
    with _Interrupt() as interrupt:
        if scenario.listener is not None:
            listener = _ListenerProcess(scenario, run, placement.listener)
            scenario = scenario.with_endpoints(listener.endpoints)
        run.write_scenario(scenario)
        collectors = [
            _CollectorProcess(scenario, run, subdir, prefix)
            for subdir, prefix in placement.collectors
        ]
        env = {
            **os.environ,
            "EPH_SCENARIO": str(run.scenario),
            "EPH_RUN_DIR": str(run.path),
            "EPH_MANAGED": "1",
            # each of Locust's processes paces its share of load.rate
            "EPH_RATE_SHARE": repr(1 / scenario.load.process_count),
        }
        start_timeout = START_TIMEOUT + (master.wait if master is not None else 0.0)
        with open(run.logs / "locust.out", "ab") as locust_out:
            proc = subprocess.Popen(
                [*placement.load, *_locust_command(scenario, run, locust_args, master)],
                stdout=locust_out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            load_started = _wait_for_start(proc, run, interrupt, start_timeout)
            started_at = time.time()
            stop_reason = _wait_for_end(
                proc, run, scenario, load_started, interrupt, progress, collectors
            )
            load_ended = time.monotonic()
            if proc.poll() is None:
                # SIGTERM, not SIGINT: Locust handles SIGTERM in a gevent handler, while
                # SIGINT raises KeyboardInterrupt in whatever greenlet runs, mid-attempt
                proc.send_signal(signal.SIGTERM)
            load = scenario.load
            _reap(proc, load.connect_timeout + load.io_timeout + load.hold + STOP_GRACE)
        finally:
            # Locust and whatever it forked (workers, uvloop children) share its session:
            # none may outlive the run, or a later run's master would adopt its workers
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for collector in collectors:
                collector.stop()
            if listener is not None:
                listener_stats = listener.stop()
                run.write_json("listener.json", listener_stats)
        if proc.returncode not in (0, -signal.SIGTERM) and not interrupt.set:
            logger.error("Locust exited with code %s; see %s", proc.returncode, run.logs)
        summary = finalize(
            run.path,
            interrupted=interrupt.set,
            started_at=started_at,
            duration_s=load_ended - load_started,
            kernel=kernel,
            listener=listener_stats,
            stop_reason="interrupted" if interrupt.set else stop_reason,
            expected_workers=master.workers if master is not None else None,
        )
    if stop_reason == "disk":
        raise RunError(
            f"the disk holding {run.path} is nearly full ({free_bytes(run.path) / 2**20:.1f} MiB"
            " free): the run stopped early. What was recorded is merged there, with its"
            " summary and report; free some space (or lower EPH_MIN_FREE_MB) and run again."
        )
    return RunResult(run.path, summary)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _preflight(scenario: Scenario, placement: Placement) -> dict[str, Any] | None:
    """``eph preflight`` where the load runs: here, or inside the lab's namespace."""
    if placement.on_host:
        from harness.capacity.preflight import preflight

        return preflight(scenario)
    result = subprocess.run(
        [*placement.load, sys.executable, "-m", "harness", "preflight", "-", "--json"],
        input=json.dumps(scenario.to_json()),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        logger.warning("the preflight failed in the lab: %s", result.stderr.strip()[-500:])
        return None
    return dict(json.loads(result.stdout))


def kernel_differences(scenario: Scenario, kernel: dict[str, Any]) -> list[str]:
    """Scenario [kernel] values the running kernel does not have (eph never writes them here)."""
    notes = []
    for key, wanted in scenario.kernel.in_kernel_units().items():
        actual = kernel.get(key)
        if actual != wanted:
            notes.append(
                f"kernel.{key} = {wanted} is not applied here (this kernel has {actual});"
                " eph applies [kernel] only inside a lab namespace"
            )
    return notes


def _wait_for_start(
    proc: subprocess.Popen[bytes], run: RunDir, interrupt: _Interrupt, timeout: float
) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not interrupt.set:
        if any(run.progress.glob("*.json")):
            return time.monotonic()
        if proc.poll() is not None:
            raise RunError(
                f"Locust exited (code {proc.returncode}) before starting: "
                f"see {run.logs / 'locust.log'} and {run.logs / 'locust.out'}"
            )
        time.sleep(0.05)
    if interrupt.set:
        return time.monotonic()
    raise RunError(f"Locust did not start within {timeout:.0f} s: see {run.logs}")


def _wait_for_end(
    proc: subprocess.Popen[bytes],
    run: RunDir,
    scenario: Scenario,
    started: float,
    interrupt: _Interrupt,
    progress: ProgressSink | None,
    collectors: Sequence[_CollectorProcess] = (),
) -> str:
    """Wait for the load to end; return why it did: ``duration``, ``max_connections``,
    ``disk`` (nearly full), ``interrupted`` or ``locust exited``."""
    duration, limit = scenario.duration, scenario.load.max_connections
    reserve = min_free_bytes()
    end = started + duration
    lost: set[int] = set()
    while not interrupt.set and proc.poll() is None:
        now = time.monotonic()
        for collector in collectors:
            code = collector.proc.poll()
            if code is not None and collector.proc.pid not in lost:
                lost.add(collector.proc.pid)
                logger.warning(
                    "the collector exited (code %s) %.1f s into the load; the run goes on"
                    " without socket samples (see logs/collector.log)",
                    code,
                    now - started,
                )
        counted = read_progress(run.progress)
        if progress is not None:
            progress(now - started, duration, counted)
        if limit and counted.attempts >= limit:
            logger.warning(
                "load.max_connections = %d reached after %.1f s: stopping the run",
                limit,
                now - started,
            )
            return "max_connections"
        free = free_bytes(run.path)
        if free < reserve:
            logger.error(
                "only %.1f MiB free where the run directory is (%s), under the %.0f MiB"
                " reserve (EPH_MIN_FREE_MB): stopping the run to keep what was recorded",
                free / 2**20,
                run.path,
                reserve / 2**20,
            )
            return "disk"
        if now >= end:
            return "duration"
        time.sleep(min(0.25, max(0.0, end - now)))
    return "interrupted" if interrupt.set else "locust exited"


def min_free_bytes() -> int:
    """The space a run leaves free on its disk: it stops before the disk fills, so that
    the merge and the report still fit (``EPH_MIN_FREE_MB``, default 64)."""
    try:
        return int(float(os.environ.get("EPH_MIN_FREE_MB", "64")) * 2**20)
    except ValueError:
        raise RunError(
            f"EPH_MIN_FREE_MB = {os.environ['EPH_MIN_FREE_MB']!r} is not a number of MiB"
        ) from None


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def run_worker(
    *,
    master_host: str,
    master_port: int,
    out: Path,
    name: str | None = None,
    max_seconds: float = 7200.0,
) -> int:
    """``eph worker``: a Locust worker of an ``eph run --master`` elsewhere.

    Each test records into a new directory under ``out`` with a collector of this
    host, and ships it to the master at the end. Returns Locust's exit code once
    the master quits, at SIGINT/SIGTERM, or after ``max_seconds`` (a bound).
    """
    out.mkdir(mode=0o750, parents=True, exist_ok=True)
    env = {**os.environ, "EPH_WORKER": "1", "EPH_RUN_DIR": str(out)}
    if name:
        env["EPH_HOST_NAME"] = name
    args = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--worker",
        "--master-host",
        master_host,
        "--master-port",
        str(master_port),
        "--logfile",
        str(out / f"worker-{os.getpid()}.log"),
    ]
    with _Interrupt() as interrupt, open(out / f"worker-{os.getpid()}.out", "ab") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + max_seconds
        try:
            while proc.poll() is None and not interrupt.set and time.monotonic() < deadline:
                time.sleep(0.1)
            if proc.poll() is None:
                if not interrupt.set:
                    logger.error("the worker ran for %.0f s, its bound; stopping it", max_seconds)
                proc.send_signal(signal.SIGTERM)
                _reap(proc, STOP_GRACE)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode
