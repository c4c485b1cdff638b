"""Netlink framing shared by eph's hand-written dumps (sock_diag, ctnetlink).

A dump's answer is datagrams of netlink messages: each starts with an
``nlmsghdr`` (length, type, flags, sequence, port id, in host byte order) and
is padded to 4 bytes. Netlink never splits a message across datagrams, so each
datagram is framed on its own. Bytes that are not whole messages raise
``OSError(EBADMSG)`` naming the dump, the datagram and the byte; an
``NLMSG_ERROR`` or ``NLMSG_DONE`` carrying a negative errno raises ``OSError``
with that errno.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

import numpy as np

__all__ = [
    "NLMSGHDR",
    "NLMSG_DONE",
    "NLMSG_ERROR",
    "NLM_F_DUMP",
    "NLM_F_REQUEST",
    "RECV_BUFFER",
    "check_status",
    "datagrams",
    "malformed",
    "messages",
    "offsets",
]

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid: 16 bytes, host byte order
RECV_BUFFER = 1 << 20


def datagrams(sock: socket.socket, source: str) -> Iterator[memoryview]:
    """The datagrams of one dump as they arrive (one buffer, reused: parse each at once).

    Read with ``MSG_TRUNC``, so a datagram larger than the buffer is an error,
    not a silently short one.
    """
    buffer = bytearray(RECV_BUFFER)
    while True:
        size = sock.recv_into(buffer, 0, socket.MSG_TRUNC)  # the datagram's real size
        if size > len(buffer):
            raise OSError(
                errno.EMSGSIZE,
                f"{source}: a {size}-byte datagram did not fit the {len(buffer)}-byte buffer",
            )
        if size == 0:
            return
        yield memoryview(buffer)[:size]


def check_status(
    chunk: memoryview, number: int, offset: int, length: int, kind: int, source: str
) -> None:
    """NLMSG_ERROR and NLMSG_DONE carry an int: 0, or minus the errno that ended the dump."""
    if length < NLMSGHDR.size + 4:
        if kind == NLMSG_DONE:
            return  # a bare NLMSG_DONE: nothing to report
        what = f"an NLMSG_ERROR of {length} bytes, with no error code"
        raise malformed(source, number, offset, what)
    (code,) = struct.unpack_from("=i", chunk, offset + NLMSGHDR.size)
    if code < 0:
        name = errno.errorcode.get(-code, f"errno {-code}")
        what = "failed" if kind == NLMSG_ERROR else "was aborted"
        raise OSError(-code, f"{source} dump {what}: {name} ({os.strerror(-code)})")


def malformed(source: str, number: int, offset: int, what: str) -> OSError:
    return OSError(errno.EBADMSG, f"{source}: datagram {number}, byte {offset}: {what}")


def offsets(chunk: memoryview, number: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Where each netlink message of a datagram starts, and its length field.

    Raises when the messages do not tile the datagram exactly (up to the
    alignment padding of the last one).
    """
    size = len(chunk)
    if size < NLMSGHDR.size:
        raise malformed(source, number, 0, f"{size} bytes, less than a netlink header")
    (first,) = struct.unpack_from("=I", chunk, 0)
    step = (first + 3) & ~3
    if first >= NLMSGHDR.size and size % step == 0:
        lengths = np.frombuffer(chunk, dtype="=u4", count=size // 4)[:: step // 4]
        if (lengths == first).all():  # the usual case: one message size throughout
            return np.arange(0, size, step, dtype=np.int64), lengths.astype(np.int64)
    starts: list[int] = []
    offset = 0
    unpack = struct.Struct("=I").unpack_from
    while offset + NLMSGHDR.size <= size:  # messages of several sizes: walk the lengths
        starts.append(offset)
        (length,) = unpack(chunk, offset)
        if length < NLMSGHDR.size:
            what = f"a length field of {length}, less than a header"
            raise malformed(source, number, offset, what)
        offset += (length + 3) & ~3
    found = np.array(starts, dtype=np.int64)
    words = np.frombuffer(chunk, dtype="=u4", count=size // 4)
    lengths = words[found // 4].astype(np.int64)  # messages start 4-aligned
    if len(found) and found[-1] + lengths[-1] > size:
        left = size - int(found[-1])
        what = f"a {lengths[-1]}-byte message cut off after {left} bytes"
        raise malformed(source, number, int(found[-1]), what)
    if offset < size:
        raise malformed(source, number, offset, f"a header cut off after {size - offset} bytes")
    return found, lengths


def messages(
    chunk: memoryview, number: int, source: str, kind: tuple[int, str, int]
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Where one datagram's messages of ``kind`` (type, name, shortest length)
    start, their lengths, and whether the datagram ends the dump (holds
    ``NLMSG_DONE``: nothing after it counts). Raises for an error the kernel
    sent, and for a message of ``kind`` shorter than its shortest."""
    wanted_type, name, shortest = kind
    starts, lengths = offsets(chunk, number, source)
    types = np.frombuffer(chunk, dtype="=u2", count=len(chunk) // 2)[starts // 2 + 2]
    ends = np.flatnonzero((types == NLMSG_DONE) | (types == NLMSG_ERROR))
    for index in ends:
        at, length, found = int(starts[index]), int(lengths[index]), int(types[index])
        check_status(chunk, number, at, length, found, source)
    done = bool((types[ends] == NLMSG_DONE).any())
    wanted = types == wanted_type
    if done:
        wanted[int(ends[np.argmax(types[ends] == NLMSG_DONE)]) :] = False
    short = wanted & (lengths < shortest)
    if short.any():
        at = int(np.argmax(short))
        what = f"a {name} message of {lengths[at]} bytes, less than {shortest}"
        raise malformed(source, number, int(starts[at]), what)
    return starts[wanted], lengths[wanted], done
