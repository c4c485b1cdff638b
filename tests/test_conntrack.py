"""The conntrack reader: its parser on hand-built dumps, and a real NAT router."""

from __future__ import annotations

import collections
import errno
import ipaddress
import socket
import struct
from pathlib import Path

import numpy as np
import pytest

from harness.kernel.conntrack import (
    CT_DTYPE,
    IPS_SRC_NAT,
    CtState,
    parse_dump,
    read_conntrack_stats,
)

from .natlab import NAT_ADDRESS, SERVER, close_held, hold, nat_lab

HEADER = struct.Struct("=IHHII")
CT_NEW = 1 << 8
NLMSG_ERROR, NLMSG_DONE = 2, 3
NESTED = 0x8000
IPS_CONFIRMED_SEEN_REPLY = 0x8 | 0x2 | 0x4  # CONFIRMED, SEEN_REPLY, ASSURED


def attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + bytes(-size % 4)


def nest(kind: int, *children: bytes) -> bytes:
    return attr(kind | NESTED, b"".join(children))


def tuple_attr(kind: int, src: str, dst: str, sport: int, dport: int, proto: int) -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    ip = (1, 2) if a.version == 4 else (3, 4)
    return nest(
        kind,
        nest(1, attr(ip[0], a.packed), attr(ip[1], b.packed)),
        nest(
            2,
            attr(1, bytes([proto])),
            attr(2, struct.pack(">H", sport)),
            attr(3, struct.pack(">H", dport)),
        ),
    )


def _port(port: int) -> bytes:
    return struct.pack(">H", port)


def entry(
    src: str = "10.77.0.2",
    dst: str = "10.78.0.2",
    sport: int = 40000,
    dport: int = 9000,
    nat: tuple[str, int] = ("198.51.100.1", 20000),
    state: CtState = CtState.ESTABLISHED,
    status: int = IPS_CONFIRMED_SEEN_REPLY | IPS_SRC_NAT,
    timeout: int = 431999,
    proto: int = socket.IPPROTO_TCP,
    mark: bool = False,
    swap: bool = False,
) -> bytes:
    """One IPCTNL_MSG_CT_NEW message, laid out as the kernel does (optionally not)."""
    family = 4 if ipaddress.ip_address(src).version == 4 else 10
    middle = [attr(3, struct.pack(">I", status)), attr(7, struct.pack(">I", timeout))]
    if swap:
        middle.reverse()
    body = [
        tuple_attr(1, src, dst, sport, dport, proto),
        tuple_attr(2, dst, nat[0], dport, nat[1], proto),
        *middle,
        *([attr(8, struct.pack(">I", 7))] if mark else []),
        *([nest(4, nest(1, attr(1, bytes([state]))))] if proto != socket.IPPROTO_UDP else []),
        attr(11, struct.pack(">I", 1)),  # CTA_USE
        attr(12, struct.pack(">I", 12345)),  # CTA_ID
    ]
    return message(CT_NEW, struct.pack("=BBH", family, 0, 0) + b"".join(body))


def message(kind: int, body: bytes) -> bytes:
    size = HEADER.size + len(body)
    return HEADER.pack(size, kind, 2, 1, 0) + body + bytes(-size % 4)


def done(code: int = 0) -> bytes:
    return message(NLMSG_DONE, struct.pack("=i", code))


def address(value: bytes, family: int = 4) -> str:
    return str(ipaddress.ip_address(bytes(value)[: 4 if family == 4 else 16]))


def test_an_snat_entry_reads_back() -> None:
    rows = parse_dump([entry() + done()])
    assert rows.dtype == CT_DTYPE and len(rows) == 1
    row = rows[0]
    assert row["state"] == CtState.ESTABLISHED
    assert row["status"] & IPS_SRC_NAT and row["timeout"] == 431999
    assert (address(row["orig_src"]), address(row["orig_dst"])) == ("10.77.0.2", "10.78.0.2")
    assert (row["orig_sport"], row["orig_dport"]) == (40000, 9000)
    assert (address(row["reply_src"]), address(row["reply_dst"])) == ("10.78.0.2", "198.51.100.1")
    assert (row["reply_sport"], row["reply_dport"]) == (9000, 20000)


def test_ipv6_entries_carry_16_byte_addresses() -> None:
    rows = parse_dump([entry("fd00::2", "fd00:1::2", nat=("fd00:1::1", 20001)) + done()])
    assert rows["family"][0] == socket.AF_INET6
    assert address(rows["reply_dst"][0], 6) == "fd00:1::1"
    assert rows["reply_dport"][0] == 20001


def test_other_protocols_are_skipped_even_in_the_same_layout() -> None:
    udp = entry(proto=socket.IPPROTO_UDP)
    sctp = entry(proto=socket.IPPROTO_SCTP)  # laid out as TCP here: only the number differs
    rows = parse_dump([udp + sctp + entry(sport=1) + sctp + done()])
    assert list(rows["orig_sport"]) == [1]


def test_every_layout_parses_even_at_the_same_length() -> None:
    """Messages of one length but attributes in another order, and messages of
    other lengths, each read by their own layout."""
    plain = [entry(sport=p, timeout=p) for p in range(100, 110)]
    swapped = [entry(sport=p, timeout=p, swap=True) for p in range(200, 205)]
    marked = [
        entry(sport=p, timeout=p, mark=True, state=CtState.TIME_WAIT) for p in range(300, 303)
    ]
    assert len(plain[0]) == len(swapped[0])
    rows = parse_dump([b"".join(plain + swapped + marked) + done()])
    assert len(rows) == 18
    assert (rows["timeout"] == rows["orig_sport"]).all()
    assert (rows["state"] == CtState.TIME_WAIT).sum() == 3


def test_a_dump_spans_several_datagrams_until_done() -> None:
    first = b"".join(entry(sport=p) for p in range(50))
    second = b"".join(entry(sport=p) for p in range(50, 80))
    rows = parse_dump(iter([first, second, done(), b"not read"]))
    assert sorted(rows["orig_sport"]) == list(range(80))


def test_an_empty_table_is_an_empty_array() -> None:
    rows = parse_dump([done()])
    assert len(rows) == 0 and rows.dtype == CT_DTYPE


@pytest.mark.parametrize(
    ("datagrams", "what"),
    [
        ([entry()[:-10] + b""], "datagram 0, byte 0: a .*-byte message cut off"),
        ([entry(), entry()[:40]], "datagram 1, byte 0"),
        ([entry()], "without NLMSG_DONE"),
        ([entry()[:20] + struct.pack("=HH", 200, 1) + entry()[24:] + done()], "overruns"),
    ],
)
def test_broken_dumps_raise_ebadmsg_saying_where(datagrams: list[bytes], what: str) -> None:
    with pytest.raises(OSError, match=what) as caught:
        parse_dump(datagrams)
    assert caught.value.errno == errno.EBADMSG


def test_an_entry_without_its_reply_tuple_is_an_error() -> None:
    whole = entry()
    start = HEADER.size + 4
    (orig,) = struct.unpack_from("=H", whole, start)
    reply_at = start + orig
    (reply,) = struct.unpack_from("=H", whole, reply_at)
    body = whole[HEADER.size : reply_at] + whole[reply_at + reply :]
    with pytest.raises(OSError, match="without its reply_src") as caught:
        parse_dump([message(CT_NEW, body) + done()])
    assert caught.value.errno == errno.EBADMSG


def test_kernel_errors_raise_their_errno() -> None:
    with pytest.raises(OSError, match="EPERM") as caught:
        parse_dump([message(NLMSG_ERROR, struct.pack("=i", -errno.EPERM) + bytes(16))])
    assert caught.value.errno == errno.EPERM
    with pytest.raises(OSError, match="aborted") as caught:
        parse_dump([entry() + done(-errno.EINTR)])
    assert caught.value.errno == errno.EINTR


STAT_HEADER = (
    "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop "
    "early_drop icmp_error  expect_new expect_create expect_delete search_restart\n"
)


def _stats_file(tmp_path: Path, rows: list[list[int]]) -> Path:
    (tmp_path / "net" / "stat").mkdir(parents=True)
    text = STAT_HEADER + "".join(" ".join(f"{v:08x}" for v in row) + "\n" for row in rows)
    (tmp_path / "net" / "stat" / "nf_conntrack").write_text(text)
    return tmp_path


def test_stats_sum_the_cpus_and_take_entries_once(tmp_path: Path) -> None:
    cpu0 = [120, 1, 2, 0, 3, 0, 0, 4, 5, 6, 7, 8, 0, 0, 0, 0, 9]
    cpu1 = [120, 10, 20, 0, 30, 0, 0, 40, 50, 60, 70, 80, 0, 0, 0, 0, 90]
    stats = read_conntrack_stats(_stats_file(tmp_path, [cpu0, cpu1]))
    assert stats == {
        "entries": 120,
        "clash_resolve": 11,
        "found": 22,
        "invalid": 33,
        "chaintoolong": 44,
        "insert": 55,
        "insert_failed": 66,
        "drop": 77,
        "early_drop": 88,
        "search_restart": 99,
    }


def test_stats_without_conntrack_are_empty(tmp_path: Path) -> None:
    assert read_conntrack_stats(tmp_path) == {}


def test_a_garbled_stats_row_names_the_file_and_line(tmp_path: Path) -> None:
    proc = _stats_file(tmp_path, [[0] * 17])
    path = proc / "net" / "stat" / "nf_conntrack"
    path.write_text(path.read_text() + "zz\n")
    with pytest.raises(ValueError, match=r"nf_conntrack, line 3: not hex"):
        read_conntrack_stats(proc)


DUMP = (
    "import json, socket\n"
    "from harness.kernel.conntrack import conntrack_available, dump_conntrack\n"
    "rows = dump_conntrack()\n"
    "print(json.dumps({'available': conntrack_available(), 'rows': [\n"
    "    {'state': int(r['state']), 'status': int(r['status']),\n"
    "     'orig_dst': socket.inet_ntoa(bytes(r['orig_dst'])[:4]),\n"
    "     'orig_dport': int(r['orig_dport']),\n"
    "     'reply_dst': socket.inet_ntoa(bytes(r['reply_dst'])[:4]),\n"
    "     'reply_dport': int(r['reply_dport'])} for r in rows]}))\n"
)
# the FIN exchanges take a round trip or two: wait until every entry has left them
# (TIME_WAIT, or CLOSE for one a RST ended), bounded in time
WAIT_FOR_TIME_WAIT = (
    "import json, time\n"
    "from harness.kernel.conntrack import CtState, dump_conntrack\n"
    "deadline = time.monotonic() + 15\n"
    "while True:\n"
    "    states = dump_conntrack()['state'].tolist()\n"
    "    ended = [s for s in states if s in (CtState.TIME_WAIT, CtState.CLOSE)]\n"
    "    if len(ended) >= %d or time.monotonic() > deadline:\n"
    "        break\n"
    "    time.sleep(0.05)\n"
    "print(json.dumps(states))\n"
)
STATS = (
    "import json\n"
    "from harness.kernel.conntrack import read_conntrack_stats\n"
    "print(json.dumps(read_conntrack_stats()))\n"
)


@pytest.mark.netns
def test_the_router_sees_each_held_connection_through_its_nat_pool() -> None:
    count = 40
    with nat_lab() as lab, hold(lab, count) as (connected, holder):
        assert connected == count
        seen = lab.in_router(DUMP)
        assert seen["available"] is None
        rows = [r for r in seen["rows"] if r["orig_dst"] == SERVER]
        assert len(rows) == count
        assert all(r["state"] == CtState.ESTABLISHED for r in rows)
        assert all(r["status"] & IPS_SRC_NAT for r in rows)
        assert {r["reply_dst"] for r in rows} == {NAT_ADDRESS}
        ports = [r["reply_dport"] for r in rows]
        assert len(set(ports)) == count and all(20000 <= p <= 20099 for p in ports)
        close_held(holder)
        states = lab.in_router(WAIT_FOR_TIME_WAIT % count)
        by_state = collections.Counter(CtState(s).name for s in states)
        # A closed flow's entry goes to TIME_WAIT, or to CLOSE when a RST ends it: in
        # about 1 run of 8, the server's link showed a second, identical ACK of its FIN
        # arriving after its socket had gone, answered with a RST (up to 7 of 40 flows;
        # conntrack drops a CLOSE entry after 10 s, so it is waited for no longer).
        ended = states.count(CtState.TIME_WAIT) + states.count(CtState.CLOSE)
        assert ended == len(states) == count, by_state
        assert states.count(CtState.TIME_WAIT) > count // 2, by_state


@pytest.mark.netns
def test_an_exhausted_pool_counts_each_dropped_syn() -> None:
    with nat_lab() as lab:
        before = lab.in_router(STATS)
        with hold(lab, 110, wait=2.5) as (connected, _):
            after = lab.in_router(STATS)
            rows = lab.in_router(DUMP)["rows"]
    assert connected == 100
    assert len(rows) == 100
    # each of the 10 SYNs that found no free port, and its retransmits
    assert after["insert_failed"] - before["insert_failed"] >= 10
    assert after["drop"] - before["drop"] >= 10
    assert np.all(np.array([r["reply_dport"] for r in rows]) >= 20000)
