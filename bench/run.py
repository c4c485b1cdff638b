"""``make bench``: churn and accept rates on loopback, measured in one run; prints JSON.

Everything runs inside one fresh network namespace when this is root (a wide
port range and tcp_tw_reuse=1 there, so that earlier rounds' TIME_WAIT sockets
do not skew later ones, and the host is left alone); on the host's loopback
otherwise. Clients close with RST, so that the numbers measure the engines and
not TIME_WAIT.

Rounds are interleaved (bare, eph, bare, eph, ...) and the median of each is
kept: the machines are noisy, and ratios within one run are what count.

    python bench/run.py [--seconds 5] [--rounds 3] [--users 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import peers  # noqa: E402
from growth import growth  # noqa: E402  (bench/ is the script's directory)

from harness.kernel.netns import Namespace, netns_available  # noqa: E402
from harness.scenario.definition import usable_cpus  # noqa: E402

BENCH = Path(__file__).resolve().parent


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, ns: Namespace | None) -> None:
        self.args = args
        self.workdir = workdir
        self.ns = ns

    def command(self, args: list[str]) -> list[str]:
        return self.ns.command(args) if self.ns else args

    def listener(self) -> tuple[subprocess.Popen[str], str]:
        return start_listener(self.command([]), "127.0.0.1:0")

    @staticmethod
    def stop(proc: subprocess.Popen[str]) -> dict[str, Any]:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        return dict(json.loads(out.strip().splitlines()[-1]))

    def locust_rate(
        self, locustfile: Path, env: dict[str, str], extra: tuple[str, ...] = ()
    ) -> float:
        """Requests/s as Locust counted them, over its own first-to-last request window."""
        return self.locust_run(locustfile, env, extra)[0]

    def locust_run(
        self, locustfile: Path, env: dict[str, str], extra: tuple[str, ...] = ()
    ) -> tuple[float, int]:
        """(requests/s, requests) of one headless Locust run, as Locust counted them."""
        entries = self.locust_entries(locustfile, env, extra)
        requests = sum(e["num_requests"] for e in entries)
        start = min(e["start_time"] for e in entries)
        last = max(e["last_request_timestamp"] for e in entries)
        return requests / (last - start), requests

    def locust_entries(
        self, locustfile: Path, env: dict[str, str], extra: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """One headless Locust run; its stats entries, eph's CPU rows left out."""
        stats = Path(tempfile.mkdtemp(dir=self.workdir)) / "stats"
        cmd = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(locustfile),
            "--headless",
            "-u",
            str(self.args.users),
            "-r",
            "1000",
            "-t",
            f"{self.args.seconds}s",
            "--json-file",
            str(stats),
            "--only-summary",
            "--loglevel",
            "ERROR",
            *extra,
        ]
        subprocess.run(
            self.command(cmd),
            cwd=self.workdir,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        # connections only: eph's CPU rows (method "CPU") count attempts a second time
        return [
            e for e in json.loads(stats.with_suffix(".json").read_text()) if e["method"] != "CPU"
        ]

    def eph_env(self, endpoint: str, engine: str, load: str = "") -> dict[str, str]:
        scenario = self.workdir / f"bench-{engine}.toml"
        scenario.write_text(
            f'name = "bench"\nduration = "1m"\n[target]\nendpoints = ["{endpoint}"]\n'
            f'[load]\nengine = "{engine}"\nclose = "reset"\n{load}'
        )
        run_dir = Path(tempfile.mkdtemp(dir=self.workdir))
        # EPH_MANAGED: leave the merge and report out of the measurement
        return {
            "EPH_SCENARIO": str(scenario),
            "EPH_RUN_DIR": str(run_dir),
            "EPH_MANAGED": "1",
            "PYTHONPATH": str(ROOT),
        }

    def scaling(self) -> dict[str, Any]:
        """The uvloop engine with 1 and 2 Locust processes (``--processes``), toward a port
        nothing listens on: the kernel answers each SYN with a RST itself, so no listener
        competes for the two cores, and every attempt is still a full socket/connect/close
        recorded like a success. Rounds interleaved; medians."""
        endpoint = "127.0.0.1:1"
        load = 'backoff = "0s"\n'
        rates: dict[str, list[float]] = {"1": [], "2": []}
        for _ in range(self.args.rounds):
            for n in rates:
                # every attempt fails (refused): Locust would exit 1 for that
                extra: tuple[str, ...] = ("--exit-code-on-error", "0")
                extra += ("--processes", n) if n != "1" else ()
                env = {**self.eph_env(endpoint, "uvloop", load), "EPH_RATE_SHARE": str(1 / int(n))}
                rates[n].append(self.locust_rate(ROOT / "harness" / "locustfile.py", env, extra))
        one, two = median(rates["1"]), median(rates["2"])
        return {
            "target": f"{endpoint} (refused: no listener)",
            "one_process_per_s": round(one),
            "two_processes_per_s": round(two),
            "speedup": round(two / one, 3),
            "all_rounds": rates,
        }

    def engines(self, binary: Path | None, endpoint: str) -> dict[str, list[float]]:
        """Connections/s of each engine against the listener at ``endpoint``, rounds
        interleaved: bare Locust, eph's two engines in one process, the uvloop engine at
        its defaults (``load.processes = "auto"``, as ``eph run`` settles it), and the C
        loop on one core and on every core eph may use."""
        rates: dict[str, list[float]] = {
            "bare_locust": [],
            "eph_locust": [],
            "eph_uvloop": [],
            "eph_uvloop_defaults": [],
        }
        if binary is not None:
            rates |= {"c_loop": [], "c_loop_every_core": []}
        eph = ROOT / "harness" / "locustfile.py"
        one = "processes = 1\n"
        for round_ in range(self.args.rounds):
            print(f"round {round_ + 1}/{self.args.rounds}", file=sys.stderr, flush=True)
            bare = {"BENCH_TARGET": endpoint}
            rates["bare_locust"].append(self.locust_rate(BENCH / "bare_locustfile.py", bare))
            rates["eph_locust"].append(self.locust_rate(eph, self.eph_env(endpoint, "locust", one)))
            rates["eph_uvloop"].append(self.locust_rate(eph, self.eph_env(endpoint, "uvloop", one)))
            env = self.eph_env(endpoint, "uvloop")
            # eph run on the host toward eph listen, a process of its own
            count = peers.default_processes(Path(env["EPH_SCENARIO"]), beside=False)
            env["EPH_RATE_SHARE"] = repr(1 / count)
            spread = ("--processes", str(count)) if count > 1 else ()
            rates["eph_uvloop_defaults"].append(self.locust_rate(eph, env, spread))
            if binary is not None:
                rates["c_loop"].append(self.c_rate(binary, endpoint))
                rates["c_loop_every_core"].append(self.c_rate(binary, endpoint, usable_cpus()))
        return rates

    def c_rate(self, binary: Path, endpoint: str, copies: int = 1) -> float:
        """The C loop's connections/s: ``copies`` of it at once, summed."""
        host, port = endpoint.rsplit(":", 1)
        procs = [
            subprocess.Popen(
                self.command([str(binary), host, port, str(self.args.seconds), "reset"]),
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(copies)
        ]
        return sum(float(json.loads(p.communicate(timeout=120)[0])["per_s"]) for p in procs)

    def engine_memory(self, endpoint: str, seconds: float) -> dict[str, float]:
        """The uvloop engine's child alone for ``seconds``: rows recorded and its peak RSS
        (VmHWM), read just before it is told to stop."""
        from harness.load.uvloop_engine import read_frame
        from harness.scenario import parse_scenario

        scenario = parse_scenario(
            f'name = "mem"\n[target]\nendpoints = ["{endpoint}"]\n'
            '[load]\nengine = "uvloop"\nclose = "reset"\n'
        )
        path = Path(tempfile.mkdtemp(dir=self.workdir))
        (path / "s.json").write_text(json.dumps(scenario.to_json()))
        child = subprocess.Popen(
            self.command(
                [
                    *(sys.executable, "-m", "harness.load.uvloop_engine"),
                    *("--scenario", str(path / "s.json"), "--part", str(path / "p.arrows")),
                ]
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert child.stdin is not None and child.stdout is not None
        rows = [0]

        def drain() -> None:  # the Locust process's part: read every frame
            while (frame := read_frame(child.stdout)) is not None:  # type: ignore[arg-type]
                rows[0] += len(frame)

        import threading

        reader = threading.Thread(target=drain)
        reader.start()
        child.stdin.write(json.dumps({"users": self.args.users}).encode() + b"\n")
        child.stdin.flush()
        time.sleep(seconds)
        status = Path(f"/proc/{child.pid}/status").read_text()
        peak_kib = int(
            next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]
        )
        child.stdin.write(b'{"stop": true}\n')
        child.stdin.flush()
        child.wait(timeout=60)
        reader.join(timeout=60)
        return {"rows": rows[0], "peak_rss_kib": peak_kib}

    def memory_per_connection(self, endpoint: str) -> dict[str, Any]:
        """Peak RSS growth per recorded connection between a 3 s and a 15 s run: the staged
        rows are flushed every 0.5 s, so the slope is what a 10-million-connection run adds."""
        short = self.engine_memory(endpoint, 3.0)
        long = self.engine_memory(endpoint, 15.0)
        extra_rows = long["rows"] - short["rows"]
        extra_bytes = (long["peak_rss_kib"] - short["peak_rss_kib"]) * 1024
        return {
            "short": short,
            "long": long,
            "bytes_per_connection": round(extra_bytes / extra_rows, 2) if extra_rows > 0 else None,
        }

    def trace_overhead(self, endpoint: str) -> dict[str, Any]:
        """The uvloop engine's churn with and without the kernel recorder (eBPF) watching
        the namespace, rounds interleaved: untraced, eph's own loader, and bpftrace
        (EPH_RECORDER=bpftrace) where it is installed; each traced rate over the
        untraced one, and what each recorder missed."""
        from harness.kernel import bpf
        from harness.observe.trace import KernelTrace
        from harness.supervisor import Supervisor

        reason = bpf.unavailable()
        if reason is not None or self.ns is None:
            return {"skipped": reason or "needs a namespace (root)"}
        netns = bpf.netns_inode(Path("/run/netns") / self.ns.name)
        locustfile = ROOT / "harness" / "locustfile.py"
        recorders = [r for r in ("eph", "bpftrace") if r != "eph" or bpf.loader_built()]
        recorders = [r for r in recorders if r != "bpftrace" or shutil.which("bpftrace")]
        rates: dict[str, list[float]] = {"untraced": [], **{r: [] for r in recorders}}
        missed: dict[str, list[int]] = {r: [] for r in recorders}
        rows_short = {r: 0 for r in recorders}
        for _ in range(self.args.rounds):
            rates["untraced"].append(self.locust_rate(locustfile, self.eph_env(endpoint, "uvloop")))
            for recorder in recorders:
                with Supervisor() as children:
                    trace = KernelTrace(
                        children, Path(tempfile.mkdtemp(dir=self.workdir)), netns,
                        recorder=recorder,
                    )  # fmt: skip
                    trace.start()
                    rate, made = self.locust_run(locustfile, self.eph_env(endpoint, "uvloop"))
                    rates[recorder].append(rate)
                    trace.settle()  # the load's last sockets close before it stops
                    result = trace.finish()
                missed[recorder].append(result.lost_events + result.missed_events)
                rows_short[recorder] += made - result.connections
        untraced = median(rates["untraced"])
        report: dict[str, Any] = {"untraced_per_s": round(untraced), "all_rounds": rates}
        for recorder in recorders:
            # a recorder watching the wrong namespace would cost nothing and score 1.0:
            # its ratio means something only when it saw the connections it says it saw
            report[recorder] = {
                "traced_per_s": round(median(rates[recorder])),
                "ratio": round(median(rates[recorder]) / untraced, 3),
                "missed_per_round": missed[recorder],
                "rows_short": rows_short[recorder],
            }
        return report

    def listener_accept_rate(self, binary: Path) -> dict[str, float]:
        """The C loop against our listener: accepts/s the listener saw, and the client's rate."""
        proc, endpoint = self.listener()
        try:
            started = time.monotonic()
            client = self.c_rate(binary, endpoint)
            elapsed = time.monotonic() - started
        finally:
            stats = self.stop(proc)
        return {"accepts_per_s": stats["accepted"] / elapsed, "client_per_s": client}


@contextlib.contextmanager
def listening_bench(args: argparse.Namespace) -> Iterator[tuple[Bench, str]]:
    """A :class:`Bench` in a fresh namespace (a wide range, tcp_tw_reuse=1) with eph's
    listener in it: (the bench, the listener's endpoint), both gone after the block."""
    with (
        tempfile.TemporaryDirectory(prefix="eph-bench-") as tmp,
        Namespace(prefix="ephbench") as ns,
    ):
        ns.set_sysctl("net.ipv4.ip_local_port_range", (1024, 65000))
        ns.set_sysctl("net.ipv4.tcp_tw_reuse", 1)
        bench = Bench(args, Path(tmp), ns)
        proc, endpoint = bench.listener()
        try:
            yield bench, endpoint
        finally:
            bench.stop(proc)


def engine_figures(rates: dict[str, list[float]]) -> dict[str, Any]:
    """Medians of the engines' rounds, and the ratios the goals are read from."""
    results = {name: median(values) for name, values in rates.items() if values}
    ratios = {"eph_locust_vs_bare_locust": round(results["eph_locust"] / results["bare_locust"], 3)}
    if "c_loop" in results:
        ratios["eph_uvloop_vs_c_loop"] = round(results["eph_uvloop"] / results["c_loop"], 3)
        # goal >= 0.8: the plain engine at its defaults against the C loop on every core,
        # and against the C loop's best here (one copy, or one per core)
        ratios["eph_uvloop_defaults_vs_c_loop_every_core"] = round(
            results["eph_uvloop_defaults"] / results["c_loop_every_core"], 3
        )
        best = max(results["c_loop"], results["c_loop_every_core"])
        ratios["eph_uvloop_defaults_vs_c_loop_best"] = round(
            results["eph_uvloop_defaults"] / best, 3
        )
    return {"connections_per_s": results, "all_rounds": rates, "ratios": ratios}


def start_listener(prefix: list[str], endpoint: str) -> tuple[subprocess.Popen[str], str]:
    """``eph listen`` (inside ``prefix``, e.g. a namespace); returns it and its endpoint."""
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "harness", "listen", "--endpoint", endpoint],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())["endpoints"][0]


def collector_vs_ss(binary: Path, sockets: int) -> dict[str, Any]:
    """Sample time with ``sockets`` TIME_WAIT sockets, eph's collector against ``ss``,
    timed the same way twice over, rounds interleaved:

    - as a sample: eph's in-process sample against ``ss``'s run less its own start
      (``ss -V``: fork, exec and the dynamic loader, which a sample inside ``ss``
      does not pay either);
    - as a command: ``eph collect --once`` against ``ss -tanH state all``, each a
      whole process (eph pays Python's start there).
    """
    with Namespace(prefix="ephbench") as ns:
        ns.set_sysctl("net.ipv4.ip_local_port_range", (1024, 65000))
        listener, _ = start_listener(ns.command([]), "127.0.0.1:9000")
        subprocess.run(
            ns.command([str(binary), "127.0.0.1", "9000", "30", "fin", str(sockets)]),
            capture_output=True,
            check=True,
        )
        code = (
            "import json, sys, time, subprocess, statistics\n"
            "from harness.observe.collector import Collector\n"
            "from harness.endpoints import Endpoint\n"
            "c = Collector([Endpoint('127.0.0.1', 9000).resolve()])\n"
            "def timed(args):\n"
            "    t = time.perf_counter()\n"
            "    subprocess.run(args, capture_output=True, check=True)\n"
            "    return (time.perf_counter() - t) * 1000\n"
            "eph, ss, ss_start, eph_cmd, ss_cmd = [], [], [], [], []\n"
            "once = [sys.executable, '-m', 'harness', 'collect', '--once',"
            " '--target', '127.0.0.1:9000']\n"
            "for _ in range(15):\n"
            "    s = c.sample(); eph.append(s.sample_ms)\n"
            "    ss.append(timed(['ss', '-tanH', 'state', 'all']))\n"
            "    ss_start.append(timed(['ss', '-V']))\n"
            "for _ in range(5):\n"
            "    eph_cmd.append(timed(once))\n"
            "    ss_cmd.append(timed(['ss', '-tanH', 'state', 'all']))\n"
            "m = statistics.median\n"
            "print(json.dumps({'time_wait': s.states['all']['time_wait'],"
            " 'collector_ms': m(eph), 'ss_ms': m(ss) - m(ss_start), 'ss_start_ms': m(ss_start),"
            " 'collect_once_command_ms': m(eph_cmd), 'ss_command_ms': m(ss_cmd)}))\n"
        )
        out = subprocess.run(
            ns.command([sys.executable, "-c", code]),
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        ).stdout
        listener.terminate()
        listener.communicate(timeout=10)
    result = {k: round(v, 1) if isinstance(v, float) else v for k, v in json.loads(out).items()}
    result["ss_over_collector"] = round(result["ss_ms"] / result["collector_ms"], 2)
    result["ss_over_collector_as_commands"] = round(
        result["ss_command_ms"] / result["collect_once_command_ms"], 2
    )
    return result


def paths_vs_ss(sockets: int, destinations: int) -> dict[str, Any]:
    """Target-free path sampling (eph observe) against ``ss -tan`` in a fresh namespace."""
    with Namespace(prefix="ephbench") as ns:
        ns.set_sysctl("net.ipv4.ip_local_port_range", (1024, 65000))
        out = subprocess.run(
            ns.command(
                [sys.executable, str(BENCH / "paths_sample.py"), str(sockets), str(destinations)]
            ),
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        ).stdout
    return dict(json.loads(out))


def owners_vs_ss(sockets: int) -> dict[str, Any]:
    """Naming the owners of ports (eph observe's "held by") against ``ss -tanp``."""
    with Namespace(prefix="ephbench") as ns:
        ns.set_sysctl("net.ipv4.ip_local_port_range", (1024, 65000))
        out = subprocess.run(
            ns.command([sys.executable, str(BENCH / "owners_sample.py"), str(sockets)]),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        ).stdout
    return dict(json.loads(out))


def namespaces_vs_ss(sockets: int, namespaces: int = 10) -> dict[str, Any]:
    """``eph observe --all-namespaces``' sample against ``ss`` in each namespace."""
    out = subprocess.run(
        [sys.executable, str(BENCH / "namespaces_sample.py"), str(sockets), str(namespaces)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout  # fmt: skip
    return dict(json.loads(out))


def trace_convert(sizes: tuple[int, ...] = (10_000_000, 20_000_000)) -> list[dict[str, Any]]:
    """The kernel trace's conversion, partitioned against whole in memory, per size."""
    found = []
    for rows in sizes:
        with tempfile.TemporaryDirectory(prefix="eph-bench-") as tmp:
            out = subprocess.run(
                [sys.executable, str(BENCH / "trace_convert.py"), str(rows), tmp],
                cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            ).stdout  # fmt: skip
        found.append(json.loads(out))
    return found


def synthetic_table(n: int) -> Any:
    """``n`` records at 20,000/s over the default 28,232-port range, 5% EADDRNOTAVAIL."""
    import numpy as np
    import pyarrow as pa

    from harness.records import CONNECTIONS_SCHEMA, application_zeros

    rng = np.random.default_rng(3)
    ports = 32768 + (np.arange(n) * 2 + (np.arange(n) // 14116) % 2) % 28232
    errno = np.where(rng.random(n) < 0.05, 99, 0).astype(np.uint16)

    def const(value: str) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value]))

    return pa.table(
        {
            "start_ns": pa.array(np.arange(n, dtype=np.int64) * 50_000),
            "connect_us": pa.array(rng.integers(20, 2000, n).astype(np.uint32)),
            "close_us": pa.array(rng.integers(30, 3000, n).astype(np.uint32)),
            "local_addr": const("127.0.0.1"),
            "local_port": pa.array(np.where(errno == 0, ports, 0).astype(np.uint16)),
            "remote_addr": const("127.0.0.1"),
            "remote_port": pa.array(np.full(n, 9000, np.uint16)),
            "errno": pa.array(errno),
            "io_errno": pa.array(np.zeros(n, np.uint16)),
            "close": const("client"),
            "engine": const("locust"),
            "pid": pa.array(np.ones(n, np.uint32)),
            "host": const("localhost"),
            **application_zeros(n),
        },
        schema=CONNECTIONS_SCHEMA,
    )


_KERNEL = {"ip_local_port_range": [32768, 60999], "tcp_tw_reuse": 1, "tcp_timestamps": 1}
_SCENARIO = 'name = "b"\n[target]\nendpoints = ["127.0.0.1:9000"]\n'


def analysis_time(connections: int) -> dict[str, Any]:
    """finalize()'s analysis over ``connections`` synthetic records (no load needed)."""
    from harness.report.analysis import analyze
    from harness.report.scan import scan_records
    from harness.report.summarize import summarize
    from harness.scenario import parse_scenario
    from harness.summary import Kernel

    table = synthetic_table(connections)
    scenario = parse_scenario(_SCENARIO)
    started = time.perf_counter()
    cols = scan_records(table)
    summary = summarize(
        cols,
        scenario="b",
        started_at="-",
        duration_s=50.0,
        interrupted=False,
        kernel=Kernel.model_validate(_KERNEL),
    )
    analyze(table, None, scenario, summary)
    return {"connections": connections, "seconds": round(time.perf_counter() - started, 2)}


def report_growth(rows: list[int]) -> list[dict[str, Any]]:
    """Merge and ``eph report`` of synthetic runs of each size (``bench/growth.py``),
    one size at a time, each in a directory removed before the next."""
    results = []
    for connections in rows:
        print(f"growth: {connections:,} connections", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="eph-bench-") as tmp:
            results.append(growth(connections, Path(tmp)))
    return results


def _rows(text: str) -> list[int]:
    try:
        rows = [int(n.replace("_", "")) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--rows {text!r}: expected sizes like 1000000,10000000"
        ) from None
    if any(n < 1 for n in rows):
        raise argparse.ArgumentTypeError(f"--rows {text!r}: sizes must be positive")
    return rows


def compile_baseline(workdir: Path) -> Path | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    binary = workdir / "churn"
    subprocess.run([cc, "-O2", "-o", str(binary), str(BENCH / "churn.c")], check=True)
    return binary


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
    }


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--tw-sockets", type=int, default=28000)
    parser.add_argument("--analysis-connections", type=int, default=1_000_000)
    parser.add_argument(
        "--only",
        choices=[
            "all",
            "engines",
            "report",
            "memory",
            "scaling",
            "paths",
            "owners",
            "namespaces",
            "trace",
            "trace-convert",
            "peers",
        ],
        default="all",
        help="engines: only the churn rates (bare Locust, eph's engines in one process and"
        " at their defaults, the C loop on one core and on every core);"
        " report: only the merge and report of synthetic runs (--rows);"
        " memory: only the engine's bytes per connection;"
        " scaling: only 1 against 2 processes; paths: only eph observe's sample against ss;"
        " owners: only naming the owners of ports (at 30k and 100k sockets) against ss -tanp;"
        " namespaces: only the sample of every namespace (30k and 100k sockets over 10"
        " namespaces) against ss -tanp in each;"
        " trace: only churn with the kernel recorder against without;"
        " trace-convert: only the kernel trace's conversion, partitioned against whole,"
        " at 10M and 20M rows (bench/trace_convert.py);"
        " peers: only wrk, ab and hey against eph's engines, one nginx (bench/peers.py)",
    )
    parser.add_argument("--destinations", type=int, default=1000)
    parser.add_argument(
        "--rows",
        type=_rows,
        default=[1_000_000, 10_000_000, 100_000_000],
        help="synthetic run sizes for the merge and report rows, comma-separated"
        " (default 1000000,10000000,100000000; 100M needs ~6 GB of disk for a while)",
    )
    args = parser.parse_args()
    if args.only == "paths":
        paths = paths_vs_ss(args.tw_sockets, args.destinations)
        print(json.dumps({"machine": machine(), "paths_at_time_wait": paths}, indent=2))
        return 0
    if args.only == "owners":
        owners = [owners_vs_ss(n) for n in (30_000, 100_000)]
        print(json.dumps({"machine": machine(), "owners": owners}, indent=2))
        return 0
    if args.only == "namespaces":
        spread = [namespaces_vs_ss(n) for n in (30_000, 100_000)]
        print(json.dumps({"machine": machine(), "namespaces": spread}, indent=2))
        return 0
    if args.only == "engines":
        with listening_bench(args) as (bench, endpoint):
            binary = compile_baseline(bench.workdir)
            listener = engine_figures(bench.engines(binary, endpoint))
            nginx, toward_nginx = peers.nginx_binary(), None
            if nginx is not None and bench.ns is not None:
                # a C server beside the clients: the Python listener caps every client
                # near its own rate, and the C loop's blocking connect stalls 1 s on
                # each SYN its full accept queue drops
                with peers.nginx(bench.ns, bench.workdir / "nginx", nginx):
                    toward_nginx = engine_figures(bench.engines(binary, peers.PLAIN))
        figures = {"eph_listener": listener, "nginx": toward_nginx}
        print(json.dumps({"machine": machine(), **figures}, indent=2))
        return 0
    if args.only == "scaling":
        with (
            tempfile.TemporaryDirectory(prefix="eph-bench-") as tmp,
            Namespace(prefix="ephbench") as ns,
        ):
            ns.set_sysctl("net.ipv4.ip_local_port_range", (1024, 65000))
            scaling = Bench(args, Path(tmp), ns).scaling()
        print(json.dumps({"machine": machine(), "scaling": scaling}, indent=2))
        return 0
    if args.only == "peers":
        print(json.dumps({"machine": machine(), "peers": peers.measure(args, Bench)}, indent=2))
        return 0
    if args.only == "trace-convert":
        print(json.dumps({"machine": machine(), "trace_convert": trace_convert()}, indent=2))
        return 0
    if args.only == "trace":
        print(json.dumps({"machine": machine(), "trace": trace_overhead(args)}, indent=2))
        return 0
    if args.only == "memory":
        with listening_bench(args) as (bench, endpoint):
            memory = bench.memory_per_connection(endpoint)
        print(json.dumps({"machine": machine(), "uvloop_engine_memory": memory}, indent=2))
        return 0
    if args.only == "report":
        print(json.dumps({"machine": machine(), "growth": report_growth(args.rows)}, indent=2))
        return 0

    with tempfile.TemporaryDirectory(prefix="eph-bench-") as tmp:
        workdir = Path(tmp)
        binary = compile_baseline(workdir)
        use_ns = netns_available() is None
        with Namespace(prefix="ephbench") if use_ns else _null() as ns:
            if ns is not None:
                ns.set_sysctl("net.ipv4.ip_local_port_range", (1024, 65000))
                ns.set_sysctl("net.ipv4.tcp_tw_reuse", 1)
            bench = Bench(args, workdir, ns)
            proc, endpoint = bench.listener()
            try:
                rates = bench.engines(binary, endpoint)
                memory = bench.memory_per_connection(endpoint)
            finally:
                bench.stop(proc)
            scaling = bench.scaling()
            accept = bench.listener_accept_rate(binary) if binary is not None else None
        collector = (
            collector_vs_ss(binary, args.tw_sockets) if binary is not None and use_ns else None
        )

    report = {
        "machine": machine(),
        "where": "fresh network namespace" if use_ns else "host loopback",
        "seconds_per_round": args.seconds,
        "rounds": args.rounds,
        "users": args.users,
        **engine_figures(rates),
        "listener": accept,
        "uvloop_engine_memory": memory,
        "scaling": scaling,
        "collector_at_time_wait": collector,
        "paths_at_time_wait": (paths_vs_ss(args.tw_sockets, args.destinations) if use_ns else None),
        "analysis": analysis_time(args.analysis_connections),
        "trace": trace_overhead(args),
        "peers": peers.measure(args, Bench),
    }
    report["growth"] = report_growth(args.rows)
    print(json.dumps(report, indent=2))
    return 0


def trace_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """:meth:`Bench.trace_overhead` in a fresh namespace, against eph's listener there."""
    if netns_available() is not None:
        return {"skipped": netns_available()}
    with tempfile.TemporaryDirectory(prefix="eph-bench-") as tmp, Namespace("ephbench") as ns:
        ns.set_sysctl("net.ipv4.ip_local_port_range", (1024, 65000))
        ns.set_sysctl("net.ipv4.tcp_tw_reuse", 1)
        bench = Bench(args, Path(tmp), ns)
        proc, endpoint = bench.listener()
        try:
            return bench.trace_overhead(endpoint)
        finally:
            bench.stop(proc)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    sys.exit(main())
