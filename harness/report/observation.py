"""The summary of an observation (``eph observe --out DIR``): which path ran out, or will.

Read from the directory alone (``paths.parquet``, ``host.parquet``,
``observe.json``), so ``eph report DIR`` can render it again at any time. Rows
are samples x kept paths: small even for a day at one sample a second, so the
tables are read whole. The kernel's rows of ``--trace`` (``connections.parquet``)
can be millions: they are held when few and otherwise read a batch at a time, by
the run's own analysis.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from harness.capacity.nat_model import NatCapacityModel
from harness.errors import RunDirError
from harness.observe.store import STATE_COLUMNS
from harness.records import CONNECTIONS_SCHEMA
from harness.report.analysis import audit_of, latency_cliff
from harness.report.disk_sweep import InUse
from harness.report.nat_section import nat_section
from harness.report.ondisk import (
    Held,
    OnDisk,
    RecordHandle,
    as_handle,
    open_records,
    record_batches,
)
from harness.scenario import Scenario
from harness.summary import (
    ExecRecord,
    HostCounters,
    LatencyCliff,
    NamespaceTotals,
    Nat,
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
        namespaces=_namespaces(host),
        exec=_exec(directory),
        traced=_traced(directory, paths),
        nat=_nat(directory),
    )


def _namespaces(host: pa.Table) -> list[NamespaceTotals] | None:
    """Each namespace's counters over the samples that found it (the ``netns`` column
    of ``host.parquet``, with --all-namespaces), the most connects first."""
    if "netns" not in host.column_names or host.column("netns").null_count == host.num_rows:
        return None
    per_sample = host.column("netns")
    lengths = pc.list_value_length(per_sample).fill_null(0).to_numpy()
    rows = pc.list_flatten(per_sample.combine_chunks())
    time = np.repeat(host.column("time").to_numpy(), lengths)
    table = pa.table({
        "time": time,
        **{field.name: rows.field(field.name) for field in rows.type},
    })  # fmt: skip
    inodes = table.column("inode").to_numpy()
    order = np.lexsort((time, inodes))  # each namespace's rows together, in time
    table, inodes = table.take(order), inodes[order]
    starts = np.flatnonzero(np.diff(inodes, prepend=inodes[:1] - 1))
    totals = []
    for start, end in zip(starts, [*starts[1:], len(inodes)], strict=True):
        inode, mine = inodes[start], table.slice(start, end - start)
        opens = mine.column("active_opens").to_numpy(zero_copy_only=False).astype(float)
        times = mine.column("time").to_numpy()
        rates = _finite(np.diff(opens) / np.diff(times)) if mine.num_rows > 1 else np.zeros(0)
        totals.append(
            NamespaceTotals(
                netns=str(mine.column("netns")[-1].as_py()),
                inode=int(inode),
                samples=mine.num_rows,
                active_opens=_delta(mine, "active_opens"),
                active_opens_per_s_peak=float(rates.max()) if len(rates) else None,
                attempt_fails=_delta(mine, "attempt_fails"),
                tw_recycled=_delta(mine, "tw_recycled"),
                timewait_overflow=_delta(mine, "timewait_overflow"),
                time_wait_peak=_max(mine, "sockstat_tw"),
            )
        )
    totals.sort(key=lambda t: (-(t.active_opens or 0), t.netns))
    return totals


def _nat(directory: Path) -> Nat | None:
    """eph lab --exec in the nat topology: the router's pool (``router/nat.parquet``),
    read with the kernel's rows of the client's connects when traced (then the SYNs that
    waited or timed out are counted), else from the router's samples alone."""
    if not (directory / "router" / "nat.parquet").exists():
        return None
    traced = directory / "connections.parquet"
    records = (
        as_handle(open_records(traced))
        if traced.exists()
        else as_handle(CONNECTIONS_SCHEMA.empty_table())
    )
    scenario = directory / "scenario.json"
    hold_s = 0.0
    if scenario.exists():
        setup = Scenario.model_validate(json.loads(scenario.read_text(encoding="utf-8")))
        hold_s = NatCapacityModel.from_scenario(setup, lifetime_s=0.0).hold_s
    return nat_section(directory, records, hold_s)


OPENERS_TOP = 5


def _with_openers(directory: Path, observed: list[ObservedPath], t0: float) -> list[ObservedPath]:
    """With a trace: each path's TIME_WAIT ports at its peak, by the program that opened
    the connection (a TIME_WAIT socket has no owner left to find in /proc).

    A batch of the kernel's rows at a time; what is kept per path is its ports in
    TIME_WAIT at one instant, so at most its port range."""
    table_path, meta_path = directory / "connections.parquet", directory / "kernel.json"
    if not (table_path.exists() and meta_path.exists()):
        return observed
    offset = int(json.loads(meta_path.read_text(encoding="utf-8"))["wall_minus_monotonic_ns"])
    columns = ["local_addr", "local_port", "remote_addr", "remote_port", "pid", "comm"]
    held_rows: list[list[pa.Table]] = [[] for _ in observed]
    for batch in record_batches(
        as_handle(open_records(table_path)), [*columns, "time_wait_ns", "time_wait_end_ns"]
    ):
        table = pa.Table.from_batches([batch])
        text = {name: table.column(name).cast(pa.string()).to_numpy(zero_copy_only=False)
                for name in ("local_addr", "remote_addr")}  # fmt: skip
        port = table.column("remote_port").to_numpy()
        entered = table.column("time_wait_ns").fill_null(0).to_numpy()
        ended = table.column("time_wait_end_ns").fill_null(np.iinfo(np.int64).max).to_numpy()
        for n, path in enumerate(observed):
            address, _, remote_port = path.remote.rpartition(":")
            at = int((t0 + path.peak_at_s) * 1e9) - offset  # the peak on the trace's clock
            held = (text["local_addr"] == path.local_addr) & (text["remote_addr"] == address)
            held &= (port == int(remote_port)) & (entered > 0) & (entered <= at) & (ended > at)
            if held.any():
                chosen = table.filter(pa.array(held)).select(["comm", "pid", "local_port"])
                held_rows[n].append(chosen.cast(_OPENER_SCHEMA))
    result = []
    for path, tables in zip(observed, held_rows, strict=True):
        if not tables:
            result.append(path)
            continue
        rows = (
            pa.concat_tables(tables)
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


_OPENER_SCHEMA = pa.schema(
    [("comm", pa.string()), ("pid", pa.uint32()), ("local_port", pa.uint16())]
)


def _traced(directory: Path, paths: pa.Table) -> Traced | None:
    """The kernel's rows, when the observation traced them: held when few, else read
    from disk a batch at a time by the run's own analysis."""
    table_path, meta_path = directory / "connections.parquet", directory / "kernel.json"
    if not (table_path.exists() and meta_path.exists()):
        return None
    try:
        records = as_handle(open_records(table_path))
    except (OSError, pa.ArrowInvalid) as exc:
        raise RunDirError(directory, f"cannot read connections.parquet: {exc}") from None
    offset = int(json.loads(meta_path.read_text(encoding="utf-8"))["wall_minus_monotonic_ns"])
    failed = sum(
        int(np.count_nonzero(batch.column(0).to_numpy(zero_copy_only=False)))
        for batch in record_batches(records, ["errno"])
    )
    label, cliff = _path_cliff(records, paths, offset, directory)
    return Traced(
        connections=records.num_rows,
        failed=failed,
        path=label,
        tuples=audit_of(records)[0].section(),  # the run's audit
        latency_cliff=cliff,
    )


_PATH = ["local_addr", "remote_addr", "remote_port"]


def _path_cliff(
    records: RecordHandle, paths: pa.Table, offset_ns: int, directory: Path
) -> tuple[str | None, LatencyCliff]:
    """Connect latency against the busiest traced path's occupancy when each began."""
    counts: Counter[tuple[str, str, int]] = Counter()
    for batch in record_batches(records, _PATH):
        grouped = (
            pa.Table.from_batches([batch])
            .cast(
                pa.schema(
                    [(name, pa.string()) for name in _PATH[:2]] + [("remote_port", pa.uint16())]
                )
            )
            .group_by(_PATH)
            .aggregate([([], "count_all")])
        )
        for la, ra, rp, n in zip(
            *(grouped.column(c).to_pylist() for c in [*_PATH, "count_all"]), strict=True
        ):
            counts[(la, ra, rp)] += n
    if not counts:
        return None, LatencyCliff(detected=False)
    (local, remote, remote_port), busiest = counts.most_common(1)[0]
    label = f"{local} -> {remote}:{remote_port}"
    series = paths.filter(pc.equal(paths.column("label"), label))
    if not series.num_rows:
        return label, LatencyCliff(detected=False)
    # the path's ports in use over time, on the records' clock (monotonic ns)
    usable = int(series.column("usable").to_numpy().max())
    times_ns = series.column("time").to_numpy().astype(float) * 1e9 - offset_ns
    held = series.column("occupancy").to_numpy(zero_copy_only=False).astype(float) * usable
    if len(times_ns) < 2 or not usable:
        return label, LatencyCliff(detected=False)
    occupancy = InUse(times_ns, held, usable)
    if busiest == records.num_rows:  # one path: every row is its
        return label, latency_cliff(records, occupancy)  # the run's own
    with tempfile.TemporaryDirectory(prefix=".path.", dir=directory) as scratch:
        rows = _one_path(records, (local, remote, remote_port), Path(scratch) / "path.parquet")
        return label, latency_cliff(as_handle(rows), occupancy)


def _one_path(
    records: RecordHandle, path: tuple[str, str, int], scratch: Path
) -> pa.Table | OnDisk:
    """The rows of one path: held when few, else written to ``scratch`` and scanned."""
    local, remote, remote_port = path
    names = records.column_names
    with pq.ParquetWriter(scratch, _schema_of(records)) as writer:
        for batch in record_batches(records, names):
            same = pc.and_(
                pc.equal(batch.column("local_addr").cast(pa.string()), local),
                pc.equal(batch.column("remote_addr").cast(pa.string()), remote),
            )
            keep = same.to_numpy(zero_copy_only=False) & (
                batch.column("remote_port").to_numpy() == remote_port
            )
            if keep.any():
                writer.write_table(pa.Table.from_batches([batch.filter(pa.array(keep))]))
    return open_records(scratch)


def _schema_of(records: RecordHandle) -> pa.Schema:
    schema: pa.Schema = (
        records.table.schema if isinstance(records, Held) else pq.read_schema(records.path)
    )
    return schema


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
        netns=col["netns"][peak] if "netns" in col and col["netns"][peak] else None,
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
