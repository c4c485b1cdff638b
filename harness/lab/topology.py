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
  apart. ``[lab] delay``/``jitter``/``loss`` put netem on both ends of the link,
  or, where the kernel has no netem (``emulation = "auto"``) or when asked
  (``"relay"``), replace the veth pair with a TUN device on each side and
  ``harness.lab.relay``, a userspace process that delays and drops packets.

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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from harness.endpoints import Endpoint
from harness.errors import RunError, ScenarioError
from harness.kernel.netns import Namespace, netns_available, run_checked
from harness.kernel.sysctls import SYSCTLS
from harness.report.model import Summary
from harness.run import Placement, ProgressSink, RunResult, run_scenario
from harness.rundir import RunDir
from harness.scenario import Emulation, Scenario, Topology

__all__ = ["CLIENT_ADDRESS", "SERVER_ADDRESS", "lab_sysctls", "run_lab"]

logger = logging.getLogger(__name__)

CLIENT_ADDRESS = "198.18.0.1"
SERVER_ADDRESS = "198.18.0.2"
_PREFIX_LENGTH = 24
_VETH = "eph0"  # the same name in each namespace: names are per namespace
_INSIDE = "EPH_LAB_INSIDE"  # set for the inner run of an unprivileged lab
_RELAY_GRACE = 300.0  # seconds the relay outlives the run's duration at most (ramp, drain)
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
    on_preflight: Callable[[dict[str, Any]], None] | None = None,
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
        return _run_here(scenario, run, lab_sysctls(scenario), progress, locust_args, on_preflight)
    with contextlib.ExitStack() as stack:
        scenario, placement, namespaces, link = _build(stack, scenario, run)
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
                "emulation": link,
                "netem": _netem_args(scenario) if link == "netem" else [],
            },
        )
        logger.info(
            "lab %s: %s", scenario.lab.topology.value, ", ".join(n.name for n in namespaces)
        )
        stack.enter_context(_service(scenario, run, placement.load))
        return run_scenario(
            scenario,
            out=run.path,
            progress=progress,
            locust_args=locust_args,
            placement=placement,
            on_preflight=on_preflight,
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
    stack: contextlib.ExitStack, scenario: Scenario, run: RunDir
) -> tuple[Scenario, Placement, list[Namespace], str]:
    """The namespaces of the scenario's topology (deleted when ``stack`` closes), and
    what makes the pair's link: "veth", "netem" or "relay"."""
    client = stack.enter_context(Namespace("eph"))
    inside_client = tuple(client.command([]))
    if scenario.lab.topology is Topology.PAIR:
        server = stack.enter_context(Namespace("eph"))
        link = _link_kind(scenario, client)
        if link == "relay":
            _build_tun_link(stack, client, server, scenario, run)
        else:
            _build_veth_link(client, server, scenario)
        scenario = _route_pair(client, server, scenario)
        inside_server = tuple(server.command([]))
        placement = Placement(
            load=inside_client,
            listener=inside_server,
            collectors=(("", inside_client), ("server", inside_server)),
        )
        return scenario, placement, [client, server], link
    _add_sources(client, scenario.load.source_addresses, "lo")
    placement = Placement(
        load=inside_client, listener=inside_client, collectors=(("", inside_client),)
    )
    return scenario, placement, [client], "loopback"


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
    return RunResult(run.path, Summary.load(run.summary))


def _run_here(
    scenario: Scenario,
    run: RunDir,
    sysctls: dict[str, str],
    progress: ProgressSink | None,
    locust_args: Sequence[str],
    on_preflight: Callable[[dict[str, Any]], None] | None = None,
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
    with _service(scenario, run, ()):
        return run_scenario(
            scenario,
            out=run.path,
            progress=progress,
            locust_args=locust_args,
            on_preflight=on_preflight,
        )


@contextlib.contextmanager
def _service(scenario: Scenario, run: RunDir, prefix: Sequence[str]) -> Iterator[None]:
    """``[lab] service_port``: the stand-in service beside the clients, for the run."""
    port = scenario.lab.service_port
    if port is None:
        yield
        return
    args = [
        *prefix,
        sys.executable,
        "-m",
        "harness.target.service",
        "--port",
        str(port),
        "--run-dir",
        str(run.path),
        "--restart-at",
        f"{scenario.lab.service_restart:g}",
        "--until",
        f"{scenario.duration:g}",
    ]
    with open(run.logs / "service.log", "ab") as log:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log)
    try:
        assert proc.stdout is not None
        if b'"listening"' not in proc.stdout.readline():
            raise RunError(
                f"the lab's service could not listen on port {port}: see {run.logs}/service.log"
            )
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _link_kind(scenario: Scenario, client: Namespace) -> str:
    lab = scenario.lab
    if not lab.impaired:
        return "veth"
    if lab.emulation is Emulation.RELAY:
        return "relay"
    if lab.emulation is Emulation.NETEM or _has_netem(client):
        return "netem"
    logger.info("this kernel has no netem: the pair's link is eph's userspace relay")
    return "relay"


def _has_netem(ns: Namespace) -> bool:
    """Probe on the namespace's own lo: add a netem qdisc, then remove it."""
    probe = ["tc", "-n", ns.name, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
    if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
        return False
    run_checked(["tc", "-n", ns.name, "qdisc", "del", "dev", "lo", "root"])
    return True


def _build_veth_link(client: Namespace, server: Namespace, scenario: Scenario) -> None:
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


def _build_tun_link(
    stack: contextlib.ExitStack,
    client: Namespace,
    server: Namespace,
    scenario: Scenario,
    run: RunDir,
) -> None:
    """A TUN device on each side and the relay between them (stopped when ``stack`` closes)."""
    for ns, address in ((client, CLIENT_ADDRESS), (server, SERVER_ADDRESS)):
        _ip("-n", ns.name, "tuntap", "add", "dev", _VETH, "mode", "tun")
        _ip("-n", ns.name, "addr", "add", f"{address}/{_PREFIX_LENGTH}", "dev", _VETH)
        _ip("-n", ns.name, "link", "set", _VETH, "up")
    lab = scenario.lab
    args = [
        sys.executable,
        "-m",
        "harness.lab.relay",
        client.name,
        server.name,
        "--device",
        _VETH,
        "--delay",
        str(lab.delay),
        "--jitter",
        str(lab.jitter),
        "--loss",
        str(lab.loss),
        "--max-seconds",
        str(scenario.duration + _RELAY_GRACE),
        "--stats",
        str(run.path / "relay.json"),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stack.callback(_stop_relay, proc)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.wait(timeout=10)
        assert proc.stderr is not None
        raise RunError(f"the lab's packet relay did not start: {proc.stderr.read().strip()}")


def _stop_relay(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _route_pair(client: Namespace, server: Namespace, scenario: Scenario) -> Scenario:
    """Extra source addresses on the client, routes back to them on the server, and the
    targets moved to the server's address (ports kept)."""
    sources = scenario.load.source_addresses
    _add_sources(client, sources, _VETH)
    for source in sources:  # the server answers them through the client
        if ipaddress.ip_address(source) not in ipaddress.ip_network(
            f"{CLIENT_ADDRESS}/24", strict=False
        ):
            _ip("-n", server.name, "route", "add", f"{source}/32", "via", CLIENT_ADDRESS)
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
            '[lab] emulation = "netem" needs the kernel\'s netem qdisc'
            " (CONFIG_NET_SCH_NETEM), which this kernel does not have; use"
            ' emulation = "auto" or "relay" (eph\'s userspace relay) instead'
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
