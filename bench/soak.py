"""``make soak``: a long, bounded run in a lab with faults on a schedule; prints JSON.

In a fresh namespace (200-port range) it runs ``eph run`` for ``--duration``
(``make soak SOAK=60m``) against an ``eph listen`` of its own, and on a
schedule (every few minutes in an hour; ``--every``):

- kills the listener and starts it again ``--down`` seconds later (an outage);
- then turns ``tcp_tw_reuse`` off inside the namespace (the range runs out and
  stays out), and on again at the next fault (exhaustion cycles); and again.

Meanwhile it samples the resident memory of every process of the run, and
prints a progress line (every 5 s on a terminal, every minute otherwise). At the
end it checks that memory stayed flat, that every record reached the run
directory (records == Locust's count, nothing left unmerged), that each outage
was found, that the report was rendered within the memory bound (the run's own
finalize, and ``eph report`` again, each with its peak RSS), and that no process
or namespace is left. Exit code 1 if any check fails.

    python bench/soak.py [--duration 3m] [--engine locust|uvloop] [--every 30s]
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.kernel.netns import Namespace  # noqa: E402
from harness.runstate import Phase, read_state  # noqa: E402
from harness.units import parse_duration  # noqa: E402

PORT = 9000
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SAMPLE_EVERY = 5.0  # seconds between memory samples while the load runs
FINALIZE_SAMPLE_EVERY = 0.2  # ... while the run merges and renders its report
REPORT_MEMORY_BOUND = 1.5 * 2**30  # the report's target (docs/performance.md): <= 1.5 GB
FINISH_GRACE = 600.0  # seconds the run may take after its duration to stop and finalize


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


@dataclass
class _Soak:
    """What the soak saw while the run went on."""

    duration: float
    every: float
    down: float
    ns: Namespace
    run: Path
    began: float = field(default_factory=time.monotonic)
    memory: list[tuple[float, int]] = field(default_factory=list)  # while loading
    finalize_peak: int = 0  # bytes, every process of the run, while it finalized
    faults: list[dict[str, Any]] = field(default_factory=list)
    reuse: int = 1
    rss: int = 0  # the latest sample, whatever the phase

    def sample(self) -> float:
        """One memory sample; returns the seconds until the next."""
        now = time.monotonic() - self.began
        rss = self.rss = sum(_rss_by_pid(str(self.run)).values())
        state = _phase(self.run)
        if state is Phase.FINALIZING:
            self.finalize_peak = max(self.finalize_peak, rss)
            return FINALIZE_SAMPLE_EVERY
        if state is Phase.LOADING:
            self.memory.append((now, rss))
        return SAMPLE_EVERY if now < self.duration else FINALIZE_SAMPLE_EVERY

    def fault(self, n: int, listener: subprocess.Popen[str]) -> subprocess.Popen[str]:
        """The ``n``-th fault: a listener restart, or tcp_tw_reuse toggled."""
        at = round(time.monotonic() - self.began, 1)
        if n % 3 == 1:  # an outage, while reuse keeps ports coming
            _stop(listener)
            time.sleep(self.down)
            listener = _listener(self.ns)
            self.faults.append({"at_s": at, "fault": "listener restart"})
        else:  # an exhaustion cycle: reuse off, then on again at the next fault
            self.reuse = 1 - self.reuse
            self.ns.set_sysctl("net.ipv4.tcp_tw_reuse", self.reuse)
            self.faults.append({"at_s": at, "fault": f"tw_reuse={self.reuse}"})
        return listener

    def progress(self) -> str:
        now = time.monotonic() - self.began
        return (
            f"{now:6.0f}/{self.duration:.0f} s  {_phase(self.run) or '-'}"
            f"  rss {self.rss / 2**20:7.1f} MiB  faults {len(self.faults)}"
        )


def _phase(run: Path) -> Phase | None:
    try:
        state = read_state(run)
    except Exception:  # a state being replaced, or not written yet: the next sample
        return None
    return state.phase if state is not None else None


def _scenario(path: Path, duration: float, engine: str, rate: int) -> Path:
    path.write_text(
        f'name = "soak"\nduration = "{duration:g}s"\n[target]\n'
        f'endpoints = ["127.0.0.1:{PORT}"]\n[load]\nengine = "{engine}"\n'
        f'users = 20\nrate = {rate}\nbackoff = "20ms"\nconnect_timeout = "1s"\n'
    )
    return path


def _drive(soak: _Soak, proc: subprocess.Popen[str], listener: subprocess.Popen[str]) -> None:
    """Faults on schedule, memory samples, progress lines, until the run exits (bounded)."""
    tty = sys.stderr.isatty()
    next_fault, next_line, n = soak.every, 0.0, 0
    deadline = soak.duration + FINISH_GRACE
    try:
        while proc.poll() is None and time.monotonic() - soak.began < deadline:
            wait = soak.sample()
            now = time.monotonic() - soak.began
            if now >= next_fault and now < soak.duration - soak.every / 2:
                n += 1
                listener = soak.fault(n, listener)
                next_fault += soak.every
            if now >= next_line:
                print(soak.progress(), file=sys.stderr, flush=True)
                next_line = now + (SAMPLE_EVERY if tty else 60.0)
            time.sleep(wait)
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop(listener, signal.SIGTERM)


def _report_again(run: Path) -> tuple[int, int]:
    """``eph report RUN`` in a child: its exit code and its peak RSS (bytes, wait4)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "report", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def _checks(soak: _Soak, code: int, report: tuple[int, int]) -> dict[str, Any]:
    """The figures and the verdicts, from the run directory and what the soak saw."""
    run, memory = soak.run, soak.memory
    summary = json.loads((run / "summary.json").read_text())
    third = max(1, len(memory) // 3)
    early = max(m for _, m in memory[:third]) if memory else 0
    late = max(m for _, m in memory[-third:]) if memory else 0
    restarts = sum(f["fault"] == "listener restart" for f in soak.faults)
    cons = summary["conservation"]
    state = read_state(run)
    checks = {
        "exit code 0": code == 0,
        "state.json finished": state is not None and state.phase is Phase.FINISHED,
        "memory flat (late peak <= early peak x 1.2 + 20 MiB)": bool(memory)
        and late <= early * 1.2 + 20 * 2**20,
        "records == Locust's count": cons.get("records_match_locust") is True,
        "every part merged": not list((run / "parts").glob("*.arrows")),
        "each listener restart found as an outage": len(summary["outages"]) >= restarts,
        "exhausted at least once": summary["exhaustion"]["exhausted"],
        "kernel ActiveOpens == attempts that sent a SYN": cons.get("attempts_match_kernel") is True,
        "report rendered within the memory bound": (run / "report.html").stat().st_size > 0
        and 0 < soak.finalize_peak <= REPORT_MEMORY_BOUND,
        "eph report again within the memory bound": report[0] == 0
        and report[1] <= REPORT_MEMORY_BOUND,
        "no process left": not _rss_by_pid(str(run)),
    }
    return {
        "minutes": round(soak.duration / 60, 2),
        "faults": soak.faults,
        "attempted": summary["connections"]["attempted"],
        "errors": summary["connections"]["errors"],
        "outages": summary["outages"],
        "rss_mib": {"early_peak": round(early / 2**20, 1), "late_peak": round(late / 2**20, 1)},
        "report_peak_rss_mib": {
            "finalize": round(soak.finalize_peak / 2**20, 1),
            "eph_report": round(report[1] / 2**20, 1),
            "bound": round(REPORT_MEMORY_BOUND / 2**20),
        },
        "conservation": cons,
        "checks": checks,
    }


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=parse_duration, help="e.g. 60m (default 3m)")
    parser.add_argument("--minutes", type=float, help="the duration in minutes (older spelling)")
    parser.add_argument("--engine", choices=["locust", "uvloop"], default="locust")
    parser.add_argument("--rate", type=int, default=400)
    parser.add_argument(
        "--every",
        type=parse_duration,
        help="time between faults (default: a sixth of the duration, 30s to 3m)",
    )
    parser.add_argument("--down", type=parse_duration, default=3.0, help="the listener's outage")
    args = parser.parse_args()
    if args.duration is None:
        args.duration = 60 * (args.minutes if args.minutes is not None else 3.0)
    if args.every is None:
        args.every = min(180.0, max(30.0, args.duration / 6))
    return args


def main() -> int:
    args = _args()
    with tempfile.TemporaryDirectory(prefix="eph-soak-") as tmp, Namespace(prefix="ephsoak") as ns:
        ns.set_sysctl("net.ipv4.ip_local_port_range", (40000, 40199))
        ns.set_sysctl("net.ipv4.tcp_tw_reuse", 1)
        scenario = _scenario(Path(tmp) / "soak.toml", args.duration, args.engine, args.rate)
        run = Path(tmp) / "run"
        soak = _Soak(args.duration, args.every, args.down, ns, run)
        listener = _listener(ns)
        with open(Path(tmp) / "eph.log", "w+") as log:
            proc = subprocess.Popen(
                ns.command(
                    [sys.executable, "-m", "harness", "run", str(scenario), "--out", str(run)]
                ),
                stdout=subprocess.DEVNULL,
                stderr=log,
                text=True,
                env=ENV,
            )
            soak.began = time.monotonic()
            _drive(soak, proc, listener)
            code = proc.wait()
            print(f"the run exited ({code}); eph report again", file=sys.stderr, flush=True)
            report = {**_checks(soak, code, _report_again(run)), "engine": args.engine}
            if code != 0:
                log.seek(0)
                report["stderr"] = log.read()[-2000:]
    print(json.dumps(report, indent=2))
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
