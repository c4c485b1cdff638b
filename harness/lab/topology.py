"""``eph lab``: a scenario in throwaway network namespaces, its [kernel] applied there only.

In a fresh namespace the scenario's sysctls (a 100-port range, tw_reuse on or
off, ...) apply to this one run: exhaustion reproduces in seconds, and deleting
the namespace wipes its TIME_WAIT state. Nothing here writes a host sysctl.

Topologies:

- ``single``: one namespace; listener, Locust and collector talk over its
  loopback. Non-loopback ``source_addresses`` are added to its ``lo``.
- ``pair``: a client and a server namespace joined by a link
  (``harness.lab.link``: a veth pair, netem on it when impaired, or TUN devices
  and eph's userspace relay), a collector on each side, so client-side and
  server-side TIME_WAIT are seen apart.
- ``nat``: a client, a router and a server namespace; the router SNATs the clients'
  flows to ``[lab.nat]``'s pool (``harness.lab.nat_router``) and a NAT collector there
  records the pool's occupancy and conntrack's drops beside the two sides' own.

The orchestrator (``harness.run.lifecycle``) stays on the host; each child runs inside
its namespace through ``ip netns exec``, started by a supervisor so that it dies
with eph even on SIGKILL. Namespaces go on every exit path: success, error,
SIGINT/SIGTERM (the run stops, finalizes, then the ``with`` blocks delete them),
a crashed child. After a SIGKILL, the next eph command of any verb deletes them
(their names carry the pid of the eph that made them), or ``eph lab --cleanup``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from harness.errors import RunError, ScenarioError
from harness.kernel.netns import Namespace, netns_available, run_checked
from harness.kernel.sysctls import SYSCTLS
from harness.lab.link import (
    CLIENT_ADDRESS,
    SERVER_ADDRESS,
    add_sources,
    build_pair_link,
    netem_args,
)
from harness.lab.nat_router import (
    NAT_CLIENT_ADDRESS,
    NAT_SERVER_ADDRESS,
    build_nat,
    describe_pool,
    nat_ruleset,
    pool_arguments,
    router_sysctls,
)
from harness.run.lifecycle import ProgressSink, RunResult, run_scenario
from harness.run.placement import START_TIMEOUT, STOP_GRACE, Placement
from harness.rundir import RunDir
from harness.scenario import Scenario, Topology
from harness.summary import Summary
from harness.supervisor import Stage, Supervisor

__all__ = ["CLIENT_ADDRESS", "SERVER_ADDRESS", "build_lab", "lab_sysctls", "run_lab"]

logger = logging.getLogger(__name__)

_INSIDE = "EPH_LAB_INSIDE"  # set for the inner run of an unprivileged lab
USERNS = "EPH_LAB_USERNS"  # "1": an unnamed user namespace even as root (what non-root gets)
_SERVICE_STOP_GRACE = 10.0
_INNER_SLACK = 300.0  # seconds an unprivileged lab's inner run may take past its own bounds


def lab_sysctls(scenario: Scenario) -> dict[str, str]:
    """The scenario's [kernel] as sysctl name -> value text, in the kernel's units."""
    out: dict[str, str] = {}
    for key, value in scenario.kernel.in_kernel_units().items():
        text = " ".join(str(v) for v in value) if isinstance(value, list) else str(value)
        out[SYSCTLS[key].replace("/", ".")] = text
    return out


def run_lab(
    scenario: Scenario,
    *,
    out: Path | None = None,
    progress: ProgressSink | None = None,
    locust_args: Sequence[str] = (),
    on_preflight: Callable[[dict[str, Any]], None] | None = None,
    report: bool = True,
) -> RunResult:
    if scenario.listener is None:
        raise ScenarioError(
            "a lab serves its own target: the scenario needs a [listener]",
            key="listener",
            expected="a [listener] table",
        )
    inside = os.environ.get(_INSIDE) == "1"
    unprivileged = False if inside else _needs_user_namespace(scenario)
    run = RunDir.open(out, create=True) if out else RunDir.create(Path("reports"), scenario.name)
    if unprivileged:
        return _run_in_user_namespace(scenario, run, locust_args, report)
    if inside:
        return _run_here(
            scenario, run, lab_sysctls(scenario), progress, locust_args, on_preflight, report
        )
    with contextlib.ExitStack() as stack:
        # the supervisor closes before the namespaces go: their processes stop first
        scenario, placement = build_lab(stack, scenario, run)
        return run_scenario(
            scenario,
            out=run.path,
            progress=progress,
            locust_args=locust_args,
            placement=placement,
            on_preflight=on_preflight,
            report=report,
        )


def _needs_user_namespace(scenario: Scenario) -> bool:
    """Named namespaces (root) or an unnamed user namespace? Raise when neither is possible."""
    problem = netns_available()
    single = scenario.lab.topology is Topology.SINGLE
    wanted = os.environ.get(USERNS) == "1"
    if wanted and not single:
        raise RunError(
            f"{USERNS}=1 serves the single topology only (a pair needs named"
            " namespaces, which need root)"
        )
    if not (problem or wanted):
        return False
    if single and _userns():
        return True
    raise RunError(
        f"eph lab needs network namespaces: {problem}; or, for the single topology,"
        " unprivileged user namespaces (`unshare --user --map-root-user --net`), which"
        " this system does not allow. Without either, `eph run` runs on the host's"
        " loopback (host settings are read, never changed)."
    )


def build_lab(
    stack: contextlib.ExitStack, scenario: Scenario, run: RunDir
) -> tuple[Scenario, Placement]:
    """The topology's namespaces (deleted when ``stack`` closes) with their settings, link
    and service (stopped before that); ``lab.json`` says what was built."""
    client = stack.enter_context(Namespace("eph"))
    namespaces = [client]
    topology = scenario.lab.topology
    if topology is not Topology.SINGLE:
        namespaces.append(stack.enter_context(Namespace("eph")))
    if topology is Topology.NAT:
        namespaces.append(stack.enter_context(Namespace("eph")))
    children = stack.enter_context(Supervisor())
    inside_client = tuple(client.command([]))
    if topology is Topology.NAT:
        server, router = namespaces[1], namespaces[2]
        scenario = build_nat(client, router, server, scenario)
        link = "nat"
        inside_server = tuple(server.command([]))
        placement = Placement(
            load=inside_client,
            listener=inside_server,
            collectors=(("", inside_client), ("server", inside_server)),
            router=tuple(router.command([])),
            router_args=tuple(pool_arguments(scenario.lab.nat_pool)),
        )
    elif len(namespaces) == 2:
        server = namespaces[1]
        scenario, link = build_pair_link(children, client, server, scenario, run)
        inside_server = tuple(server.command([]))
        placement = Placement(
            load=inside_client,
            listener=inside_server,
            collectors=(("", inside_client), ("server", inside_server)),
        )
    else:
        add_sources(client, scenario.load.source_addresses, "lo")
        link = "loopback"
        placement = Placement(inside_client, inside_client, (("", inside_client),))
    for ns in namespaces[:2]:  # the client and the server: the router has its own
        for name, value in lab_sysctls(scenario).items():
            ns.set_sysctl(name, value)
    _write_lab_json(run, scenario, [ns.name for ns in namespaces], link)
    logger.info("lab %s: %s", scenario.lab.topology.value, ", ".join(n.name for n in namespaces))
    _start_service(children, scenario, run, placement.load)
    return scenario, placement


def _write_lab_json(run: RunDir, scenario: Scenario, namespaces: list[str], link: str) -> None:
    topology = scenario.lab.topology
    addresses: dict[str, Any] = {}
    if topology is Topology.PAIR:
        addresses = {"client": CLIENT_ADDRESS, "server": SERVER_ADDRESS}
    elif topology is Topology.NAT:
        addresses = {"client": NAT_CLIENT_ADDRESS, "server": NAT_SERVER_ADDRESS}
    lab: dict[str, Any] = {
        "topology": topology.value,
        "namespaces": namespaces,
        "sysctls": lab_sysctls(scenario),
        "addresses": addresses,
        "emulation": link,
        "netem": netem_args(scenario) if link == "netem" else [],
    }
    if topology is Topology.NAT:
        nat = scenario.lab.nat_pool
        lab["nat"] = {
            "ruleset": nat_ruleset(nat),
            "router_sysctls": router_sysctls(nat),
            "pool": describe_pool(nat),
        }
    run.write_json("lab.json", lab)


def _userns() -> bool:
    """Whether this user may make a user + network namespace (no root needed)."""
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--user", "--map-root-user", "--net", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def _run_in_user_namespace(
    scenario: Scenario, run: RunDir, locust_args: Sequence[str], report: bool = True
) -> RunResult:
    """Without root: the same lab again, inside ``unshare --user --map-root-user --net``.

    That namespace has no name and ends with its last process, so nothing can be
    left behind: the inner run dies with this one (a supervisor's child), and its
    own children with it. SIGINT and SIGTERM are passed on to it; it stops, keeps
    its data and exits, and so does this process.
    """
    resolved = run.path / "lab-scenario.json"
    resolved.write_text(json.dumps(scenario.to_json()))
    args = ["unshare", "--user", "--map-root-user", "--net", "--", sys.executable, "-m"]
    args += ["harness", "lab", str(resolved), "--out", str(run.path), "--in-run"]
    args += [] if report else ["--no-report"]
    if locust_args:
        args += ["--", *locust_args]
    logger.info("not root: running the lab in an unprivileged user namespace")
    load = scenario.load
    bound = scenario.duration + START_TIMEOUT + load.connect_timeout + load.io_timeout
    bound += load.hold + STOP_GRACE + _INNER_SLACK
    with Supervisor() as children, _passing_signals_on() as forward:
        # its own process group: a Ctrl-C reaches it once, passed on from here
        inner = children.start(
            "lab (user namespace)", args, stage=Stage.LOAD, env={**os.environ, _INSIDE: "1"}
        )
        forward.append(inner.pid)
        try:
            code = inner.proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            raise RunError(f"the lab's inner run took over {bound:.0f} s, its bound") from None
    if code != 0:
        raise RunError(f"the lab's inner run (in a user namespace) exited with code {code}")
    return RunResult(run.path, Summary.load(run.summary))


@contextlib.contextmanager
def _passing_signals_on() -> Iterator[list[int]]:
    """SIGINT and SIGTERM go to the pids in the yielded list instead of this process."""
    pids: list[int] = []

    def forward(signum: int, frame: object) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield pids
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_here(
    scenario: Scenario,
    run: RunDir,
    sysctls: dict[str, str],
    progress: ProgressSink | None,
    locust_args: Sequence[str],
    on_preflight: Callable[[dict[str, Any]], None] | None = None,
    report: bool = True,
) -> RunResult:
    """Inside a fresh (user) network namespace already: set it up in place and run."""
    run_checked(["ip", "link", "set", "lo", "up"])
    for name, value in sysctls.items():
        Path("/proc/sys", *name.split(".")).write_text(f"{value}\n")
    for source in scenario.load.source_addresses:
        address = ipaddress.ip_address(source)
        if not address.is_loopback:
            run_checked(["ip", "addr", "add", f"{source}/{address.max_prefixlen}", "dev", "lo"])
    run.write_json(
        "lab.json",
        {
            "topology": "single",
            "namespaces": ["(unnamed, user namespace)"],
            "sysctls": sysctls,
            "addresses": {},
            "emulation": "loopback",
            "netem": [],
        },
    )
    with Supervisor() as children:
        _start_service(children, scenario, run, ())
        return run_scenario(
            scenario,
            out=run.path,
            progress=progress,
            locust_args=locust_args,
            report=report,
            on_preflight=on_preflight,
        )


def _start_service(
    children: Supervisor, scenario: Scenario, run: RunDir, prefix: Sequence[str]
) -> None:
    """``[lab] service_port``: the stand-in service beside the clients, for the run."""
    port = scenario.lab.service_port
    if port is None:
        return
    args = [*prefix, sys.executable, "-m", "harness.target.service", "--port", str(port)]
    args += ["--run-dir", str(run.path), "--restart-at", f"{scenario.lab.service_restart:g}"]
    args += ["--until", f"{scenario.duration:g}"]
    with open(run.logs / "service.log", "ab") as log:
        service = children.start(
            "service",
            args,
            stage=Stage.TARGET,
            grace=_SERVICE_STOP_GRACE,
            death_signal=signal.SIGTERM,  # it writes service.json, then exits
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert service.proc.stdout is not None
    if b'"listening"' not in service.proc.stdout.readline():
        raise RunError(
            f"the lab's service could not listen on port {port}: see {run.logs}/service.log"
        )
