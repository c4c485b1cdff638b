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

from harness.summary.sections import (
    Capacity,
    Connections,
    Conservation,
    Cpu,
    Distributed,
    Exhaustion,
    HostSection,
    Http,
    Kernel,
    KernelWitness,
    LatencyCliff,
    Listener,
    LoadProcesses,
    Nat,
    Occupancy,
    Outage,
    Ports,
    SamplesInfo,
    Section,
    Service,
    Startup,
    TimeWait,
    Tuples,
)
from harness.summary.summary_error import SummaryError

__all__ = ["SCHEMA_VERSION", "Crash", "PriorRun", "Summary", "summary_schema", "validated"]

SCHEMA_VERSION: Final = 3


class Crash(Section):
    """A run whose eph process died before it finished (SIGKILL, OOM, power): what
    ``eph report`` found in its directory afterwards."""

    phase: str
    """The phase ``state.json`` last recorded: starting, loading, stopping, finalizing."""
    pid: int
    host: str
    host_checked: bool
    """False: the run ran on another host, whose processes eph cannot see from here."""
    last_record_s: float | None
    """Seconds from the first attempt to the last one the parts held."""
    last_sample_s: float | None
    """Seconds from the first attempt to the collector's last sample."""
    last_record_at: str | None = None
    """The last record's start, wall clock (ISO 8601, UTC)."""
    error: str | None = None
    """The error that ended eph, when one did (a kill leaves none)."""

    def finding(self) -> str:
        """What the report says about it: what is there, and what is not."""
        reach = ", ".join(
            f"{what} up to {value:.1f} s"
            for what, value in (("records", self.last_record_s), ("samples", self.last_sample_s))
            if value is not None
        )
        unchecked = "" if self.host_checked else f" (it ran on {self.host}; not checked from here)"
        how = f"stopped with an error ({self.error})" if self.error else "died"
        return (
            f"The run crashed: its eph process (pid {self.pid}){unchecked} {how} while"
            f" {self.phase} and never finished. This summary holds what the record and sample"
            f" files had flushed ({reach or 'nothing'}); missing are the rows not yet flushed"
            " (at most one flush interval of each process), Locust's own request count,"
            " the listener's counts and the kernel counters at the end."
        )


class Summary(Section):
    """``summary.json``: the run's figures, computed in bulk after it."""

    schema_version: Literal[3] = SCHEMA_VERSION
    scenario: str
    interrupted: bool
    started_at: str
    """When the run started: ISO 8601, UTC."""
    duration_s: float
    connections: Connections
    ports: Ports
    exhaustion: Exhaustion
    outages: list[Outage]
    kernel: Kernel
    listener: Listener | None = None
    conservation: Conservation
    stop_reason: str | None = None
    startup: Startup | None = None
    load_processes: LoadProcesses | None = None
    """From eph launching Locust to the first attempt, and to the load's end."""
    service: Service | None = None
    distributed: Distributed | None = None
    samples: SamplesInfo | None = None
    time_wait: TimeWait | None = None
    tuples: Tuples | None = None
    hosts: list[HostSection] | None = None
    capacity: Capacity = Capacity()
    occupancy: Occupancy | None = None
    latency_cliff: LatencyCliff | None = None
    cpu: Cpu | None = None
    http: Http | None = None
    nat: Nat | None = None
    kernel_witness: KernelWitness | None = None
    crash: Crash | None = None

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


_M = TypeVar("_M", bound=BaseModel)


def validated(model: type[_M], data: object, source: Path | str) -> _M:
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
