"""``--prometheus HOST:PORT``: the live per-path view as Prometheus gauges.

Served by ``prometheus_client`` from its own registry (so nothing else of the
process leaks in), on loopback unless told otherwise. Per-path gauges carry
``local`` and ``remote`` labels; a path that leaves the top N is removed, so
the series stay as bounded as the rows.
"""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from harness.observe.outlook import Outlook
from harness.observe.paths import PathSnapshot
from harness.observe.session import HostView

__all__ = ["PrometheusView"]

_PATH_LABELS = ("local", "remote")


class PrometheusView:
    """Gauges updated each sample; the HTTP server runs until eph exits."""

    def __init__(self, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        g = self._gauge
        self.ports = g("eph_path_ports_in_use", "Local ports held toward the path", _PATH_LABELS)
        self.usable = g(
            "eph_path_usable_ports", "Ports connect() may pick for the path", _PATH_LABELS
        )
        self.occupancy = g("eph_path_occupancy_ratio", "Ports in use / usable ports", _PATH_LABELS)
        self.new = g("eph_path_new_connections_per_second", "New sockets per second", _PATH_LABELS)
        self.tte = g(
            "eph_path_seconds_to_exhaustion",
            "At the current rate; +Inf when the rate fits the range",
            _PATH_LABELS,
        )
        self.host_gauges = {
            name: g(f"eph_host_{name}", help_text, ())
            for name, help_text in (
                ("time_wait", "TIME_WAIT sockets (sockstat tw)"),
                ("tw_recycled_total", "TcpExt TWRecycled"),
                ("timewait_overflow_total", "TcpExt TCPTimeWaitOverflow"),
                ("active_opens_total", "Tcp ActiveOpens"),
                ("conntrack_entries", "nf_conntrack_count"),
                ("conntrack_max", "nf_conntrack_max"),
                ("paths", "Client paths seen"),
            )
        }
        self._shown: set[tuple[str, str]] = set()
        self.server, self._thread = start_http_server(port, addr=host, registry=self.registry)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def show(self, snap: PathSnapshot, look: Outlook, host: HostView) -> None:
        shown = set()
        for i in range(len(snap)):
            labels = (
                ("", "other")
                if snap.other and i == len(snap) - 1
                else (
                    snap.local[i],
                    f"{snap.remote[i]}:{int(snap.remote_port[i])}",
                )
            )
            shown.add(labels)
            rate = float(snap.new_per_s[i])
            tte = float(look.time_to_exhaustion_s[i])
            self.ports.labels(*labels).set(int(snap.ports[i]))
            self.usable.labels(*labels).set(snap.usable)
            self.occupancy.labels(*labels).set(float(snap.occupancy[i]))
            self.new.labels(*labels).set(0.0 if math.isnan(rate) else rate)
            self.tte.labels(*labels).set(math.inf if math.isnan(tte) else tte)
        for gone in self._shown - shown:
            for gauge in (self.ports, self.usable, self.occupancy, self.new, self.tte):
                gauge.remove(*gone)
        self._shown = shown
        values: dict[str, Any] = {
            "time_wait": host.counters.get("sockstat_tw"),
            "tw_recycled_total": host.counters.get("tw_recycled"),
            "timewait_overflow_total": host.counters.get("timewait_overflow"),
            "active_opens_total": host.counters.get("active_opens"),
            "conntrack_entries": host.counters.get("conntrack_count"),
            "conntrack_max": host.settings.conntrack_max,
            "paths": snap.paths_total,
        }
        for name, value in values.items():
            if value is not None:
                self.host_gauges[name].set(value)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=2)
