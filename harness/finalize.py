"""Closing a run directory: merge records, write the summary, render the report."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from harness.errors import RunDirError
from harness.kernel.sysctls import read_kernel
from harness.observe.collector import finish_samples
from harness.records import Part, merge_parts
from harness.report.analysis import HostSamples, analyze, kernel_conservation
from harness.report.figures import RunData
from harness.report.html import render_report
from harness.report.summary import Columns, summarize
from harness.rundir import HOSTS_DIR, RunDir
from harness.scenario import Scenario

__all__ = ["finalize", "load_run", "locust_request_count", "rerender", "worker_hosts"]

logger = logging.getLogger(__name__)


def finalize(
    path: Path,
    *,
    interrupted: bool = False,
    started_at: float | None = None,
    duration_s: float | None = None,
    kernel: dict[str, Any] | None = None,
    listener: dict[str, Any] | None = None,
    locust_requests: int | None = None,
    stop_reason: str | None = None,
    expected_workers: int | None = None,
) -> dict[str, Any]:
    """Merge part files into ``connections.parquet``, then write summary and report."""
    run = RunDir.open(path)
    for directory in (run.path, run.path / "server", *sorted((run.path / HOSTS_DIR).glob("*/"))):
        # a collector that died (killed, crashed) left its stream unconverted
        if (directory / "samples.arrows").exists():
            kept = finish_samples(directory)
            logger.warning("%s: the collector did not finish; kept %d samples", directory, kept)
    hosts = worker_hosts(run.path)
    parts = [Part(p) for p in sorted(run.parts.glob("*.arrows"))] + [
        Part(p, host.name, int(host.info.get("clock_shift_ns", 0)))
        for host in hosts
        for p in sorted((run.path / HOSTS_DIR / host.name / "parts").glob("*.arrows"))
    ]
    if parts or not run.connections.exists():
        try:
            rows, truncated = merge_parts(parts, run.connections)
        except OSError as exc:
            raise RunDirError(
                path,
                f"cannot write connections.parquet ({exc.strerror or exc}); the record parts"
                f" in parts/ are intact: free some space and run `eph report {path}`",
            ) from None
        for part_path in truncated:
            logger.warning("records part %s was truncated; kept its whole batches", part_path)
        for part in parts:
            part.path.unlink()
        logger.debug("merged %d rows from %d parts", rows, len(parts))
    try:
        table = pq.read_table(run.connections)
    except (OSError, ValueError) as exc:
        raise RunDirError(path, f"connections.parquet is unreadable ({exc})") from None
    cols = Columns.from_table(table)
    if duration_s is None:
        duration_s = float(cols.seconds().max()) if len(cols.start_ns) else 0.0
    if started_at is None:
        started_at = run.path.stat().st_mtime
    if locust_requests is None:
        locust_requests = locust_request_count(run.path / "locust.json")
    scenario = run.read_json("scenario.json")
    if kernel is None:
        kernel = (
            _collector_kernel(run.path)
            or next((h.kernel for h in hosts if h.kernel), None)
            or read_kernel()
        )
    summary = summarize(
        cols,
        scenario=scenario["name"],
        started_at=dt.datetime.fromtimestamp(started_at, dt.UTC).isoformat(timespec="seconds"),
        duration_s=duration_s,
        interrupted=interrupted,
        kernel=kernel,
        listener=listener,
        locust_requests=locust_requests,
        lossy_link=bool(scenario.get("lab", {}).get("loss")) and (run.path / "lab.json").exists(),
        datagrams=scenario.get("load", {}).get("protocol") == "udp",
    )
    if stop_reason is not None:
        summary["stop_reason"] = stop_reason
    if (run.path / "service.json").exists():  # the port-conflict lab's stand-in service
        summary["service"] = run.read_json("service.json")
    if expected_workers is not None:
        shipped = [host.name for host in hosts if host.info]
        summary["distributed"] = {
            "expected_workers": expected_workers,
            "hosts_shipped": shipped,
            # a worker that died (or lost the master) never shipped: its records stayed
            # on its host, and Locust counted its requests up to its last report
            "missing_workers": max(0, expected_workers - len(shipped)),
        }
        if summary["distributed"]["missing_workers"]:
            summary["conservation"]["ok"] = False  # attempts were made that no record holds
    samples = _read_samples(run.path / "samples.parquet")
    server_samples = _read_samples(run.path / "server" / "samples.parquet")
    summary.update(
        analyze(
            table,
            samples,
            Scenario.model_validate(scenario),
            kernel,
            summary,
            server_samples,
            hosts,
        )
    )
    if scenario.get("load", {}).get("protocol", "tcp") == "tcp":  # ActiveOpens counts TCP
        _judge_kernel(summary, table, samples, judged=_kernel_is_ours(run.path, scenario, hosts))
    run.write_json("summary.json", summary)
    render_report(
        run.report, RunData(table, samples, summary, scenario, server_samples, tuple(hosts))
    )
    return summary


def _kernel_is_ours(path: Path, scenario: dict[str, Any], hosts: list[HostSamples]) -> bool:
    """Only a lab's namespace holds nothing but this run's sockets: one Locust process
    (more talk to each other over TCP), no workers elsewhere."""
    processes = int(scenario.get("load", {}).get("processes", 1))
    return (path / "lab.json").exists() and processes == 1 and not hosts


def _judge_kernel(
    summary: dict[str, Any], table: pa.Table, samples: pa.Table | None, *, judged: bool
) -> None:
    found = kernel_conservation(table, samples)
    if found is None or found["kernel_active_opens"] is None:
        return
    cons = summary["conservation"]
    cons.update(found)
    match = found["kernel_active_opens"] == found["attempts_sending_syn"]
    cons["attempts_match_kernel"] = match
    if judged:
        cons["ok"] = bool(cons["ok"] and match)
    else:
        cons["kernel_check"] = "not judged: other sockets share this kernel (not a lab)"


def worker_hosts(path: Path) -> list[HostSamples]:
    """The workers of a distributed run (``hosts/<name>/``), samples on this run's clock."""
    hosts = []
    for directory in sorted((path / HOSTS_DIR).glob("*/")):
        try:
            info = json.loads((directory / "host.json").read_text())
        except (OSError, ValueError):
            logger.warning("%s has no readable host.json: its files did not all arrive", directory)
            info = {}
        samples = _read_samples(directory / "samples.parquet")
        shift = int(info.get("clock_shift_ns", 0))
        if samples is not None and shift:
            t_ns = pa.array(samples.column("t_ns").to_numpy() + shift)
            samples = samples.set_column(samples.schema.get_field_index("t_ns"), "t_ns", t_ns)
        hosts.append(HostSamples(directory.name, samples, _collector_kernel(directory), info))
    return hosts


def rerender(path: Path) -> dict[str, Any]:
    """``eph report``: summary and report again from what a run directory holds.

    What only the run itself knew (interrupted, start, load window, listener
    counts, kernel) comes from its ``summary.json`` and ``listener.json``.
    """
    run = RunDir.open(path)
    if not run.connections.exists() and not any(run.parts.glob("*.arrows")):
        raise RunDirError(
            path, "has no connections.parquet: not a run directory, or the run never started"
        )
    try:
        Scenario.model_validate(run.read_json("scenario.json"))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise RunDirError(path, f"scenario.json does not validate ({exc})") from None
    previous: dict[str, Any] = {}
    if run.summary.exists():
        try:
            previous = run.read_json("summary.json")
        except RunDirError as exc:
            logger.warning("%s; recomputing without it", exc)
    listener = run.read_json("listener.json") if (run.path / "listener.json").exists() else None
    started = previous.get("started_at")
    return finalize(
        path,
        interrupted=bool(previous.get("interrupted", False)),
        started_at=dt.datetime.fromisoformat(started).timestamp() if started else None,
        duration_s=previous.get("duration_s"),
        kernel=previous.get("kernel"),
        listener=listener,
        stop_reason=previous.get("stop_reason"),
        expected_workers=(previous.get("distributed") or {}).get("expected_workers"),
    )


def load_run(path: Path) -> RunData:
    """A finalized run directory's data, for ``eph report --compare``."""
    run = RunDir.open(path)
    if not run.summary.exists():
        rerender(path)
    try:
        table = pq.read_table(run.connections)
    except (OSError, ValueError) as exc:
        raise RunDirError(path, f"connections.parquet is unreadable ({exc})") from None
    return RunData(
        table,
        _read_samples(run.path / "samples.parquet"),
        run.read_json("summary.json"),
        run.read_json("scenario.json"),
        _read_samples(run.path / "server" / "samples.parquet"),
        tuple(worker_hosts(run.path)),
    )


def _collector_kernel(path: Path) -> dict[str, Any] | None:
    """The kernel as the collector saw it at the start: where the clients ran."""
    try:
        found = json.loads((path / "collector.json").read_text())["start"]
    except (OSError, ValueError, KeyError):
        return None
    return dict(found)


def _read_samples(path: Path) -> pa.Table | None:
    if not path.exists():
        return None
    try:
        return pq.read_table(path)
    except (OSError, ValueError) as exc:
        logger.warning("samples.parquet is unreadable (%s); analysing without samples", exc)
        return None


def locust_request_count(path: Path) -> int | None:
    """The request total of Locust's ``--json-file`` output, if there is one."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return sum(int(entry.get("num_requests", 0)) for entry in entries)
