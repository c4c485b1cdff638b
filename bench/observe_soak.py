"""A compressed-time soak of ``eph observe`` as an agent: memory flat, disk bounded.

In a fresh namespace, a plain client churns connections (client closes first, a
new destination port every so often, so paths come and go) while ``eph observe``
samples every ``--interval`` (100 ms: an hour of it is 36,000 samples, ten hours
of a 1 s agent) with ``--out --keep --rotate`` and ``--prometheus``, no
``--duration``. Every ``--every`` seconds it reads the observer's RSS (VmRSS) and
the size of its directory; at the end it stops it with SIGTERM and prints one JSON
object: RSS at the start (after the first minute), at the end and at most, the
largest directory, and the samples taken. Exit code 1 if RSS grew by more than
``--rss-growth``; the directory's largest size is printed to judge against
``--keep``.

    python bench/observe_soak.py [--duration 60m] [--interval 100ms] [--keep 2m]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.kernel.netns import Namespace  # noqa: E402
from harness.units import parse_duration  # noqa: E402

CHURN = r"""
import socket, sys, threading, time
ports = list(range(7000, 7020))
servers = []
for p in ports:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", p)); s.listen(512); servers.append(s)
def serve(s):
    while True:
        a, _ = s.accept(); a.recv(1); a.close()
for s in servers:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
end = time.time() + float(sys.argv[1])
i = 0
while time.time() < end:
    port = ports[(i // 2000) % len(ports)]  # a new path every 2,000 connections
    c = socket.create_connection(("127.0.0.1", port)); c.close()
    i += 1
    time.sleep(0.004)  # ~200 connections a second, well inside the range
"""


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", default="60m")
    parser.add_argument("--interval", default="100ms")
    parser.add_argument("--keep", default="2m")
    parser.add_argument("--rotate", default="20s")
    parser.add_argument("--every", default="10s")
    parser.add_argument("--rss-growth", type=float, default=0.10)
    args = parser.parse_args()
    duration, every = parse_duration(args.duration), parse_duration(args.every)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="eph-soak-") as tmp, Namespace(prefix="ephsoak") as ns:
        ns.set_sysctl("net.ipv4.ip_local_port_range", (20000, 60999))
        subprocess.run(ns.command(["ip", "link", "set", "lo", "up"]), check=True)
        out = Path(tmp) / "observe"
        churn = subprocess.Popen(ns.command([sys.executable, "-c", CHURN, str(duration + 30)]))
        observer = subprocess.Popen(
            ns.command(
                [sys.executable, "-m", "harness", "observe", "--plain", "--interval", args.interval,
                 "--out", str(out), "--keep", args.keep, "--rotate", args.rotate,
                 "--prometheus", "127.0.0.1:0", "--no-report"]
            ),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        readings: list[tuple[float, int, int]] = []
        began = time.monotonic()
        try:
            while time.monotonic() - began < duration:
                time.sleep(every)
                if observer.poll() is not None:
                    print(json.dumps({"error": f"eph observe exited {observer.returncode}"}))
                    return 1
                readings.append((time.monotonic() - began, _rss_kib(observer.pid), _size(out)))
                t, rss, size = readings[-1]
                print(
                    f"{t:6.0f} s  rss {rss / 1024:6.1f} MiB  dir {size / 2**20:6.2f} MiB",
                    file=sys.stderr,
                )
        finally:
            observer.send_signal(signal.SIGTERM)
            observer.wait(timeout=60)
            churn.kill()
            churn.wait()
        samples = json.loads((out / "observe.json").read_text())["samples"]
    settled = [r for r in readings if r[0] >= 60] or readings
    start, end = settled[0][1], settled[-1][1]
    result = {
        "duration_s": round(duration),
        "interval": args.interval,
        "samples": samples,
        "rss_start_mib": round(start / 1024, 1),
        "rss_end_mib": round(end / 1024, 1),
        "rss_max_mib": round(max(r[1] for r in settled) / 1024, 1),
        "rss_growth": round(end / start - 1, 3),
        "dir_max_mib": round(max(r[2] for r in readings) / 2**20, 2),
        "keep": args.keep,
    }
    print(json.dumps(result, indent=2))
    return 0 if result["rss_growth"] <= args.rss_growth else 1


if __name__ == "__main__":
    sys.exit(main())
