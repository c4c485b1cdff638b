"""One run's data as the report reads it: columns, samples, summary and scenario."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa

from harness.report.analysis import audit_of, in_use
from harness.report.disk_sweep import InUse, sweep
from harness.report.hosts import HostSamples
from harness.report.ondisk import OnDisk, RecordHandle, as_handle
from harness.report.scan import scan_records
from harness.report.tuples import TupleAudit
from harness.scenario import Scenario
from harness.summary import Summary

__all__ = ["RunData"]


@dataclass
class RunData:
    """One run's columns, read once and shared by every figure."""

    rows: pa.Table | OnDisk  # the records, held or on disk (then figures draw a sample)
    samples: pa.Table | None
    summary: Summary
    scenario: dict[str, Any]  # scenario.json as stored (the report shows it verbatim)
    server_samples: pa.Table | None = None
    hosts: tuple[HostSamples, ...] = ()  # a distributed run's workers
    nat_samples: pa.Table | None = None  # router/nat.parquet: the NAT lab's pool
    _audit: TupleAudit | None = field(default=None, repr=False)
    handle: RecordHandle | None = field(default=None, repr=False)  # the analysis's, if any

    def __post_init__(self) -> None:
        # one pass of the analysis's own (kept with the records): the counts the
        # figures draw from, and for a large run the sample of rows they plot
        self.records: RecordHandle = self.handle or as_handle(self.rows)
        found = sweep(self.records, scan_records(self.records), self.in_use)
        self.every = found.every  # the figures draw 1 in every connections
        # the rows the figures draw: all of a held run's, a sample of a large one's
        self.table: pa.Table = (
            pa.Table.from_batches(found.sample)
            if isinstance(self.records, OnDisk)
            else self.records.table
        )
        start = self.table.column("start_ns").to_numpy()
        self.t0 = int(start.min()) if len(start) else 0
        self.seconds = (start - self.t0) / 1e9
        self.errno = self.table.column("errno").to_numpy()
        self.ok = self.errno == 0
        self.port = self.table.column("local_port").to_numpy()
        self.connect_ms = self.table.column("connect_us").to_numpy() / 1000.0

    @property
    def audit(self) -> TupleAudit:
        """The run's tuple audit: the analysis's, kept with the records."""
        if self._audit is None:
            self._audit = audit_of(self.records)[0]
        return self._audit

    @property
    def sample_note(self) -> str:
        """What a figure drawn from the rows says of them on a large run."""
        return f" (1 in {self.every:,} connections drawn)" if self.every > 1 else ""

    def per_second(self) -> tuple[np.ndarray, float, dict[int, np.ndarray]]:
        """Time bins (edges, width) and attempts per bin: all (-1) and by errno (0: ok)."""
        found = sweep(self.records, scan_records(self.records), None)
        return found.edges, float(found.edges[1] - found.edges[0]), found.per_second

    def port_uses(self) -> np.ndarray:
        """Successful connections per local port (65,536 counts): all of them."""
        return scan_records(self.records).port_uses

    @cached_property
    def setup(self) -> Scenario:
        """The scenario, validated."""
        return Scenario.model_validate(self.scenario)

    @property
    def exhausted_at(self) -> float | None:
        return self.summary.exhausted_at

    @property
    def port_range(self) -> tuple[int, int] | None:
        return self.summary.ports.span

    @property
    def in_use(self) -> InUse | None:
        """The ports in use over time, as the summary's bands place each connect."""
        return in_use(self.samples, self.usable_ports, scan_records(self.records))

    @property
    def usable_ports(self) -> int | None:
        """The capacity model's ports across paths and hosts (None: range unknown)."""
        return self.summary.capacity.model_ports

    def sample_seconds(self, samples: pa.Table) -> np.ndarray:
        return np.asarray((samples.column("t_ns").to_numpy() - self.t0) / 1e9)
