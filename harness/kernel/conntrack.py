"""The kernel's conntrack table and statistics for this network namespace.

What a NAT router knows about the flows through it: each entry's original tuple
(as the client sent it), its reply tuple (as the server answers it: for a
source-NATed flow, the reply's destination address:port is the NAT address:port
the flow occupies), its TCP state, its status bits and the seconds it has left.

Read with a hand-written ctnetlink dump (``IPCTNL_MSG_CT_GET``), parsed in bulk
like :mod:`harness.kernel.sockdiag`: it is the one source that gives the status
bits (which flows were source-NATed) and numbers, not text, and the cheapest
at 10,000 entries (docs/kernel.md, "Reading conntrack"; median of 7 reads
inside a router namespace, three runs, on 2 shared AMD EPYC cores, Linux 6.18):

==============================================  =============  ==============
source, ms per read                             1,000 entries  10,000 entries
==============================================  =============  ==============
ctnetlink, :func:`dump_conntrack` (to columns)  9.8-19.7       35-97
``/proc/net/nf_conntrack``, read and split      4.3-8.4        49-68
``conntrack -L``, subprocess, output unparsed   15-27          80-89
==============================================  =============  ==============

The /proc text shows only ``[ASSURED]`` and ``[UNREPLIED]`` of the status bits,
and would still need its words turned into columns.

The parser's contract is sock_diag's: rows come from every conntrack message up
to ``NLMSG_DONE``; an ``NLMSG_ERROR`` with a negative errno, or an ``NLMSG_DONE``
carrying one, raises ``OSError`` with that errno; bytes that are not whole
messages, attributes that overrun their message or their parent, or an entry
without its tuples raise ``OSError(EBADMSG)`` saying the datagram and byte:
never a partial table. Entries of other protocols (UDP, ICMP) are skipped.

Addresses are 16 bytes as in sock_diag (IPv4 in the first 4, network order);
ports are host-order integers.
"""

from __future__ import annotations

import enum
import errno
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from harness.kernel import netlink
from harness.kernel.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSGHDR

__all__ = [
    "CT_DTYPE",
    "IPS_SRC_NAT",
    "STATS",
    "CtState",
    "conntrack_available",
    "dump_conntrack",
    "parse_dump",
    "read_conntrack_stats",
]

NETLINK_NETFILTER = 12
_SUBSYS_CTNETLINK = 1 << 8
IPCTNL_MSG_CT_NEW = _SUBSYS_CTNETLINK | 0  # what each entry of a dump comes as
IPCTNL_MSG_CT_GET = _SUBSYS_CTNETLINK | 1
IPCTNL_MSG_CT_GET_STATS = _SUBSYS_CTNETLINK | 5
IPS_SRC_NAT = 1 << 4
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian, unused): 4 bytes
_NFGENMSG_AT = NLMSGHDR.size
_BODY = _NFGENMSG_AT + _NFGENMSG.size  # where a conntrack message's attributes start
_SOURCE = "ctnetlink"
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER


class CtState(enum.IntEnum):
    """conntrack's own TCP states (enum tcp_conntrack, uapi nf_conntrack_tcp.h)."""

    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9


CT_DTYPE = np.dtype(
    [
        ("family", "u1"),  # AF_INET or AF_INET6
        ("state", "u1"),  # CtState
        ("status", "u4"),  # IPS_* bits
        ("timeout", "u4"),  # seconds left
        ("orig_src", "V16"),
        ("orig_dst", "V16"),
        ("orig_sport", "u2"),
        ("orig_dport", "u2"),
        ("reply_src", "V16"),
        ("reply_dst", "V16"),
        ("reply_sport", "u2"),
        ("reply_dport", "u2"),
    ]
)

# Attribute paths (nested types from the message's top level) of each column:
# uapi nfnetlink_conntrack.h. CTA_TUPLE_ORIG 1, CTA_TUPLE_REPLY 2, CTA_STATUS 3,
# CTA_PROTOINFO 4, CTA_TIMEOUT 7; in a tuple CTA_TUPLE_IP 1 (V4_SRC 1, V4_DST 2,
# V6_SRC 3, V6_DST 4) and CTA_TUPLE_PROTO 2 (NUM 1, SRC_PORT 2, DST_PORT 3);
# CTA_PROTOINFO_TCP 1, its STATE 1. Every integer is big-endian.
_COLUMNS: dict[str, tuple[tuple[int, ...], ...]] = {
    "state": ((4, 1, 1),),
    "status": ((3,),),
    "timeout": ((7,),),
    "orig_src": ((1, 1, 1), (1, 1, 3)),
    "orig_dst": ((1, 1, 2), (1, 1, 4)),
    "orig_sport": ((1, 2, 2),),
    "orig_dport": ((1, 2, 3),),
    "reply_src": ((2, 1, 1), (2, 1, 3)),
    "reply_dst": ((2, 1, 2), (2, 1, 4)),
    "reply_sport": ((2, 2, 2),),
    "reply_dport": ((2, 2, 3),),
}
_PROTO_NUM = (1, 2, 1)
_NESTS = {(1,), (2,), (1, 1), (1, 2), (2, 1), (2, 2), (4,), (4, 1)}  # walked into
_REQUIRED = ("orig_src", "orig_dst", "orig_sport", "orig_dport", "reply_src", "reply_dst")
_WIDTHS = {"u1": 1, "u2": 2, "u4": 4}

# The per-CPU columns of /proc/net/stat/nf_conntrack, by the names used here.
# The kernel prints chaintoolong under the header "chainlength" and clash_resolve
# under "clashres" (net/netfilter/nf_conntrack_standalone.c, ct_cpu_seq_show).
STATS = {
    "found": "found",
    "invalid": "invalid",
    "insert": "insert",
    "insert_failed": "insert_failed",
    "drop": "drop",
    "early_drop": "early_drop",
    "search_restart": "search_restart",
    "clashres": "clash_resolve",
    "chainlength": "chaintoolong",
}


def conntrack_available() -> str | None:
    """``None`` when this namespace's conntrack table can be dumped, else why not."""
    if not Path("/proc/sys/net/netfilter/nf_conntrack_count").exists():
        return "conntrack is not loaded in this network namespace (no nf_conntrack)"
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
            sock.settimeout(2.0)
            sock.send(_request(IPCTNL_MSG_CT_GET_STATS, NLM_F_REQUEST))
            for chunk in netlink.datagrams(sock, _SOURCE):
                _frame(memoryview(chunk).cast("B"), 0)  # raises the kernel's errno
                return None
    except OSError as exc:
        need = " (it needs root: CAP_NET_ADMIN)" if exc.errno == errno.EPERM else ""
        return f"cannot read conntrack over netlink: {exc.strerror or exc}{need}"
    return "cannot read conntrack over netlink: no answer"


def dump_conntrack(family: socket.AddressFamily = socket.AF_UNSPEC) -> np.ndarray:
    """Every TCP entry of this namespace's conntrack table, as ``CT_DTYPE`` rows.

    ``family`` AF_UNSPEC gives IPv4 and IPv6 both. Needs CAP_NET_ADMIN.
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, netlink.RECV_BUFFER)
        sock.send(_request(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, family))
        return parse_dump(netlink.datagrams(sock, _SOURCE))


def _request(kind: int, flags: int, family: int = socket.AF_UNSPEC) -> bytes:
    body = _NFGENMSG.pack(family, 0, 0)  # version NFNETLINK_V0
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, 1, 0) + body


# hand-written: 35-40 ms a read at 10,000 entries, against 80-89 for `conntrack -L` unparsed
def parse_dump(datagrams: Iterable[bytes | bytearray | memoryview]) -> np.ndarray:
    """The ``CT_DTYPE`` rows of one dump's datagrams, read up to ``NLMSG_DONE``.

    The datagrams are framed one by one, then joined, so that each attribute
    layout is walked once for the whole dump: parsed per datagram, 10,000 entries
    took ~78 ms to parse; joined, ~18 ms.
    Rows come grouped by layout, not in the kernel's order.
    """
    chunks: list[bytes] = []
    starts: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    bases: list[int] = []
    size = 0
    for number, datagram in enumerate(datagrams):
        chunk = memoryview(datagram).cast("B")
        entries, entry_lengths, done = _frame(chunk, number)
        bases.append(size)
        starts.append(entries + size)
        lengths.append(entry_lengths)
        chunks += [bytes(chunk), bytes(-len(chunk) % 4)]  # each datagram 4-aligned
        size += len(chunk) + (-len(chunk) % 4)
        if done:
            where = _Where(np.array(bases, dtype=np.int64))
            return _entries(
                b"".join(chunks), np.concatenate(starts), np.concatenate(lengths), where
            )
    raise OSError(errno.EBADMSG, f"{_SOURCE}: the dump ended without NLMSG_DONE")


def _frame(chunk: memoryview, number: int) -> tuple[np.ndarray, np.ndarray, bool]:
    return netlink.messages(chunk, number, _SOURCE, (IPCTNL_MSG_CT_NEW, "conntrack", _BODY))


class _Where:
    """Names a byte of the joined datagrams as the datagram and byte it came from."""

    def __init__(self, bases: np.ndarray) -> None:
        self.bases = bases

    def error(self, at: int, what: str) -> OSError:
        number = int(np.searchsorted(self.bases, at, side="right")) - 1
        return netlink.malformed(_SOURCE, number, at - int(self.bases[number]), what)


def _entries(buffer: bytes, starts: np.ndarray, lengths: np.ndarray, where: _Where) -> np.ndarray:
    """Bulk parse: walk one message's attributes in Python (its template), take every
    other message with the very same attribute headers with numpy, repeat."""
    raw = np.frombuffer(buffer, dtype=np.uint8)
    words = np.frombuffer(buffer, dtype="=u4")  # messages and attributes are 4-aligned
    parts = []
    left = np.arange(len(starts))
    while len(left):  # each pass takes at least the message its template came from
        first = int(left[0])
        headers, fields = _template(buffer, int(starts[first]), int(lengths[first]), where)
        same = left[lengths[left] == lengths[first]]
        offsets = np.array([offset for offset, _ in headers], dtype=np.int64)
        expected = np.array([word for _, word in headers], dtype=np.uint32)
        match = (words[(starts[same, None] + offsets) // 4] == expected).all(axis=1)
        taken = same[match]
        left = np.setdiff1d(left, taken, assume_unique=True)
        if fields is not None:
            parts.append(_columns(raw, starts[taken], fields))
    return np.concatenate(parts) if parts else np.zeros(0, CT_DTYPE)


def _columns(raw: np.ndarray, rows: np.ndarray, fields: dict[str, tuple[int, int]]) -> np.ndarray:
    out = np.zeros(len(rows), CT_DTYPE)
    for name, (offset, width) in fields.items():
        data = raw[(rows + offset)[:, None] + np.arange(width)]
        if name == "family":
            out[name] = data[:, 0]
        elif CT_DTYPE[name].kind == "V":  # an address: 4 or 16 bytes into 16
            padded = np.zeros((len(rows), 16), np.uint8)
            padded[:, :width] = data
            out[name] = padded.view("V16").ravel()
        else:
            out[name] = data.view(f">u{width}").ravel()
    return out


def _template(
    buffer: bytes, start: int, length: int, where: _Where
) -> tuple[list[tuple[int, int]], dict[str, tuple[int, int]] | None]:
    """One message's attribute headers (offset, ``len | type << 16``) and where each
    column's value lies; no columns for a message that is not TCP."""
    found: dict[tuple[int, ...], tuple[int, int]] = {}  # path -> (value offset, size)
    headers = [(_NFGENMSG_AT, _word(buffer, start + _NFGENMSG_AT))]  # the family, too
    _walk(buffer, start, start + _BODY, start + length, (), found, headers, where)
    proto = found.get(_PROTO_NUM)
    if proto is not None:  # the protocol, checked per message like the headers
        headers.append((proto[0], _word(buffer, start + proto[0])))
    if proto is None or buffer[start + proto[0]] != socket.IPPROTO_TCP:
        return headers, None
    fields = {"family": (_NFGENMSG_AT, 1)}
    for name, paths in _COLUMNS.items():
        for path in paths:
            if path in found:
                fields[name] = found[path]
                break
        else:
            if name in _REQUIRED:
                raise where.error(start, f"a TCP entry without its {name} attribute")
    return headers, fields


def _word(buffer: bytes, at: int) -> int:
    return int(struct.unpack_from("=I", buffer, at)[0])


def _walk(
    buffer: bytes,
    start: int,
    at: int,
    end: int,
    path: tuple[int, ...],
    found: dict[tuple[int, ...], tuple[int, int]],
    headers: list[tuple[int, int]],
    where: _Where,
) -> None:
    """Record the attributes from ``at`` to ``end`` (offsets relative to the
    message's ``start``), walking into the nests the columns need."""
    while at + 4 <= end:
        size, kind = struct.unpack_from("=HH", buffer, at)
        if size < 4 or at + size > end:
            raise where.error(
                at, f"an attribute of {size} bytes overruns its {end - at}-byte parent"
            )
        headers.append((at - start, size | kind << 16))
        here = (*path, kind & _NLA_TYPE_MASK)
        if here in _NESTS:
            _walk(buffer, start, at + 4, at + size, here, found, headers, where)
        else:
            found[here] = (at + 4 - start, size - 4)
        at += (size + 3) & ~3


def read_conntrack_stats(proc: Path = Path("/proc")) -> dict[str, int]:
    """This namespace's conntrack statistics: the ``STATS`` columns summed over CPUs,
    and ``entries`` (the table's size, the same in every row: the first row's).

    An empty dict when conntrack is not loaded (no /proc/net/stat/nf_conntrack);
    columns this kernel lacks are absent. A row that is not hex raises ValueError
    naming the file and line.
    """
    path = proc / "net" / "stat" / "nf_conntrack"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    if not lines:
        return {}
    header = lines[0].split()
    totals = dict.fromkeys((STATS[h] for h in header if h in STATS), 0)
    for number, line in enumerate(lines[1:], start=2):
        try:
            values = [int(word, 16) for word in line.split()]
        except ValueError:
            raise ValueError(f"{path}, line {number}: not hex: {line!r}") from None
        if len(values) != len(header):
            what = f"{len(values)} values under {len(header)} column names"
            raise ValueError(f"{path}, line {number}: {what}")
        if number == 2:
            totals["entries"] = values[0]
        for name, value in zip(header, values, strict=True):
            if name in STATS:
                totals[STATS[name]] += value
    return totals
