"""Where each child of a run lives and how it starts: listener, collectors, Locust.

``harness.run.lifecycle`` drives a run from start to finalize; this module makes its
children, each through the run's :class:`~harness.supervisor.Supervisor` (so each
dies with eph and stops in the supervisor's order). A :class:`Placement` puts
each in a namespace (``eph lab``); a :class:`Master` makes Locust a master whose
workers run elsewhere. None of it imports locust: Locust runs in its own process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.endpoints import Endpoint
from harness.errors import RunError
from harness.kernel.parent_death import death_signal_preexec
from harness.observe.collector import collect_command
from harness.observe.nat_collector import nat_command
from harness.rundir import RunDir
from harness.scenario import Protocol, Scenario
from harness.scenario.definition import usable_cpus
from harness.summary import LoadProcesses
from harness.supervisor import Child, Stage, Supervisor
from harness.units import format_duration

if TYPE_CHECKING:
    from harness.target.tls import ThrowawayCert

__all__ = [
    "LISTENER_START_TIMEOUT",
    "LOCUSTFILE",
    "PROCESSES_ENV",
    "START_TIMEOUT",
    "STOP_GRACE",
    "ListenerChild",
    "Master",
    "Placement",
    "choose_processes",
    "master_port",
    "preflight_where",
    "start_collectors",
    "start_locust",
    "start_nat_collector",
]

START_TIMEOUT = 60.0  # seconds for Locust to start its test (first start installs nothing)
LISTENER_START_TIMEOUT = 15.0
LISTENER_STOP_GRACE = 15.0  # seconds for the listener to drain its accept queue and report
COLLECTOR_STOP_GRACE = 10.0
STOP_GRACE = 30.0  # seconds past the close timeouts for Locust to write its stats
LOCUSTFILE = Path(__file__).resolve().parent.parent / "locustfile.py"  # harness/locustfile.py

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where each process of a run lives: a command prefix such as ``ip netns exec NAME``.

    Empty prefixes (the default) run everything here, on the host. ``collectors``
    pairs a subdirectory of the run directory ("" for its root) with a prefix.
    """

    load: tuple[str, ...] = ()
    listener: tuple[str, ...] = ()
    collectors: tuple[tuple[str, tuple[str, ...]], ...] = (("", ()),)
    # the nat topology's router: the NAT collector runs there with these pool arguments
    router: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()

    @property
    def on_host(self) -> bool:
        return not self.load

    @property
    def load_netns(self) -> Path:
        """The network namespace the load runs in (its file, for its inode)."""
        if self.load[:3] == ("ip", "netns", "exec") and len(self.load) > 3:
            return Path("/run/netns") / self.load[3]
        return Path("/proc/self/ns/net")


@dataclass(frozen=True)
class Master:
    """``eph run --master``: Locust's master here, its workers (``eph worker``) elsewhere.

    The master binds ``bind_host:bind_port`` (loopback unless told otherwise), waits
    up to ``wait`` seconds for ``workers`` workers, runs no users and no collector
    itself, and merges what each worker ships into the run directory.
    """

    workers: int = 1
    bind_host: str = "127.0.0.1"
    bind_port: int = 5557
    wait: float = 120.0

    def locust_args(self) -> list[str]:
        return [
            "--master",
            "--expect-workers",
            str(self.workers),
            "--expect-workers-max-wait",
            f"{self.wait:g}",
            "--master-bind-host",
            self.bind_host,
            "--master-bind-port",
            str(self.bind_port),
        ]


# the default of load.processes where a scenario does not set it, instead of "auto":
# a CI runner that runs several eph at once, say
PROCESSES_ENV = "EPH_LOAD_PROCESSES"


def choose_processes(
    scenario: Scenario, placement: Placement, master: Master | None = None, cpus: int = 0
) -> LoadProcesses:
    """How many Locust processes make this run's load here.

    ``auto`` takes one per CPU eph may run on (``cpus``, else its affinity), less one
    when a server of the run shares them (the embedded listener, a lab's target) and
    more than two are there: with two, a second engine made 16,462 requests/s toward
    nginx against 11,059 for one (docs/performance.md; toward the embedded listener one
    process did better, 30,126 connects/s against 26,520). Never more than
    ``load.users``: a process without a user makes nothing. ``EPH_LOAD_PROCESSES`` in
    the environment replaces ``auto`` where the scenario does not set the key.
    """
    load = scenario.load
    cpus = cpus or usable_cpus()
    plural = "s" if cpus != 1 else ""
    if master is not None:
        why = "a master: each worker is one Locust process on its own host"
        return LoadProcesses(count=1, asked=str(load.processes), cpus=cpus, why=why)
    default = os.environ.get(PROCESSES_ENV)
    if default is not None and "processes" not in load.model_fields_set:
        try:
            count = int(default)
        except ValueError:
            raise RunError(
                f"{PROCESSES_ENV} = {default!r} is not a number of processes"
                ' (unset it for load.processes\'s own default, "auto")'
            ) from None
        if not 1 <= count <= 1024:
            raise RunError(f"{PROCESSES_ENV} = {count} is not between 1 and 1024")
        why = f"{PROCESSES_ENV}={count}, the default where the scenario does not say"
        return LoadProcesses(count=count, asked=str(count), cpus=cpus, why=why)
    if load.processes != "auto":
        count = load.processes or cpus
        why = f"load.processes = {load.processes}" + (
            f": one per CPU eph may run on ({cpus})" if load.processes == 0 else ""
        )
        return LoadProcesses(count=count, asked=str(load.processes), cpus=cpus, why=why)
    sharer = (
        "the embedded listener"
        if scenario.listener is not None
        else "the lab's target"
        if not placement.on_host
        else None
    )
    count, why = cpus, f"auto: {cpus} CPU{plural} eph may run on"
    if sharer is not None and cpus > 2:
        count, why = cpus - 1, f"{why}, less one for {sharer}"
    elif sharer is not None and cpus == 2:
        why += f" and {sharer} shares them: too few to leave it one"
    if count > load.users:
        count, why = load.users, f"{why}, capped at load.users = {load.users}"
    return LoadProcesses(count=count, asked="auto", cpus=cpus, why=why)


def preflight_where(scenario: Scenario, placement: Placement) -> dict[str, Any] | None:
    """``eph preflight`` where the load runs: here, or inside the lab's namespace."""
    if placement.on_host:
        from harness.capacity.preflight import preflight

        return preflight(scenario)
    result = subprocess.run(
        [*placement.load, sys.executable, "-m", "harness", "preflight", "-", "--json"],
        input=json.dumps(scenario.to_json()),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=death_signal_preexec(),  # a killed eph takes it along
    )
    if result.returncode != 0:
        logger.warning("the preflight failed in the lab: %s", result.stderr.strip()[-500:])
        return None
    return dict(json.loads(result.stdout))


class ListenerChild:
    """``eph listen`` in a child process, speaking JSON lines on stdout; over TLS with
    ``tls`` (from :func:`harness.target.tls.listener_certificate`)."""

    def __init__(
        self,
        supervisor: Supervisor,
        scenario: Scenario,
        run: RunDir,
        prefix: Sequence[str] = (),
        tls: ThrowawayCert | None = None,
    ) -> None:
        self._supervisor = supervisor
        self._log = run.logs / "listener.log"
        with open(self._log, "ab") as log:
            self.child = supervisor.start(
                "listener",
                [*prefix, *_listen_command(scenario, tls)],
                stage=Stage.TARGET,
                grace=LISTENER_STOP_GRACE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self.endpoints = [Endpoint.parse(e) for e in self._read_event("listening")["endpoints"]]

    def _read_event(self, name: str, timeout: float = LISTENER_START_TIMEOUT) -> dict[str, Any]:
        stdout = self.child.proc.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    break
                line = stdout.readline()
                if not line:
                    break
                event = json.loads(line)
                if event.get("event") == name:
                    return dict(event)
        self._supervisor.stop(self.child, grace=0.0)
        raise RunError(f"the embedded listener failed ({name!r} never came): {self._tail()}")

    def _tail(self) -> str:
        try:
            text = self._log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return text[-1].removeprefix("error: ") if text else f"exit code {self.child.poll()}"

    def stats(self) -> dict[str, Any]:
        """What it accepted, from the report it prints when stopped (stop it first)."""
        stats = self._read_event("stopped", timeout=1.0)
        stats.pop("event", None)
        return stats


def start_listener(
    supervisor: Supervisor, scenario: Scenario, run: RunDir, prefix: Sequence[str] = ()
) -> tuple[ListenerChild, Scenario]:
    """The scenario's ``[listener]`` in a child; over TLS with a throwaway certificate made
    in the run directory (``tls/``). Returns the child and the scenario as the load sees
    it: the endpoints the listener bound, and, when the clients verify TLS without a CA
    of their own, the throwaway CA to verify with."""
    from harness.target.tls import listener_certificate

    cert = None
    if scenario.listener_tls:
        cert = listener_certificate(run.path, scenario.target.endpoints)
    listener = ListenerChild(supervisor, scenario, run, prefix, cert)
    scenario = scenario.with_endpoints(listener.endpoints)
    tls = scenario.load.tls
    if cert is not None and tls is not None and tls.ca_file is None and not tls.insecure:
        load = scenario.load.model_copy(
            update={"tls": tls.model_copy(update={"ca_file": str(cert.ca_file)})}
        )
        scenario = scenario.model_copy(update={"load": load})
    return listener, scenario


def _listen_command(scenario: Scenario, tls: ThrowawayCert | None = None) -> list[str]:
    """``eph listen`` as the scenario's [listener] asks; ``tls``: the certificate it
    serves (needed when ``scenario.listener_tls``)."""
    listener = scenario.listener
    if listener is None:
        raise ValueError("the scenario has no [listener]")
    if scenario.listener_tls and tls is None:
        raise RunError(
            "the scenario's listener serves TLS but was given no certificate: make one"
            " with harness.target.tls.listener_certificate and pass it (tls=)"
        )
    args = [
        sys.executable,
        "-m",
        "harness",
        "listen",
        "--close",
        scenario.listener_close.value,
        "--backlog",
        str(listener.backlog),
    ]
    for endpoint in scenario.target.endpoints:
        args += ["--endpoint", str(endpoint)]
    if listener.response:
        args += ["--response", listener.response]
    if scenario.listener_reads_request:
        args.append("--read-request")
        if listener.keep_alive:
            args.append("--keep-alive")
    if scenario.load.protocol is Protocol.UDP:
        args.append("--udp")
    if scenario.listener_http:
        args.append("--http")
    if tls is not None:
        args += ["--tls-cert", str(tls.cert_file), "--tls-key", str(tls.key_file)]
    return args


def start_collectors(
    supervisor: Supervisor, scenario: Scenario, run: RunDir, placement: Placement
) -> list[Child]:
    """``eph collect`` into the run directory (or a subdirectory), one per placement."""
    bound = math.ceil(scenario.duration) + START_TIMEOUT + STOP_GRACE
    children = []
    for subdir, prefix in placement.collectors:
        args = collect_command(
            run.path / subdir,
            format_duration(scenario.collector.interval),
            bound,
            scenario.target.endpoints,
            udp=scenario.load.protocol is Protocol.UDP,
        )
        log_name = f"collector-{subdir}.log" if subdir else "collector.log"
        with open(run.logs / log_name, "ab") as log:
            children.append(
                supervisor.start(
                    "collector",
                    [*prefix, *args],
                    stage=Stage.OBSERVE,
                    grace=COLLECTOR_STOP_GRACE,
                    death_signal=signal.SIGTERM,  # it writes its last sample, then exits
                    stdout=log,
                    stderr=log,
                )
            )
    if placement.router:
        children.append(start_nat_collector(supervisor, scenario, run, placement, bound))
    return children


def start_nat_collector(
    supervisor: Supervisor, scenario: Scenario, run: RunDir, placement: Placement, bound: float
) -> Child:
    """The router's NAT collector, into ``router/`` of the run directory."""
    args = nat_command(
        run.path / "router",
        scenario.collector.interval,
        bound,
        scenario.target.endpoints,
        placement.router_args,
    )
    with open(run.logs / "collector-router.log", "ab") as log:
        return supervisor.start(
            "NAT collector",
            [*placement.router, *args],
            stage=Stage.OBSERVE,
            grace=COLLECTOR_STOP_GRACE,
            death_signal=signal.SIGTERM,  # it writes its last sample, then exits
            stdout=log,
            stderr=log,
        )


def start_locust(
    supervisor: Supervisor,
    scenario: Scenario,
    run: RunDir,
    placement: Placement,
    extra: Sequence[str] = (),
    master: Master | None = None,
    web: Endpoint | None = None,
    master_port: int | None = None,
) -> Child:
    """Locust on ``harness/locustfile.py``, configured through the environment: headless,
    or with its web UI at ``web`` (the test starting at once, the Ports tab live).

    Stopped with SIGTERM, which Locust handles in a gevent handler; SIGINT would
    raise KeyboardInterrupt in whatever greenlet runs, mid-attempt.
    """
    load = scenario.load
    env = {
        **os.environ,
        "EPH_SCENARIO": str(run.scenario),
        "EPH_RUN_DIR": str(run.path),
        "EPH_MANAGED": "1",
        # each of Locust's processes paces its share of load.rate
        "EPH_RATE_SHARE": repr(1 / load.process_count),
    }
    if master is None:  # local processes: none connects before every one is ready
        env["EPH_LOAD_GATE"] = "1"
    with open(run.logs / "locust.out", "ab") as out:
        return supervisor.start(
            "locust",
            [*placement.load, *locust_command(scenario, run, extra, master, web, master_port)],
            stage=Stage.LOAD,
            grace=load.connect_timeout + load.io_timeout + load.hold + STOP_GRACE,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def locust_command(
    scenario: Scenario,
    run: RunDir,
    extra: Sequence[str],
    master: Master | None = None,
    web: Endpoint | None = None,
    master_port: int | None = None,
) -> list[str]:
    load = scenario.load
    backstop = math.ceil(scenario.duration) + 30  # eph stops it first; this bounds a lost parent
    if master is not None:
        spread = master.locust_args()
    elif load.process_count > 1:
        spread = _processes_args(load.process_count, master_port or 0)
    else:
        spread = []
    # users finish the attempt they are in before stopping (then Locust kills them)
    stop_timeout = math.ceil(load.connect_timeout + load.io_timeout + load.hold + 1)
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        *_ui_args(web),
        "-u",
        str(load.users),
        "-r",
        f"{load.spawn_rate:g}",
        "-t",
        f"{backstop}s",
        "--csv",
        str(run.path / "locust"),
        "--json-file",
        str(run.path / "locust"),
        "--logfile",
        str(run.logs / "locust.log"),
        "--only-summary",
        "--exit-code-on-error",
        "0",
        "--stop-timeout",
        str(stop_timeout),
        *spread,
        *extra,
    ]


def _ui_args(web: Endpoint | None) -> list[str]:
    if web is None:
        return ["--headless"]
    return ["--autostart", "--web-host", web.host, "--web-port", str(web.port)]


def _processes_args(count: int, port: int) -> list[str]:
    """Locust forks ``count`` workers that talk to its master over TCP on ``port``: one
    of this run's own, so that two runs on one host (parallel tests) never mix workers."""
    return ["--processes", str(count), "--master-bind-port", str(port), "--master-port", str(port)]


# Run where Locust runs (a lab's namespace): a free loopback port outside that
# namespace's ephemeral range, or 0 when the range leaves none
_MASTER_PORT_PROBE = r"""
import random, socket
lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
spans = [(a, b) for a, b in ((hi + 1, 65535), (1024, lo - 1)) if a <= b]
tries = [p for a, b in spans for p in random.sample(range(a, b + 1), min(32, b - a + 1))]
found = 0
for port in tries:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        found = port
        break
print(found)
"""


def master_port(placement: Placement) -> int:
    """The port Locust's master listens on for its ``--processes`` workers: outside the
    ephemeral range of the namespace the load runs in. Inside it, the master's
    listening socket would take one of the load's ports (connect() skips a port that
    has a bind owner): a lab of 100 ports made 99 connections before EADDRNOTAVAIL."""
    done = subprocess.run(
        [*placement.load, sys.executable, "-c", _MASTER_PORT_PROBE],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    port = int(done.stdout.strip() or 0) if done.returncode == 0 else 0
    if port:
        return port
    logger.warning(
        "no free port outside the ephemeral range for Locust's master: it takes one of"
        " the range's ports (%s)",
        (done.stderr.strip().splitlines() or ["the range spans 1024-65535"])[-1],
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
