"""TCP sockets from the kernel: a netlink SOCK_DIAG_BY_FAMILY dump, parsed in bulk.

Hand-written with ``struct`` and numpy over a plain netlink socket, because the
libraries are far too slow for a 100 ms sampling interval at this scale
(docs/kernel.md, "The cost of looking": at ~28,000 TIME_WAIT sockets this dump
takes a few ms where ``ss`` and /proc/net/tcp take tens). The kernel filters by
state (the request's bitmask), and every message body is read with one numpy
structured view instead of a Python loop per socket.

The socket I/O (:func:`dump_sockets`) and the parsing (:func:`parse_dump`, which
takes the dump's datagrams as bytes) are separate, so the parser is testable on
hand-built buffers. Its contract:

- rows come from every ``SOCK_DIAG_BY_FAMILY`` message up to ``NLMSG_DONE``;
  other message types (an ``NLMSG_ERROR`` with code 0 is an ack) are skipped;
- an ``NLMSG_ERROR`` with a negative errno, or an ``NLMSG_DONE`` carrying one
  (a dump the kernel aborted), raises ``OSError`` with that errno, its name and
  its text;
- bytes that are not whole netlink messages (a datagram cut mid-message, a
  length field smaller than a header, a diag message shorter than
  ``inet_diag_msg``) or datagrams that run out before ``NLMSG_DONE`` raise
  ``OSError(EBADMSG)`` saying where: never a partial count.

Netlink never splits a message across datagrams, so each datagram is parsed on
its own; :func:`dump_sockets` reads with ``MSG_TRUNC`` so that a datagram larger
than its buffer is an error too, not a silently short one.
"""

from __future__ import annotations

import enum
import errno
import socket
import struct
from collections.abc import Iterable

import numpy as np

from harness.kernel import netlink
from harness.kernel.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSGHDR

__all__ = ["DIAG_DTYPE", "TcpState", "dump_sockets", "dump_tcp", "parse_dump"]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
_SOURCE = "sock_diag"
# inet_diag_req_v2: family, protocol, ext, pad, states; then an empty inet_diag_sockid (48 bytes)
_REQUEST = struct.Struct("=BBBBI48x")


class TcpState(enum.IntEnum):
    """The kernel's TCP states (include/net/tcp_states.h)."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


# struct inet_diag_msg: what each answer carries after its netlink header (72 bytes).
# Ports are in network byte order, every other integer in the host's.
DIAG_DTYPE = np.dtype(
    [
        ("family", "u1"),
        ("state", "u1"),
        ("timer", "u1"),
        ("retrans", "u1"),
        ("sport", ">u2"),
        ("dport", ">u2"),
        ("src", "V16"),  # IPv4 uses the first 4 bytes
        ("dst", "V16"),
        ("ifindex", "=u4"),
        ("cookie", "=u8"),
        ("expires", "=u4"),
        ("rqueue", "=u4"),
        ("wqueue", "=u4"),
        ("uid", "=u4"),
        ("inode", "=u4"),
    ]
)
_MESSAGE = NLMSGHDR.size + DIAG_DTYPE.itemsize  # the shortest diag message: 88 bytes
_DIAG = (SOCK_DIAG_BY_FAMILY, "diag", _MESSAGE)


def dump_tcp(
    states: Iterable[TcpState] = tuple(TcpState),
    families: Iterable[socket.AddressFamily] = (socket.AF_INET, socket.AF_INET6),
) -> np.ndarray:
    """Every TCP socket in ``states`` of this network namespace, as ``DIAG_DTYPE`` rows."""
    return dump_sockets(socket.IPPROTO_TCP, states, families)


def dump_sockets(
    protocol: int,
    states: Iterable[TcpState] = tuple(TcpState),
    families: Iterable[socket.AddressFamily] = (socket.AF_INET, socket.AF_INET6),
) -> np.ndarray:
    """Every socket of ``protocol`` (TCP or UDP) in ``states``, as ``DIAG_DTYPE`` rows.

    UDP sockets use the TCP state numbers too: a bound, unconnected one (a UDP
    server) is CLOSE, a connected one ESTABLISHED.
    """
    mask = 0
    for state in states:
        mask |= 1 << int(state)
    parts = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, netlink.RECV_BUFFER)
        for sequence, family in enumerate(families, start=1):
            request = _REQUEST.pack(family, protocol, 0, 0, mask)
            header = NLMSGHDR.pack(
                NLMSGHDR.size + len(request),
                SOCK_DIAG_BY_FAMILY,
                NLM_F_REQUEST | NLM_F_DUMP,
                sequence,
                0,
            )
            sock.send(header + request)
            parts.append(parse_dump(netlink.datagrams(sock, _SOURCE)))
    return _joined(parts)


def parse_dump(datagrams: Iterable[bytes | bytearray | memoryview]) -> np.ndarray:
    """The ``DIAG_DTYPE`` rows of one dump's datagrams, read up to ``NLMSG_DONE``.

    Raises ``OSError`` as the module docstring says; stops consuming
    ``datagrams`` at the one holding ``NLMSG_DONE``.
    """
    parts = []
    for number, datagram in enumerate(datagrams):
        rows, done = _parse(memoryview(datagram).cast("B"), number)
        if len(rows):
            parts.append(rows)
        if done:
            return _joined(parts)
    raise OSError(errno.EBADMSG, "sock_diag: the dump ended without NLMSG_DONE")


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """One array of ``DIAG_DTYPE`` (a plain concatenate would turn the ports native-endian)."""
    out = np.empty(sum(len(p) for p in parts), dtype=DIAG_DTYPE)
    return np.concatenate(parts, out=out) if parts else out


def _parse(chunk: memoryview, number: int = 0) -> tuple[np.ndarray, bool]:
    """The diag rows of one datagram and whether it ends the dump."""
    starts, _, done = netlink.messages(chunk, number, _SOURCE, _DIAG)
    data = starts + NLMSGHDR.size
    if not len(data):
        return np.zeros(0, dtype=DIAG_DTYPE), done
    raw = np.frombuffer(chunk, dtype=np.uint8)
    stride = int(data[1] - data[0]) if len(data) > 1 else 0
    if len(data) > 1 and (np.diff(data) == stride).all():
        # every message the same length (TIME_WAIT sockets carry no attributes):
        # one strided view, one copy
        view = np.ndarray((len(data),), DIAG_DTYPE, raw, int(data[0]), (stride,))
        return view.copy(), done
    gathered = raw[data[:, None] + np.arange(DIAG_DTYPE.itemsize)]
    return gathered.view(DIAG_DTYPE).reshape(-1), done
