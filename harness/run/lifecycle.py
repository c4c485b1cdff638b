"""``eph run``: a run's lifecycle, from its children's start to its finalized directory.

This process never imports locust. Through a :class:`~harness.supervisor.Supervisor`
it starts the embedded listener when the scenario has ``[listener]``, the
collector, then Locust headless on ``harness/locustfile.py`` (``harness.run.placement``
makes them, in a namespace when a :class:`Placement` says so: ``eph lab``). It
shows progress until the scenario's duration (or a limit: ``max_connections``,
free disk), stops the children in the supervisor's order (Locust with SIGTERM,
handled by Locust in a gevent handler; the collector; the listener, which drains
and reports), and finalizes the run directory. SIGINT/SIGTERM to ``eph run`` takes
the same path, marked ``interrupted``; a SIGKILL takes every child with it.
``eph worker`` (:mod:`harness.run.worker`) is a Locust worker under the same supervisor.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.endpoints import Endpoint
from harness.errors import RunError
from harness.files import atomic_write_json
from harness.kernel.sysctls import read_kernel
from harness.load.http_client import client_context
from harness.load.progress import Progress, read_progress
from harness.observe.trace import KernelTrace, TraceResult, start_trace
from harness.report.witness import kernel_witness
from harness.run.finalize import finalize
from harness.run.placement import (
    START_TIMEOUT,
    ListenerChild,
    Master,
    Placement,
    choose_processes,
    master_port,
    preflight_where,
    start_collectors,
    start_listener,
    start_locust,
)
from harness.rundir import MASTER_PROGRESS, RunDir, free_bytes, min_free_bytes
from harness.runstate import Phase, clock_offset_ns, noting_errors, startup_error, write_state
from harness.scenario import Scenario
from harness.summary import KernelWitness, Summary
from harness.supervisor import Child, Interrupt, Stage, Supervisor

__all__ = ["Master", "Placement", "RunResult", "kernel_differences", "run_scenario"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    summary: Summary


ProgressSink = Callable[[float, float, Progress], None]
_ON_HOST = Placement()
# seconds the load waits for its last Locust process once the first is ready: under
# CI's load the gap was up to 3 s; one that never comes is said, not waited for
ALL_STARTED_GRACE = 20.0


def run_scenario(
    scenario: Scenario,
    *,
    out: Path | None = None,
    progress: ProgressSink | None = None,
    locust_args: Sequence[str] = (),
    placement: Placement = _ON_HOST,
    master: Master | None = None,
    on_preflight: Callable[[dict[str, Any]], None] | None = None,
    web: Endpoint | None = None,
    trace: bool = False,
    report: bool = True,
) -> RunResult:
    """Run ``scenario``: its children, the load for ``duration``, then the summary and
    report. ``web``: Locust's web UI there (the test starts at once) instead of headless.
    ``trace``: the kernel recorder witnesses every connection (``kernel_witness``).
    ``report``: False leaves report.html to ``eph report`` (``--no-report``)."""
    if scenario.load.tls is not None:
        client_context(scenario.load.tls)  # a missing or bad PEM file: said before any load
    run = RunDir.open(out, create=True) if out else RunDir.create(Path("reports"), scenario.name)
    chosen = choose_processes(scenario, placement, master)
    if chosen.count > 1:
        chosen = chosen.model_copy(update={"master_port": master_port(placement)})
    logger.info(
        "load: %d Locust process%s; %s",
        chosen.count,
        "es" if chosen.count != 1 else "",
        chosen.why,
    )
    load = scenario.load.model_copy(update={"processes": chosen.count})
    scenario = scenario.model_copy(update={"load": load})
    if master is None:  # a master makes no connections: its workers' hosts matter
        _write_preflight(scenario, placement, run, on_preflight)
    else:
        placement = _master_placement(scenario, placement, master)
    kernel = _host_kernel(scenario, placement, master)
    workers = master.workers if master is not None else None
    write_state(
        run.path,
        Phase.STARTING,
        started_at=time.time(),
        expected_workers=workers,
        load_processes=chosen.model_dump(mode="json"),
    )
    with Interrupt() as interrupt, noting_errors(run.path):
        outcome = _run_children(
            scenario, run, placement, master, locust_args, interrupt, progress, web, trace,
            chosen.master_port,
        )  # fmt: skip
        stop_reason = "interrupted" if interrupt.set else outcome.stop_reason
        write_state(run.path, Phase.FINALIZING, stop_reason=stop_reason)
        summary = finalize(
            run.path,
            interrupted=interrupt.set,
            started_at=outcome.started_at,
            duration_s=outcome.load_ended - outcome.load_started,
            kernel=kernel,
            listener=outcome.listener,
            stop_reason=stop_reason,
            expected_workers=workers,
            report=report,
        )
        if trace:
            summary.kernel_witness = _witness(run, outcome.trace)
            run.write_json("summary.json", summary.to_json())
        write_state(run.path, Phase.FINISHED)
    if outcome.stop_reason == "disk":
        raise RunError(
            f"the disk holding {run.path} is nearly full ({free_bytes(run.path) / 2**20:.1f} MiB"
            " free): the run stopped early. What was recorded is merged there, with its"
            " summary and report; free some space (or lower EPH_MIN_FREE_MB) and run again."
        )
    return RunResult(run.path, summary)


def _host_kernel(
    scenario: Scenario, placement: Placement, master: Master | None
) -> dict[str, Any] | None:
    """This host's kernel, its differences from the scenario's warned about; None in a lab
    (the collector reads the lab's) or for a master (its kernel is not the workers')."""
    if not placement.on_host or master is not None:
        return None
    kernel = read_kernel()
    for note in kernel_differences(scenario, kernel):
        logger.warning("%s", note)
    return kernel


@dataclass
class _Outcome:
    """How the load went, for the run's summary."""

    started_at: float = field(default_factory=time.time)
    load_started: float = field(default_factory=time.monotonic)
    load_ended: float = 0.0
    stop_reason: str = "interrupted"
    listener: dict[str, Any] | None = None
    trace: TraceResult | str = "not traced"  # the kernel recorder's, or why it did not run

    def __post_init__(self) -> None:
        self.load_ended = self.load_started


def _run_children(
    scenario: Scenario,
    run: RunDir,
    placement: Placement,
    master: Master | None,
    locust_args: Sequence[str],
    interrupt: Interrupt,
    progress: ProgressSink | None,
    web: Endpoint | None = None,
    trace: bool = False,
    master_port: int | None = None,
) -> _Outcome:
    """Listener, collectors, Locust: start them, wait for the load's end, stop them
    (the supervisor's order: Locust, then the collectors, then the listener)."""
    outcome = _Outcome()
    with Supervisor() as supervisor:
        listener: ListenerChild | None = None
        if scenario.listener is not None:
            listener, scenario = start_listener(supervisor, scenario, run, placement.listener)
        run.write_scenario(scenario, replace=True)
        collectors = start_collectors(supervisor, scenario, run, placement)
        tracing = start_trace(supervisor, run.path, placement.load_netns) if trace else None
        launched = time.time()
        locust = start_locust(
            supervisor, scenario, run, placement, locust_args, master, web, master_port
        )
        start_timeout = START_TIMEOUT + (master.wait if master is not None else 0.0)
        outcome.load_started = _wait_for_start(
            locust,
            run,
            interrupt,
            start_timeout,
            by_master=master is not None,
            processes=scenario.load.process_count,
        )
        outcome.started_at = time.time()
        write_state(
            run.path,
            Phase.LOADING,
            load_started_at=time.time(),
            clock_offset_ns=clock_offset_ns(),
            locust_launched_at=launched,
        )
        outcome.stop_reason = _wait_for_end(
            locust, run, scenario, outcome.load_started, interrupt, progress, collectors
        )
        outcome.load_ended = time.monotonic()
        write_state(
            run.path,
            Phase.STOPPING,
            stop_reason=outcome.stop_reason,
            load_ended_at=time.time(),
            load_duration_s=outcome.load_ended - outcome.load_started,
        )
        if isinstance(tracing, KernelTrace):
            # the load's last sockets close before the recorder stops, and the recorder
            # stops on its own terms (its skipped events are read while it still runs)
            supervisor.stop(*[c for c in supervisor.running if c.stage is Stage.LOAD])
            outcome.trace = tracing.finish("kernel_connections.parquet")
        elif tracing is not None:
            outcome.trace = tracing
        supervisor.close()
        if listener is not None:
            outcome.listener = listener.stats()
            run.write_json("listener.json", outcome.listener)
    _log_exits(locust, collectors, run, interrupt)
    return outcome


def _witness(run: RunDir, trace: TraceResult | str) -> KernelWitness:
    records = run.path / "connections.parquet"
    if isinstance(trace, str):
        return kernel_witness(records, None, reason=trace)
    lost = trace.lost_events + trace.missed_events
    return kernel_witness(records, run.path / trace.table, lost_events=lost)


def _log_exits(
    locust: Child, collectors: Sequence[Child], run: RunDir, interrupt: Interrupt
) -> None:
    for collector in collectors:
        if collector.returncode not in (0, -signal.SIGTERM):
            logger.error(
                "the collector exited with code %s; see logs/collector.log", collector.returncode
            )
    if locust.returncode not in (0, -signal.SIGTERM) and not interrupt.set:
        logger.error("Locust exited with code %s; see %s", locust.returncode, run.logs)


def _master_placement(scenario: Scenario, placement: Placement, master: Master) -> Placement:
    """The master host makes no connections: each worker samples its own host."""
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
    return Placement(placement.load, placement.listener, ())


def _write_preflight(
    scenario: Scenario,
    placement: Placement,
    run: RunDir,
    on_preflight: Callable[[dict[str, Any]], None] | None,
) -> None:
    report = preflight_where(scenario, placement)
    if report is not None:
        run.write_json("preflight.json", report)
        if on_preflight is not None:
            on_preflight(report)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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
    locust: Child,
    run: RunDir,
    interrupt: Interrupt,
    timeout: float,
    *,
    by_master: bool = False,
    processes: int = 1,
) -> float:
    """When the load started: once each of its ``processes`` reports that it makes
    connections (``by_master``: the master's report, which relays its remote workers').
    With local ``--processes`` the master reports before it forks its workers, and a
    short run timed from it ended before any connection; under load a second process's
    uvloop engine was ready seconds after the first's, and a 3 s run had rows from one.
    A process not ready :data:`ALL_STARTED_GRACE` seconds after the first is said, and
    the load goes on without waiting for it. A Locust that could not start is a
    :class:`RunError` with its own reason (``logs/*.error``), said at once."""
    deadline = time.monotonic() + timeout
    first: float | None = None
    while time.monotonic() < deadline and not interrupt.set:
        reason = startup_error(run.path)
        if reason is not None:
            raise RunError(f"the load could not start: {reason}")
        now = time.monotonic()
        ready = sum(by_master or p.name != MASTER_PROGRESS for p in run.progress.glob("*.json"))
        if ready and first is None:
            first = now
        wanted = 1 if by_master else processes
        if ready >= wanted or (first is not None and now - first >= ALL_STARTED_GRACE):
            _say_start(ready, wanted, now - first if first is not None else 0.0)
            _open_gate(run, now)
            return now
        code = locust.poll()
        if code is not None:
            raise RunError(_why_not_started(run, code))
        time.sleep(0.05)
    if interrupt.set:
        return time.monotonic()
    raise RunError(f"Locust did not start within {timeout:.0f} s: see {run.logs}")


def _open_gate(run: RunDir, now: float) -> None:
    """Tell the local Locust processes to connect (``EPH_LOAD_GATE``): they hold their
    users until this file is there, so none connects before the run's window."""
    atomic_write_json(run.load_go, {"monotonic_ns": int(now * 1e9)})


def _say_start(ready: int, wanted: int, spread: float) -> None:
    """A start worth a line: a process missing, or the last one late."""
    if ready < wanted:
        logger.warning(
            "load: %d of %d Locust processes ready %.0f s after the first; the run goes on"
            " with them (see logs/)",
            ready,
            wanted,
            spread,
        )
    elif spread >= 1.0:
        logger.info(
            "load: the last of %d Locust processes was ready %.1f s after the first;"
            " the run's time counts from then",
            wanted,
            spread,
        )


def _why_not_started(run: RunDir, code: int) -> str:
    """Locust's own reason for exiting before its load, in one paragraph: eph's note
    (``logs/locust.error``), else the error line Locust printed (a bad argument)."""
    reason = startup_error(run.path)
    if reason is not None:
        return f"the load could not start: {reason}"
    said = _error_line(run.logs / "locust.out") or _error_line(run.logs / "locust.log")
    if said is not None:
        return (
            f"Locust could not start (exit {code}): {said}. Arguments after the scenario that"
            " eph does not know go to Locust as they are"
        )
    return (
        f"Locust exited (code {code}) before starting: "
        f"see {run.logs / 'locust.log'} and {run.logs / 'locust.out'}"
    )


def _error_line(path: Path) -> str | None:
    """The last line of a log that says error, without the program's name."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if "error" in line.lower():
            return line.split(": error: ", 1)[-1].strip()
    return None


def _wait_for_end(
    locust: Child,
    run: RunDir,
    scenario: Scenario,
    started: float,
    interrupt: Interrupt,
    progress: ProgressSink | None,
    collectors: Sequence[Child] = (),
) -> str:
    """Wait for the load to end; return why it did: ``duration``, ``max_connections``,
    ``disk`` (nearly full), ``interrupted`` or ``locust exited``."""
    duration = scenario.duration
    reserve = min_free_bytes()
    end = started + duration
    lost: set[int] = set()
    while not interrupt.set and locust.poll() is None:
        now = time.monotonic()
        # a Locust process that failed to start its engine after another had started
        # (the master's progress came first): the run is not the scenario's, said now
        failed = startup_error(run.path)
        if failed is not None:
            raise RunError(f"the load could not start: {failed}")
        _warn_lost_collectors(collectors, lost, now - started)
        counted = read_progress(run.progress)
        if progress is not None:
            progress(now - started, duration, counted)
        reason = _limit_reached(scenario, run, counted, reserve, now - started)
        if reason is not None:
            return reason
        if now >= end:
            return "duration"
        time.sleep(min(0.25, max(0.0, end - now)))
    return "interrupted" if interrupt.set else "locust exited"


def _warn_lost_collectors(collectors: Sequence[Child], lost: set[int], elapsed: float) -> None:
    for collector in collectors:
        code = collector.poll()
        if code is not None and collector.pid not in lost:
            lost.add(collector.pid)
            logger.warning(
                "the collector exited (code %s) %.1f s into the load; the run goes on"
                " without socket samples (see logs/collector.log)",
                code,
                elapsed,
            )


def _limit_reached(
    scenario: Scenario, run: RunDir, counted: Progress, reserve: int, elapsed: float
) -> str | None:
    """``max_connections`` or ``disk`` when that limit stops the run, else ``None``."""
    limit = scenario.load.max_connections
    if limit and counted.attempts >= limit:
        logger.warning(
            "load.max_connections = %d reached after %.1f s: stopping the run", limit, elapsed
        )
        return "max_connections"
    free = free_bytes(run.path)
    # The merge into connections.parquet needs room beside the parts it reads: at most
    # their size (zstd Parquet is smaller than the Arrow parts), so the reserve grows
    # with them. A 6 MiB disk once filled during the merge instead of before it.
    merge_room = run.parts_bytes()
    if free < reserve + merge_room:
        logger.error(
            "only %.1f MiB free where the run directory is (%s), under the %.0f MiB"
            " reserve (EPH_MIN_FREE_MB) plus the %.1f MiB the merge needs: stopping"
            " the run to keep what was recorded",
            free / 2**20,
            run.path,
            reserve / 2**20,
            merge_room / 2**20,
        )
        return "disk"
    return None
