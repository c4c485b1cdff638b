"""The ``summary.json`` contract: one pydantic model, its schema published.

Analysis builds a :class:`Summary`; the report, the figures, ``eph plan --from``,
the sweep and the CLI read its attributes. A key renamed here is renamed for
every reader, and mypy sees each use. Field names are the JSON keys.

A field that a run may leave out (``listener`` when eph served nothing,
``occupancy`` without samples) defaults to None and is written only when it was
set, so ``summary.json`` carries the keys the run had something to say about.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from harness.errors import SummaryError

__all__ = [
    "SCHEMA_VERSION",
    "BindAttempt",
    "Capacity",
    "Connections",
    "Conservation",
    "Distributed",
    "Exhaustion",
    "HostSection",
    "Kernel",
    "Latency",
    "Listener",
    "Occupancy",
    "OccupancyBand",
    "Outage",
    "ParityQuantiles",
    "Ports",
    "PriorRun",
    "Quantiles",
    "SamplesInfo",
    "Service",
    "Summary",
    "TimeWait",
    "TupleExample",
    "Tuples",
    "summary_schema",
    "validated",
]

SCHEMA_VERSION: Final = 2


class _Section(BaseModel):
    """A part of the summary eph itself computes: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _Reported(BaseModel):
    """A part copied from another process's JSON: its extra keys are kept."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)


class Latency(_Section):
    """Connect latency in milliseconds."""

    p50: float
    p90: float
    p99: float
    max: float


class Quantiles(_Section):
    p50: float
    p90: float
    p99: float
    min: float


class ParityQuantiles(_Section):
    even: Quantiles | None
    odd: Quantiles | None


class Connections(_Section):
    attempted: int
    succeeded: int
    failed: int
    errors: dict[str, int]  # errno name -> failed attempts
    io_errors: dict[str, int]  # errno name -> connected, then failed in I/O
    rate_per_s: float
    connect_ms: Latency | None


class Ports(_Section):
    range: list[int] | None  # ip_local_port_range, [low, high]
    distinct_used: int
    even_fraction: float | None
    # how the kernel handed them out (absent when no connection succeeded)
    max_uses_per_port: int | None = None
    mean_uses_per_port: float | None = None
    first_odd_s: float | None = None
    first_port_by_destination: dict[str, int] | None = None
    connect_ms_by_parity: ParityQuantiles | None = None
    first_offset_by_destination: dict[str, int] | None = None

    @property
    def span(self) -> tuple[int, int] | None:
        """The range as (low, high), when the kernel's reading had one."""
        if self.range is None or len(self.range) != 2:
            return None
        return self.range[0], self.range[1]


class Exhaustion(_Section):
    exhausted: bool
    errno: str | None = None  # the first failure's, when exhausted
    first_failure_s: float | None
    succeeded_before_first_failure: int | None


class Outage(_Section):
    from_s: float
    to_s: float
    failures: int
    errors: dict[str, int]
    recovered: bool


class Kernel(_Reported):
    """The sysctls as read where the clients ran (``harness.kernel.sysctls``)."""

    release: str | None = None
    ip_local_port_range: list[int] | None = None
    ip_local_reserved_ports: str | int | None = None
    tcp_tw_reuse: int | None = None
    tcp_tw_reuse_delay_ms: int | None = None  # Linux 6.14+
    tcp_timestamps: int | None = None
    tcp_fin_timeout: int | None = None
    tcp_max_tw_buckets: int | None = None
    somaxconn: int | None = None
    rlimit_nofile: list[int] | None = None
    netns: str | None = None

    @property
    def reserved(self) -> str:
        """``ip_local_reserved_ports`` as text (a single port reads back as a number)."""
        return str(self.ip_local_reserved_ports or "")

    @property
    def port_span(self) -> tuple[int, int] | None:
        found = self.ip_local_port_range
        return (found[0], found[1]) if found is not None and len(found) == 2 else None


class Listener(_Reported):
    """The embedded listener's counts (``listener.json``)."""

    accepted: int = 0
    endpoints: dict[str, int] | None = None
    loop_errors: int | None = None


class Conservation(_Section):
    records: int
    locust_requests: int | None = None
    records_match_locust: bool | None = None
    listener_accepted: int | None = None
    succeeded_match_listener: bool | None = None
    listener_check: str | None = None  # why the listener's count is not judged
    ok: bool
    # the kernel's Tcp ActiveOpens against the records (TCP runs with counters)
    kernel_active_opens: int | None = None
    kernel_attempt_fails: int | None = None
    attempts_sending_syn: int | None = None
    attempts_match_kernel: bool | None = None
    kernel_check: str | None = None


class BindAttempt(_Section):
    at_s: float
    errno: str
    held_by: dict[str, int]  # TCP state -> client sockets on the port


class Service(_Reported):
    """The port-conflict lab's stand-in service (``service.json``)."""

    port: int
    restart_at_s: float
    stopped_at_s: float | None = None
    rebound_at_s: float | None = None
    failed_binds: int = 0
    errors: list[str] = []
    attempts: list[BindAttempt] = []
    rebound: bool = False


class Distributed(_Section):
    expected_workers: int
    hosts_shipped: list[str]
    missing_workers: int


class SamplesInfo(_Section):
    count: int
    interval_s: float
    max_sample_ms: float | None
    median_sample_ms: float | None
    missing_after_s: float | None  # the collector's samples stop here (it died)


class TimeWait(_Section):
    peak: int | None
    reused_connections: int
    kernel_tw_recycled: int | None
    reused_minus_kernel: int | None
    reuse_age_s: Quantiles | None
    server_peak: int | None = None  # a lab's pair topology: the server namespace's


class TupleExample(_Section):
    local_port: int
    remote_port: int
    first_start_ns: int
    first_close_ns: int
    second_start_ns: int


class Tuples(_Section):
    distinct: int
    max_uses: int
    concurrent_duplicates: int
    examples: list[TupleExample]
    reuse_distance_median: float | None


class HostSection(_Section):
    """One load-generator host of a distributed run."""

    host: str
    hostname: str | None
    attempted: int
    succeeded: int
    failed: int
    source_addresses: list[str]
    distinct_ports: int
    port_span: list[int] | None
    first_exhaustion_s: float | None
    port_range: list[int] | None
    peak_in_use: int | None
    usable_ports: int | None
    clock_shift_ms: float
    time_wait_peak: int | None = None


class Capacity(_Section):
    """The capacity model against what was measured."""

    measured_rate_per_s: float | None = None
    measured_time_to_exhaustion_s: float | None = None
    model_max_rate_per_s: float | None = None
    model_time_to_exhaustion_s: float | None = None
    # the model's inputs (absent when the port range is unknown)
    model_ports: int | None = None
    model_hold_s: float | None = None
    model_lifetime_s: float | None = None
    model_reuse: bool | None = None
    offered_rate_per_s: float | None = None
    offered_rate_source: Literal["scenario", "measured"] | None = None
    measured_sustained_rate_per_s: float | None = None


class OccupancyBand(_Section):
    occupancy: list[float]  # [low, high) share of the usable ports
    connections: int
    even: Quantiles | None
    odd: Quantiles | None


class Occupancy(_Section):
    peak_ports: int
    usable_ports: int
    peak_fraction: float | None
    connect_ms_by_occupancy: list[OccupancyBand]


class Summary(_Section):
    """``summary.json``: the run's figures, computed in bulk after it."""

    schema_version: Literal[2] = SCHEMA_VERSION
    scenario: str
    interrupted: bool
    started_at: str  # ISO 8601, UTC
    duration_s: float
    connections: Connections
    ports: Ports
    exhaustion: Exhaustion
    outages: list[Outage]
    kernel: Kernel
    listener: Listener | None = None
    conservation: Conservation
    stop_reason: str | None = None
    service: Service | None = None
    distributed: Distributed | None = None
    samples: SamplesInfo | None = None
    time_wait: TimeWait | None = None
    tuples: Tuples | None = None
    hosts: list[HostSection] | None = None
    capacity: Capacity = Capacity()
    occupancy: Occupancy | None = None

    @property
    def exhausted_at(self) -> float | None:
        """Seconds from the first attempt to the first failure for want of a port."""
        return self.exhaustion.first_failure_s if self.exhaustion.exhausted else None

    def to_json(self) -> dict[str, Any]:
        """The JSON object, with only the optional keys the run set."""
        data = self.model_dump(mode="json", exclude_unset=True)
        return {"schema_version": self.schema_version, **data}  # always, and first

    @classmethod
    def load(cls, path: Path) -> Summary:
        """Read and validate ``path``; an older or malformed one raises :class:`SummaryError`."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SummaryError(path, f"is not readable JSON ({exc})") from None
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: object, source: Path | str = "summary.json") -> Summary:
        if not isinstance(data, dict):
            raise SummaryError(source, "is not a JSON object", value=type(data).__name__)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SummaryError(
                source,
                "was written by another version of eph; `eph report RUN_DIR` writes it again",
                key="schema_version",
                value=version,
                expected=str(SCHEMA_VERSION),
            )
        return validated(cls, data, source)


class PriorRun(BaseModel):
    """What only the run itself knew, read back from any version's ``summary.json``
    so that ``eph report`` can compute the rest again."""

    model_config = ConfigDict(extra="ignore")

    interrupted: bool = False
    started_at: str | None = None
    duration_s: float | None = None
    kernel: Kernel | None = None
    stop_reason: str | None = None
    distributed: Distributed | None = None

    @classmethod
    def load(cls, path: Path) -> PriorRun:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SummaryError(path, f"is not readable JSON ({exc})") from None
        return validated(cls, data, path)


Section = TypeVar("Section", bound=BaseModel)


def validated(model: type[Section], data: object, source: Path | str) -> Section:
    """``data`` (from ``source``, a file that feeds the summary) as ``model``; a wrong
    value raises :class:`SummaryError` naming the file, the key, the value."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _first_error(source, exc) from None


def _first_error(source: Path | str, exc: ValidationError) -> SummaryError:
    """The first of pydantic's errors, spelled the way eph names a bad value."""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    more = f"; {exc.error_count() - 1} more value(s) wrong too" if exc.error_count() > 1 else ""
    if error["type"] == "missing":
        return SummaryError(source, "is missing" + more, key=key)
    if error["type"] == "extra_forbidden":
        return SummaryError(source, "is not a summary key" + more, key=key)
    expected = error["msg"].removeprefix("Input should be ")
    return SummaryError(
        source, "has a wrong value" + more, key=key, value=error.get("input"), expected=expected
    )


def summary_schema() -> dict[str, Any]:
    """The JSON Schema of ``summary.json`` (``eph schema summary``)."""
    schema = Summary.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
