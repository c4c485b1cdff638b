"""Closing a run directory: merge records, write the summary, render the report."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from harness.capacity.nat_model import NatCapacityModel
from harness.errors import RunDirError, SummaryError
from harness.kernel.sysctls import read_kernel
from harness.load.cpu_meter import CPU_FILE, is_cpu_part, merge_cpu_parts
from harness.observe.collector import finish_samples
from harness.observe.nat_collector import finish_nat
from harness.records import Part
from harness.report.analysis import analyze
from harness.report.cpu_section import cpu_section
from harness.report.hosts import HostSamples
from harness.report.nat_section import nat_section, scan_for_nat, with_nat_model
from harness.report.ondisk import Held, OnDisk, Records, as_handle, open_records
from harness.report.port_occupancy import kernel_conservation
from harness.report.rundata import RunData
from harness.report.scan import scan_records
from harness.report.summarize import summarize
from harness.run.crash import crash_section, crashed_state
from harness.run.leftovers import account_for_workers, collect
from harness.run.merge import merge_parts
from harness.run.readings import collector_kernel, locust_request_count, read_samples, worker_hosts
from harness.rundir import HOSTS_DIR, RunDir
from harness.runstate import RunState, read_state
from harness.scenario import Protocol, Scenario
from harness.summary import (
    Kernel,
    Listener,
    LoadProcesses,
    PriorRun,
    Service,
    Startup,
    Summary,
    validated,
)

__all__ = ["finalize", "load_run", "rerender"]

logger = logging.getLogger(__name__)


def finalize(
    path: Path,
    *,
    interrupted: bool = False,
    started_at: float | None = None,
    duration_s: float | None = None,
    kernel: Kernel | Mapping[str, Any] | None = None,
    listener: Mapping[str, Any] | None = None,
    locust_requests: int | None = None,
    stop_reason: str | None = None,
    expected_workers: int | None = None,
    crash: RunState | None = None,
    report: bool = True,
) -> Summary:
    """Merge part files into ``connections.parquet``, then write summary and report.
    ``crash``: the state of a run whose eph process died, as ``state.json`` left it.
    ``report``: False writes the summary only (``--no-report``; ``eph report`` renders
    it later from the same records)."""
    run = RunDir.open(path)
    _finish_samples(run)
    hosts = worker_hosts(run.path)
    _merge_cpu(run, hosts)
    _merge_records(run, hosts)
    records = as_handle(_read_connections(run))  # one handle: its scan is kept with it
    scenario = run.read_json("scenario.json")
    setup = Scenario.model_validate(scenario)
    facts = _facts(
        run,
        hosts,
        interrupted=interrupted,
        started_at=started_at,
        duration_s=duration_s,
        kernel=kernel,
        listener=listener,
        locust_requests=locust_requests,
    )
    summary = _summarize(run, records, setup, facts)
    _add_run_notes(run, summary, stop_reason, expected_workers, hosts)
    summary.startup = _startup(run, records)
    summary.load_processes = _load_processes(run)
    samples = read_samples(run.path / "samples.parquet")
    server_samples = read_samples(run.path / "server" / "samples.parquet")
    summary = analyze(records, samples, setup, summary, server_samples, hosts)
    # the NAT's hold after close, as the model has it: the lab's held TIME_WAIT or none
    hold_s = NatCapacityModel.from_scenario(setup, lifetime_s=0.0).hold_s
    if (run.path / "router" / "nat.parquet").exists():  # the nat lab's router, any size
        scan = scan_for_nat(records)
        nat = nat_section(run.path, records, hold_s, scan)
        if nat is not None:
            summary.nat = with_nat_model(nat, summary, setup, scan.lifetime_s(setup.load.hold))
    if crash is not None:
        summary.crash = crash_section(crash, records, samples)
    cpu = cpu_section(_read_cpu(run.path), samples, summary.capacity.model_ports)
    if cpu is not None:
        summary.cpu = cpu
    if setup.load.protocol is Protocol.TCP:  # ActiveOpens counts TCP
        judged = _kernel_is_ours(run.path, hosts)
        _judge_kernel(summary, records, samples, setup, judged=judged)
    run.write_json("summary.json", summary.to_json())
    if not report:
        logger.info("report.html not rendered (--no-report): eph report %s renders it", run.path)
        return summary
    # here, not at the top: matplotlib and jinja2 are 0.44 s of CPU to import (of a
    # 1 s run's 3.3 s in all its processes), spent for nothing with --no-report
    from harness.report.html import render_report

    nat_samples = read_samples(run.path / "router" / "nat.parquet")
    render_report(
        run.report,
        RunData(
            records.table if isinstance(records, Held) else records,
            samples,
            summary,
            scenario,
            server_samples,
            tuple(hosts),
            nat_samples,
            handle=records,
        ),
    )
    return summary


@dataclass(frozen=True)
class _RunFacts:
    """What only the run itself knew, as finalize was given it."""

    interrupted: bool
    started_at: float  # seconds since the epoch
    duration_s: float | None  # the load's window; None: the records' span
    kernel: Kernel
    listener: Listener | None
    locust_requests: int | None


def _facts(
    run: RunDir,
    hosts: list[HostSamples],
    *,
    interrupted: bool,
    started_at: float | None,
    duration_s: float | None,
    kernel: Kernel | Mapping[str, Any] | None,
    listener: Mapping[str, Any] | None,
    locust_requests: int | None,
) -> _RunFacts:
    """What finalize was given, the gaps filled from the run directory (or this host)."""
    counts = None
    if listener is not None:
        counts = validated(Listener, listener, run.path / "listener.json")
    if locust_requests is None:
        locust_requests = locust_request_count(run.path / "locust.json")
    return _RunFacts(
        interrupted=interrupted,
        started_at=run.path.stat().st_mtime if started_at is None else started_at,
        duration_s=duration_s,
        kernel=_kernel(run.path, hosts, kernel),
        listener=counts,
        locust_requests=locust_requests,
    )


def _finish_samples(run: RunDir) -> None:
    """Convert the sample streams of collectors that died (killed, crashed)."""
    for directory in (run.path, run.path / "server", *sorted((run.path / HOSTS_DIR).glob("*/"))):
        if (directory / "samples.arrows").exists():
            kept = finish_samples(directory)
            logger.warning("%s: the collector did not finish; kept %d samples", directory, kept)
    if (run.path / "router" / "nat.arrows").exists():
        kept = finish_nat(run.path / "router")
        logger.warning("the NAT collector did not finish; kept %d rows", kept)


def _parts(run: RunDir, hosts: list[HostSamples], *, cpu: bool) -> list[Part]:
    """This host's part files and every worker's: the CPU parts, or the records'."""
    found = [Part(p) for p in sorted(run.parts.glob("*.arrows"))] + [
        Part(p, host.name, int(host.info.get("clock_shift_ns", 0)))
        for host in hosts
        for p in sorted((run.path / HOSTS_DIR / host.name / "parts").glob("*.arrows"))
    ]
    return [part for part in found if is_cpu_part(part.path) == cpu]


def _merge_cpu(run: RunDir, hosts: list[HostSamples]) -> None:
    """Every load process's CPU per interval into ``cpu.parquet``."""
    parts = _parts(run, hosts, cpu=True)
    if not parts:
        return  # nothing new (eph report), or a run from before CPU was recorded
    try:
        rows = merge_cpu_parts(parts, run.path / CPU_FILE)
    except OSError as exc:
        logger.warning("cannot write %s (%s); its parts stay in parts/", CPU_FILE, exc)
        return
    for part in parts:
        part.path.unlink()
    logger.debug("merged %d CPU rows from %d parts", rows, len(parts))


def _read_cpu(path: Path) -> pa.Table | None:
    try:
        return pq.read_table(path / CPU_FILE)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s); the summary has no cpu section", CPU_FILE, exc)
        return None


def _merge_records(run: RunDir, hosts: list[HostSamples]) -> None:
    """This host's record parts and every worker's into ``connections.parquet``."""
    parts = _parts(run, hosts, cpu=False)
    if not parts and run.connections.exists():
        return
    try:
        rows, truncated = merge_parts(parts, run.connections)
    except OSError as exc:
        raise RunDirError(
            run.path,
            f"cannot write connections.parquet ({exc.strerror or exc}); the record parts"
            f" in parts/ are intact: free some space and run `eph report {run.path}`",
        ) from None
    for part_path in truncated:
        logger.warning("records part %s was truncated; kept its whole batches", part_path)
    for part in parts:
        part.path.unlink()
    logger.debug("merged %d rows from %d parts", rows, len(parts))


def _read_connections(run: RunDir) -> pa.Table | OnDisk:
    """The records in memory, or for a large run a handle the analyses scan
    (``harness.report.ondisk``): either goes wherever a table of them goes."""
    try:
        return open_records(run.connections)
    except (OSError, ValueError) as exc:
        raise RunDirError(run.path, f"connections.parquet is unreadable ({exc})") from None


def _kernel(
    path: Path, hosts: list[HostSamples], given: Kernel | Mapping[str, Any] | None
) -> Kernel:
    """The kernel as given, else as the collector (or a worker's) saw it, else this one."""
    if isinstance(given, Kernel):
        return given
    if given is not None:
        return validated(Kernel, given, "the run's kernel reading")
    found = collector_kernel(path) or next((h.kernel for h in hosts if h.kernel), None)
    return found if found is not None else Kernel.model_validate(read_kernel())


def _summarize(run: RunDir, table: Records, setup: Scenario, facts: _RunFacts) -> Summary:
    """The sections that come from the records alone: one scan, for every size."""
    scan = scan_records(table)
    span_s = scan.span_s
    http = scan.http.section()
    duration_s = span_s if facts.duration_s is None else facts.duration_s
    started = dt.datetime.fromtimestamp(facts.started_at, dt.UTC)
    return summarize(
        scan,
        scenario=setup.name,
        started_at=started.isoformat(timespec="seconds"),
        duration_s=duration_s,
        interrupted=facts.interrupted,
        kernel=facts.kernel,
        listener=facts.listener,
        locust_requests=facts.locust_requests,
        lossy_link=bool(setup.lab.loss) and (run.path / "lab.json").exists(),
        datagrams=setup.load.protocol is Protocol.UDP,
        http=http,
    )


def _add_run_notes(
    run: RunDir,
    summary: Summary,
    stop_reason: str | None,
    expected_workers: int | None,
    hosts: list[HostSamples],
) -> None:
    """Why the run stopped, the stand-in service's timeline, the workers that shipped."""
    if stop_reason is not None:
        summary.stop_reason = stop_reason
    if (run.path / "service.json").exists():  # the port-conflict lab's stand-in service
        service = run.read_json("service.json")
        summary.service = validated(Service, service, run.path / "service.json")
    if expected_workers is not None:
        summary.distributed = account_for_workers(run.path, summary, expected_workers, hosts)


def _startup(run: RunDir, records: Held | OnDisk) -> Startup | None:
    """From eph launching Locust (``state.json``) to the first record, and to the load's
    end: how long the engines took to start, measured in this run."""
    state = read_state(run.path)
    if state is None or state.locust_launched_at is None:
        return None
    launched = state.locust_launched_at
    first_ns = scan_records(records).first_ns if records.num_rows else None
    first = (
        round((first_ns + state.clock_offset_ns) / 1e9 - launched, 3)
        if first_ns is not None and state.clock_offset_ns is not None
        else None
    )
    end = round(state.load_ended_at - launched, 3) if state.load_ended_at is not None else None
    return Startup(launched_to_first_attempt_s=first, launched_to_end_s=end)


def _load_processes(run: RunDir) -> LoadProcesses | None:
    """How many Locust processes the run chose, and why; None for a run before eph said."""
    state = read_state(run.path)
    if state is None or state.load_processes is None:
        return None
    return LoadProcesses.model_validate(state.load_processes)


def _kernel_is_ours(path: Path, hosts: list[HostSamples]) -> bool:
    """Only a lab's namespace holds nothing but this run's sockets: no workers elsewhere."""
    return (path / "lab.json").exists() and not hosts


def _judge_kernel(
    summary: Summary, records: Records, samples: pa.Table | None, setup: Scenario, *, judged: bool
) -> None:
    found = kernel_conservation(records, samples)
    if found is None or found.kernel_active_opens is None:
        return
    cons = summary.conservation
    cons.kernel_active_opens = found.kernel_active_opens
    cons.kernel_attempt_fails = found.kernel_attempt_fails
    cons.attempts_sending_syn = found.attempts_sending_syn
    # Locust's --processes N forks N workers, each connecting to its master over
    # loopback in the load's namespace: the kernel counts them (a lab's run at
    # processes = 2 counted 802 for 800 attempts sending a SYN, either engine), and a
    # worker's try before its master listens once more, refused (77 for 74, with one
    # AttemptFails the records did not make)
    processes = setup.load.processes
    workers = processes if isinstance(processes, int) and processes > 1 else 0
    refused = (found.kernel_attempt_fails or 0) - found.attempts_failing_after_syn
    cons.kernel_other_opens = workers + refused if workers else 0
    match = found.kernel_active_opens == found.attempts_sending_syn + cons.kernel_other_opens
    cons.attempts_match_kernel = match
    if judged:
        cons.ok = bool(cons.ok and match)
    else:
        cons.kernel_check = "not judged: other sockets share this kernel (not a lab)"


def rerender(path: Path, collect_from: Sequence[Path] = ()) -> Summary:
    """``eph report``: summary and report again from what a run directory holds.

    What only the run itself knew (interrupted, start, load window, listener
    counts, kernel) comes from its ``summary.json`` (of this schema version or an
    older one) and ``listener.json``. A run that never finished (``state.json``)
    and whose eph process is gone is summarized as crashed, from what its parts hold.
    ``collect_from``: run directories of workers that never shipped, folded in first.
    """
    run = RunDir.open(path)
    crash = crashed_state(run)  # a run still going is refused
    for worker_dir in collect_from:
        logger.info("%s: collected as %s", worker_dir, collect(run.path, worker_dir))
    if not run.connections.exists() and not any(run.parts.glob("*.arrows")):
        raise RunDirError(
            path, "has no connections.parquet: not a run directory, or the run never started"
        )
    try:
        Scenario.model_validate(run.read_json("scenario.json"))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise RunDirError(path, f"scenario.json does not validate ({exc})") from None
    previous = _prior_run(run, crash)
    listener = run.read_json("listener.json") if (run.path / "listener.json").exists() else None
    started = previous.started_at
    expected = previous.distributed.expected_workers if previous.distributed else None
    state = read_state(run.path)
    if expected is None and state is not None:
        expected = state.expected_workers
    return finalize(
        path,
        interrupted=previous.interrupted,
        started_at=dt.datetime.fromisoformat(started).timestamp() if started else None,
        duration_s=previous.duration_s,
        kernel=previous.kernel,
        listener=listener,
        stop_reason=previous.stop_reason,
        crash=crash,
        expected_workers=expected,
    )


def _prior_run(run: RunDir, crash: RunState | None) -> PriorRun:
    """What only the run knew: from its ``summary.json``; when that is missing or
    unreadable, from ``state.json`` (start, load window, stop reason), and the log says
    which; a crashed run's marked so."""
    previous: PriorRun | None = None
    if run.summary.exists():
        try:
            previous = PriorRun.load(run.summary)
        except (RunDirError, SummaryError) as exc:
            logger.warning("%s", exc)
    if previous is None:
        state = crash or read_state(run.path)
        previous = _from_state(state) if state is not None else PriorRun()
        logger.warning(
            "%s: the run's start, load window and stop reason come from %s; every"
            " figure from the records",
            run.summary,
            "state.json" if state is not None else "nowhere (no state.json): the records' span",
        )
    if crash is None:
        return previous
    started = previous.started_at
    wall = crash.load_started_at or crash.started_at
    if started is None and wall is not None:
        started = _iso(wall)
    return previous.model_copy(
        update={"interrupted": True, "stop_reason": "crashed", "started_at": started}
    )


def _from_state(state: RunState) -> PriorRun:
    """The facts ``state.json`` keeps of a run, as ``summary.json`` would have held them."""
    started = state.load_started_at or state.started_at
    window = state.load_duration_s
    if window is None and state.load_started_at is not None and state.load_ended_at is not None:
        window = state.load_ended_at - state.load_started_at
    return PriorRun(
        interrupted=state.stop_reason == "interrupted",
        started_at=_iso(started) if started is not None else None,
        duration_s=window,
        stop_reason=state.stop_reason,
    )


def _iso(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.UTC).isoformat(timespec="seconds")


def load_run(path: Path) -> RunData:
    """A finalized run directory's data, for ``eph report --compare``; a summary of an
    older schema version is written again first."""
    run = RunDir.open(path)
    summary = rerender(path) if not run.summary.exists() else None
    if summary is None:
        try:
            summary = Summary.load(run.summary)
        except SummaryError as exc:
            logger.warning("%s; writing it again", exc)
            summary = rerender(path)
    return RunData(
        _read_connections(run),
        read_samples(run.path / "samples.parquet"),
        summary,
        run.read_json("scenario.json"),
        read_samples(run.path / "server" / "samples.parquet"),
        tuple(worker_hosts(run.path)),
    )
