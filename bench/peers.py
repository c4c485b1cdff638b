"""``make bench`` peers: wrk, ab and hey against eph's two engines, one nginx, one namespace.

Every client opens a new connection per request, 32 connections at once, against the
same nginx (one worker, ``return 200``) in a fresh network namespace (tcp_tw_reuse=1
and a wide port range there, so ports do not run out). Each runs at its defaults
(wrk's 2 threads, hey on every CPU, ab's one, eph's ``load.processes = "auto"``) and
pinned to one core (``wrk -t1``, ``hey -cpus 1``, eph in one process).
Rounds are interleaved (each client once per round) and medians kept; the ratios
are eph's engines over the peers. Each peer's non-2xx and failed requests are kept
beside its rate: a fast client that got errors is not a fast client.

    python bench/run.py --only peers [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from harness.kernel.netns import Namespace, netns_available

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 32
PORT = 8080
URL = f"http://127.0.0.1:{PORT}/"
PLAIN = f"127.0.0.1:{PORT}"  # the same nginx as a plain TCP target: connect, close
# what each eph connection does: one HTTP/1.1 request, and the server closes
EPH_REQUEST = '[load.http]\nmethod = "GET"\npath = "/"\n'
# each ratio eph / peer, and the goal it should reach: eph at its defaults against
# each peer at its own defaults (the bar), the rest for the table
GOALS = {
    ("eph_uvloop", "hey"): 1.0,
    ("eph_uvloop", "wrk"): 0.7,
    ("eph_locust", "hey"): None,
    ("eph_uvloop", "ab"): None,
    ("eph_uvloop", "wrk_t1"): None,
    ("eph_uvloop", "hey_cpus1"): None,
    ("eph_uvloop_x1", "wrk_t1"): None,
}
# eph's variants: (engine, Locust processes); None: load.processes as eph run settles
# its default "auto" on this host (a uvloop child per process). x1: one process, the
# way wrk -t1 and hey -cpus 1 use one core
VARIANTS: dict[str, tuple[str, int | None]] = {
    "eph_uvloop": ("uvloop", None),
    "eph_locust": ("locust", None),
    "eph_uvloop_x1": ("uvloop", 1),
}
INSTALL = "`make system-deps` installs it (Debian package {package})"

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


class BenchLike(Protocol):
    """What this needs of ``run.Bench``."""

    workdir: Path

    def command(self, args: list[str]) -> list[str]: ...

    def locust_entries(
        self, locustfile: Path, env: dict[str, str], extra: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]: ...


@dataclass
class Sample:
    """One client's one round: its rate, and what went wrong beside it."""

    per_s: float | None
    requests: int = 0
    non_2xx: int = 0
    failed: int = 0
    problem: str = ""
    window_s: float | None = None  # eph only: Locust's first-to-last request window


def _int(pattern: str, text: str) -> int:
    match = re.search(pattern, text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _rate(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else None


def parse_wrk(out: str) -> Sample:
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return Sample(
        per_s=_rate(r"^Requests/sec:\s+([\d.]+)", out),
        requests=_int(r"^\s*(\d+) requests in", out),
        non_2xx=_int(r"Non-2xx or 3xx responses:\s+(\d+)", out),
        failed=sum(int(n) for n in errors.groups()) if errors else 0,
    )


def parse_ab(out: str) -> Sample:
    return Sample(
        per_s=_rate(r"^Requests per second:\s+([\d.]+)", out),
        requests=_int(r"^Complete requests:\s+(\d+)", out),
        non_2xx=_int(r"^Non-2xx responses:\s+(\d+)", out),
        failed=_int(r"^Failed requests:\s+(\d+)", out),
    )


def parse_hey(out: str) -> Sample:
    statuses = re.findall(r"^\s*\[(\d{3})\]\s+(\d+) responses", out, re.MULTILINE)
    errors_part = out.split("Error distribution:", 1)[1] if "Error distribution:" in out else ""
    errors = re.findall(r"^\s*\[(\d+)\]\s", errors_part, re.MULTILINE)
    return Sample(
        per_s=_rate(r"^\s*Requests/sec:\s+([\d.]+)", out),
        requests=sum(int(count) for _, count in statuses),
        non_2xx=sum(int(count) for code, count in statuses if not code.startswith("2")),
        failed=sum(int(n) for n in errors),
    )


# each peer: its Debian package, and its parser
PEERS: dict[str, tuple[str, Callable[[str], Sample]]] = {
    "wrk": ("wrk", parse_wrk),
    "ab": ("apache2-utils", parse_ab),
    "hey": ("hey", parse_hey),
}
# each peer's runs: at its defaults (wrk: 2 threads; hey: every CPU; ab has one), and
# pinned to one core as eph_uvloop_x1 is
PEER_VARIANTS = {"wrk": "wrk", "wrk_t1": "wrk", "ab": "ab", "hey": "hey", "hey_cpus1": "hey"}


def peer_command(name: str, seconds: int) -> list[str]:
    """``name``'s command line (a ``PEER_VARIANTS`` key): 32 connections, one request
    each, for ``seconds``; nothing else set where the name says its defaults."""
    c = str(CONNECTIONS)
    if name.startswith("wrk"):
        threads = ["-t1"] if name == "wrk_t1" else []
        return ["wrk", *threads, f"-c{c}", f"-d{seconds}s", "-H", "Connection: close", URL]
    if name == "ab":  # HTTP/1.0: a new connection per request without asking
        return ["ab", "-q", f"-c{c}", f"-t{seconds}", "-n", "100000000", URL]
    cpus = ["-cpus", "1"] if name == "hey_cpus1" else []
    return ["hey", "-c", c, "-z", f"{seconds}s", *cpus, "-disable-keepalive", URL]


def run_peer(bench: BenchLike, name: str, seconds: int) -> Sample:
    """One timed run of a peer inside the namespace; its exit and output kept if odd."""
    try:
        done = subprocess.run(
            bench.command(peer_command(name, seconds)),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Sample(per_s=None, problem=f"no result within {seconds + 60} s")
    sample = PEERS[PEER_VARIANTS[name]][1](done.stdout)
    if done.returncode != 0 or sample.per_s is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        sample.problem = f"exit {done.returncode}: {' | '.join(tail)}"
    return sample


def eph_env(workdir: Path, engine: str, seconds: int) -> dict[str, str]:
    """The environment of eph's Locust process for ``engine`` against nginx."""
    scenario = workdir / f"peers-{engine}.toml"
    scenario.write_text(
        f'name = "bench-peers"\nduration = "{seconds + 60}s"\n'
        f'[target]\nendpoints = ["127.0.0.1:{PORT}"]\n'
        f'[load]\nengine = "{engine}"\nusers = {CONNECTIONS}\nclose = "server"\n'
        f"{EPH_REQUEST}"
    )
    # EPH_MANAGED: leave the merge and report out of the measurement
    return {
        "EPH_SCENARIO": str(scenario),
        "EPH_RUN_DIR": tempfile.mkdtemp(dir=workdir),
        "EPH_MANAGED": "1",
        "PYTHONPATH": str(ROOT),
    }


def run_eph(bench: BenchLike, variant: str, seconds: int) -> Sample:
    """eph's Locust process(es) of ``variant`` (``VARIANTS``): the rate as Locust counted it
    (its first to last request), and its failures (an unexpected status is one)."""
    engine, processes = VARIANTS[variant]
    env = eph_env(bench.workdir, engine, seconds)
    if processes is None:
        processes = default_processes(Path(env["EPH_SCENARIO"]))
    env["EPH_RATE_SHARE"] = repr(1 / processes)
    locustfile = ROOT / "harness" / "locustfile.py"
    extra = ("--exit-code-on-error", "0")
    extra += ("--processes", str(processes)) if processes > 1 else ()
    try:
        entries = bench.locust_entries(locustfile, env, extra)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or "").strip().splitlines()[-3:]
        return Sample(per_s=None, problem=f"exit {exc.returncode}: {' | '.join(tail)}")
    except subprocess.TimeoutExpired:
        return Sample(per_s=None, problem="no result in time")
    if not entries:
        return Sample(per_s=None, problem="Locust recorded no request")
    requests = sum(e["num_requests"] for e in entries)
    window = max(e["last_request_timestamp"] for e in entries) - min(
        e["start_time"] for e in entries
    )
    sample = Sample(
        per_s=requests / window if window > 0 else None,
        requests=requests,
        failed=sum(e["num_failures"] for e in entries),
        window_s=round(window, 3),
    )
    # a connection or two per user, or a blink of a window, is no steady rate: e.g. an
    # engine that never got its answer and recorded only the users' first connections
    if requests <= CONNECTIONS or window < 0.5:
        sample.problem = f"{requests} requests in {window:.3f} s: too few for a rate"
        sample.per_s = None
    return sample


def default_processes(scenario: Path, *, beside: bool = True) -> int:
    """The Locust processes ``eph run`` settles ``load.processes = "auto"`` on for
    ``scenario`` here; ``beside``: its target shares the CPUs, as a lab's does (nginx)."""
    from harness.run.placement import Placement, choose_processes
    from harness.scenario import load_scenario

    placement = Placement(load=("ip", "netns", "exec", "bench")) if beside else Placement()
    return choose_processes(load_scenario(scenario), placement).count


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None
    )


@contextlib.contextmanager
def nginx(ns: Namespace, prefix: Path, binary: str) -> Iterator[None]:
    """nginx serving ``200 ok`` on 127.0.0.1:PORT inside ``ns``, until the block ends."""
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=PORT))
    proc = subprocess.Popen(
        ns.command([binary, "-c", str(conf), "-p", str(prefix)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not subprocess.run(
            ns.command(["ss", "-ltnH", f"sport = :{PORT}"]),
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                log = prefix / "error.log"
                raise RuntimeError(
                    "nginx did not start listening: "
                    + (log.read_text().strip() if log.exists() else f"exit {proc.returncode}")
                )
            time.sleep(0.05)
        yield
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def available_peers() -> list[str]:
    """The peers' runs (``PEER_VARIANTS``) whose tool is installed here; a line on
    stderr for each tool that is not."""
    missing = set()
    for name, (package, _) in PEERS.items():
        if shutil.which(name) is None:
            print(
                f"peers: {name} is missing, skipping it: " + INSTALL.format(package=package),
                file=sys.stderr,
                flush=True,
            )
            missing.add(name)
    return [name for name, tool in PEER_VARIANTS.items() if tool not in missing]


def rounds(
    bench: BenchLike, clients: list[str], args: argparse.Namespace
) -> dict[str, list[Sample]]:
    """Every client once per round, ``args.rounds`` rounds."""
    samples: dict[str, list[Sample]] = {name: [] for name in clients}
    for round_ in range(args.rounds):
        print(f"peers: round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for name in clients:
            if name.startswith("eph_"):
                sample = run_eph(bench, name, args.seconds)
            else:
                sample = run_peer(bench, name, args.seconds)
            if sample.problem:
                print(f"peers: {name}: {sample.problem}", file=sys.stderr, flush=True)
            samples[name].append(sample)
    return samples


def summarize(samples: dict[str, list[Sample]]) -> dict[str, Any]:
    """Median rates, totals of what went wrong, and eph's ratios to each peer."""
    clients: dict[str, Any] = {}
    for name, runs in samples.items():
        rates = [s.per_s for s in runs if s.per_s is not None]
        clients[name] = {
            "per_s": round(statistics.median(rates), 1) if rates else None,
            "requests": sum(s.requests for s in runs),
            "non_2xx": sum(s.non_2xx for s in runs),
            "failed": sum(s.failed for s in runs),
            "problems": sorted({s.problem for s in runs if s.problem}),
            "all_rounds": [asdict(s) for s in runs],
        }
        windows = [s.window_s for s in runs if s.window_s is not None]
        if windows:
            clients[name]["window_s_median"] = round(statistics.median(windows), 2)
    ratios: dict[str, Any] = {}
    for (eph, peer), goal in GOALS.items():
        ours = clients.get(eph, {}).get("per_s")
        theirs = clients.get(peer, {}).get("per_s")
        if ours and theirs:
            ratio = round(ours / theirs, 3)
            met = None if goal is None else ratio >= goal
            ratios[f"{eph}_vs_{peer}"] = {"ratio": ratio, "goal": goal, "met": met}
    return {"clients": clients, "ratios": ratios}


def table(result: dict[str, Any]) -> str:
    """The figures as a plain-text table, then the ratios against their goals."""
    lines = [f"{'client':<14} {'req/s median':>13} {'requests':>10} {'non-2xx':>8} {'failed':>8}"]
    for name, row in result["clients"].items():
        rate = f"{row['per_s']:,.0f}" if row["per_s"] is not None else "-"
        counts = f"{row['requests']:>10,} {row['non_2xx']:>8,} {row['failed']:>8,}"
        window = f"  (over {row['window_s_median']} s)" if "window_s_median" in row else ""
        lines.append(f"{name:<14} {rate:>13} {counts}{window}")
        lines += [f"  {name}: {problem}" for problem in row["problems"]]
    for name, ratio in result["ratios"].items():
        eph, peer = name.split("_vs_")
        goal = "" if ratio["goal"] is None else f"  (goal >= {ratio['goal']}: "
        goal += "" if ratio["met"] is None else ("met)" if ratio["met"] else "NOT met)")
        lines.append(f"{eph.replace('_', ' ')} / {peer}: {ratio['ratio']:.3f}{goal}")
    return "\n".join(lines)


def measure(args: argparse.Namespace, make_bench: Callable[..., BenchLike]) -> dict[str, Any]:
    """The peers section: ``make_bench(args, workdir, ns)`` is ``run.Bench``."""
    if netns_available() is not None:
        return {"skipped": netns_available()}
    binary = nginx_binary()
    if binary is None:
        print(
            "peers: nginx is missing, skipping: " + INSTALL.format(package="nginx-light"),
            file=sys.stderr,
        )
        return {"skipped": "nginx is missing (make system-deps)"}
    clients = [*available_peers(), *VARIANTS]
    args = argparse.Namespace(**{**vars(args), "users": CONNECTIONS})
    previous = signal.signal(signal.SIGTERM, _terminate)  # so that `finally` runs
    try:
        with (
            tempfile.TemporaryDirectory(prefix="eph-bench-") as tmp,
            Namespace(prefix="ephbench") as ns,
        ):
            ns.set_sysctl("net.ipv4.ip_local_port_range", (1024, 65000))
            ns.set_sysctl("net.ipv4.tcp_tw_reuse", 1)
            with nginx(ns, Path(tmp) / "nginx", binary):
                samples = rounds(make_bench(args, Path(tmp), ns), clients, args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = summarize(samples)
    print(table(result), file=sys.stderr, flush=True)
    return {
        "server": f"nginx, 1 worker, return 200, {URL}",
        "connections": CONNECTIONS,
        "new_connection_per_request": True,
        "eph_per_s": "requests over Locust's first-to-last request window (window_s)",
        "seconds_per_round": args.seconds,
        "rounds": args.rounds,
        "missing": [name for name in PEERS if name not in clients],
        **result,
    }


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
