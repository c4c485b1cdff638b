"""The summary of an observation (``eph observe --out DIR``): which path ran out, or will.

Read from the directory alone (``paths.parquet``, ``host.parquet``,
``observe.json``), so ``eph report DIR`` can render it again at any time. Rows
are samples x kept paths: small even for a day at one sample a second, so the
tables are read whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from harness.errors import RunDirError
from harness.observe.store import STATE_COLUMNS
from harness.report.analysis import audit_of, latency_cliff
from harness.report.disk_sweep import InUse
from harness.report.ondisk import Held
from harness.summary import (
    ExecRecord,
    HostCounters,
    LatencyCliff,
    ObservedPath,
    ObserveSummary,
    PathExhaustion,
    PathOpener,
    PathOwner,
    Traced,
)

__all__ = [
    "is_observation",
    "summarize_observation",
]


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
    observed = _with_openers(directory, observed, t0)
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
        exhaustion=PathExhaustion(
            exhausted=first is not None,
            path=first.label if first else None,
            first_full_s=first.first_full_s if first else None,
        ),
        host=_host(host, meta["settings"].get("conntrack_max")),
        exec=_exec(directory),
        traced=_traced(directory, paths),
    )


OPENERS_TOP = 5


def _with_openers(directory: Path, observed: list[ObservedPath], t0: float) -> list[ObservedPath]:
    """With a trace: each path's TIME_WAIT ports at its peak, by the program that opened
    the connection (a TIME_WAIT socket has no owner left to find in /proc)."""
    table_path, meta_path = directory / "connections.parquet", directory / "kernel.json"
    if not (table_path.exists() and meta_path.exists()):
        return observed
    offset = int(json.loads(meta_path.read_text(encoding="utf-8"))["wall_minus_monotonic_ns"])
    columns = ["local_addr", "local_port", "remote_addr", "remote_port", "pid", "comm"]
    table = pq.read_table(table_path, columns=[*columns, "time_wait_ns", "time_wait_end_ns"])
    text = {name: table.column(name).cast(pa.string()).to_numpy(zero_copy_only=False)
            for name in ("local_addr", "remote_addr", "comm")}  # fmt: skip
    port = table.column("remote_port").to_numpy()
    entered = table.column("time_wait_ns").fill_null(0).to_numpy()
    ended = table.column("time_wait_end_ns").fill_null(np.iinfo(np.int64).max).to_numpy()
    result = []
    for path in observed:
        address, _, remote_port = path.remote.rpartition(":")
        at = int((t0 + path.peak_at_s) * 1e9) - offset  # the peak on the trace's clock
        held = (text["local_addr"] == path.local_addr) & (text["remote_addr"] == address)
        held &= (port == int(remote_port)) & (entered > 0) & (entered <= at) & (ended > at)
        if not held.any():
            result.append(path)
            continue
        rows = (
            table.filter(pa.array(held))
            .group_by("comm")
            .aggregate([("pid", "count_distinct"), ("local_port", "count_distinct")])
        )
        openers = sorted(
            (
                PathOpener(comm=str(c), processes=int(p), ports=int(n))
                for c, p, n in zip(
                    rows.column("comm").to_pylist(),
                    rows.column("pid_count_distinct").to_pylist(),
                    rows.column("local_port_count_distinct").to_pylist(),
                    strict=True,
                )
            ),
            key=lambda o: (-o.ports, o.comm),
        )
        result.append(path.model_copy(update={"opened_by": openers[:OPENERS_TOP]}))
    return result


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
        tuples=audit_of(Held(table))[0].section(),  # the run's audit, one partition
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
    if not series.num_rows:
        return label, LatencyCliff(detected=False)
    # the path's ports in use over time, on the records' clock (monotonic ns)
    usable = int(series.column("usable").to_numpy().max())
    times_ns = series.column("time").to_numpy().astype(float) * 1e9 - offset_ns
    held = series.column("occupancy").to_numpy(zero_copy_only=False).astype(float) * usable
    if len(times_ns) < 2 or not usable:
        return label, LatencyCliff(detected=False)
    cliff = latency_cliff(Held(rows), InUse(times_ns, held, usable))  # the run's own
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
        **_owners_at(rows, peak),
    )


def _owners_at(rows: pa.Table, peak: int) -> dict[str, Any]:
    """Who held the path's ports at its peak (observations before owners had none)."""
    if "owners" not in rows.column_names:
        return {}
    owners = rows.column("owners")[peak].as_py()
    unattributed = rows.column("unattributed")[peak].as_py()
    if owners is None:
        return {}
    return {
        "owners": [PathOwner(**owner) for owner in owners],
        "unattributed_ports": unattributed,
    }


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
