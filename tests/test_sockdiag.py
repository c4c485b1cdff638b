"""The sock_diag parser on hand-built netlink buffers (no root, no kernel), and once live.

Each datagram is built the way the kernel builds it: ``nlmsghdr`` (host byte
order) + ``inet_diag_msg`` (ports in network byte order) + optional attributes,
every message padded to 4 bytes.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from harness.kernel.netlink import NLMSG_DONE, NLMSG_ERROR, datagrams
from harness.kernel.sockdiag import (
    DIAG_DTYPE,
    SOCK_DIAG_BY_FAMILY,
    TcpState,
    dump_tcp,
    parse_dump,
)

HEADER = struct.Struct("=IHHII")
NLM_F_MULTI = 0x2


def message(kind: int, payload: bytes, seq: int = 1) -> bytes:
    raw = HEADER.pack(HEADER.size + len(payload), kind, NLM_F_MULTI, seq, 0) + payload
    return raw + b"\0" * (-len(raw) % 4)


def diag(
    state: TcpState,
    sport: int,
    dport: int,
    src: str = "127.0.0.1",
    dst: str = "127.0.0.2",
    *,
    inode: int = 0,
    attributes: bytes = b"",
) -> bytes:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    body = (
        struct.pack("=BBBB", family, state, 0, 0)
        + struct.pack("!HH", sport, dport)
        + socket.inet_pton(family, src).ljust(16, b"\0")
        + socket.inet_pton(family, dst).ljust(16, b"\0")
        + struct.pack("=IQIIIII", 0, 0, 0, 0, 0, 0, inode)
    )
    assert len(body) == DIAG_DTYPE.itemsize
    return message(SOCK_DIAG_BY_FAMILY, body + attributes)


def done(code: int = 0) -> bytes:
    return message(NLMSG_DONE, struct.pack("=i", code))


def error(code: int) -> bytes:
    request = HEADER.pack(HEADER.size + 56, SOCK_DIAG_BY_FAMILY, 0x301, 1, 0)
    return message(NLMSG_ERROR, struct.pack("=i", code) + request)


# an attribute the kernel adds to full sockets (INET_DIAG_SHUTDOWN, u8, padded to 8)
SHUTDOWN = struct.pack("=HHB3x", 5, 8, 0)  # nla_len 5, INET_DIAG_SHUTDOWN, value 0

TIME_WAITS = b"".join(diag(TcpState.TIME_WAIT, 40000 + i, 9000, inode=i) for i in range(5))
MIXED = (
    diag(TcpState.ESTABLISHED, 40001, 9000, attributes=SHUTDOWN)
    + diag(TcpState.TIME_WAIT, 40002, 9000)
    + diag(TcpState.LISTEN, 9000, 0, attributes=SHUTDOWN)
)


def test_ports_are_read_in_network_byte_order_and_addresses_as_bytes() -> None:
    rows = parse_dump([diag(TcpState.ESTABLISHED, 40000, 443) + done()])
    assert rows.dtype == DIAG_DTYPE
    assert len(rows) == 1
    assert int(rows["sport"][0]) == 40000 and int(rows["dport"][0]) == 443
    assert rows["family"][0] == socket.AF_INET
    assert rows["state"][0] == TcpState.ESTABLISHED
    assert bytes(rows["src"][0]) == socket.inet_aton("127.0.0.1") + bytes(12)
    assert bytes(rows["dst"][0])[:4] == socket.inet_aton("127.0.0.2")


def test_ipv6_addresses_fill_all_sixteen_bytes() -> None:
    rows = parse_dump([diag(TcpState.TIME_WAIT, 50000, 8080, "::1", "fd00::2") + done()])
    assert rows["family"][0] == socket.AF_INET6
    assert bytes(rows["src"][0]) == socket.inet_pton(socket.AF_INET6, "::1")
    assert bytes(rows["dst"][0]) == socket.inet_pton(socket.AF_INET6, "fd00::2")
    assert (int(rows["sport"][0]), int(rows["dport"][0])) == (50000, 8080)


@pytest.mark.parametrize("datagram", [TIME_WAITS, MIXED], ids=["same-length", "mixed-length"])
def test_every_message_is_a_row_in_order(datagram: bytes) -> None:
    rows = parse_dump([datagram + done()])
    count = len(rows)
    assert count == (5 if datagram is TIME_WAITS else 3)
    expected = [40000, 40001, 40002, 40003, 40004] if count == 5 else [40001, 40002, 9000]
    assert rows["sport"].tolist() == expected


def test_a_dump_spans_several_datagrams_until_done() -> None:
    datagrams = [TIME_WAITS, MIXED, diag(TcpState.SYN_SENT, 40010, 9000, "::1", "::1") + done()]
    rows = parse_dump(datagrams)
    assert len(rows) == 9
    states, counts = np.unique(rows["state"], return_counts=True)
    assert dict(zip(states.tolist(), counts.tolist(), strict=True)) == {
        TcpState.ESTABLISHED: 1,
        TcpState.SYN_SENT: 1,
        TcpState.TIME_WAIT: 6,
        TcpState.LISTEN: 1,
    }
    assert rows["family"].tolist().count(socket.AF_INET6) == 1


def test_reading_stops_at_done() -> None:
    def datagrams() -> Iterator[bytes]:
        yield TIME_WAITS
        yield done()
        raise AssertionError("read past NLMSG_DONE")

    assert len(parse_dump(datagrams())) == 5


def test_an_empty_dump_is_an_empty_array() -> None:
    rows = parse_dump([done()])
    assert rows.dtype == DIAG_DTYPE and len(rows) == 0


def test_messages_after_done_in_the_same_datagram_are_not_rows() -> None:
    assert len(parse_dump([TIME_WAITS + done() + MIXED])) == 5


def test_an_ack_is_not_an_error() -> None:
    assert len(parse_dump([error(0) + TIME_WAITS, done()])) == 5


@pytest.mark.parametrize(
    ("make", "code", "word"),
    [(error, errno.EPERM, "failed"), (done, errno.ENOBUFS, "aborted")],
    ids=["NLMSG_ERROR", "NLMSG_DONE"],
)
def test_a_negative_errno_raises_naming_it(make: object, code: int, word: str) -> None:
    assert callable(make)
    with pytest.raises(OSError) as caught:
        parse_dump([TIME_WAITS, make(-code)])
    assert caught.value.errno == code
    assert errno.errorcode[code] in str(caught.value) and word in str(caught.value)


@pytest.mark.parametrize("datagram", [TIME_WAITS + done(), MIXED + done()], ids=["same", "mixed"])
def test_a_datagram_cut_anywhere_raises_instead_of_counting_short(datagram: bytes) -> None:
    for cut in range(1, len(datagram)):
        with pytest.raises(OSError) as caught:
            parse_dump([datagram[:cut]])
        assert caught.value.errno == errno.EBADMSG, cut
        assert "sock_diag" in str(caught.value)


def test_a_cut_message_names_the_datagram_and_the_byte() -> None:
    cut = r"datagram 1, byte 96: a 88-byte message cut off after 32 bytes"
    with pytest.raises(OSError, match=cut):
        parse_dump([TIME_WAITS, MIXED[:128], done()])


def test_datagrams_that_end_before_done_raise() -> None:
    with pytest.raises(OSError, match="without NLMSG_DONE"):
        parse_dump([TIME_WAITS, MIXED])


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        (HEADER.pack(8, SOCK_DIAG_BY_FAMILY, 0, 1, 0) + bytes(8), "length field of 8"),
        (message(SOCK_DIAG_BY_FAMILY, bytes(40)), "diag message of 56 bytes"),
        (message(NLMSG_ERROR, b""), "NLMSG_ERROR of 16 bytes"),
    ],
    ids=["length-below-header", "short-diag", "error-without-code"],
)
def test_malformed_messages_raise(bad: bytes, what: str) -> None:
    with pytest.raises(OSError, match=what) as caught:
        parse_dump([MIXED + bad + done()])
    assert caught.value.errno == errno.EBADMSG


class _FakeNetlink:
    """recv_into as the kernel does it with MSG_TRUNC: the datagram's full size."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self._datagrams = datagrams

    def recv_into(self, buffer: bytearray, nbytes: int, flags: int) -> int:
        assert flags & socket.MSG_TRUNC
        datagram = self._datagrams.pop(0)
        buffer[: len(datagram)] = datagram[: len(buffer)]
        return len(datagram)


def test_datagrams_read_from_a_socket_parse() -> None:
    fake = _FakeNetlink([TIME_WAITS, MIXED + done()])
    assert len(parse_dump(datagrams(fake, "sock_diag"))) == 8  # type: ignore[arg-type]


def test_a_datagram_larger_than_the_buffer_raises() -> None:
    fake = _FakeNetlink([bytes(2 << 20)])
    with pytest.raises(OSError, match="did not fit") as caught:
        parse_dump(datagrams(fake, "sock_diag"))  # type: ignore[arg-type]
    assert caught.value.errno == errno.EMSGSIZE


def test_the_kernel_agrees_on_ports_and_addresses() -> None:
    """Live, in this namespace (sock_diag needs no privilege): our own connection."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            sport, dport = client.getsockname()[1], server.getsockname()[1]
            rows = dump_tcp([TcpState.ESTABLISHED], [socket.AF_INET])
            mine = rows[(rows["sport"] == sport) & (rows["dport"] == dport)]
            assert len(mine) == 1
            assert bytes(mine["src"][0])[:4] == socket.inet_aton("127.0.0.1")
            server.accept()[0].close()
