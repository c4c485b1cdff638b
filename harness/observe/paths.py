"""Every client-side socket of a network namespace, grouped by path, without a target.

A *path* is (protocol, local address, remote address, remote port): the unit
the kernel hands ephemeral ports out per. connect() without bind() may give
the same local port to two paths, never twice to one, so a path runs out when
every usable port of the range is held toward it (docs/kernel.md, "Port
selection").

One sample is one sock_diag dump of TCP (every state) and UDP, then bulk numpy
work; nothing per socket in Python:

- client side: the local port lies in ``ip_local_port_range`` and is not a
  port this namespace listens on (an accepted socket shares its listener's);
- per path: sockets by state, distinct local ports held, and *new* sockets
  since the previous sample, counted by socket cookie. A socket keeps its
  cookie into TIME_WAIT, so a connection that closed between two samples is
  still counted while its TIME_WAIT lasts; one that left no TIME_WAIT (the
  server closed first, or a reset) and lived less than an interval is missed:
  the rate is then a lower bound, and ActiveOpens beside it says by how much.
  A dump is not atomic (a socket can slip past its cursor), so a cookie counts
  as new only if neither of the two samples before saw it;
- usable ports per path: the range, less reserved ports, less ports that
  listeners hold inside it;
- the top ``top`` paths by ports held, and every other path summed as one
  ``other`` row, so a host with 100,000 sockets still gives a few rows.

With ``namespaces`` (``eph observe --all-namespaces``) a sample is one dump per
network namespace, taken inside it by a helper thread
(:class:`harness.kernel.namespaces.NamespaceThread`), each with its own range,
reserved and listening ports; the client rows of all of them are then grouped in
one pass, the namespace being part of each path. The cost grows with sockets and
namespaces, never with namespaces times the range. Socket cookies and inodes are
the host's, so new sockets and owners need nothing per namespace. The kernel keeps
its TCP counters per namespace too: each dump reads them there
(:class:`NamespaceCounters`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.capacity.port_model import reserved_spans
from harness.kernel.counters import ipv6_sockets_unseen, read_counters
from harness.kernel.namespaces import NamespaceThread, NetNamespace, host_namespaces
from harness.kernel.sockdiag import DIAG_DTYPE, TcpState, dump_sockets
from harness.observe.owners import OwnerIndex, PortOwner

__all__ = [
    "STATES",
    "NamespaceCounters",
    "NamespaceDump",
    "PathSampler",
    "PathSnapshot",
    "dump_here",
    "dump_here_with_counters",
    "group_paths",
    "text_addresses",
    "usable_ports",
]

# the states a client socket can hold a port in, in the order of PathSnapshot.states' columns
STATES = (
    TcpState.SYN_SENT,
    TcpState.ESTABLISHED,
    TcpState.FIN_WAIT1,
    TcpState.FIN_WAIT2,
    TcpState.CLOSING,
    TcpState.TIME_WAIT,
    TcpState.CLOSE_WAIT,
    TcpState.LAST_ACK,
    TcpState.CLOSE,
)
_STATE_COLUMN = np.full(16, len(STATES) - 1, dtype=np.intp)
for _i, _s in enumerate(STATES):
    _STATE_COLUMN[int(_s)] = _i

TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
NAMESPACES_REFRESH_S = 10.0  # the host's namespaces, looked up again this often
PROC_SYS_IPV4 = Path("/proc/sys/net/ipv4")  # the calling thread's namespace's


@dataclass
class NamespaceDump:
    """One namespace's sockets, and the settings that say which of them are clients."""

    tcp: np.ndarray  # DIAG_DTYPE
    udp: np.ndarray | None
    port_range: tuple[int, int]
    reserved: Sequence[tuple[int, int]] = ()
    label: str | None = None  # with every namespace: which one
    inode: int | None = None  # with every namespace: its inode
    # with every namespace: its own TCP counters (harness.kernel.counters' names)
    counters: dict[str, int | None] | None = None


@dataclass(frozen=True)
class NamespaceCounters:
    """One namespace's TCP counters in a sample (``eph observe --all-namespaces``):
    the kernel keeps ActiveOpens, TIME_WAIT and the rest per network namespace."""

    label: str
    inode: int
    counters: dict[str, int | None]


def dump_here(udp: bool = True, proc: Path = Path("/proc/thread-self")) -> NamespaceDump:
    """The calling thread's namespace: its TCP (and UDP) sockets, range and reserved
    ports. ``proc``'s ``net/`` gives its counters (``/proc/thread-self``: this
    thread's namespace, which a helper thread may have entered)."""
    tcp = dump_sockets(TCP, families=[socket.AF_INET])
    if ipv6_sockets_unseen(int((tcp["state"] == TcpState.TIME_WAIT).sum()), proc=proc):
        tcp = np.concatenate([tcp, dump_sockets(TCP, families=[socket.AF_INET6])])
    udp_rows = dump_sockets(UDP, [TcpState.ESTABLISHED, TcpState.CLOSE]) if udp else None
    low, high = (int(v) for v in (PROC_SYS_IPV4 / "ip_local_port_range").read_text().split())
    try:
        reserved = reserved_spans((PROC_SYS_IPV4 / "ip_local_reserved_ports").read_text())
    except OSError:
        reserved = []
    return NamespaceDump(tcp, udp_rows, (low, high), reserved)


def dump_here_with_counters(udp: bool = True) -> NamespaceDump:
    """:func:`dump_here` of the calling thread's namespace, with its counters."""
    dump = dump_here(udp)
    dump.counters = read_counters(Path("/proc/thread-self"), sysctls=Path("/proc/sys"))
    return dump


def usable_ports(
    low: int, high: int, reserved: Sequence[tuple[int, int]], listening: np.ndarray
) -> int:
    """Ports connect() may pick: the range, less reserved spans, less listening ports in it."""
    taken = np.zeros(high - low + 1, dtype=bool)
    for first, last in reserved:
        a, b = max(first, low), min(last, high)
        if a <= b:
            taken[a - low : b - low + 1] = True
    inside = listening[(listening >= low) & (listening <= high)].astype(np.int64)
    taken[inside - low] = True
    return int((~taken).sum())


@dataclass
class PathSnapshot:
    """One sample's paths, columnar; row ``i`` of every array is one path.

    The last row is ``other`` (every path outside the top) when ``other`` is
    True; its address columns are empty and ``remote_port`` is 0.
    """

    time: float
    protocol: np.ndarray  # u1: IPPROTO_TCP or IPPROTO_UDP
    local: list[str]
    remote: list[str]
    remote_port: np.ndarray  # u2
    states: np.ndarray  # (paths, len(STATES)) socket counts
    ports: np.ndarray  # distinct local ports held
    new: np.ndarray  # sockets not seen in the previous sample
    usable: np.ndarray  # usable ports per path (a number is every path's)
    paths_total: int  # every path seen, before the top-N cut
    sockets: int  # client-side sockets in all
    other: bool = False
    interval_s: float | None = None  # since the previous sample; None for the first
    # who holds each row's ports (harness.observe.owners), when the sampler was given
    # an OwnerIndex: most ports first; and the ports of sockets with no owner known
    # (TIME_WAIT has none). The ``other`` row has neither: [] and 0.
    owners: list[list[PortOwner]] | None = None
    unattributed: np.ndarray | None = None
    # with every namespace: each row's namespace (``other``'s is ""); else None
    netns: list[str] | None = None
    # the usable ports of eph's own namespace (the host line's), whatever the paths
    host_usable: int = -1
    # with every namespace: each namespace's counters, eph's own first; else None
    namespaces: list[NamespaceCounters] | None = None

    def __post_init__(self) -> None:
        if np.ndim(self.usable) == 0:
            if self.host_usable < 0:
                self.host_usable = int(self.usable)
            self.usable = np.full(len(self.ports), int(self.usable), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ports)

    @property
    def occupancy(self) -> np.ndarray:
        """Ports held / usable ports, per path (``other``'s is its busiest path's share or less)."""
        share: np.ndarray = self.ports / np.maximum(1, self.usable)
        return share

    @property
    def new_per_s(self) -> np.ndarray:
        if not self.interval_s:
            return np.full(len(self), np.nan)
        return self.new / self.interval_s

    def label(self, i: int) -> str:
        if self.other and i == len(self) - 1:
            return "other"
        proto = "udp " if int(self.protocol[i]) == UDP else ""
        remote = f"[{self.remote[i]}]" if ":" in self.remote[i] else self.remote[i]
        where = f"{self.netns[i]}: " if self.netns is not None else ""
        return f"{where}{proto}{self.local[i]} -> {remote}:{int(self.remote_port[i])}"


@dataclass
class _Columns:
    """The columns of client-side sockets that grouping needs, sorted by path then port."""

    family: np.ndarray
    protocol: np.ndarray
    state: np.ndarray
    sport: np.ndarray
    dport: np.ndarray
    cookie: np.ndarray
    inode: np.ndarray  # 0: no owner (TIME_WAIT)
    src: np.ndarray  # V16
    dst: np.ndarray  # V16
    namespace: np.ndarray  # u2: index of the row's namespace (0 with one)
    path_of_row: np.ndarray  # path index of each row, 0..paths-1
    starts: np.ndarray  # each path's first row
    new_port: np.ndarray  # bool: the first row of a (path, port) pair


def _address_words(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """16-byte address fields as two big-endian u64 words (sortable, comparable)."""
    words = np.ascontiguousarray(raw).view(">u8").reshape(-1, 2)
    return words[:, 0], words[:, 1]


def _sort_keys(rows: np.ndarray, protocol: np.ndarray) -> list[np.ndarray]:
    """Keys for ``np.lexsort``, least significant first: port, then the path.

    When every socket is IPv4 (the common case) the path packs into two words:
    the addresses sit in the first 4 bytes of each 16-byte field.
    """
    src_hi, src_lo = _address_words(rows["src"])
    dst_hi, dst_lo = _address_words(rows["dst"])
    sport = rows["sport"].astype(np.uint64)
    tail = (rows["dport"].astype(np.uint64) << np.uint64(8)) | protocol.astype(np.uint64)
    if (rows["family"] == socket.AF_INET).all():
        return [sport, (dst_hi & np.uint64(0xFFFFFFFF00000000)) | tail, src_hi]
    return [sport, tail, dst_lo, dst_hi, src_lo, src_hi]


def group_paths(
    rows: np.ndarray, protocol: np.ndarray, namespace: np.ndarray | None = None
) -> _Columns:
    """Sort client-side ``rows`` (``DIAG_DTYPE``) by path and port; find the paths.
    ``namespace`` (an index per row) makes the namespace part of the path."""
    if namespace is None:
        namespace = np.zeros(len(rows), np.uint16)
    keys = _sort_keys(rows, protocol) if len(rows) else []
    if len(rows) and namespace.any():
        keys.append(namespace.astype(np.uint64))
    order = np.lexsort(keys) if len(rows) else np.zeros(0, np.intp)
    path_change = np.zeros(len(order), dtype=bool)
    port_change = np.zeros(len(order), dtype=bool)
    if len(order):
        path_change[0] = port_change[0] = True
        for k in keys[1:]:
            ks = k[order]
            path_change[1:] |= ks[1:] != ks[:-1]
        ports = keys[0][order]
        port_change[1:] = path_change[1:] | (ports[1:] != ports[:-1])
    return _Columns(
        family=rows["family"][order],
        protocol=protocol[order],
        state=rows["state"][order],
        sport=rows["sport"][order],
        dport=rows["dport"][order],
        cookie=rows["cookie"][order],
        inode=rows["inode"][order],
        src=rows["src"][order],
        dst=rows["dst"][order],
        namespace=namespace[order],
        path_of_row=np.cumsum(path_change) - 1,
        starts=np.flatnonzero(path_change),
        new_port=port_change,
    )


def text_addresses(families: np.ndarray, raws: np.ndarray) -> list[str]:
    """Text addresses, for the few rows shown (never per socket)."""
    out = []
    for family, raw in zip(families.tolist(), raws.tolist(), strict=True):
        if family == socket.AF_INET:
            out.append(socket.inet_ntop(socket.AF_INET, raw[:4]))
        else:
            out.append(socket.inet_ntop(socket.AF_INET6, raw))
    return out


@dataclass
class PathSampler:
    """Samples the current network namespace's client paths; keeps the last cookies.

    ``port_range`` and ``reserved`` are the namespace's settings (read them
    with ``harness.kernel.sysctls.read_kernel``); ``top`` bounds the rows.
    """

    port_range: tuple[int, int]
    reserved: Sequence[tuple[int, int]] = ()
    top: int = 20
    udp: bool = True
    owners: OwnerIndex | None = None  # who holds the ports; None: not looked up
    # every namespace of the host, entered by this thread; None: this one only
    inside: NamespaceThread | None = None
    find_namespaces: Callable[[], list[NetNamespace]] = host_namespaces
    _found: list[NetNamespace] = field(default_factory=list, repr=False)
    _found_at: float | None = field(default=None, repr=False)
    # the cookies of the last two samples (sorted), and of the last alone: a dump is
    # not atomic, and a socket it skipped (its bucket changed under the dump's cursor)
    # would be counted again at the next one. Seen once in 450 under churn.
    _cookies: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64), repr=False)
    _previous: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64), repr=False)
    _last: float | None = field(default=None, repr=False)

    def sample(self) -> PathSnapshot:
        now = time.time()
        if self.inside is None:
            dump = dump_here(self.udp, Path("/proc"))
            return self.from_rows(dump.tcp, dump.udp, now)
        dumps = []
        for ns in self._namespaces(now):
            try:
                dump = self.inside.call(ns.path, lambda: dump_here_with_counters(self.udp))
            except OSError:  # its last process left meanwhile
                continue
            dump.label, dump.inode = ns.label, ns.inode
            dumps.append(dump)
        return self.from_dumps(dumps, now)

    def _namespaces(self, now: float) -> list[NetNamespace]:
        """The host's namespaces, looked up again every :data:`NAMESPACES_REFRESH_S`."""
        if self._found_at is None or now - self._found_at >= NAMESPACES_REFRESH_S:
            self._found, self._found_at = self.find_namespaces(), now
        return self._found

    def from_rows(self, tcp: np.ndarray, udp: np.ndarray | None, now: float) -> PathSnapshot:
        """The snapshot of already-dumped rows (tests and benchmarks feed their own)."""
        return self.from_dumps([NamespaceDump(tcp, udp, self.port_range, self.reserved)], now)

    def from_dumps(self, dumps: Sequence[NamespaceDump], now: float) -> PathSnapshot:
        """The snapshot of one dump per namespace (the first is eph's own)."""
        pieces, protocols, spaces, usables = [], [], [], []
        for index, dump in enumerate(dumps):
            tcp = dump.tcp
            udp = np.zeros(0, DIAG_DTYPE) if dump.udp is None else dump.udp
            listening = np.zeros(1 << 16, dtype=bool)
            listening[tcp["sport"][tcp["state"] == TcpState.LISTEN]] = True
            listening[udp["sport"][udp["state"] == TcpState.CLOSE]] = True
            low, high = dump.port_range
            tcp_client = _client(tcp, low, high, listening, TcpState.LISTEN)
            udp_client = _client(udp, low, high, listening, TcpState.CLOSE)
            counts = [int(tcp_client.sum()), int(udp_client.sum())]
            pieces += [tcp[tcp_client], udp[udp_client]]
            protocols.append(np.repeat(np.array([TCP, UDP], np.uint8), counts))
            spaces.append(np.full(sum(counts), index, np.uint16))
            usables.append(usable_ports(low, high, dump.reserved, np.flatnonzero(listening)))
        rows = np.concatenate(pieces) if pieces else np.zeros(0, DIAG_DTYPE)
        protocol = np.concatenate(protocols) if protocols else np.zeros(0, np.uint8)
        namespace = np.concatenate(spaces) if spaces else np.zeros(0, np.uint16)
        columns = group_paths(rows, protocol, namespace)
        labelled = any(dump.label is not None for dump in dumps)
        labels = [dump.label or "" for dump in dumps] if labelled else None
        snapshot = self._summarise(columns, np.array(usables or [0], np.int64), labels)
        snapshot.host_usable = usables[0] if usables else 0
        if labelled:
            snapshot.namespaces = [
                NamespaceCounters(d.label or "", d.inode or 0, d.counters or {}) for d in dumps
            ]
        snapshot.time = now
        snapshot.interval_s = None if self._last is None else now - self._last
        self._cookies = np.union1d(columns.cookie, self._previous)  # sorted
        self._previous, self._last = columns.cookie, now
        return snapshot

    def _new_per_path(self, c: _Columns, paths: int) -> np.ndarray:
        """Sockets whose cookie neither of the two samples before saw, per path."""
        if self._last is None:
            return np.zeros(paths, dtype=np.int64)  # nothing to compare with yet
        where = np.searchsorted(self._cookies, c.cookie)
        where[where == len(self._cookies)] = 0
        seen = self._cookies[where] == c.cookie if len(self._cookies) else c.cookie != c.cookie
        return np.bincount(c.path_of_row[~seen], minlength=paths)

    def _summarise(
        self, c: _Columns, usables: np.ndarray, labels: list[str] | None
    ) -> PathSnapshot:
        """The top paths and ``other``; ``usables`` and ``labels`` by namespace index."""
        paths = len(c.starts)
        path_namespace = c.namespace[c.starts].astype(np.intp)
        usable = usables[path_namespace]
        states = np.zeros((paths, len(STATES)), dtype=np.int64)
        np.add.at(states, (c.path_of_row, _STATE_COLUMN[c.state.astype(np.intp)]), 1)
        ports = np.bincount(c.path_of_row[c.new_port], minlength=paths)
        new = self._new_per_path(c, paths)
        keep = np.argsort(-ports, kind="stable")[: self.top]
        first = c.starts[keep]
        snap = PathSnapshot(
            time=0.0,
            protocol=c.protocol[first],
            local=text_addresses(c.family[first], c.src[first]),
            remote=text_addresses(c.family[first], c.dst[first]),
            remote_port=c.dport[first].astype(np.uint16),
            states=states[keep],
            ports=ports[keep],
            new=new[keep],
            usable=usable[keep],
            paths_total=paths,
            sockets=len(c.state),
            netns=None if labels is None else [labels[k] for k in path_namespace[keep]],
            host_usable=int(usables[0]),
        )
        if self.owners is not None:
            rank = np.full(paths, -1)
            rank[keep] = np.arange(len(keep))
            kept = rank[c.path_of_row] >= 0
            snap.owners, snap.unattributed = self.owners.owners(
                rank[c.path_of_row[kept]], c.inode[kept], len(keep)
            )
        rest = np.ones(paths, dtype=bool)
        rest[keep] = False
        if rest.any():
            snap.other = True
            snap.protocol = np.append(snap.protocol, 0).astype(np.uint8)
            snap.local.append("")
            snap.remote.append("")
            snap.remote_port = np.append(snap.remote_port, 0).astype(np.uint16)
            snap.states = np.vstack([snap.states, states[rest].sum(axis=0)])
            snap.ports = np.append(snap.ports, ports[rest].max())
            snap.new = np.append(snap.new, new[rest].sum())
            busiest = np.flatnonzero(rest)[np.argmax(ports[rest])]
            snap.usable = np.append(snap.usable, usable[busiest])
            if snap.netns is not None:
                snap.netns.append("")
            if snap.owners is not None and snap.unattributed is not None:
                snap.owners.append([])
                snap.unattributed = np.append(snap.unattributed, 0)
        return snap


def _client(
    rows: np.ndarray, low: int, high: int, listening: np.ndarray, server: int
) -> np.ndarray:
    """Rows that hold an ephemeral port as a client: in the range, not a listening port."""
    sport = rows["sport"]
    mask: np.ndarray = (sport >= low) & (sport <= high) & ~listening[sport]
    mask &= rows["state"] != server
    return mask
