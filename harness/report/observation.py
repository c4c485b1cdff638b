"""The summary of an observation (``eph observe --out DIR``): which path ran out, or will.

Read from the directory alone (``paths.parquet``, ``host.parquet``,
``observe.json``), so ``eph report DIR`` can render it again at any time. Rows
are samples x kept paths: small even for a day at one sample a second, so the
tables are read whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from harness.errors import RunDirError
from harness.observe.store import STATE_COLUMNS
from harness.report.cliff import CliffInput, detect_cliff
from harness.report.sections import LatencyCliff, Tuples
from harness.report.tuples import audit_tuples

__all__ = [
    "OBSERVE_SCHEMA_VERSION",
    "ObserveSummary",
    "ObservedPath",
    "is_observation",
    "summarize_observation",
]

OBSERVE_SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ObservedPath(_Model):
    """One path (local address -> remote address:port) over the whole observation."""

    label: str
    protocol: str
    local_addr: str
    remote: str  # address:port
    peak_ports: int
    usable_ports: int
    peak_fraction: float
    peak_at_s: float  # seconds from the start
    states_at_peak: dict[str, int]
    new_per_s_peak: float
    new_per_s_mean: float
    hold_s: float  # TIME_WAIT hold seen on the path (0: the client did not close first)
    lifetime_s: float  # median estimate, connect to close
    time_to_exhaustion_s: float | None  # shortest estimate seen; None: never heading there
    first_full_s: float | None


class Exhaustion(_Model):
    exhausted: bool
    path: str | None
    first_full_s: float | None


class HostCounters(_Model):
    time_wait_peak: int | None
    tw_recycled: int | None  # over the observation
    timewait_overflow: int | None
    active_opens_per_s_peak: float | None
    conntrack_peak: int | None
    conntrack_max: int | None
    sample_ms_median: float


class ExecRecord(_Model):
    """``eph lab --exec``: the user's command and how it ended (``exec.json``)."""

    command: list[str]
    target: str
    exit_code: int | None  # None: stopped by eph at the scenario's duration
    ran_s: float
    stopped_at_duration: bool
    exited_at_once: bool
    stdout: str
    stderr: str
    verdict: str  # how it ended, for a person (written by harness.lab.exec)


class Traced(_Model):
    """What the eBPF recorder's rows say (``eph observe --trace``, ``lab --exec --trace``).

    The same analysis as a run's records: the 4-tuple audit, and the latency cliff
    of the busiest traced path, its occupancy read from the samples of that path.
    """

    connections: int
    failed: int
    path: str | None  # the busiest traced path, whose latency the cliff reads
    tuples: Tuples
    latency_cliff: LatencyCliff


class ObserveSummary(_Model):
    """``summary.json`` of an observation; ``mode`` tells it from a run's."""

    schema_version: int = OBSERVE_SCHEMA_VERSION
    mode: Literal["observe"] = "observe"
    started_at: str
    duration_s: float
    samples: int
    interval_s: float
    stop_reason: str | None
    settings: dict[str, Any]
    paths_seen_peak: int
    paths: list[ObservedPath]
    exhaustion: Exhaustion
    host: HostCounters
    exec: ExecRecord | None = None  # eph lab --exec: the client that was observed
    # with --trace: the kernel's row of every client connection (connections.parquet)
    traced: Traced | None = None

    @classmethod
    def read(cls, path: Path) -> ObserveSummary:
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            reason = f"{path.name} is not an observation summary: {exc}"
            raise RunDirError(path.parent, reason) from None


def is_observation(directory: Path) -> bool:
    """Whether ``directory`` holds an observation rather than a run."""
    return (directory / "observe.json").exists()


def _read(directory: Path, name: str) -> pa.Table:
    path = directory / name
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise RunDirError(directory, f"cannot read {name}: {exc}") from None


def summarize_observation(directory: Path) -> ObserveSummary:
    """The summary of the observation stored in ``directory``."""
    meta = json.loads((directory / "observe.json").read_text(encoding="utf-8"))
    paths = _read(directory, "paths.parquet")
    host = _read(directory, "host.parquet")
    t0 = float(meta["started"])
    observed = [_path(paths, label, t0) for label in _labels(paths)]
    observed.sort(key=lambda p: (-p.peak_fraction, -p.peak_ports, p.label))
    full = [p for p in observed if p.first_full_s is not None]
    first = min(full, key=lambda p: p.first_full_s or 0.0) if full else None
    return ObserveSummary(
        started_at=meta["started_at"],
        duration_s=float(meta.get("duration_s") or 0.0),
        samples=host.num_rows,
        interval_s=float(meta["interval_s"]),
        stop_reason=meta.get("stop_reason"),
        settings=meta["settings"],
        paths_seen_peak=int(pc.max(host.column("paths")).as_py() or 0) if host.num_rows else 0,
        paths=observed,
        exhaustion=Exhaustion(
            exhausted=first is not None,
            path=first.label if first else None,
            first_full_s=first.first_full_s if first else None,
        ),
        host=_host(host, meta["settings"].get("conntrack_max")),
        exec=_exec(directory),
        traced=_traced(directory, paths),
    )


def _traced(directory: Path, paths: pa.Table) -> Traced | None:
    """The kernel's rows, when the observation traced them."""
    table_path, meta_path = directory / "connections.parquet", directory / "kernel.json"
    if not (table_path.exists() and meta_path.exists()):
        return None
    table = _read(directory, "connections.parquet")
    offset = int(json.loads(meta_path.read_text(encoding="utf-8"))["wall_minus_monotonic_ns"])
    errno = table.column("errno").to_numpy(zero_copy_only=False)
    label, cliff = _path_cliff(table, paths, offset)
    return Traced(
        connections=table.num_rows,
        failed=int((errno != 0).sum()),
        path=label,
        tuples=audit_tuples(table).section(),
        latency_cliff=cliff,
    )


def _path_cliff(
    table: pa.Table, paths: pa.Table, offset_ns: int
) -> tuple[str | None, LatencyCliff]:
    """Connect latency against the busiest traced path's occupancy when each began."""
    if table.num_rows == 0:
        return None, LatencyCliff(detected=False)
    keys = pc.binary_join_element_wise(
        table.column("local_addr").cast(pa.string()),
        pc.binary_join_element_wise(
            table.column("remote_addr").cast(pa.string()),
            table.column("remote_port").cast(pa.string()),
            ":",
        ),
        " -> ",
    )
    counts = pc.value_counts(keys)
    top = counts.field("values")[
        int(pc.index(counts.field("counts"), pc.max(counts.field("counts"))).as_py())
    ]
    label = str(top.as_py())
    rows = table.filter(pc.equal(keys, top))
    series = paths.filter(pc.equal(paths.column("label"), label))
    start = rows.column("start_ns").to_numpy().astype(np.int64)
    errno = rows.column("errno").to_numpy(zero_copy_only=False)
    ok = errno == 0
    wall_s = (start + offset_ns) / 1e9
    occupancy = (
        np.interp(
            wall_s,
            series.column("time").to_numpy(),
            series.column("occupancy").to_numpy(zero_copy_only=False).astype(float),
        )
        if series.num_rows
        else np.zeros(len(start))
    )
    first = float(start.min()) / 1e9
    cliff = detect_cliff(
        CliffInput(
            occupancy=occupancy[ok],
            connect_ms=rows.column("connect_us").to_numpy(zero_copy_only=False)[ok] / 1000.0,
            start_s=start[ok] / 1e9 - first,
            failures_s=np.sort(start[errno == 99] / 1e9 - first),
        )
    )
    return label, cliff


def _exec(directory: Path) -> ExecRecord | None:
    path = directory / "exec.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return None if "error" in data else ExecRecord.model_validate(data)


def _labels(paths: pa.Table) -> list[str]:
    """Every labelled path (``other`` is an aggregate, not a path)."""
    labels = pc.unique(paths.column("label")).to_pylist()
    return [label for label in labels if label and label != "other"]


def _finite(values: np.ndarray) -> np.ndarray:
    kept: np.ndarray = values[np.isfinite(values)]
    return kept


def _path(paths: pa.Table, label: str, t0: float) -> ObservedPath:
    rows = paths.filter(pc.equal(paths.column("label"), label))
    col = {name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names}
    peak = int(np.argmax(col["ports"]))
    usable = int(col["usable"][peak])
    full = np.flatnonzero(col["ports"] >= col["usable"])
    rates = _finite(col["new_per_s"].astype(float))
    tte = _finite(col["time_to_exhaustion_s"].astype(float))
    lifetimes = _finite(col["lifetime_s"].astype(float))
    return ObservedPath(
        label=label,
        protocol=str(col["protocol"][peak]),
        local_addr=str(col["local"][peak]),
        remote=f"{col['remote'][peak]}:{int(col['remote_port'][peak])}",
        peak_ports=int(col["ports"][peak]),
        usable_ports=usable,
        peak_fraction=float(col["ports"][peak]) / max(1, usable),
        peak_at_s=float(col["time"][peak]) - t0,
        states_at_peak={s: int(col[s][peak]) for s in STATE_COLUMNS if col[s][peak]},
        new_per_s_peak=float(rates.max()) if len(rates) else 0.0,
        new_per_s_mean=float(rates.mean()) if len(rates) else 0.0,
        hold_s=float(col["hold_s"].max()),
        lifetime_s=float(np.median(lifetimes)) if len(lifetimes) else 0.0,
        time_to_exhaustion_s=float(tte.min()) if len(tte) else None,
        first_full_s=float(col["time"][full[0]]) - t0 if len(full) else None,
    )


def _max(host: pa.Table, name: str) -> int | None:
    value = pc.max(host.column(name)).as_py() if host.num_rows else None
    return None if value is None else int(value)


def _delta(host: pa.Table, name: str) -> int | None:
    values = host.column(name).drop_null()
    if len(values) < 2:
        return None
    return int(values[-1].as_py()) - int(values[0].as_py())


def _host(host: pa.Table, conntrack_max: int | None) -> HostCounters:
    time = host.column("time").to_numpy()
    opens = host.column("active_opens").to_numpy(zero_copy_only=False).astype(float)
    rates = np.diff(opens) / np.diff(time) if host.num_rows > 1 else np.zeros(0)
    rates = _finite(rates)
    sample_ms = host.column("sample_ms").to_numpy(zero_copy_only=False).astype(float)
    return HostCounters(
        time_wait_peak=_max(host, "sockstat_tw"),
        tw_recycled=_delta(host, "tw_recycled"),
        timewait_overflow=_delta(host, "timewait_overflow"),
        active_opens_per_s_peak=float(rates.max()) if len(rates) else None,
        conntrack_peak=_max(host, "conntrack_count"),
        conntrack_max=conntrack_max,
        sample_ms_median=float(np.median(sample_ms)) if len(sample_ms) else 0.0,
    )
