"""One run's data as the report reads it: columns, samples, summary and scenario."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa

from harness.report.hosts import HostSamples
from harness.report.model import Summary
from harness.report.tuples import TupleAudit, audit_tuples
from harness.scenario import Scenario

__all__ = ["RunData"]


@dataclass
class RunData:
    """One run's columns, read once and shared by every figure."""

    table: pa.Table
    samples: pa.Table | None
    summary: Summary
    scenario: dict[str, Any]  # scenario.json as stored (the report shows it verbatim)
    server_samples: pa.Table | None = None
    hosts: tuple[HostSamples, ...] = ()  # a distributed run's workers
    _audit: TupleAudit | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        start = self.table.column("start_ns").to_numpy()
        self.t0 = int(start.min()) if len(start) else 0
        self.seconds = (start - self.t0) / 1e9
        self.errno = self.table.column("errno").to_numpy()
        self.ok = self.errno == 0
        self.port = self.table.column("local_port").to_numpy()
        self.connect_ms = self.table.column("connect_us").to_numpy() / 1000.0

    @property
    def audit(self) -> TupleAudit:
        if self._audit is None:
            self._audit = audit_tuples(self.table)
        return self._audit

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
    def usable_ports(self) -> int | None:
        """The capacity model's ports across paths and hosts (None: range unknown)."""
        return self.summary.capacity.model_ports

    def sample_seconds(self, samples: pa.Table) -> np.ndarray:
        return np.asarray((samples.column("t_ns").to_numpy() - self.t0) / 1e9)
