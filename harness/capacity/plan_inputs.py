"""What a capacity plan is asked about: the rate wanted and the settings it meets.

Kept apart from :mod:`harness.capacity.plan` so that the levers, which change these
inputs, and the plan, which weighs the levers, import it both, and not each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.capacity.port_model import CapacityModel
from harness.scenario import ClosePolicy

__all__ = ["PlanInputs"]


@dataclass(frozen=True)
class PlanInputs:
    rate: float  # new connections per second wanted, all hosts together
    port_range: tuple[int, int] = (32768, 60999)
    lifetime_s: float = 0.0  # connect() to close
    close: ClosePolicy = ClosePolicy.CLIENT
    reserved: str = ""
    tw_reuse: int = 2
    reuse_delay_ms: int | None = None  # None: the kernel's default (1 s)
    timestamps: int = 1
    sources: int = 1
    destinations: int = 1
    loopback: bool = False  # the destinations are loopback addresses (tw_reuse = 2)
    hosts: int = 1
    reuse_delay_settable: bool = True  # tcp_tw_reuse_delay_ms exists (Linux 6.14+)
    # ports local services listen on (found by the preflight, or --keep-port): any
    # range recommended here leaves them out of the clients' reach, reserved
    keep_ports: tuple[int, ...] = ()
    tw_buckets: int | None = None  # net.ipv4.tcp_max_tw_buckets; None: not known
    socket_window: int | None = None  # a random IP_LOCAL_PORT_RANGE window per socket

    def model(self) -> CapacityModel:
        destination = "127.0.0.1" if self.loopback else "192.0.2.1"
        return CapacityModel.from_settings(
            port_range=self.port_range,
            reserved=self.reserved,
            tw_reuse=self.tw_reuse,
            reuse_delay_ms=self.reuse_delay_ms,
            timestamps=self.timestamps,
            close=self.close,
            destinations=[destination] * max(1, self.destinations),
            sources=self.sources,
            lifetime_s=self.lifetime_s,
            hosts=self.hosts,
            tw_buckets=self.tw_buckets,
            window=self.socket_window,
        )
