"""Inside a fresh namespace: the cost of naming owners (``eph observe``'s "held by").

Makes ``sockets`` client connections toward 127.0.0.1:9000, half of them held open
by this process (ESTABLISHED: both ends are fds here, so /proc holds ``sockets``
socket fds) and half closed by the client first (TIME_WAIT: no owner). Then times
15 rounds, interleaved: a sample without owners, a sample with owners that reads
every fd of /proc again (the worst case: a new index each round), ``ss -tan`` and
``ss -tanp`` (which also names processes). Prints one JSON object. Run by
``bench/run.py --only owners``; it needs root for the namespace.
"""

from __future__ import annotations

import json
import resource
import socket
import statistics
import subprocess
import sys
import time

from harness.observe.owners import OwnerIndex
from harness.observe.paths import PathSampler


def main() -> None:
    sockets = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (sockets * 2 + 1000, sockets * 2 + 1000))
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 9000))
    server.listen(4096)
    held = []
    for i in range(sockets):
        client = socket.create_connection(("127.0.0.1", 9000))
        accepted, _ = server.accept()
        if i % 2:
            held += [client, accepted]
        else:
            client.close()  # the client closes first: TIME_WAIT on the client side
            accepted.close()
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
    del held


if __name__ == "__main__":
    main()
