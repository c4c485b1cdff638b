"""What a run directory holds besides its records, read for the analysis: the
collector's samples and kernel reading, a distributed run's workers, Locust's count."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from harness.load.cpu_meter import CPU_REQUEST_TYPE
from harness.report.hosts import HostSamples
from harness.rundir import HOSTS_DIR
from harness.summary import Kernel

__all__ = ["collector_kernel", "locust_request_count", "read_samples", "worker_hosts"]

logger = logging.getLogger(__name__)


def worker_hosts(path: Path) -> list[HostSamples]:
    """The workers of a distributed run (``hosts/<name>/``), samples on this run's clock."""
    hosts = []
    for directory in sorted((path / HOSTS_DIR).glob("*/")):
        try:
            info = json.loads((directory / "host.json").read_text())
        except (OSError, ValueError):
            logger.warning("%s has no readable host.json: its files did not all arrive", directory)
            info = {}
        samples = read_samples(directory / "samples.parquet")
        shift = int(info.get("clock_shift_ns", 0))
        if samples is not None and shift:
            t_ns = pa.array(samples.column("t_ns").to_numpy() + shift)
            samples = samples.set_column(samples.schema.get_field_index("t_ns"), "t_ns", t_ns)
        hosts.append(HostSamples(directory.name, samples, collector_kernel(directory), info))
    return hosts


def collector_kernel(path: Path) -> Kernel | None:
    """The kernel as the collector saw it at the start: where the clients ran."""
    try:
        return Kernel.model_validate(json.loads((path / "collector.json").read_text())["start"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_samples(path: Path) -> pa.Table | None:
    """The collector's samples without their port lists: the report never draws them,
    and an hour's samples hold a few GB of them."""
    if not path.exists():
        return None
    try:
        names = pq.read_schema(path).names
        return pq.read_table(path, columns=[name for name in names if name != "ports"])
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s); analysing without it", path, exc)
        return None


def locust_request_count(path: Path) -> int | None:
    """The request total of Locust's ``--json-file`` output, if there is one."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return sum(
        int(entry.get("num_requests", 0))
        for entry in entries
        if entry.get("method") != CPU_REQUEST_TYPE  # CPU per connection, not requests
    )
