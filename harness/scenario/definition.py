"""The scenario's model: every section, key, default and check, in pydantic.

Reading a file into it, with errors that name the file, line and key path,
is ``harness.scenario.loading``'s part.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StrictBool,
    StrictInt,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from harness.endpoints import Endpoint
from harness.errors import EndpointError
from harness.scenario.choices import (
    ClosePolicy,
    Emulation,
    Engine,
    ListenerClose,
    Protocol,
    Reply,
    Topology,
)
from harness.units import format_duration, parse_duration

__all__ = [
    "ClosePolicy",
    "Emulation",
    "Engine",
    "HttpConfig",
    "ListenerClose",
    "NatConfig",
    "Protocol",
    "Reply",
    "Scenario",
    "TlsConfig",
    "Topology",
    "usable_cpus",
]


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (``taskset``, a cgroup's cpuset),
    not every CPU of the machine."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _processes(value: object) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1024:
        return value
    raise ValueError('expected "auto" or a number of processes, 0 (one per CPU) to 1024')


Processes = Annotated[
    int | Literal["auto"],
    PlainValidator(_processes),
    WithJsonSchema(
        {"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": 0, "maximum": 1024}]}
    ),
]


def _duration(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f'{value!r} has no unit: write e.g. "{value}s" or "{value}ms"')
    if not isinstance(value, str):
        raise ValueError(f'{value!r} is not a duration string such as "10s"')
    return parse_duration(value)


def _endpoint(value: object) -> Endpoint:
    if isinstance(value, Endpoint):
        return value
    if not isinstance(value, str):
        raise ValueError(f'{value!r} is not an endpoint string such as "127.0.0.1:9000"')
    try:
        return Endpoint.parse(value)
    except EndpointError as exc:
        raise ValueError(exc.reason) from None


Duration = Annotated[
    float,
    PlainValidator(_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "examples": ["100ms", "10s"]}),
]
EndpointField = Annotated[
    Endpoint,
    PlainValidator(_endpoint),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "examples": ["127.0.0.1:9000", "[::1]:9000"]}),
]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]


def _port_range(value: object) -> object:
    """``"40000-40099"`` reads as ``[40000, 40099]`` (handy in --set and --vary)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
        if match:
            return [int(match.group(1)), int(match.group(2))]
    return value


PortRange = Annotated[tuple[Port, Port], BeforeValidator(_port_range)]
_RESERVED = re.compile(r"^\s*(\d+(-\d+)?)(\s*,\s*\d+(-\d+)?)*\s*$|^\s*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class TargetConfig(_Section):
    endpoints: list[EndpointField] = Field(min_length=1)


class ListenerConfig(_Section):
    response: str = ""  # the bytes sent; with http, the body of each response
    close: ListenerClose = ListenerClose.AUTO
    read_request: StrictBool | None = None  # None: read the request when load.send is set
    # answer every request read on a connection, not only the first: a keep-alive
    # server for clients that pool (with close = "wait" and read_request)
    keep_alive: StrictBool = False
    backlog: Annotated[StrictInt, Field(ge=1, le=1 << 20)] = 4096
    # serve HTTP/1.1 (200 and ``response`` as the body, keep-alive as asked) and TLS
    # (a throwaway self-signed certificate made at start); None: as [load] asks
    http: StrictBool | None = None
    tls: StrictBool | None = None


_STATUS_CLASS = re.compile(r"^[1-5]xx$")


def _status(value: object) -> object:
    """``expect_status``: one code or class, or a list of them (``200``, ``"2xx"``)."""
    return value if isinstance(value, list) else [value]


def _table_or_flag(value: object) -> object:
    """``tls = true`` reads as an empty table (every default), ``false`` as none."""
    if value is True:
        return {}
    if value is False:
        return None
    return value


class HttpConfig(_Section):
    """``[load.http]``: each connection carries HTTP/1.1 requests, and each record gets
    the status and the response size (``harness.load.http_client``)."""

    method: Annotated[str, Field(pattern=r"^[A-Z]{1,16}$")] = "GET"
    path: Annotated[str, Field(pattern=r"^/\S*$")] = "/"
    headers: dict[str, str] = Field(default_factory=dict)  # Host defaults to the endpoint's
    body: str = ""
    # the statuses that count as success: codes (200) or classes ("2xx"); Locust's
    # HttpUser counts everything under 400 as success, and so does this default
    expect_status: Annotated[list[StrictInt | str], BeforeValidator(_status)] = Field(
        default_factory=lambda: list[int | str](["2xx", "3xx"]), min_length=1
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        for index, item in enumerate(self.expect_status):
            if isinstance(item, int) and not 100 <= item <= 599:
                raise ValueError(f"expect_status[{index}] = {item} is not an HTTP status")
            if isinstance(item, str) and not _STATUS_CLASS.match(item):
                raise ValueError(
                    f"expect_status[{index}] = {item!r} is neither a status code nor a"
                    ' class such as "2xx"'
                )
        for name, value in self.headers.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name) or "\n" in value:
                raise ValueError(f"headers: {name!r} = {value!r} is not a valid header")
        return self

    def accepts(self, status: int) -> bool:
        """Whether ``status`` is one of the expected ones."""
        return any(
            status == item if isinstance(item, int) else status // 100 == int(item[0])
            for item in self.expect_status
        )


class TlsConfig(_Section):
    """``load.tls = true`` or ``[load.tls]``: every connection does a TLS handshake after
    connect(), timed apart from it. Verification is on unless ``insecure = true``."""

    server_name: str | None = None  # SNI and the name verified; default: the endpoint's host
    ca_file: str | None = None  # PEM bundle to verify with; default: the system's
    cert_file: str | None = None  # a client certificate (PEM), with key_file
    key_file: str | None = None
    insecure: StrictBool = False  # no verification at all: only when asked

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        return self


class LoadConfig(_Section):
    engine: Engine = Engine.LOCUST
    protocol: Protocol = Protocol.TCP
    users: Annotated[StrictInt, Field(ge=1, le=100_000)] = 50
    spawn_rate: Annotated[float, Field(gt=0, strict=True)] = 50.0
    rate: Annotated[float, Field(ge=0, strict=True)] = 0.0
    close: ClosePolicy = ClosePolicy.CLIENT
    hold: Duration = 0.0
    send: str = ""
    reply: Reply = Reply.NONE
    source_addresses: list[str] = Field(default_factory=list)
    socket_port_range: PortRange | None = None  # IP_LOCAL_PORT_RANGE (Linux 6.3+)
    # IP_LOCAL_PORT_RANGE per socket, a random aligned window of this many ports of the
    # range (or of socket_port_range): connect() scans the window, not the whole range
    socket_port_window: Annotated[StrictInt, Field(ge=2, le=65536)] | None = None
    connect_timeout: Duration = 3.0
    io_timeout: Duration = 5.0
    backoff: Duration = 0.01
    # Locust processes on this host (Locust's --processes). "auto": one per CPU eph may
    # run on, less one for an embedded listener or lab target beside it when more than
    # two are available, and no more than load.users; a number pins it (0: every CPU)
    processes: Processes = "auto"
    # stop the run once this many attempts were made (0: only the duration bounds it)
    max_connections: Annotated[StrictInt, Field(ge=0)] = 0
    http: Annotated[HttpConfig | None, BeforeValidator(_table_or_flag)] = None
    tls: Annotated[TlsConfig | None, BeforeValidator(_table_or_flag)] = None
    # HTTP requests over each connection before it closes (keep-alive): the pooling
    # lever, measured. load.rate then counts requests, not connections
    requests_per_connection: Annotated[StrictInt, Field(ge=1, le=65535)] = 1

    @property
    def process_count(self) -> int:
        """The processes, ``auto`` taken as if nothing shared the CPUs (a run settles it
        once with :func:`harness.run.placement.choose_processes`)."""
        if self.processes == "auto":
            return max(1, min(usable_cpus(), self.users))
        return self.processes or usable_cpus()

    @model_validator(mode="after")
    def _check_sources(self) -> Self:
        import ipaddress

        for index, text in enumerate(self.source_addresses):
            try:
                ipaddress.ip_address(text)
            except ValueError:
                raise ValueError(
                    f"source_addresses[{index}] = {text!r} is not an IP address"
                ) from None
        if self.connect_timeout <= 0:
            raise ValueError("connect_timeout must be above 0")
        if self.protocol is Protocol.UDP and (
            self.reply is Reply.EOF or self.close is ClosePolicy.SERVER
        ):
            raise ValueError(
                'protocol = "udp" has no end of stream: reply "eof" and close "server"'
                ' need TCP (use reply = "data" to wait for an answer)'
            )
        if self.protocol is Protocol.UDP and (self.http is not None or self.tls is not None):
            raise ValueError('protocol = "udp" carries neither HTTP nor TLS: use "tcp"')
        if self.http is not None and (self.send or self.reply is not Reply.NONE):
            raise ValueError(
                "[load.http] builds the request and reads the response itself:"
                " leave send and reply unset (the request's body is load.http.body)"
            )
        if self.requests_per_connection > 1 and self.http is None:
            raise ValueError(
                f"requests_per_connection = {self.requests_per_connection} needs [load.http]:"
                " only HTTP has requests to count"
            )
        if (
            self.socket_port_range is not None
            and self.socket_port_range[0] > self.socket_port_range[1]
        ):
            raise ValueError(
                f"socket_port_range low end {self.socket_port_range[0]} is above high end"
                f" {self.socket_port_range[1]}"
            )
        return self


class KernelConfig(_Section):
    """Sysctls: written only inside a lab namespace; on the host read and recorded."""

    ip_local_port_range: PortRange | None = None
    ip_local_reserved_ports: str | None = None
    tcp_tw_reuse: Literal[0, 1, 2] | None = None
    tcp_tw_reuse_delay: Duration | None = None
    tcp_timestamps: Literal[0, 1, 2] | None = None
    tcp_fin_timeout: Duration | None = None
    tcp_max_tw_buckets: Annotated[StrictInt, Field(ge=0)] | None = None
    somaxconn: Annotated[StrictInt, Field(ge=1)] | None = None

    def in_kernel_units(self) -> dict[str, Any]:
        """The keys that are set, named and valued as ``harness.kernel.sysctls.read_kernel`` reads
        them: ``tcp_tw_reuse_delay`` -> ``tcp_tw_reuse_delay_ms`` in ms, seconds as whole
        seconds, ranges as lists."""
        out: dict[str, Any] = {}
        for key in type(self).model_fields:
            value = getattr(self, key)
            if value is None:
                continue
            if key == "tcp_tw_reuse_delay":
                key, value = "tcp_tw_reuse_delay_ms", round(value * 1000)
            elif key == "tcp_fin_timeout":
                value = round(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.ip_local_port_range is not None:
            lo, hi = self.ip_local_port_range
            if lo > hi:
                raise ValueError(f"ip_local_port_range low end {lo} is above high end {hi}")
        reserved = self.ip_local_reserved_ports
        if reserved is not None and not _RESERVED.match(reserved):
            raise ValueError(
                f"ip_local_reserved_ports {reserved!r} is not a list of ports and ranges"
                ' such as "40000-40009,40050"'
            )
        return self


# conntrack's TCP timeouts a [lab.nat] may set: key tcp_timeout_<name> is the router
# namespace's net.netfilter.nf_conntrack_tcp_timeout_<name> (whole seconds)
CONNTRACK_TIMEOUTS = (
    "syn_sent",
    "syn_recv",
    "established",
    "fin_wait",
    "close_wait",
    "last_ack",
    "time_wait",
    "close",
    "max_retrans",
    "unacknowledged",
)
_Seconds = Annotated[Duration, Field(ge=1)]
HOLD_POOL_MAX = 4096  # ports in a hold_time_wait pool: one nftables rule each


def _ipv4(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an IPv4 address string")
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None
    if address.is_loopback or address.is_unspecified or address.is_multicast:
        raise ValueError(f"{value} cannot be a NAT address (loopback, 0.0.0.0 or multicast)")
    return str(address)


class NatConfig(_Section):
    """``[lab.nat]``: the router's SNAT pool and conntrack, in the router namespace only
    (``harness.lab.nat_router``). The defaults are a Linux MASQUERADE's: the whole port range
    on one address, conntrack's own timeouts."""

    # the router's outside addresses; each gives the pool another ``ports`` per destination
    addresses: Annotated[list[Annotated[str, BeforeValidator(_ipv4)]], Field(min_length=1)] = Field(
        default_factory=lambda: ["198.51.100.1"]
    )  # TEST-NET-2
    ports: PortRange = (1024, 65535)
    random_fully: StrictBool = False  # NF_NAT_RANGE_PROTO_RANDOM_FULLY, as kube-proxy sets
    # a cloud NAT's rule: a port stays taken toward its destination for
    # tcp_timeout_time_wait after the flow closes. Linux 6.5+ instead hands a TIME_WAIT
    # entry to a new SYN whose sequence number has advanced (docs/kernel.md)
    hold_time_wait: StrictBool = False
    # the router's conntrack table size, as an nftables ``ct count`` limit: the host's
    # nf_conntrack_max is not writable from a namespace
    conntrack_max: Annotated[StrictInt, Field(ge=1, le=1 << 24)] | None = None
    tcp_timeout_syn_sent: _Seconds | None = None
    tcp_timeout_syn_recv: _Seconds | None = None
    tcp_timeout_established: _Seconds | None = None
    tcp_timeout_fin_wait: _Seconds | None = None
    tcp_timeout_close_wait: _Seconds | None = None
    tcp_timeout_last_ack: _Seconds | None = None
    tcp_timeout_time_wait: _Seconds | None = None
    tcp_timeout_close: _Seconds | None = None
    tcp_timeout_max_retrans: _Seconds | None = None
    tcp_timeout_unacknowledged: _Seconds | None = None

    @property
    def pool_ports(self) -> int:
        """Ports per NAT address."""
        return self.ports[1] - self.ports[0] + 1

    def timeouts(self) -> dict[str, int]:
        """The timeouts set, as sysctl name -> whole seconds."""
        out = {}
        for name in CONNTRACK_TIMEOUTS:
            value = getattr(self, f"tcp_timeout_{name}")
            if value is not None:
                out[f"net.netfilter.nf_conntrack_tcp_timeout_{name}"] = round(value)
        return out

    @model_validator(mode="after")
    def _check(self) -> Self:
        lo, hi = self.ports
        if lo > hi:
            raise ValueError(f"ports low end {lo} is above high end {hi}")
        if len(set(self.addresses)) != len(self.addresses):
            raise ValueError(f"addresses {self.addresses} repeat an address")
        if self.hold_time_wait and self.random_fully:
            raise ValueError(
                "random_fully and hold_time_wait exclude each other: with hold_time_wait"
                " the lab picks each port itself (the first free one), not the kernel"
            )
        pool = self.pool_ports * len(self.addresses)
        if self.hold_time_wait and pool > HOLD_POOL_MAX:
            raise ValueError(
                f"hold_time_wait with a pool of {pool} ports: at most {HOLD_POOL_MAX}"
                " (one nftables rule a port); narrow ports or use fewer addresses"
            )
        for name in CONNTRACK_TIMEOUTS:
            value = getattr(self, f"tcp_timeout_{name}")
            if value is not None and value != round(value):
                raise ValueError(
                    f"tcp_timeout_{name} = {value:g} s: conntrack counts whole seconds"
                )
        return self


class LabConfig(_Section):
    """How ``eph lab`` builds its namespaces (ignored by ``eph run``)."""

    topology: Topology = Topology.SINGLE
    delay: Duration = 0.0  # round trip added on the pair's link (half each way)
    jitter: Duration = 0.0  # round trip: ±jitter/2 each way
    loss: Annotated[float, Field(ge=0, le=100, strict=True)] = 0.0  # percent, each way
    emulation: Emulation = Emulation.AUTO
    # a stand-in service listening on this port where the clients run (the
    # port-conflict scenario): stopped service_restart after the load starts, then
    # restarted as soon as bind() lets it (harness.target.service)
    service_port: Port | None = None
    service_restart: Duration = 1.0
    # the user's own client instead of Locust (eph lab --exec): a command line, run in
    # the client namespace with EPH_TARGET=host:port, observed (harness.lab.exec)
    exec: str | None = None
    nat: NatConfig | None = None  # topology = "nat": the router's pool (defaults when absent)

    @property
    def nat_pool(self) -> NatConfig:
        """``[lab.nat]``, or its defaults."""
        return self.nat if self.nat is not None else NatConfig()

    @property
    def impaired(self) -> bool:
        return bool(self.delay or self.jitter or self.loss)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.impaired and self.topology is not Topology.PAIR:
            raise ValueError(
                "delay, jitter and loss act on the link between two namespaces:"
                ' they need topology = "pair"'
            )
        if self.nat is not None and self.topology is not Topology.NAT:
            raise ValueError('[lab.nat] configures the router of topology = "nat" only')
        return self


class CollectorConfig(_Section):
    interval: Duration = 0.1

    @field_validator("interval")
    @classmethod
    def _above_zero(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("the interval must be above 0")
        return value


class Scenario(_Section):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")]
    description: str = ""
    duration: Duration = 20.0
    target: TargetConfig
    listener: ListenerConfig | None = None
    load: LoadConfig = LoadConfig()
    kernel: KernelConfig = KernelConfig()
    lab: LabConfig = LabConfig()
    collector: CollectorConfig = CollectorConfig()

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.duration <= 0:
            raise ValueError("duration must be above 0")
        if self.listener is None:
            for endpoint in self.target.endpoints:
                if endpoint.port == 0:
                    raise ValueError(
                        f"target endpoint {endpoint} has port 0, which only an embedded"
                        " [listener] can resolve (it picks a free port)"
                    )
        return self

    @property
    def listener_close(self) -> ListenerClose:
        """The listener's behaviour, with ``auto`` resolved from ``load.close``."""
        if self.listener is None or self.listener.close is not ListenerClose.AUTO:
            return self.listener.close if self.listener else ListenerClose.WAIT
        if self.load.close is ClosePolicy.SERVER:
            return ListenerClose.FIRST
        return ListenerClose.WAIT

    @property
    def listener_http(self) -> bool:
        if self.listener is not None and self.listener.http is not None:
            return self.listener.http
        return self.load.http is not None

    @property
    def listener_tls(self) -> bool:
        if self.listener is not None and self.listener.tls is not None:
            return self.listener.tls
        return self.load.tls is not None

    @property
    def listener_reads_request(self) -> bool:
        if self.listener is not None and self.listener.read_request is not None:
            return self.listener.read_request
        return bool(self.load.send) or self.listener_http

    def advisories(self) -> list[str]:
        """Things worth a warning that are not errors."""
        notes = []
        if self.kernel.ip_local_port_range is not None:
            lo, hi = self.kernel.ip_local_port_range
            if lo % 2 == hi % 2:
                notes.append(
                    f"kernel.ip_local_port_range {lo}-{hi}: both ends have the same parity;"
                    " the kernel docs advise different parity (connect() splits the range"
                    " by parity)"
                )
        if (
            self.listener is not None
            and self.load.close is ClosePolicy.SERVER
            and self.listener_close is ListenerClose.WAIT
        ):
            notes.append(
                "load.close = server but listener.close = wait: each connection lasts"
                " until load.io_timeout"
            )
        return notes

    def with_endpoints(self, endpoints: Sequence[Endpoint]) -> Scenario:
        return self.model_copy(update={"target": TargetConfig(endpoints=list(endpoints))})

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
