"""Re-measure the kernel facts in docs/kernel.md, each in a fresh network namespace.

    sudo .venv/bin/python docs/kernel/measure.py EXPERIMENT   # or: all

Each run unshares a new network namespace for this process alone (no name, no
cleanup needed: it disappears with the process, TIME_WAIT sockets and all), sets
``lo`` up and writes the namespace's own sysctls only. Traffic goes to 127.0.0.0/8
only, and every loop is bounded by a count or a deadline. Prints one JSON object
per figure. Needs root and Linux; ``cost`` needs numpy and eph (the project venv).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

CLONE_NEWNET = 0x40000000
IP_BIND_ADDRESS_NO_PORT = 24
IP_LOCAL_PORT_RANGE = 51
SMALL = (40000, 40099)


def fresh_namespace() -> None:
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) needs root")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def sysctl(name: str, value: object | None = None) -> str:
    path = Path("/proc/sys/net/ipv4") / name
    if value is not None:
        text = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
        path.write_text(text + "\n")
    return path.read_text().strip()


def report(figure: str, **values: object) -> None:
    print(json.dumps({"figure": figure, **values}), flush=True)


def listener(ip: str = "127.0.0.1", port: int = 0) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(4096)
    return s


def netstat(*fields: str) -> dict[str, int]:
    lines = Path("/proc/net/netstat").read_text().splitlines()
    names, values = lines[0].split()[1:], lines[1].split()[1:]
    table = dict(zip(names, map(int, values), strict=True))
    return {f: table[f] for f in fields}


def hold_until_full(
    connect: Callable[[], socket.socket], limit: int
) -> tuple[list[socket.socket], int | None]:
    """Open sockets until one fails (or ``limit``): the sockets and the failure's errno."""
    held: list[socket.socket] = []
    for _ in range(limit):
        try:
            held.append(connect())
        except OSError as e:
            return held, e.errno
    return held, None


def connector(
    dst: tuple[str, int],
    lst: socket.socket,
    bind: tuple[str, int] | None = None,
    no_port: bool = False,
    per_socket_range: tuple[int, int] | None = None,
    accepted: list[socket.socket] | None = None,
) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        c = socket.socket()
        try:
            if no_port:
                c.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            if per_socket_range:
                lo, hi = per_socket_range
                c.setsockopt(
                    socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE, struct.pack("=I", (hi << 16) | lo)
                )
            if bind:
                c.bind(bind)
            c.connect(dst)
        except OSError:
            c.close()
            raise
        conn, _ = lst.accept()  # keep the accept queue empty
        if accepted is not None:
            accepted.append(conn)
        return c

    return connect


def ports_of(sockets: list[socket.socket]) -> list[int]:
    return [s.getsockname()[1] for s in sockets]


@contextlib.contextmanager
def closing_all(*groups: list[socket.socket]) -> Iterator[None]:
    try:
        yield
    finally:
        for group in groups:  # with RST, so that no TIME_WAIT outlives the figure
            for s in group:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            group.clear()


# --- port selection ---------------------------------------------------------------


def selection() -> None:
    report(
        "default range",
        ip_local_port_range=sysctl("ip_local_port_range"),
        reserved=sysctl("ip_local_reserved_ports"),
    )
    sysctl("ip_local_port_range", SMALL)
    a, b = listener("127.0.0.1", 9000), listener("127.0.0.1", 9001)
    c = listener("127.0.0.2", 9000)
    keep: list[socket.socket] = []
    opened = {}
    socks: list[socket.socket] = []
    for name, lst in (("127.0.0.1:A", a), ("127.0.0.1:B", b), ("127.0.0.2:A", c)):
        held, err = hold_until_full(connector(lst.getsockname(), lst, accepted=keep), 300)
        opened[name] = {"held": len(held), "then": errno.errorcode.get(err or 0)}
        socks += held
    report("connect() per destination, range of 100, sockets held open", **opened)
    with closing_all(socks, keep):
        pass

    sysctl("ip_local_reserved_ports", "40010-40019")
    held, err = hold_until_full(connector(a.getsockname(), a, accepted=keep), 300)
    ports = ports_of(held)
    report(
        "reserved 40010-40019, range of 100",
        held=len(held),
        then=errno.errorcode.get(err or 0),
        reserved_ports_used=sum(40010 <= p <= 40019 for p in ports),
    )
    with closing_all(held, keep):
        pass
    # an explicit bind to a reserved port still works
    with socket.socket() as s:
        s.bind(("127.0.0.1", 40010))
        report("explicit bind to a reserved port", ok=True, port=s.getsockname()[1])
    sysctl("ip_local_reserved_ports", "")

    # bind(ip, 0) then connect: the port is taken at bind time, for every destination
    held, err = hold_until_full(
        connector(a.getsockname(), a, bind=("127.0.0.1", 0), accepted=keep), 300
    )
    more, err2 = hold_until_full(
        connector(b.getsockname(), b, bind=("127.0.0.1", 0), accepted=keep), 300
    )
    odd_first = sum(p % 2 for p in ports_of(held)[:50])
    report(
        "bind(127.0.0.1, 0) then connect, range of 100",
        first_destination=len(held),
        then=errno.errorcode.get(err or 0),
        second_destination=len(more),
        then2=errno.errorcode.get(err2 or 0),
        odd_ports_among_first_50_binds=odd_first,
    )
    with closing_all(held, more, keep):
        pass

    # IP_BIND_ADDRESS_NO_PORT: source IP fixed at bind, port chosen at connect
    held, err = hold_until_full(
        connector(a.getsockname(), a, bind=("127.0.0.1", 0), no_port=True, accepted=keep), 300
    )
    more, err2 = hold_until_full(
        connector(b.getsockname(), b, bind=("127.0.0.1", 0), no_port=True, accepted=keep), 300
    )
    report(
        "IP_BIND_ADDRESS_NO_PORT + bind(127.0.0.1, 0), range of 100",
        first_destination=len(held),
        then=errno.errorcode.get(err or 0),
        second_destination=len(more),
        then2=errno.errorcode.get(err2 or 0),
    )
    with closing_all(held, more, keep):
        pass

    # IP_LOCAL_PORT_RANGE narrows one socket's range
    held, err = hold_until_full(
        connector(a.getsockname(), a, per_socket_range=(40050, 40059), accepted=keep), 300
    )
    ports = ports_of(held)
    report(
        "IP_LOCAL_PORT_RANGE 40050-40059 on each socket",
        held=len(held),
        then=errno.errorcode.get(err or 0),
        low=min(ports),
        high=max(ports),
    )
    with closing_all(held, keep):
        pass


def bind_over_timewait() -> None:
    """Range of 100 all in TIME_WAIT (reuse off): can a bind-first client still get a port?"""
    sysctl("ip_local_port_range", SMALL)
    sysctl("tcp_tw_reuse", 0)
    lst = listener(port=9000)
    for _ in range(100):
        churn_once(lst.getsockname(), lst)
    for how, address in (
        ("bind(ip, 0)", ("127.0.0.1", 0)),
        ("bind(ip, 40000)", ("127.0.0.1", 40000)),
    ):
        for reuseaddr in (0, 1):
            with socket.socket() as c:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuseaddr)
                try:
                    c.bind(address)
                    result = "bound"
                except OSError as e:
                    result = errno.errorcode.get(e.errno or 0, str(e.errno))
            report(
                "range of 100 in TIME_WAIT, reuse off",
                bind=how,
                so_reuseaddr=reuseaddr,
                result=result,
            )


def parity() -> None:
    sysctl("ip_local_port_range", SMALL)
    lst = listener(port=9000)
    keep: list[socket.socket] = []
    held, _ = hold_until_full(connector(lst.getsockname(), lst, accepted=keep), 100)
    ports = ports_of(held)
    report(
        "parity, range 40000-40099, 100 held connects",
        even_in_first_50=sum(p % 2 == 0 for p in ports[:50]),
        odd_in_last_50=sum(p % 2 == 1 for p in ports[50:]),
    )
    with closing_all(held, keep):
        pass
    sysctl("ip_local_port_range", (40001, 40100))  # an odd low end
    held, _ = hold_until_full(connector(lst.getsockname(), lst, accepted=keep), 100)
    ports = ports_of(held)
    report(
        "parity, range 40001-40100, 100 held connects",
        odd_in_first_50=sum(p % 2 == 1 for p in ports[:50]),
        even_in_last_50=sum(p % 2 == 0 for p in ports[50:]),
    )
    with closing_all(held, keep):
        pass


def churn_once(dst: tuple[str, int], lst: socket.socket, client_first: bool = True) -> int:
    """connect, then both sides close (client first: TIME_WAIT stays with the client)."""
    c = socket.socket()
    try:
        c.connect(dst)
        port = c.getsockname()[1]
        if client_first:
            c.close()
        conn, _ = lst.accept()
        conn.close()
        return int(port)
    finally:
        c.close()


def parity_cliff(low: int, high: int, probes: int = 200) -> None:
    """Fill the even half with TIME_WAIT, then time connects on the odd half."""
    sysctl("tcp_tw_reuse", 0)
    sysctl("ip_local_port_range", (low, high))
    lst = listener(port=9000)
    dst = lst.getsockname()
    size = high - low + 1
    even_ns, odd_ns = [], []
    even_ports = 0
    for _ in range(size // 2):
        t = time.perf_counter_ns()
        port = churn_once(dst, lst)
        even_ns.append(time.perf_counter_ns() - t)
        even_ports += port % 2 == 0
    for _ in range(probes):
        t = time.perf_counter_ns()
        port = churn_once(dst, lst)
        if port % 2:
            odd_ns.append(time.perf_counter_ns() - t)
    q = lambda xs, p: round(statistics.quantiles(xs, n=100)[p - 1] / 1e6, 3)  # noqa: E731
    report(
        f"connect+close latency, range {low}-{high} ({size} ports), tw_reuse=0",
        even_half_connects=size // 2,
        on_even_ports=even_ports,
        even_p50_ms=q(even_ns, 50),
        even_p99_ms=q(even_ns, 99),
        odd_probes=len(odd_ns),
        odd_p50_ms=q(odd_ns, 50),
        odd_p99_ms=q(odd_ns, 99),
    )


def cliff() -> None:
    parity_cliff(40000, 40999)


def cliff4k() -> None:
    parity_cliff(40000, 43999)


def cliff16k() -> None:
    parity_cliff(40000, 55999)


def cliff_default() -> None:
    parity_cliff(32768, 60999)


# --- TIME_WAIT ---------------------------------------------------------------------


def tw_sockets() -> list[tuple[str, float]]:
    out = subprocess.run(
        ["ss", "-tanoH", "state", "time-wait"], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in out.splitlines():
        if "timer:(timewait," in line:
            left = line.split("timer:(timewait,")[1].split(",")[0]
            found.append((line.split()[2], _seconds(left)))
    return found


def _seconds(text: str) -> float:
    total = 0.0
    for unit, factor in (("min", 60.0), ("sec", 1.0), ("ms", 0.001)):
        if unit in text:
            head, text = text.split(unit, 1)
            total += float(head) * factor
    return total


def timewait() -> None:
    sysctl("tcp_tw_reuse", 0)
    lst = listener()
    start = time.monotonic()
    churn_once(lst.getsockname(), lst)
    first = tw_sockets()
    gone = None
    deadline = start + 75
    while time.monotonic() < deadline:
        if not tw_sockets():
            gone = round(time.monotonic() - start, 1)
            break
        time.sleep(0.5)
    report(
        "TIME_WAIT hold of one client-closed socket",
        timer_at_start=first,
        gone_after_s=gone,
        tcp_fin_timeout=sysctl("tcp_fin_timeout"),
    )


def buckets() -> None:
    sysctl("tcp_tw_reuse", 0)
    report("tcp_max_tw_buckets default", value=sysctl("tcp_max_tw_buckets"))
    sysctl("tcp_max_tw_buckets", 10)
    lst = listener()
    before = netstat("TW", "TCPTimeWaitOverflow")
    for _ in range(30):
        churn_once(lst.getsockname(), lst)
    after = netstat("TW", "TCPTimeWaitOverflow")
    report(
        "tcp_max_tw_buckets=10, 30 client-closed connections",
        time_wait_sockets=len(tw_sockets()),
        delta={k: after[k] - before[k] for k in after},
    )


# --- reuse ------------------------------------------------------------------------


def churn_for(
    seconds: float, dst: tuple[str, int], lst: socket.socket, client_first: bool = True
) -> dict[str, object]:
    """Connect+close as fast as possible for ``seconds``; count successes per second."""
    start = time.monotonic()
    per_second = [0] * int(seconds)
    tuples: dict[int, int] = {}
    failures: dict[str, int] = {}
    while (elapsed := time.monotonic() - start) < seconds:
        try:
            port = churn_once(dst, lst, client_first)
        except OSError as e:
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            failures[name] = failures.get(name, 0) + 1
            time.sleep(0.001)
            continue
        per_second[min(int(elapsed), len(per_second) - 1)] += 1
        tuples[port] = tuples.get(port, 0) + 1
    return {
        "succeeded": sum(per_second),
        "per_second": per_second,
        "distinct_ports": len(tuples),
        "failures": failures,
    }


def reuse_case(
    tw_reuse: int,
    timestamps: int,
    delay_ms: int | None = None,
    client_first: bool = True,
    seconds: float = 5,
) -> None:
    sysctl("ip_local_port_range", SMALL)
    sysctl("tcp_tw_reuse", tw_reuse)
    sysctl("tcp_timestamps", timestamps)
    if delay_ms is not None:
        sysctl("tcp_tw_reuse_delay", delay_ms)
    lst = listener(port=9000)
    before = netstat("TWRecycled", "TW")
    result = churn_for(seconds, lst.getsockname(), lst, client_first)
    after = netstat("TWRecycled", "TW")
    report(
        f"range of 100, one destination, connect+close for {seconds}s",
        tw_reuse=tw_reuse,
        tcp_timestamps=timestamps,
        tcp_tw_reuse_delay=sysctl("tcp_tw_reuse_delay"),
        closes_first="client" if client_first else "server",
        **result,
        delta={k: after[k] - before[k] for k in after},
    )


def reuse0() -> None:
    reuse_case(0, 1)


def reuse1() -> None:
    reuse_case(1, 1)


def reuse2() -> None:
    reuse_case(2, 1)


def reuse1_delay100() -> None:
    reuse_case(1, 1, delay_ms=100)


def reuse1_nots() -> None:
    reuse_case(1, 0)


def server_first() -> None:
    reuse_case(0, 1, client_first=False, seconds=2)


def server_rst() -> None:
    for rfc1337 in (0, 1):
        _server_rst(rfc1337, port=9000 + rfc1337)


def _server_rst(rfc1337: int, port: int) -> None:
    """Client closes first, the server answers its FIN with an RST (SO_LINGER 0)."""
    sysctl("ip_local_port_range", (40000 + 200 * rfc1337, 40099 + 200 * rfc1337))
    sysctl("tcp_tw_reuse", 0)
    sysctl("tcp_rfc1337", rfc1337)
    lst = listener(port=port)
    before = netstat("TW", "TWRecycled", "TWKilled")
    succeeded, ports, deadline = 0, set(), time.monotonic() + 2
    while time.monotonic() < deadline:
        c = socket.socket()
        try:
            c.connect(("127.0.0.1", port))
        except OSError:
            c.close()
            time.sleep(0.001)
            continue
        ports.add(c.getsockname()[1])
        succeeded += 1
        c.close()
        conn, _ = lst.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    after = netstat("TW", "TWRecycled", "TWKilled")
    report(
        "range of 100, reuse off, client closes first, server answers with RST, 2 s",
        tcp_rfc1337=rfc1337,
        succeeded=succeeded,
        distinct_ports=len(ports),
        time_wait_now=len(tw_sockets()),
        delta={k: after[k] - before[k] for k in after},
    )


def multi_destination() -> None:
    sysctl("ip_local_port_range", SMALL)
    sysctl("tcp_tw_reuse", 0)
    lsts = [listener(ip, port) for ip in ("127.0.0.1", "127.0.0.2") for port in (9000, 9001)]
    counts = []
    for lst in lsts:
        counts.append(churn_for(1, lst.getsockname(), lst)["succeeded"])
    report(
        "reuse off, range of 100, 2 dst IPs x 2 dst ports, 1 s each",
        per_destination=counts,
        total=sum(counts),
    )


def tuple_reuse(trials: int = 8) -> None:
    """Reuse off, 200-port range: does any port serve twice within one second?"""
    results = []
    for trial in range(trials):
        sysctl("ip_local_port_range", (40000 + trial * 200, 40199 + trial * 200))
        sysctl("tcp_tw_reuse", 0)
        lst = listener(port=9000)
        before = netstat("TWRecycled")["TWRecycled"]
        r = churn_for(1, lst.getsockname(), lst)
        recycled = netstat("TWRecycled")["TWRecycled"] - before
        results.append((r["succeeded"], r["distinct_ports"], recycled))
        lst.close()
    report(
        f"reuse off, 200-port range, 1 s of connect+close, {trials} trials",
        succeeded_distinct_twrecycled=results,
    )


def _eof_closer(port: int, seconds: float) -> None:
    """A listener in its own process: accept, close right after the client's FIN."""
    import selectors

    sel = selectors.DefaultSelector()
    lst = listener(port=port)
    lst.setblocking(False)
    sel.register(lst, selectors.EVENT_READ)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, _ in sel.select(0.1):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is lst:
                with contextlib.suppress(BlockingIOError):
                    conn, _ = lst.accept()
                    sel.register(conn, selectors.EVENT_READ)
            elif not sock.recv(1):
                sel.unregister(sock)
                sock.close()
    os._exit(0)


def tuple_reuse_async(trials: int = 5) -> None:
    """As tuple_reuse, with the listener in another process closing on the client's FIN."""
    results = []
    for trial in range(trials):
        sysctl("ip_local_port_range", (40000 + trial * 200, 40199 + trial * 200))
        sysctl("tcp_tw_reuse", 0)
        port = 9100 + trial
        child = os.fork()
        if child == 0:
            _eof_closer(port, 3.5)
        time.sleep(0.3)
        before = netstat("TWRecycled")["TWRecycled"]
        ports: dict[int, int] = {}
        start = time.monotonic()
        while time.monotonic() - start < 2:
            c = socket.socket()
            try:
                c.connect(("127.0.0.1", port))
                p = c.getsockname()[1]
                ports[p] = ports.get(p, 0) + 1
            except OSError:
                time.sleep(0.001)
            finally:
                c.close()
        os.waitpid(child, 0)
        recycled = netstat("TWRecycled")["TWRecycled"] - before
        results.append((sum(ports.values()), len(ports), recycled))
    report(
        "reuse off, 200-port range, 2 s, listener in another process closing on FIN,"
        f" {trials} trials",
        succeeded_distinct_twrecycled=results,
    )


def snmp(*fields: str) -> dict[str, int]:
    lines = [
        line for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Tcp:")
    ]
    table = dict(zip(lines[0].split()[1:], map(int, lines[1].split()[1:]), strict=True))
    return {f: table[f] for f in fields}


def counters() -> None:
    """Which counters move for exhaustion, refusals and a full accept queue."""
    sysctl("ip_local_port_range", SMALL)
    sysctl("tcp_tw_reuse", 0)
    lst = listener(port=9000)
    tcp = ("ActiveOpens", "AttemptFails", "CurrEstab")
    ext = ("TW", "TWRecycled", "TCPTimeWaitOverflow", "ListenOverflows", "ListenDrops")
    b1, b2 = snmp(*tcp), netstat(*ext)
    fails = 0
    for _ in range(150):
        try:
            churn_once(lst.getsockname(), lst)
        except OSError:
            fails += 1
    a1, a2 = snmp(*tcp), netstat(*ext)
    report(
        "150 connect+close attempts on a 100-port range, reuse off",
        failed=fails,
        delta={k: a1[k] - b1[k] for k in tcp} | {k: a2[k] - b2[k] for k in ext},
    )
    sysctl("ip_local_port_range", (32768, 60999))
    b1 = snmp(*tcp)
    for _ in range(10):
        with socket.socket() as c, contextlib.suppress(ConnectionRefusedError):
            c.connect(("127.0.0.1", 9999))
    a1 = snmp(*tcp)
    report("10 connects to a closed port (refused)", delta={k: a1[k] - b1[k] for k in tcp})
    full = socket.socket()
    full.bind(("127.0.0.1", 9001))
    full.listen(1)  # never accepted
    b2 = netstat(*ext)
    clients = []
    for _ in range(10):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", 9001))
        clients.append(c)
    time.sleep(1.5)  # one SYN retransmission
    a2 = netstat(*ext)
    report(
        "10 connects to a listener with backlog 1 that never accepts, 1.5 s",
        delta={k: a2[k] - b2[k] for k in ext},
    )
    for c in clients:
        c.close()


# --- cost of looking --------------------------------------------------------------


def cost(target: int = 28000, repeats: int = 7) -> None:
    sysctl("tcp_tw_reuse", 0)
    sysctl("ip_local_port_range", (32768, 60999))
    # four destinations, so that no destination's even half fills (see parity_cliff)
    for port in (9000, 9001, 9002, 9003):
        lst = listener(port=port)
        for _ in range(target // 4):
            churn_once(lst.getsockname(), lst)
    from harness.kernel.sockdiag import TcpState, dump_tcp

    def median_ms(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return round(statistics.median(times) * 1000, 2)

    def sockstat() -> int:
        line = next(
            line
            for line in Path("/proc/net/sockstat").read_text().splitlines()
            if line.startswith("TCP:")
        )
        words = line.split()
        return int(words[words.index("tw") + 1])

    def proc_tcp() -> int:
        n = 0
        for name in ("tcp", "tcp6"):
            with open(f"/proc/net/{name}") as f:
                next(f)
                for line in f:
                    n += line.split()[3] == "06"
        return n

    def ss() -> int:
        out = subprocess.run(
            ["ss", "-tanH", "state", "time-wait"], capture_output=True, check=True
        ).stdout
        return out.count(b"\n")

    tw = [TcpState.TIME_WAIT]
    counts = {"sockstat": sockstat(), "netlink": len(dump_tcp(tw)), "ss": ss(), "proc": proc_tcp()}
    report(
        f"cost of looking, median of {repeats}, ms",
        time_wait_sockets=counts,
        sockstat_tw=median_ms(sockstat),
        netlink_sockdiag_time_wait=median_ms(lambda: dump_tcp(tw)),
        netlink_ports_too=median_ms(lambda: dump_tcp(tw)["sport"].astype(int).sum()),
        ss_state_time_wait=median_ms(ss),
        proc_net_tcp_and_tcp6=median_ms(proc_tcp),
    )


# --- UDP --------------------------------------------------------------------------


def udp() -> None:
    sysctl("ip_local_port_range", SMALL)
    servers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    for port, s in enumerate(servers, start=9000):
        s.bind(("127.0.0.1", port))
    held: list[socket.socket] = []
    failure = None
    with closing_all(held, servers):
        for i in range(400):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                c.connect(servers[i % 3].getsockname())
            except OSError as e:
                failure = errno.errorcode.get(e.errno or 0)
                c.close()
                break
            held.append(c)
        held.pop().close()
        again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        again.connect(servers[0].getsockname())
        held.append(again)
        report(
            "connected UDP, range of 100, 3 destinations round-robin",
            opened=len(held),
            then=failure,
            after_closing_one="connect ok",
        )


EXPERIMENTS = {
    f.__name__: f
    for f in (
        selection,
        bind_over_timewait,
        parity,
        cliff,
        cliff4k,
        cliff16k,
        cliff_default,
        timewait,
        buckets,
        reuse0,
        reuse1,
        reuse2,
        reuse1_delay100,
        reuse1_nots,
        server_first,
        server_rst,
        multi_destination,
        tuple_reuse,
        tuple_reuse_async,
        counters,
        cost,
        udp,
    )
}


def main() -> None:
    names = sys.argv[1:] or ["--help"]
    if names == ["all"]:
        names = list(EXPERIMENTS)
    if names[0] not in EXPERIMENTS:
        sys.exit(f"usage: measure.py all | {' | '.join(EXPERIMENTS)}")
    if len(names) > 1:  # one process, so one fresh namespace, per experiment
        for name in names:
            subprocess.run([sys.executable, __file__, name], check=True)
        return
    fresh_namespace()
    EXPERIMENTS[names[0]]()


if __name__ == "__main__":
    main()
