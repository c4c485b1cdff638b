"""Inside a fresh namespace: target-free path sampling against ``ss -tan``, interleaved.

Makes ``sockets`` client TIME_WAIT sockets spread over ``destinations``
(127.0.x.y:9000, one listener on 0.0.0.0:9000), then times 15 rounds of
PathSampler.sample() and ``ss -tan``, alternating. Prints one JSON object.
Run by ``bench/run.py`` (``--only paths``); it needs root for the namespace.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time

from harness.observe.paths import PathSampler


def main() -> None:
    sockets, destinations = int(sys.argv[1]), int(sys.argv[2])
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 9000))
    server.listen(4096)
    per = sockets // destinations
    for d in range(destinations):
        address = f"127.0.{1 + d // 250}.{1 + d % 250}"
        for _ in range(per):
            client = socket.create_connection((address, 9000))
            accepted, _ = server.accept()
            client.close()  # the client closes first: TIME_WAIT on the client side
            accepted.close()
    sampler = PathSampler((1024, 65000), top=20)
    snap = sampler.sample()  # warm: imports and buffers
    eph, ss = [], []
    for _ in range(15):
        began = time.perf_counter()
        snap = sampler.sample()
        eph.append((time.perf_counter() - began) * 1000)
        began = time.perf_counter()
        subprocess.run(["ss", "-tan"], capture_output=True, check=True)
        ss.append((time.perf_counter() - began) * 1000)
    print(
        json.dumps(
            {
                "client_sockets": snap.sockets,
                "paths": snap.paths_total,
                "sample_ms": round(statistics.median(eph), 1),
                "ss_tan_ms": round(statistics.median(ss), 1),
                "sample_over_ss": round(statistics.median(eph) / statistics.median(ss), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
