"""``eph lab``: a scenario in throwaway network namespaces, its [kernel] applied there only.

In a fresh namespace the scenario's sysctls (a 100-port range, tw_reuse on or
off, ...) apply to this one run: exhaustion reproduces in seconds, and deleting
the namespace wipes its TIME_WAIT state. Nothing here writes a host sysctl.

Topologies:

- ``single``: one namespace; listener, Locust and collector talk over its
  loopback. Non-loopback ``source_addresses`` are added to its ``lo``.
- ``pair``: a client and a server namespace joined by a veth pair
  (client 198.18.0.1, server 198.18.0.2: the RFC 2544 benchmarking range), a
  collector on each side, so client-side and server-side TIME_WAIT are seen
  apart; ``[lab] delay``/``jitter``/``loss`` put netem on both ends of the link.

The orchestrator (``harness.run``) stays on the host; each child runs inside
its namespace through ``ip netns exec``. Namespaces go on every exit path:
success, error, SIGINT/SIGTERM (the run stops, finalizes, then the ``with``
blocks delete them), a crashed child.
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
from collections.abc import Sequence
from pathlib import Path

from harness.endpoints import Endpoint
from harness.errors import RunError, ScenarioError
from harness.kernel import SYSCTLS
from harness.netns import Namespace, netns_available, run_checked
from harness.run import Placement, ProgressSink, RunResult, run_scenario
from harness.rundir import RunDir
from harness.scenario import Scenario, Topology

__all__ = ["CLIENT_ADDRESS", "SERVER_ADDRESS", "lab_sysctls", "run_lab"]

logger = logging.getLogger(__name__)

CLIENT_ADDRESS = "198.18.0.1"
SERVER_ADDRESS = "198.18.0.2"
_PREFIX_LENGTH = 24
_VETH = "eph0"  # the same name in each namespace: names are per namespace
_INSIDE = "EPH_LAB_INSIDE"  # set for the inner run of an unprivileged lab
USERNS = "EPH_LAB_USERNS"  # "1": an unnamed user namespace even as root (what non-root gets)


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
        return _run_in_user_namespace(scenario, run, locust_args)
    if inside:
        return _run_here(scenario, run, lab_sysctls(scenario), progress, locust_args)
    with contextlib.ExitStack() as stack:
        scenario, placement, namespaces = _build(stack, scenario)
        for ns in namespaces:
            for name, value in lab_sysctls(scenario).items():
                ns.set_sysctl(name, value)
        pair = scenario.lab.topology is Topology.PAIR
        run.write_json(
            "lab.json",
            {
                "topology": scenario.lab.topology.value,
                "namespaces": [ns.name for ns in namespaces],
                "sysctls": lab_sysctls(scenario),
                "addresses": {"client": CLIENT_ADDRESS, "server": SERVER_ADDRESS} if pair else {},
                "netem": _netem_args(scenario),
            },
        )
        logger.info(
            "lab %s: %s", scenario.lab.topology.value, ", ".join(n.name for n in namespaces)
        )
        return run_scenario(
            scenario, out=run.path, progress=progress, locust_args=locust_args, placement=placement
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


def _build(
    stack: contextlib.ExitStack, scenario: Scenario
) -> tuple[Scenario, Placement, list[Namespace]]:
    """The namespaces of the scenario's topology (deleted when ``stack`` closes)."""
    client = stack.enter_context(Namespace("eph"))
    inside_client = tuple(client.command([]))
    if scenario.lab.topology is Topology.PAIR:
        server = stack.enter_context(Namespace("eph"))
        scenario = _build_pair(client, server, scenario)
        inside_server = tuple(server.command([]))
        placement = Placement(
            load=inside_client,
            listener=inside_server,
            collectors=(("", inside_client), ("server", inside_server)),
        )
        return scenario, placement, [client, server]
    _add_sources(client, scenario.load.source_addresses, "lo")
    placement = Placement(
        load=inside_client, listener=inside_client, collectors=(("", inside_client),)
    )
    return scenario, placement, [client]


def _userns() -> bool:
    """Whether this user may make a user + network namespace (no root needed)."""
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--user", "--map-root-user", "--net", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def _run_in_user_namespace(
    scenario: Scenario, run: RunDir, locust_args: Sequence[str]
) -> RunResult:
    """Without root: the same lab again, inside ``unshare --user --map-root-user --net``.

    That namespace has no name and ends with its last process, so nothing can be
    left behind. SIGINT reaches the inner run (same process group); SIGTERM is
    passed on to it.
    """
    resolved = run.path / "lab-scenario.json"
    resolved.write_text(json.dumps(scenario.to_json()))
    args = [
        "unshare",
        "--user",
        "--map-root-user",
        "--net",
        "--",
        sys.executable,
        "-m",
        "harness",
        "lab",
        str(resolved),
        "--out",
        str(run.path),
    ]
    if locust_args:
        args += ["--", *locust_args]
    logger.info("not root: running the lab in an unprivileged user namespace")
    proc = subprocess.Popen(args, env={**os.environ, _INSIDE: "1"})
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code != 0:
        raise RunError(f"the lab's inner run (in a user namespace) exited with code {code}")
    return RunResult(run.path, run.read_json("summary.json"))


def _run_here(
    scenario: Scenario,
    run: RunDir,
    sysctls: dict[str, str],
    progress: ProgressSink | None,
    locust_args: Sequence[str],
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
            "netem": [],
        },
    )
    return run_scenario(scenario, out=run.path, progress=progress, locust_args=locust_args)


def _build_pair(client: Namespace, server: Namespace, scenario: Scenario) -> Scenario:
    _ip(
        "link",
        "add",
        _VETH,
        "netns",
        client.name,
        "type",
        "veth",
        "peer",
        "name",
        _VETH,
        "netns",
        server.name,
    )
    for ns, address in ((client, CLIENT_ADDRESS), (server, SERVER_ADDRESS)):
        _ip("-n", ns.name, "addr", "add", f"{address}/{_PREFIX_LENGTH}", "dev", _VETH)
        _ip("-n", ns.name, "link", "set", _VETH, "up")
        netem = _netem_args(scenario)
        if netem:
            _add_netem(ns, netem)
    sources = scenario.load.source_addresses
    _add_sources(client, sources, _VETH)
    for source in sources:  # the server answers them through the client
        if ipaddress.ip_address(source) not in ipaddress.ip_network(
            f"{CLIENT_ADDRESS}/24", strict=False
        ):
            _ip("-n", server.name, "route", "add", f"{source}/32", "via", CLIENT_ADDRESS)
    # the server listens on its veth address; targets keep their ports
    endpoints = []
    for endpoint in scenario.target.endpoints:
        if endpoint.is_ipv6:
            raise ScenarioError(
                "the pair topology is IPv4 only", key="target.endpoints", value=str(endpoint)
            )
        endpoints.append(Endpoint(SERVER_ADDRESS, endpoint.port))
    return scenario.with_endpoints(endpoints)


def _netem_args(scenario: Scenario) -> list[str]:
    """netem for one end of the link: half the round trip each way; loss each way."""
    lab = scenario.lab
    args: list[str] = []
    if lab.delay or lab.jitter:
        args += ["delay", f"{lab.delay * 1000 / 2:g}ms"]
        if lab.jitter:
            args += [f"{lab.jitter * 1000 / 2:g}ms"]
    if lab.loss:
        args += ["loss", f"{lab.loss:g}%"]
    return args


def _add_netem(ns: Namespace, netem: list[str]) -> None:
    args = ["tc", "-n", ns.name, "qdisc", "add", "dev", _VETH, "root", "netem", *netem]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return
    if "unknown" in result.stderr.lower():
        raise RunError(
            "[lab] delay, jitter and loss need the kernel's netem qdisc"
            " (CONFIG_NET_SCH_NETEM), which this kernel does not have; run without them"
            " (--set lab.delay=0ms) or on a kernel built with netem"
        )
    raise RunError(f"{' '.join(args)}: {result.stderr.strip()}")


def _add_sources(ns: Namespace, sources: Sequence[str], device: str) -> None:
    for source in sources:
        address = ipaddress.ip_address(source)
        if address.is_loopback and device == "lo":
            continue  # 127.0.0.0/8 and ::1 are already local on lo
        ns.add_address(f"{source}/{address.max_prefixlen}", device)


def _ip(*args: str) -> None:
    run_checked(["ip", *args])
