"""``--prometheus HOST:PORT``: the live per-path view, as Prometheus expects it.

Served by ``prometheus_client`` from its own registry (so nothing else of the
process leaks in), on loopback unless told otherwise. Names follow Prometheus'
conventions, and ``promtool check metrics`` passes them (tests/test_observe.py):
base units (seconds), ratios from 0 to 1, ``_total`` only on counters.

- ``eph_path_*`` gauges, labelled ``local`` and ``remote``: the top N paths of a
  sample and one ``remote="other"`` series for the rest, so the series stay as
  bounded as the rows (a path that leaves the top N is removed).
- ``eph_host_*``: the namespace's TCP counters as counters (the kernel's own
  totals, so ``rate()`` works and a restart of eph is no reset), TIME_WAIT and
  conntrack as gauges.
- ``eph_netns_*`` with ``--all-namespaces``: the same counters of each network
  namespace, labelled ``netns`` (as ``eph_path_*`` are) and ``inode`` (which stays
  while the label's processes change): one series per namespace and counter, so a
  node's series grow with its pods, and a namespace gone is gone from the next scrape.
- ``eph_nat_*`` on a NAT router: ports per NAT address and destination (the top N
  as well), the pool's size where nftables' rules give it, and conntrack's insert
  failures and drops as counters since eph began.
- ``eph_build_info`` (version, python) and ``eph_sample_duration_seconds``.
- With ``--trace``: ``eph_connect_failures_total`` by destination and errno, and
  the ``eph_connect_duration_seconds`` histogram by destination, from the kernel's
  record of every connect (the drainer's tally, read at each scrape): the top
  :data:`TRACE_TOP` destinations and one ``remote="other"``.

docs/operations/observe.md lists every metric with its labels; deploy/prometheus/
holds the alert rules written against them.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from harness import __version__
from harness.errors import errno_name
from harness.kernel.sockdiag import TcpState
from harness.observe.outlook import Outlook
from harness.observe.paths import STATES, UDP, PathSnapshot
from harness.observe.session import HostView

__all__ = ["HOST_COUNTERS", "NETNS_COUNTERS", "NETNS_GAUGES", "PrometheusView"]

_PATH_LABELS = ("protocol", "local", "remote")
_TIME_WAIT_COLUMN = STATES.index(TcpState.TIME_WAIT)
_NAT_LABELS = ("nat_address", "destination")
NAT_TOP = 20  # NAT address and destination pairs kept
TRACE_TOP = 20  # destinations of the traced connects kept, the rest as "other"

# the kernel's cumulative TCP counters (harness.kernel.counters' names): metric, help
HOST_COUNTERS = {
    "active_opens": ("eph_host_active_opens", "Connects that sent a SYN (Tcp ActiveOpens)"),
    "attempt_fails": (
        "eph_host_attempt_fails",
        "Connects that failed after sending a SYN (Tcp AttemptFails)",
    ),
    "tw_recycled": (
        "eph_host_tw_recycled",
        "TIME_WAIT ports reused by connect (TcpExt TWRecycled)",
    ),
    "timewait_overflow": (
        "eph_host_timewait_overflow",
        "TIME_WAIT sockets not made, the table full (TcpExt TCPTimeWaitOverflow)",
    ),
}


class _HostMetrics(Collector):
    """What one sample says of the namespace, built at scrape time from the last one."""

    def __init__(self) -> None:
        self.host: HostView | None = None
        self.paths = 0
        self.samples = 0
        self.nat_insert_failed = 0
        self.nat_drop = 0

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("eph_build_info", "eph's version", labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        yield CounterMetricFamily("eph_samples", "Samples taken", value=self.samples)
        host = self.host
        if host is None:
            return
        yield GaugeMetricFamily(
            "eph_sample_duration_seconds",
            "How long the last sample took",
            value=host.sample_ms / 1000,
        )
        yield GaugeMetricFamily("eph_host_paths", "Client paths seen", value=self.paths)
        for key, (name, text) in HOST_COUNTERS.items():
            value = host.counters.get(key)
            if value is not None:
                yield CounterMetricFamily(name, text, value=value)
        gauges: dict[str, tuple[str, Any]] = {
            "eph_host_time_wait_sockets": (
                "TIME_WAIT sockets (sockstat tw)",
                host.counters.get("sockstat_tw"),
            ),
            "eph_host_conntrack_entries": (
                "Conntrack entries (nf_conntrack_count)",
                host.counters.get("conntrack_count"),
            ),
            "eph_host_conntrack_max": (
                "Conntrack's limit (nf_conntrack_max)",
                host.settings.conntrack_max,
            ),
        }
        for name, (text, value) in gauges.items():
            if value is not None:
                yield GaugeMetricFamily(name, text, value=value)
        yield from _namespace_metrics(host)
        if host.nat is not None:
            yield CounterMetricFamily(
                "eph_nat_conntrack_insert_failed",
                "Conntrack insert failures since eph began (a SYN that found no NAT port)",
                value=self.nat_insert_failed,
            )
            yield CounterMetricFamily(
                "eph_nat_conntrack_drops", "Conntrack drops since eph began", value=self.nat_drop
            )


# each namespace's counters (--all-namespaces): counters, then gauges; name, help
NETNS_COUNTERS = {
    key: (name.replace("eph_host_", "eph_netns_"), text)
    for key, (name, text) in HOST_COUNTERS.items()
}
NETNS_GAUGES = {
    "sockstat_tw": ("eph_netns_time_wait_sockets", "TIME_WAIT sockets (sockstat tw)"),
    "conntrack_count": ("eph_netns_conntrack_entries", "Conntrack entries (nf_conntrack_count)"),
}


def _namespace_metrics(host: HostView) -> Iterator[Metric]:
    """``eph_netns_*``: every namespace's counters, built from the last sample."""
    if not host.namespaces:
        return
    labels = ["netns", "inode"]
    families: list[tuple[str, CounterMetricFamily | GaugeMetricFamily]] = [
        (key, CounterMetricFamily(name, f"{text}, per network namespace", labels=labels))
        for key, (name, text) in NETNS_COUNTERS.items()
    ] + [
        (key, GaugeMetricFamily(name, f"{text}, per network namespace", labels=labels))
        for key, (name, text) in NETNS_GAUGES.items()
    ]
    for view in host.namespaces:
        ns = view.namespace
        for key, family in families:
            value = ns.counters.get(key)
            if value is not None:
                family.add_metric([ns.label, str(ns.inode)], value)
    for _, family in families:
        if family.samples:
            yield family


class _TraceMetrics(Collector):
    """The traced connects' failures and latency, read from the drainer's tally (JSON,
    rewritten after each drain) at each scrape: nothing is kept here."""

    def __init__(self) -> None:
        self.tally: Path | None = None

    def collect(self) -> Iterator[Metric]:
        if self.tally is None:
            return
        try:
            found = json.loads(self.tally.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not written yet
            return
        bounds = found["buckets_s"]
        failures = CounterMetricFamily(
            "eph_connect_failures",
            "Failed connects the kernel saw, by destination and errno (--trace)",
            labels=["remote", "errno"],
        )
        latency = HistogramMetricFamily(
            "eph_connect_duration_seconds",
            "Time to connect, of the connects that connected (--trace)",
            labels=["remote"],
        )
        for remote, entry in _top_destinations(found["destinations"]):
            for code, count in sorted(entry["failed"].items()):
                failures.add_metric([remote, errno_name(int(code))], count)
            cumulative, buckets = 0, []
            for bound, count in zip([*bounds, math.inf], entry["buckets"], strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
            latency.add_metric([remote], buckets, entry["sum_s"])
        yield failures
        yield latency


def _top_destinations(destinations: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The :data:`TRACE_TOP` busiest destinations, and the rest summed as ``other``."""

    def total(entry: dict[str, Any]) -> int:
        return int(entry["connected"]) + int(sum(entry["failed"].values()))

    ranked = sorted(destinations.items(), key=lambda item: (-total(item[1]), item[0]))
    kept = ranked[:TRACE_TOP]
    if len(ranked) > TRACE_TOP:
        other: dict[str, Any] = {"failed": {}, "connected": 0, "sum_s": 0.0, "buckets": []}
        for _, entry in ranked[TRACE_TOP:]:
            for code, count in entry["failed"].items():
                other["failed"][code] = other["failed"].get(code, 0) + count
            other["connected"] += entry["connected"]
            other["sum_s"] += entry["sum_s"]
            other["buckets"] = [
                a + b for a, b in zip(other["buckets"] or [0] * len(entry["buckets"]),
                                      entry["buckets"], strict=True)
            ]  # fmt: skip
        kept.append(("other", other))
    return kept


class PrometheusView:
    """The metrics, updated each sample; the HTTP server runs until :meth:`close`."""

    def __init__(self, host: str, port: int, netns: bool = False) -> None:
        self.registry = CollectorRegistry()
        g = self._gauge
        path_labels = (*_PATH_LABELS, "netns") if netns else _PATH_LABELS
        self.ports = g("eph_path_ports_in_use", "Local ports held toward the path", path_labels)
        self.usable = g(
            "eph_path_usable_ports", "Ports connect() may pick for the path", path_labels
        )
        self.occupancy = g("eph_path_occupancy_ratio", "Ports in use / usable ports", path_labels)
        self.new = g("eph_path_new_connections_per_second", "New sockets per second", path_labels)
        self.time_wait = g("eph_path_time_wait_sockets", "Sockets in TIME_WAIT", path_labels)
        self.tte = g(
            "eph_path_seconds_to_exhaustion",
            "At the current rate; +Inf when the rate fits the range",
            path_labels,
        )
        self.owner_ports = g(
            "eph_path_owner_ports",
            "Ports of the path held by one process (the top owners of each path)",
            (*path_labels, "comm", "pid"),
        )
        self.unattributed = g(
            "eph_path_unattributed_ports",
            "Ports of the path held by sockets with no owner known (TIME_WAIT has none)",
            path_labels,
        )
        self.nat_ports = g("eph_nat_ports_in_use", "NAT ports held by live flows", _NAT_LABELS)
        self.nat_time_wait = g(
            "eph_nat_time_wait_entries", "NAT entries in TIME_WAIT (no flow)", _NAT_LABELS
        )
        self.nat_pool = g(
            "eph_nat_pool_ports",
            "Ports the nftables snat or masquerade rule gives the NAT address",
            _NAT_LABELS,
        )
        self.host = _HostMetrics()
        self.registry.register(self.host)
        self.traced = _TraceMetrics()
        self.registry.register(self.traced)
        self._shown: set[tuple[str, ...]] = set()
        self._nat_shown: set[tuple[str, ...]] = set()
        self._owners_shown: set[tuple[str, ...]] = set()
        self.server, self._thread = start_http_server(port, addr=host, registry=self.registry)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def watch_trace(self, tally: Path) -> None:
        """Serve the traced connects' failures and latency from ``tally`` (--trace)."""
        self.traced.tally = tally

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def show(self, snap: PathSnapshot, look: Outlook, host: HostView) -> None:
        shown: set[tuple[str, ...]] = set()
        time_wait = snap.states[:, _TIME_WAIT_COLUMN]
        for i in range(len(snap)):
            labels = _path_labels(snap, i)
            shown.add(labels)
            rate = float(snap.new_per_s[i])
            tte = float(look.time_to_exhaustion_s[i])
            self.ports.labels(*labels).set(int(snap.ports[i]))
            self.usable.labels(*labels).set(int(snap.usable[i]))
            self.occupancy.labels(*labels).set(float(snap.occupancy[i]))
            self.new.labels(*labels).set(0.0 if math.isnan(rate) else rate)
            self.time_wait.labels(*labels).set(int(time_wait[i]))
            self.tte.labels(*labels).set(math.inf if math.isnan(tte) else tte)
        _forget(
            self._shown - shown,
            (
                self.ports,
                self.usable,
                self.occupancy,
                self.new,
                self.time_wait,
                self.tte,
                self.unattributed,
            ),
        )
        self._shown = shown
        self._show_owners(snap)
        self._show_nat(host)
        self.host.host, self.host.paths = host, snap.paths_total
        self.host.samples += 1

    def _show_owners(self, snap: PathSnapshot) -> None:
        if snap.owners is None or snap.unattributed is None:
            return
        shown: set[tuple[str, ...]] = set()
        for i, owners in enumerate(snap.owners):
            path = _path_labels(snap, i)
            if path[2] == "other":
                continue
            self.unattributed.labels(*path).set(int(snap.unattributed[i]))
            for owner in owners:
                labels = (*path, owner.comm, str(owner.pid))
                shown.add(labels)
                self.owner_ports.labels(*labels).set(owner.ports)
        _forget(self._owners_shown - shown, (self.owner_ports,))
        self._owners_shown = shown

    def _show_nat(self, host: HostView) -> None:
        nat = host.nat
        if nat is None:
            return
        self.host.nat_insert_failed += nat.insert_failed or 0
        self.host.nat_drop += nat.drop or 0
        shown: set[tuple[str, ...]] = set()
        for row in nat.rows[:NAT_TOP]:
            labels = (row.nat_address, row.destination)
            shown.add(labels)
            self.nat_ports.labels(*labels).set(row.in_use)
            self.nat_time_wait.labels(*labels).set(row.time_wait)
            if row.pool is not None:
                self.nat_pool.labels(*labels).set(row.pool)
            else:
                _forget({labels}, (self.nat_pool,))
        _forget(self._nat_shown - shown, (self.nat_ports, self.nat_time_wait, self.nat_pool))
        self._nat_shown = shown

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=2)


def _path_labels(snap: PathSnapshot, i: int) -> tuple[str, ...]:
    """protocol, local, remote, and with every namespace the path's namespace."""
    where = () if snap.netns is None else (snap.netns[i],)
    if snap.other and i == len(snap) - 1:
        return ("", "", "other", *where)
    remote = snap.remote[i]
    remote = f"[{remote}]" if ":" in remote else remote
    protocol = "udp" if int(snap.protocol[i]) == UDP else "tcp"
    return (protocol, snap.local[i], f"{remote}:{int(snap.remote_port[i])}", *where)


def _forget(gone: set[tuple[str, ...]], gauges: tuple[Gauge, ...]) -> None:
    for labels in gone:
        for gauge in gauges:
            with contextlib.suppress(KeyError):  # a series this gauge never had
                gauge.remove(*labels)
