"""A distributed run's load-generator hosts, each with its own ports and kernel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from harness.capacity.port_model import CapacityModel
from harness.report.columns import equals
from harness.report.port_occupancy import peaks
from harness.summary import HostSection, Kernel

__all__ = ["HostCounts", "HostSamples", "host_mask", "sections_of"]


@dataclass(frozen=True)
class HostSamples:
    """One load-generator host of a distributed run: its sockets and its kernel."""

    name: str
    samples: pa.Table | None
    kernel: Kernel | None
    info: dict[str, Any] = field(default_factory=dict)  # its host.json


def host_mask(table: pa.Table, name: str) -> np.ndarray:
    """Rows recorded by load-generator ``name``."""
    return equals(table, "host", name)


@dataclass
class HostCounts:
    """One host's share of the records."""

    attempted: int = 0
    succeeded: int = 0
    failed: int = 0
    first_exhaustion_ns: int | None = None
    addresses: set[str] = field(default_factory=set)  # of its successful connections
    ports: np.ndarray = field(default_factory=lambda: np.zeros(65536, np.int64))  # uses


def sections_of(
    counts: dict[str, HostCounts],
    hosts: Sequence[HostSamples],
    model: CapacityModel | None,
    t0: int,
) -> list[HostSection]:
    """The hosts' sections from their counts (in memory, or of a large run's scan)."""
    sections = []
    for host in hosts:
        mine = counts.get(host.name, HostCounts())
        used = np.flatnonzero(mine.ports)
        first = mine.first_exhaustion_ns
        entry = HostSection(
            host=host.name,
            hostname=host.info.get("hostname"),
            attempted=mine.attempted,
            succeeded=mine.succeeded,
            failed=mine.failed,
            source_addresses=sorted(mine.addresses),
            distinct_ports=len(used),
            port_span=[int(used[0]), int(used[-1])] if len(used) else None,
            first_exhaustion_s=round((first - t0) / 1e9, 4) if first is not None else None,
            port_range=host.kernel.ip_local_port_range if host.kernel is not None else None,
            peak_in_use=None,
            usable_ports=model.usable_ports * model.paths if model is not None else None,
            clock_shift_ms=round(int(host.info.get("clock_shift_ns", 0)) / 1e6, 3),
        )
        if host.samples is not None and host.samples.num_rows:
            found = peaks(host.samples)
            entry.peak_in_use = found.in_use
            entry.time_wait_peak = found.time_wait
        sections.append(entry)
    return sections
