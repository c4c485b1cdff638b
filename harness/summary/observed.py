"""``summary.json`` of an observation (``eph observe --out``, ``eph lab --exec``):
``mode = "observe"`` tells it from a run's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from harness.summary.sections import LatencyCliff, Nat, Tuples
from harness.summary.summary_error import SummaryError

__all__ = [
    "OBSERVE_SCHEMA_VERSION",
    "ExecRecord",
    "HostCounters",
    "NamespaceTotals",
    "ObserveSummary",
    "ObservedPath",
    "PathExhaustion",
    "PathOpener",
    "PathOwner",
    "Traced",
]

OBSERVE_SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathOwner(_Model):
    """A process that held ports of a path, at the path's peak."""

    comm: str
    pid: int
    cgroup: str
    container: str | None = None  # the container ID (12 characters) or "pod UID"
    ports: int


class PathOpener(_Model):
    """A program whose connections held ports of a path in TIME_WAIT at its peak: from
    the kernel's trace (``--trace``), which saw who opened each one."""

    comm: str
    processes: int  # distinct pids (a shell loop of curl is one process per request)
    ports: int


class ObservedPath(_Model):
    """One path (local address -> remote address:port) over the whole observation."""

    label: str
    protocol: str
    local_addr: str
    remote: str  # address:port
    peak_ports: int
    usable_ports: int
    peak_fraction: float
    peak_at_s: float  # seconds from the start
    states_at_peak: dict[str, int]
    new_per_s_peak: float
    new_per_s_mean: float
    hold_s: float  # TIME_WAIT hold seen on the path (0: the client did not close first)
    lifetime_s: float  # median estimate, connect to close
    time_to_exhaustion_s: float | None  # shortest estimate seen; None: never heading there
    first_full_s: float | None
    # at the peak: who held the ports (most first), and ports of sockets with no owner
    # known (TIME_WAIT has none); None when owners were not looked up (--no-owners)
    owners: list[PathOwner] = []
    unattributed_ports: int | None = None
    # with --trace: who opened the connections in TIME_WAIT at the peak, most first
    opened_by: list[PathOpener] = []
    # with --all-namespaces: the path's network namespace (ip netns name, else its
    # first processes); None with one namespace
    netns: str | None = None


class PathExhaustion(_Model):
    """Whether a path ran out of ports while observed, and which first."""

    exhausted: bool
    path: str | None
    first_full_s: float | None


class HostCounters(_Model):
    time_wait_peak: int | None
    tw_recycled: int | None  # over the observation
    timewait_overflow: int | None
    active_opens_per_s_peak: float | None
    conntrack_peak: int | None
    conntrack_max: int | None
    sample_ms_median: float


class NamespaceTotals(_Model):
    """One network namespace's TCP counters over the observation (``--all-namespaces``):
    the kernel keeps them per namespace, so each pod's churn and failures show apart."""

    netns: str  # ip netns's name, else its first processes ("host": init's)
    inode: int
    samples: int  # samples that found it (a namespace may come or go meanwhile)
    active_opens: int | None  # over the samples that found it
    active_opens_per_s_peak: float | None
    attempt_fails: int | None
    tw_recycled: int | None
    timewait_overflow: int | None
    time_wait_peak: int | None


class ExecRecord(_Model):
    """``eph lab --exec``: the user's command and how it ended (``exec.json``)."""

    command: list[str]
    target: str
    exit_code: int | None  # None: stopped by eph at the scenario's duration
    ran_s: float
    stopped_at_duration: bool
    exited_at_once: bool
    stdout: str
    stderr: str
    verdict: str  # how it ended, for a person (written by harness.lab.exec)


class Traced(_Model):
    """What the eBPF recorder's rows say (``eph observe --trace``, ``lab --exec --trace``).

    The same analysis as a run's records: the 4-tuple audit, and the latency cliff
    of the busiest traced path, its occupancy read from the samples of that path.
    """

    connections: int
    failed: int
    path: str | None  # the busiest traced path, whose latency the cliff reads
    tuples: Tuples
    latency_cliff: LatencyCliff


class ObserveSummary(_Model):
    """``summary.json`` of an observation; ``mode`` tells it from a run's."""

    schema_version: int = OBSERVE_SCHEMA_VERSION
    mode: Literal["observe"] = "observe"
    started_at: str
    duration_s: float
    samples: int
    interval_s: float
    stop_reason: str | None
    settings: dict[str, Any]
    paths_seen_peak: int
    paths: list[ObservedPath]
    exhaustion: PathExhaustion
    host: HostCounters
    # with --all-namespaces: each namespace's counters, the most connects first
    namespaces: list[NamespaceTotals] | None = None
    exec: ExecRecord | None = None  # eph lab --exec: the client that was observed
    # with --trace: the kernel's row of every client connection (connections.parquet)
    traced: Traced | None = None
    # eph lab --exec in the nat topology: the router's pool, as a run's summary has it
    nat: Nat | None = None

    @classmethod
    def read(cls, path: Path) -> ObserveSummary:
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SummaryError(path, f"is not an observation summary: {exc}") from None
