"""Inside a fresh namespace: the cost of naming owners (``eph observe``'s "held by").

Makes ``sockets`` client connections toward 127.0.0.x:9000 (a few destinations):
half closed by the client
first (TIME_WAIT: no owner), half held open by processes of their own, 8,000 each
(CLOSE_WAIT once the server closed: owned, one fd each in /proc). Then times
15 rounds, interleaved: a sample without owners, a sample with owners that reads
every fd of /proc again (the worst case: a new index each round), ``ss -tan`` and
``ss -tanp`` (which also names processes). Prints one JSON object. Run by
``bench/run.py --only owners``; it needs root for the namespace. With ``--hold`` it
makes the sockets, says ``ready`` and keeps them until stdin has a line
(``bench/namespaces_sample.py``).
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import threading
import time

from harness.observe.owners import OwnerIndex
from harness.observe.paths import PathSampler

HOLDER = r"""
import socket, sys
held = [socket.create_connection((sys.argv[2], 9000)) for _ in range(int(sys.argv[1]))]
print("held", flush=True)
sys.stdin.readline()
"""
PER_HOLDER = 8_000  # connections a holder keeps: RLIMIT_NOFILE is 20,000 here, fixed


def _destination(n: int) -> str:
    """127.0.0.n+1: a destination's range holds 64,000 ports at most, so 100,000 sockets
    need several."""
    return f"127.0.0.{1 + n}"


def main() -> None:
    sockets = int(sys.argv[1])
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 9000))
    server.listen(4096)
    for i in range(sockets // 2):  # half: TIME_WAIT on the client side, owned by nobody
        client = socket.create_connection((_destination(i // 20_000), 9000))
        accepted, _ = server.accept()
        client.close()  # the client closes first
        accepted.close()

    def accept_and_close() -> None:  # the other half's server ends: CLOSE_WAIT for them
        while True:
            server.accept()[0].close()

    threading.Thread(target=accept_and_close, daemon=True).start()
    holders = []
    left = sockets - sockets // 2  # held open by processes of their own, as a host's are
    while left > 0:
        n = min(PER_HOLDER, left)
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(n), _destination(len(holders))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        holders.append(holder)
        left -= n
    if "--hold" in sys.argv:  # bench/namespaces_sample.py samples them from outside
        print("ready", flush=True)
        sys.stdin.readline()
        for holder in holders:
            holder.communicate("\n")
        return
    bare = PathSampler((1024, 65000), top=20)
    bare.sample()  # warm: imports and buffers
    times: dict[str, list[float]] = {
        "sample": [],
        "sample_with_owners": [],
        "ss_tan": [],
        "ss_tanp": [],
    }
    snap = None
    for _ in range(15):
        began = time.perf_counter()
        bare.sample()
        times["sample"].append((time.perf_counter() - began) * 1000)
        named = PathSampler((1024, 65000), top=20, owners=OwnerIndex(refresh_s=0))
        began = time.perf_counter()
        snap = named.sample()
        times["sample_with_owners"].append((time.perf_counter() - began) * 1000)
        for name, args in (("ss_tan", ["ss", "-tan"]), ("ss_tanp", ["ss", "-tanp"])):
            began = time.perf_counter()
            subprocess.run(args, capture_output=True, check=True)
            times[name].append((time.perf_counter() - began) * 1000)
    assert snap is not None and snap.owners is not None
    medians = {f"{k}_ms": round(statistics.median(v), 1) for k, v in times.items()}
    print(
        json.dumps(
            {
                "client_sockets": snap.sockets,
                "owned": sum(o.ports for row in snap.owners for o in row),
                **medians,
                "owners_over_ss_tanp": round(
                    medians["sample_with_owners_ms"] / medians["ss_tanp_ms"], 2
                ),
            }
        )
    )
    for holder in holders:
        holder.communicate("\n")


if __name__ == "__main__":
    main()
