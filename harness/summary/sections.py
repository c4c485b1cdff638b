"""The sections of ``summary.json``, one model each (the whole: ``harness.summary.Summary``).

Field names are the JSON keys. Attribute docstrings become the published JSON
Schema's descriptions.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BindAttempt",
    "Capacity",
    "Connections",
    "Conservation",
    "Cpu",
    "CpuBand",
    "Distributed",
    "Exhaustion",
    "HostSection",
    "Http",
    "Kernel",
    "KernelWitness",
    "Latency",
    "LatencyCliff",
    "Listener",
    "LoadProcesses",
    "Nat",
    "NatDestination",
    "Occupancy",
    "OccupancyBand",
    "Outage",
    "ParityQuantiles",
    "Ports",
    "Quantiles",
    "SamplesInfo",
    "Section",
    "Service",
    "Startup",
    "TimeWait",
    "TupleExample",
    "Tuples",
]


class Section(BaseModel):
    """A part of the summary eph itself computes: unknown keys are an error."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


class _Reported(BaseModel):
    """A part copied from another process's JSON: its extra keys are kept."""

    model_config = ConfigDict(
        extra="allow", validate_assignment=True, use_attribute_docstrings=True
    )


class Latency(Section):
    """Connect latency in milliseconds."""

    p50: float
    p90: float
    p99: float
    max: float


class Quantiles(Section):
    """Percentiles and minimum of a sample of values (the field names its unit)."""

    p50: float
    p90: float
    p99: float
    min: float


class ParityQuantiles(Section):
    """Connect latency (ms) of connections on even and on odd local ports."""

    even: Quantiles | None
    odd: Quantiles | None


class Connections(Section):
    """Every connection attempt's outcome, from the records."""

    attempted: int
    succeeded: int
    failed: int
    errors: dict[str, int]
    """Failed connects by errno name (EADDRNOTAVAIL, ECONNREFUSED, ...)."""
    io_errors: dict[str, int]
    """Connections that connected, then failed in I/O, by errno name."""
    rate_per_s: float
    """Attempts per second over the records' own span."""
    connect_ms: Latency | None
    """None when nothing connected."""


class Ports(Section):
    """The local (ephemeral) ports the successful connections got. The keys after
    ``even_fraction`` say how the kernel handed them out; absent when none succeeded."""

    range: list[int] | None
    """The kernel's ip_local_port_range, [low, high]."""
    distinct_used: int
    even_fraction: float | None
    max_uses_per_port: int | None = None
    mean_uses_per_port: float | None = None
    first_odd_s: float | None = None
    """When the first odd port was handed out (s from the first attempt)."""
    first_port_by_destination: dict[str, int] | None = None
    connect_ms_by_parity: ParityQuantiles | None = None
    first_offset_by_destination: dict[str, int] | None = None

    @property
    def span(self) -> tuple[int, int] | None:
        """The range as (low, high), when the kernel's reading had one."""
        if self.range is None or len(self.range) != 2:
            return None
        return self.range[0], self.range[1]


class Exhaustion(Section):
    """Whether and when a connect first failed for want of a port."""

    exhausted: bool
    errno: str | None = None
    """The first such failure's errno name (EADDRNOTAVAIL, EADDRINUSE, EAGAIN)."""
    first_failure_s: float | None
    """Seconds from the first attempt."""
    succeeded_before_first_failure: int | None


class Outage(Section):
    """A span in which every attempt failed at the target: the target, not the range."""

    from_s: float
    to_s: float
    failures: int
    errors: dict[str, int]
    recovered: bool
    """A connection succeeded again after it."""


class Kernel(_Reported):
    """The sysctls as read where the clients ran (``harness.kernel.sysctls``)."""

    release: str | None = None
    ip_local_port_range: list[int] | None = None
    ip_local_reserved_ports: str | int | None = None
    tcp_tw_reuse: int | None = None
    tcp_tw_reuse_delay_ms: int | None = None
    """net.ipv4.tcp_tw_reuse_delay (Linux 6.14+); absent before."""
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
    requests: int | None = None
    """HTTP requests answered (an HTTP listener)."""
    bad_requests: int | None = None
    """HTTP requests that did not parse, answered with a 400 and a close."""


class Startup(Section):
    """How long the load took to start: from eph launching Locust to the first attempt
    (Locust starts, forks its processes, each engine starts and spawns its users)."""

    launched_to_first_attempt_s: float | None
    """None: no attempt was made."""
    launched_to_end_s: float | None
    """From the launch to the load's end: what the engines had."""


class LoadProcesses(Section):
    """How many Locust processes made the load on this host, and why that many."""

    count: int
    asked: str
    """``load.processes`` as the scenario gave it: ``auto`` or a number."""
    cpus: int
    """The CPUs eph could run on (its affinity)."""
    why: str
    master_port: int | None = None
    """The loopback port the workers connect to their master on, outside the ephemeral
    range: those connections are not the load's."""


class Conservation(Section):
    """Every attempt recorded, counted by Locust, accepted by the listener, and
    (TCP, with counters) counted by the kernel's Tcp ActiveOpens."""

    records: int
    locust_requests: int | None = None
    records_as_locust_requests: int | None = None
    """What Locust should have counted for the records, when it is not one per record
    (HTTP: each connection's responses, one more if it failed)."""
    records_match_locust: bool | None = None
    listener_requests: int | None = None
    """HTTP requests the embedded listener answered."""
    requests_match_listener: bool | None = None
    """The records' whole responses equal the listener's answers."""
    listener_accepted: int | None = None
    succeeded_match_listener: bool | None = None
    listener_check: str | None = None
    """Why the listener's count is not judged."""
    ok: bool
    """Every check that is judged agrees."""
    kernel_active_opens: int | None = None
    kernel_attempt_fails: int | None = None
    attempts_sending_syn: int | None = None
    kernel_other_opens: int | None = None
    """Active opens that were not the load's: each of Locust's ``--processes`` workers
    connects to its master, once, plus each try refused before the master listened (the
    kernel's AttemptFails the records did not make)."""
    attempts_match_kernel: bool | None = None
    kernel_check: str | None = None
    """Why the kernel's count is not judged."""


class BindAttempt(Section):
    """One failed bind() of the stand-in service."""

    at_s: float
    errno: str
    held_by: dict[str, int]
    """TCP state -> client sockets on the port."""


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


class MissingWorker(Section):
    """A worker that never shipped: its records stayed in its own run directory."""

    name: str
    hostname: str
    run_dir: str

    def finding(self) -> str:
        return (
            f"Worker {self.name}'s records stayed on {self.hostname}, in {self.run_dir}:"
            f" `eph report RUN_DIR --collect-from {self.run_dir}` folds them in (copy that"
            " directory here first if it is on another host)."
        )


class Distributed(Section):
    """A distributed run's workers: expected, and those whose records arrived."""

    expected_workers: int
    hosts_shipped: list[str]
    missing_workers: int
    missing: list[MissingWorker] = []
    """The missing workers that announced themselves, and where their records are."""


class SamplesInfo(Section):
    """The collector's socket samples."""

    count: int
    interval_s: float
    max_sample_ms: float | None
    median_sample_ms: float | None
    missing_after_s: float | None
    """Seconds from the first attempt at which the samples stop (the collector died);
    None when they cover the run."""


class TimeWait(Section):
    """TIME_WAIT on the client: its peak, and tuples reused out of it."""

    peak: int | None
    """Most client sockets toward the targets in TIME_WAIT at once (from the samples)."""
    reused_connections: int
    """Connections on a tuple the client had closed less than 60 s before."""
    kernel_tw_recycled: int | None
    """The kernel's TWRecycled counter over the run."""
    reused_minus_kernel: int | None
    reuse_age_s: Quantiles | None
    """Seconds from a tuple's close to its reuse."""
    server_peak: int | None = None
    """A lab's pair topology: the server namespace's TIME_WAIT peak."""
    kernel_timewait_overflow: int | None = None
    """TCPTimeWaitOverflow over the run: closes that skipped TIME_WAIT because
    tcp_max_tw_buckets was reached (ports freed at once, without TIME_WAIT's protection)."""


class TupleExample(Section):
    """Two uses of one 4-tuple, the second begun before the first closed."""

    local_port: int
    remote_port: int
    first_start_ns: int
    first_close_ns: int
    second_start_ns: int


class Tuples(Section):
    """The audit of every successful connection's 4-tuple."""

    distinct: int
    max_uses: int
    concurrent_duplicates: int
    """Uses of a 4-tuple begun while another use of it was still open (should be 0)."""
    examples: list[TupleExample]
    reuse_distance_median: float | None
    """Connections between two uses of one tuple, median."""


class HostSection(Section):
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


class Capacity(Section):
    """The capacity model against what was measured."""

    measured_rate_per_s: float | None = None
    measured_time_to_exhaustion_s: float | None = None
    model_max_rate_per_s: float | None = None
    """The sustainable rate: ports / (lifetime + hold); None: no port limit."""
    model_time_to_exhaustion_s: float | None = None
    model_ports: int | None = None
    """Usable ports across paths and hosts; absent (as the keys after it) when the
    port range is unknown."""
    model_hold_s: float | None = None
    """How long a closed port stays unavailable; None: no TIME_WAIT on the client."""
    model_lifetime_s: float | None = None
    model_reuse: bool | None = None
    offered_rate_per_s: float | None = None
    offered_rate_source: Literal["scenario", "measured"] | None = None
    measured_sustained_rate_per_s: float | None = None
    """Successes per second once the range ran out; None when it never did."""
    model_soft_rate_per_s: float | None = None
    """The rate at which the low-parity half fills: (ports / 2) / (lifetime + hold). Above
    it connects slow down (each scans that half) before any fails; None: it never fills."""
    model_tw_buckets: int | None = None
    """net.ipv4.tcp_max_tw_buckets: past it closes skip TIME_WAIT (no hold)."""


class OccupancyBand(Section):
    """Connect latency (ms) of the connections begun in one band of occupancy."""

    occupancy: list[float]
    """The band: [low, high) share of the usable ports in use."""
    connections: int
    even: Quantiles | None
    odd: Quantiles | None


class Occupancy(Section):
    """Ports in use toward the targets, from the collector's samples."""

    peak_ports: int
    usable_ports: int
    peak_fraction: float | None
    connect_ms_by_occupancy: list[OccupancyBand]


class LatencyCliff(Section):
    """The warning before the errors: the occupancy at which connect latency steps up
    (the low-parity half of the range held, so each connect scans it first; detector in
    ``harness.report.cliff``). Before and after: successful connections below and from
    the onset's occupancy."""

    detected: bool
    onset_occupancy: float | None = None
    """Share of the usable ports in use where the step begins (the even half: 0.5)."""
    onset_s: float | None = None
    """When the first connection past the onset began (s from the first attempt)."""
    before_p50_ms: float | None = None
    after_p50_ms: float | None = None
    before_p99_ms: float | None = None
    after_p99_ms: float | None = None
    ratio: float | None = None
    """after_p50_ms / before_p50_ms."""
    rate_before_per_s: float | None = None
    """Successful connections per second before the onset."""
    rate_after_per_s: float | None = None
    """Successful connections per second from the onset to the first failure for want of a
    port (or the end)."""


class CpuBand(Section):
    """The load processes' CPU in the intervals spent in one band of occupancy."""

    occupancy: list[float]
    """The band: [low, high) share of the usable ports in use."""
    intervals: int
    """Process intervals (one per load process per records flush) in the band."""
    attempts: int
    system_us_per_attempt: float | None
    """System CPU (µs) per attempt: the band's system CPU over its attempts."""
    user_us_per_attempt: float | None


class Cpu(Section):
    """CPU time of the load processes per attempt, from ``cpu.parquet``."""

    processes: int
    """Load processes that recorded CPU (engine processes and their drivers)."""
    intervals: int
    attempts: int
    """Attempts the engine processes counted in their intervals (equals the records)."""
    succeeded: int
    system_s: float
    user_s: float
    system_us_per_attempt: float | None
    """System CPU over the run (µs) per attempt; None without attempts."""
    user_us_per_attempt: float | None
    by_occupancy: list[CpuBand] = Field(default_factory=list)
    """The same per band of occupancy (needs the collector's samples)."""


class Http(Section):
    """HTTP requests and TLS handshakes, when the run made them."""

    requests: int
    """Responses read whole, over every connection."""
    connections_with_requests: int
    """Connections that read at least one response."""
    requests_per_connection: float | None
    """Responses per connection that read any: load.requests_per_connection when all went well."""
    statuses: dict[str, int]
    """The status each connection ended with (its last, or its first unexpected): count."""
    response_bytes: int
    """Response bytes read, headers included."""
    tls_handshakes: int
    """Connections whose TLS handshake finished."""
    tls_handshake_ms: Latency | None = None
    """From connect() answering to the handshake's end, in milliseconds."""
    locust_requests: int
    """What Locust counts for these records: each connection's responses, one more if it
    failed, and at least one (``harness.records.request_events``)."""


class NatDestination(Section):
    """The pool toward one destination."""

    destination: str
    pool_ports: int
    """Ports the pool has for this destination: ports per address x addresses."""
    peak_in_use: int
    """Most ports a new flow could not take at one sample: open, TIME_WAIT or held."""
    peak_live: int
    """Most flows still open at one sample."""
    peak_time_wait: int
    """Most conntrack entries in TIME_WAIT (or CLOSE) at one sample."""
    peak_held: int
    """Most ports held after their flow closed (``hold_time_wait``)."""
    full_at_s: float | None
    """When a sample first saw every port in use, from the first attempt; None: never."""


class Nat(Section):
    """What the router's NAT collector saw (the lab's nat topology)."""

    pool: str
    """The pool as ``[lab.nat]`` built it: addresses, ports, size per destination."""
    hold_time_wait: bool
    """Whether closed flows kept their port for the NAT's TIME_WAIT (a cloud NAT's rule)."""
    destinations: list[NatDestination]
    drops: dict[str, int]
    """conntrack's statistics over the run (``insert_failed``, ``drop``, ...) and the
    lab's ``held_drops``: SYNs the NAT dropped."""
    slow_connects: int
    """Connects that succeeded only after a SYN retransmission (over 0.9 s)."""
    retransmission_steps: dict[str, int] = Field(default_factory=dict)
    """The slow connects by their step: SYN retransmissions come 1 s, 3 s, 7 s after
    the first SYN (the RTO doubling from 1 s), so a dropped SYN shows as a connect
    of ~1 s ("1"), ~3 s ("2") or more ("3+")."""
    connect_timeouts: int
    """Connects that timed out (ETIMEDOUT)."""
    exhausted: bool
    """The pool was full and the NAT dropped SYNs: the run met the NAT's limit."""
    exhausted_at_s: float | None
    """The first connect that was slowed or timed out by a dropped SYN, from the first
    attempt."""
    sustained_rate_per_s: float | None
    """Connects that completed per second once exhausted: what the pool sustains."""
    model_max_rate_per_s: float | None = None
    """The NAT model's sustained rate for this setup (harness.capacity.nat_model)."""
    model_exhausted_at_s: float | None = None
    """The NAT model's time to exhaustion at the offered rate; None: never."""
    client_peak_fraction: float | None = None
    """The client's own range at its fullest, for contrast (the summary's occupancy)."""


class KernelWitness(Section):
    """eph's records against the kernel's account of the same connections (eBPF)."""

    available: bool
    """Whether the kernel recorder ran."""
    reason: str | None = None
    """Why it did not, in one line."""
    kernel_connections: int = 0
    """Client connections the kernel saw toward the run's endpoints."""
    records: int = 0
    """Connection attempts eph recorded."""
    matched: int = 0
    """Attempts found in both."""
    only_in_records: int = 0
    """Attempts eph recorded that the kernel did not see (or saw more than a second apart)."""
    only_in_kernel: int = 0
    """Connections the kernel saw that eph did not record."""
    lost_events: int = 0
    """State changes the kernel recorder did not see, by its own count (bpftrace's full
    buffer or skipped programs; eph's own recorder: none seen yet): a cause of
    only_in_records."""
