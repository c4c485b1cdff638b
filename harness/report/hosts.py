"""A distributed run's load-generator hosts, each with its own ports and kernel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from harness.capacity.model import CapacityModel
from harness.report.columns import equals
from harness.report.model import HostSection, Kernel
from harness.report.occupancy import peaks
from harness.report.summary import EXHAUSTION_ERRNOS

__all__ = ["HostSamples", "host_mask", "host_sections"]


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


def host_sections(
    table: pa.Table, hosts: Sequence[HostSamples], model: CapacityModel | None
) -> list[HostSection]:
    """Per load-generator host: its connections, ports, first failure and peak occupancy."""
    start = table.column("start_ns").to_numpy()
    t0 = int(start.min()) if len(start) else 0
    errno = table.column("errno").to_numpy()
    ports = table.column("local_port").to_numpy()
    sections = []
    for host in hosts:
        mine = host_mask(table, host.name)
        ok = mine & (errno == 0)
        failed = mine & np.isin(errno, list(EXHAUSTION_ERRNOS))
        used = np.unique(ports[ok])
        entry = HostSection(
            host=host.name,
            hostname=host.info.get("hostname"),
            attempted=int(mine.sum()),
            succeeded=int(ok.sum()),
            failed=int((mine & (errno != 0)).sum()),
            source_addresses=sorted(
                str(a) for a in pc.unique(table.column("local_addr").filter(ok)).to_pylist()
            ),
            distinct_ports=len(used),
            port_span=[int(used[0]), int(used[-1])] if len(used) else None,
            first_exhaustion_s=(
                round((int(start[failed].min()) - t0) / 1e9, 4) if failed.any() else None
            ),
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
