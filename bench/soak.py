"""``make soak``: a long, bounded run in a lab with faults on a schedule; prints JSON.

In a fresh namespace (200-port range) it runs ``eph run`` for ``--minutes`` against
an ``eph listen`` of its own, and on a schedule:

- kills the listener and starts it again ``--down`` seconds later (an outage);
- then turns ``tcp_tw_reuse`` off inside the namespace (the range runs out and
  stays out), and on again at the next fault (exhaustion cycles); and again.

Meanwhile it samples the resident memory of every process of the run. At the end
it checks that memory stayed flat, that every record reached the run directory
(records == Locust's count, nothing left unmerged), that each outage was found,
and that no process or namespace is left. Exit code 1 if any check fails.

    python bench/soak.py [--minutes 3] [--engine locust|uvloop] [--every 30]
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.kernel.netns import Namespace  # noqa: E402

PORT = 9000
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _listener(ns: Namespace) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ns.command([sys.executable, "-m", "harness", "listen", "--endpoint", f"127.0.0.1:{PORT}"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if '"listening"' not in line:
        raise SystemExit(f"the listener did not start: {line!r}")
    return proc


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=30)
    if proc.stdout is not None:
        proc.stdout.close()


def _rss_by_pid(marker: str) -> dict[int, int]:
    """Resident memory (bytes) of every process whose command line holds ``marker``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker not in (entry / "cmdline").read_bytes().decode(errors="replace"):
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    found[int(entry.name)] = int(line.split()[1]) * 1024
        except OSError:
            continue
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--engine", choices=["locust", "uvloop"], default="locust")
    parser.add_argument("--rate", type=int, default=400)
    parser.add_argument("--every", type=float, default=30.0, help="seconds between faults")
    parser.add_argument("--down", type=float, default=3.0, help="seconds the listener stays down")
    args = parser.parse_args()
    duration = args.minutes * 60
    checks: dict[str, bool] = {}
    memory: list[tuple[float, int]] = []
    faults: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="eph-soak-") as tmp, Namespace(prefix="ephsoak") as ns:
        ns.set_sysctl("net.ipv4.ip_local_port_range", (40000, 40199))
        ns.set_sysctl("net.ipv4.tcp_tw_reuse", 1)
        scenario = Path(tmp) / "soak.toml"
        scenario.write_text(
            f'name = "soak"\nduration = "{duration:g}s"\n[target]\n'
            f'endpoints = ["127.0.0.1:{PORT}"]\n[load]\nengine = "{args.engine}"\n'
            f'users = 20\nrate = {args.rate}\nbackoff = "20ms"\nconnect_timeout = "1s"\n'
        )
        run = Path(tmp) / "run"
        listener = _listener(ns)
        proc = subprocess.Popen(
            ns.command([sys.executable, "-m", "harness", "run", str(scenario), "--out", str(run)]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        began = time.monotonic()
        next_fault, reuse, n = began + args.every, 1, 0
        try:
            while proc.poll() is None and time.monotonic() < began + duration + 120:
                now = time.monotonic()
                memory.append((now - began, sum(_rss_by_pid(str(run)).values())))
                if now >= next_fault and now < began + duration - args.every / 2:
                    n += 1
                    if n % 3 == 1:  # an outage, while reuse keeps ports coming
                        _stop(listener)
                        time.sleep(args.down)
                        listener = _listener(ns)
                        faults.append({"at_s": round(now - began, 1), "fault": "listener restart"})
                    else:  # an exhaustion cycle: reuse off, then on again at the next fault
                        reuse = 1 - reuse
                        ns.set_sysctl("net.ipv4.tcp_tw_reuse", reuse)
                        faults.append({"at_s": round(now - began, 1), "fault": f"tw_reuse={reuse}"})
                    next_fault += args.every
                print(
                    f"{now - began:6.0f}/{duration:.0f} s  rss {memory[-1][1] / 2**20:7.1f} MiB"
                    f"  faults {len(faults)}",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(5)
            _, stderr = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
            _stop(listener, signal.SIGTERM)
        summary = json.loads((run / "summary.json").read_text())
        left = _rss_by_pid(str(run))
        third = max(1, len(memory) // 3)
        early = max(m for _, m in memory[:third])
        late = max(m for _, m in memory[-third:])
        restarts = sum(f["fault"] == "listener restart" for f in faults)
        cons = summary["conservation"]
        checks = {
            "exit code 0": proc.returncode == 0,
            "memory flat (late peak <= early peak x 1.2 + 20 MiB)": late
            <= early * 1.2 + 20 * 2**20,
            "records == Locust's count": cons.get("records_match_locust") is True,
            "every part merged": not list((run / "parts").glob("*.arrows")),
            "each listener restart found as an outage": len(summary["outages"]) >= restarts,
            "exhausted at least once": summary["exhaustion"]["exhausted"],
            "kernel ActiveOpens == attempts that sent a SYN": cons.get("attempts_match_kernel")
            is True,
            "no process left": not left,
        }
        report = {
            "minutes": args.minutes,
            "engine": args.engine,
            "faults": faults,
            "attempted": summary["connections"]["attempted"],
            "errors": summary["connections"]["errors"],
            "outages": summary["outages"],
            "rss_mib": {"early_peak": round(early / 2**20, 1), "late_peak": round(late / 2**20, 1)},
            "conservation": cons,
            "checks": checks,
        }
        if proc.returncode != 0:
            report["stderr"] = stderr[-2000:]
    print(json.dumps(report, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
