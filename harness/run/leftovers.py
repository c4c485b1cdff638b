"""A distributed run's workers that never shipped: where their records stayed, and how
``eph report --collect-from`` brings them in.

Each worker announces itself as its test starts (``eph_worker``, see
:mod:`harness.load.shipping`): its name, its host, its own run directory
(under ``eph worker --out``) and its clock; it writes the same to
``worker.json`` in that directory. The master keeps the announcements in
``workers.json`` of its run directory. A worker that dies keeps its record
parts and samples in its own directory; the master's summary names it and that
directory (``distributed.missing``). ``eph report RUN --collect-from DIR``
copies DIR's files under ``hosts/<name>/`` as the worker would have shipped them,
and the report is made again with them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness.errors import RunDirError
from harness.files import atomic_write_json, merge_sorted_files
from harness.load.cpu_meter import CPU_FILE, is_cpu_part, merge_cpu_parts
from harness.load.shipping import SHIPPED, WORKER_FILE, WORKERS_FILE, announced
from harness.records import Part
from harness.report.hosts import HostSamples
from harness.run.merge import merge_parts
from harness.rundir import HOSTS_DIR
from harness.summary import Distributed, MissingWorker, Summary

__all__ = ["account_for_workers", "collect", "missing_workers"]

_Merge = Callable[[Sequence[Part], Path], object]  # parts into one Parquet file


def account_for_workers(
    run_path: Path, summary: Summary, expected: int, hosts: list[HostSamples]
) -> Distributed:
    """The workers whose records arrived, and where the others' stayed; a missing one
    fails the conservation check."""
    shipped = [host.name for host in hosts if host.info]
    distributed = Distributed(
        expected_workers=expected,
        hosts_shipped=shipped,
        # a worker that died (or lost the master) never shipped: its records stayed
        # on its host, and Locust counted its requests up to its last report
        missing_workers=max(0, expected - len(shipped)),
    )
    missing = missing_workers(run_path, shipped)
    if missing:  # where they stayed: `eph report --collect-from` brings them in
        distributed.missing = missing
    if distributed.missing_workers:
        summary.conservation.ok = False  # attempts were made that no record holds
    return distributed


def missing_workers(run_path: Path, shipped: list[str]) -> list[MissingWorker]:
    """The workers that announced themselves and never shipped: where their records are."""
    return [
        MissingWorker(
            name=name,
            hostname=str(data.get("hostname", "")),
            run_dir=str(data.get("run_dir", "")),
        )
        for name, data in sorted(announced(run_path).items())
        if name not in shipped
    ]


def collect(run_path: Path, worker_dir: Path) -> str:
    """Copy a worker's leftover files under ``hosts/<name>/`` of the run; return the name.

    ``worker_dir`` is the worker's own run directory, as ``distributed.missing`` names it.
    """
    try:
        worker = json.loads((worker_dir / WORKER_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(
            worker_dir, f"is not an eph worker's run directory ({WORKER_FILE}: {exc})"
        ) from None
    name, shift = _name_in_run(run_path, worker, worker_dir)
    target = run_path / HOSTS_DIR / name
    if (target / "host.json").exists():
        raise RunDirError(run_path, f"already holds worker {name}'s records ({target})")
    target.mkdir(mode=0o750, parents=True, exist_ok=True)
    files = size = 0
    for pattern in SHIPPED:
        for path in sorted(worker_dir.glob(pattern)):
            relative = path.relative_to(worker_dir)
            (target / relative).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            shutil.copyfile(path, target / relative)
            files, size = files + 1, size + path.stat().st_size
    _fold_into_run(run_path, target / "parts", name, shift)
    host = {**worker, "name": name, "clock_shift_ns": shift, "files": files, "bytes": size}
    host |= {"collected_from": str(worker_dir.resolve()), "collected_at": time.time()}
    atomic_write_json(target / "host.json", host)
    return name


def _fold_into_run(run_path: Path, parts: Path, host: str, shift_ns: int) -> None:
    """Merge a collected worker's parts into the run's merged files: a merge of its
    parts alone would replace what the run held."""
    found = [Part(path, host, shift_ns) for path in sorted(parts.glob("*.arrows"))]
    cpu = [part for part in found if is_cpu_part(part.path)]
    records = [part for part in found if not is_cpu_part(part.path)]
    _fold(run_path / "connections.parquet", records, merge_parts, "start_ns")
    _fold(run_path / CPU_FILE, cpu, merge_cpu_parts, "t_ns")


def _fold(merged: Path, parts: list[Part], merge: _Merge, key: str) -> None:
    """``merged`` and ``parts``, sorted by ``key``, into ``merged``; the parts removed.
    Without ``merged`` yet (a crashed run's), finalize merges the parts with the rest.
    The parts are merged as the run's own were (in windows), then the two sorted files
    into one, a batch of each at a time: bounded memory at any size."""
    if not parts or not merged.exists():
        return
    new = merged.with_name(f".collected-{merged.name}")
    merge(parts, new)
    merge_sorted_files([merged, new], merged, key)
    new.unlink()
    for part in parts:
        part.path.unlink()


def _name_in_run(run_path: Path, worker: dict[str, Any], worker_dir: Path) -> tuple[str, int]:
    """The worker's directory name in the run, and its clock shift, as the master saw it
    announce itself; a worker the master never heard of is refused."""
    for name, data in announced(run_path).items():
        if data.get("run_dir") == worker.get("run_dir"):
            return name, int(data.get("clock_shift_ns", 0))
    raise RunDirError(
        worker_dir,
        f"is not one of this run's workers: {run_path / WORKERS_FILE} names no worker"
        f" that recorded into {worker.get('run_dir')}",
    )
