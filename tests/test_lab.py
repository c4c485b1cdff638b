"""``eph lab``: the kernel's real behaviour in throwaway namespaces, and their cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from .conftest import EPH, ROOT, eph, lab_under_way, run_dir_summary, write_scenario
from .unprivileged import eph_as_nobody

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

RANGE_100 = "ip_local_port_range = [40000, 40099]"


def _lab(
    tmp_path: Path,
    *,
    load: str = "",
    kernel: str = RANGE_100,
    lab: str = "",
    endpoints: str = '["127.0.0.1:9000"]',
    duration: str = "1500ms",
    connect_timeout: str = "1s",
) -> dict:  # type: ignore[type-arg]
    scenario = write_scenario(
        tmp_path / "lab.toml",
        f"""
name = "lab-test"
description = "test"
duration = "{duration}"
[target]
endpoints = {endpoints}
[listener]
[load]
users = 10
spawn_rate = 100
backoff = "20ms"
connect_timeout = "{connect_timeout}"
io_timeout = "1s"
{load}
[kernel]
tcp_tw_reuse = 0
{kernel}
[lab]
{lab}
""",
    )
    out = tmp_path / "run"
    host_before = _host_sysctls()
    result = eph(["lab", str(scenario), "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _host_sysctls() == host_before, "a lab writes only its own namespace's settings"
    summary = run_dir_summary(out)
    assert summary["kernel"]["netns"] != _host_netns(), "the run happened in the lab"
    assert summary["conservation"]["ok"] is True, summary["conservation"]
    # the kernel's own count: one SYN per attempt that did not fail for want of a port
    assert summary["conservation"]["attempts_match_kernel"] is True, summary["conservation"]
    return summary


def _host_sysctls() -> dict[str, str]:
    keys = ("ip_local_port_range", "ip_local_reserved_ports", "tcp_tw_reuse", "tcp_timestamps")
    return {key: Path("/proc/sys/net/ipv4", key).read_text() for key in keys}


def _host_netns() -> str:
    return os.readlink("/proc/self/ns/net").rsplit("/", 1)[-1]


def _eph_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith("eph-")]


def _left_behind(before: set[str]) -> list[str]:
    """Namespaces made since ``before`` whose maker is gone: left behind. (One whose
    maker still runs is another eph's, running beside this test: not ours to judge.)"""
    return [n for n in set(_eph_namespaces()) - before if not _alive(int(n.split("-")[1]))]


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_a_100_port_range_gives_100_connections(tmp_path: Path) -> None:
    summary = _lab(tmp_path)
    assert 100 <= summary["connections"]["succeeded"] <= 110  # see test_run_e2e: tuple race
    assert summary["ports"]["distinct_used"] == 100
    assert summary["exhaustion"]["exhausted"] is True
    assert summary["kernel"]["ip_local_port_range"] == [40000, 40099]
    assert summary["kernel"]["tcp_tw_reuse"] == 0
    # out of ports, each of the 10 users pauses 20 ms after a failed connect: at most
    # ~500 failures/s, where a spinning user would make tens of thousands
    failed_per_s = summary["connections"]["failed"] / summary["duration_s"]
    assert failed_per_s <= 10 / 0.020 * 1.2, failed_per_s


def test_reserved_ports_shrink_the_range(tmp_path: Path) -> None:
    summary = _lab(tmp_path, kernel=RANGE_100 + '\nip_local_reserved_ports = "40000-40009"')
    assert summary["ports"]["distinct_used"] == 90
    assert summary["capacity"]["model_ports"] == 90
    assert summary["exhaustion"]["exhausted"] is True


def test_each_destination_gets_the_whole_range(tmp_path: Path) -> None:
    summary = _lab(tmp_path, endpoints='["127.0.0.1:9000", "127.0.0.1:9001"]')
    # exactly 200 4-tuples; successes may exceed by a few (the kernel's just-closed reuse)
    assert summary["tuples"]["distinct"] == 200
    assert summary["connections"]["succeeded"] >= 200
    assert summary["capacity"]["model_ports"] == 200


def test_source_addresses_multiply_it(tmp_path: Path) -> None:
    summary = _lab(tmp_path, load='source_addresses = ["127.0.0.2", "127.0.0.3"]')
    assert summary["tuples"]["distinct"] == 200
    assert summary["connections"]["succeeded"] >= 200
    assert summary["capacity"]["model_ports"] == 200


@pytest.mark.parametrize("close", ["server", "reset"])
def test_server_first_or_reset_close_never_exhausts(tmp_path: Path, close: str) -> None:
    summary = _lab(tmp_path, load=f'close = "{close}"')
    assert summary["connections"]["failed"] == 0
    assert summary["connections"]["succeeded"] > 500  # far past the 100 ports
    assert summary["exhaustion"]["exhausted"] is False
    capacity = summary["capacity"]
    # no TIME_WAIT on the client: only each connection's ~1 ms lifetime holds a port
    assert capacity["model_hold_s"] is None
    # far above what was measured, or None: a lifetime-only bound above a million
    # connects/s is no limit (the Locust engine's ~86 µs lifetime over 100 ports is one)
    limit = capacity["model_max_rate_per_s"]
    assert limit is None or limit > 10 * capacity["measured_rate_per_s"]


@pytest.mark.serial  # the rate the machine reaches
def test_with_reuse_the_rate_sits_at_range_over_delay(tmp_path: Path) -> None:
    summary = _lab_with(tmp_path, RANGE_100 + '\ntcp_tw_reuse_delay = "200ms"', tw_reuse=1)
    capacity = summary["capacity"]
    # 100 ports / (200 ms delay + the connections' own ~1 ms lifetime)
    assert capacity["model_max_rate_per_s"] == pytest.approx(500.0, rel=0.02)
    assert capacity["measured_rate_per_s"] == pytest.approx(500.0, rel=0.15)  # incl. the fill
    model = capacity["model_max_rate_per_s"]
    assert capacity["measured_sustained_rate_per_s"] == pytest.approx(model, rel=0.05)


def _lab_with(tmp_path: Path, kernel: str, tw_reuse: int) -> dict:  # type: ignore[type-arg]
    scenario = write_scenario(
        tmp_path / "reuse.toml",
        f"""
name = "lab-reuse"
duration = "3s"
[target]
endpoints = ["127.0.0.1:9000"]
[listener]
[load]
users = 10
backoff = "5ms"
[kernel]
tcp_tw_reuse = {tw_reuse}
{kernel}
""",
    )
    out = tmp_path / "run"
    result = eph(["lab", str(scenario), "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir_summary(out)


@pytest.mark.parametrize(("close", "client_side"), [("client", True), ("server", False)])
def test_pair_shows_time_wait_on_the_side_that_closed_first(
    tmp_path: Path, close: str, client_side: bool
) -> None:
    summary = _lab(
        tmp_path, load=f'close = "{close}"\nrate = 200', lab='topology = "pair"', kernel=""
    )
    succeeded = summary["connections"]["succeeded"]
    client_tw, server_tw = summary["time_wait"]["peak"], summary["time_wait"]["server_peak"]
    assert succeeded > 200
    if client_side:
        assert client_tw >= 0.9 * succeeded and server_tw == 0, summary["time_wait"]
    else:
        assert server_tw >= 0.9 * succeeded and client_tw == 0, summary["time_wait"]
    assert json.loads((tmp_path / "run" / "lab.json").read_text())["topology"] == "pair"


def _kernel_has_netem() -> bool:
    config = Path("/proc/config.gz")
    if not config.exists():
        return True  # assume so; the test then says otherwise
    text = subprocess.run(["zcat", str(config)], capture_output=True, check=True).stdout
    return b"CONFIG_NET_SCH_NETEM=" in text


def _pair_with(tmp_path: Path, lab: str, duration: str = "1500ms") -> tuple[dict, dict]:  # type: ignore[type-arg]
    summary = _lab(
        tmp_path,
        kernel="",
        load="rate = 50",
        connect_timeout="5s",
        lab=f'topology = "pair"\n{lab}',
        duration=duration,
    )
    lab_json = json.loads((tmp_path / "run" / "lab.json").read_text())
    # the pair's two namespaces, named in lab.json, are gone with the lab
    assert not set(lab_json["namespaces"]) & set(_eph_namespaces())
    return summary, lab_json


@pytest.mark.parametrize("emulation", ["relay", "auto"])
def test_link_delay_shows_in_connect_latency(tmp_path: Path, emulation: str) -> None:
    """A 40 ms round trip on the pair's link: connect() takes one round trip."""
    summary, lab = _pair_with(tmp_path, f'delay = "40ms"\nemulation = "{emulation}"')
    expected = "relay" if emulation == "relay" or not _kernel_has_netem() else "netem"
    assert lab["emulation"] == expected
    connect = summary["connections"]["connect_ms"]
    assert 39 <= connect["p50"] <= 60, connect
    if expected == "relay":
        relay = json.loads((tmp_path / "run" / "relay.json").read_text())
        # each connection crosses the link at least 3 times (SYN, SYN-ACK, ACK)
        assert relay["forwarded"] >= 3 * summary["connections"]["succeeded"], relay
        assert relay["dropped"] == 0


def test_link_loss_costs_syn_retransmits(tmp_path: Path) -> None:
    """30% loss each way: about half the handshakes lose a SYN or SYN-ACK and wait
    out the kernel's 1 s initial retransmission timeout."""
    summary, _ = _pair_with(tmp_path, 'loss = 30.0\nemulation = "relay"', duration="2s")
    relay = json.loads((tmp_path / "run" / "relay.json").read_text())
    assert 0.2 <= relay["dropped"] / (relay["dropped"] + relay["forwarded"]) <= 0.4, relay
    assert summary["connections"]["connect_ms"]["p90"] >= 1000, summary["connections"]


NETEM_SCENARIO = """
name = "rtt"
duration = "1s"
[target]
endpoints = ["127.0.0.1:9000"]
[listener]
[load]
users = 5
rate = 50
[lab]
topology = "pair"
delay = "40ms"
emulation = "netem"
"""


def test_netem_delays_connects_when_asked(tmp_path: Path) -> None:
    """The kernel's own qdisc, where this kernel has it: a 40 ms round trip shows in
    every connect. Without netem this is skipped, and said: the relay stands in for
    it (the tests above), and the refusal is the next test's."""
    if not _kernel_has_netem():
        pytest.skip("this kernel has no netem (CONFIG_NET_SCH_NETEM): the relay stands in")
    before = set(_eph_namespaces())
    scenario = write_scenario(tmp_path / "rtt.toml", NETEM_SCENARIO)
    result = eph(["lab", str(scenario), "--out", str(tmp_path / "run")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert run_dir_summary(tmp_path / "run")["connections"]["connect_ms"]["p50"] >= 38
    assert _left_behind(before) == []


def test_netem_asked_of_a_kernel_without_it_is_refused_clearly(tmp_path: Path) -> None:
    if _kernel_has_netem():
        pytest.skip("this kernel has netem: nothing to refuse (the previous test uses it)")
    before = set(_eph_namespaces())
    scenario = write_scenario(tmp_path / "rtt.toml", NETEM_SCENARIO)
    result = eph(["lab", str(scenario), "--out", str(tmp_path / "run")], cwd=tmp_path)
    assert result.returncode == 2
    assert "CONFIG_NET_SCH_NETEM" in result.stderr and "Traceback" not in result.stderr
    assert _left_behind(before) == []


def test_sigint_stops_the_run_keeps_the_data_and_removes_the_namespace(tmp_path: Path) -> None:
    scenario = write_scenario(
        tmp_path / "long.toml",
        """
name = "long"
duration = "60s"
[target]
endpoints = ["127.0.0.1:9000"]
[listener]
[load]
users = 5
rate = 200
""",
    )
    out = tmp_path / "run"
    proc = lab_under_way(scenario, out)
    namespaces = json.loads((out / "lab.json").read_text())["namespaces"]
    assert set(namespaces) <= set(_eph_namespaces())
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    summary = run_dir_summary(out)
    assert summary["interrupted"] is True
    assert summary["connections"]["succeeded"] > 50
    assert (out / "report.html").exists()
    assert not set(namespaces) & set(_eph_namespaces())


def test_without_privilege_or_user_namespaces_the_message_says_what_is_needed() -> None:
    scenario = ROOT / "scenarios" / "exhaust-small-range.toml"
    # not root, and no unshare on PATH: neither kind of namespace can be made
    result = eph_as_nobody(
        ["lab", str(scenario), "--out", "/tmp/never"],
        root=ROOT,
        cwd=ROOT,
        env={"PATH": "/nonexistent", "MPLCONFIGDIR": "/tmp"},
    )
    assert result.returncode == 2, result.stderr
    assert "needs network namespaces" in result.stderr and "root" in result.stderr
    assert "unshare --user --map-root-user --net" in result.stderr
    assert "Traceback" not in result.stderr


def test_unprivileged_user_namespace_lab_applies_settings_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """What a non-root user gets (forced here with EPH_LAB_USERNS=1): an unnamed user +
    network namespace, its sysctls set from inside, gone with its last process."""
    before = set(_eph_namespaces())
    scenario = ROOT / "scenarios" / "exhaust-small-range.toml"
    out = tmp_path / "run"
    result = subprocess.run(
        [*EPH, "lab", str(scenario), "--set", "duration=1500ms", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), "EPH_LAB_USERNS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = run_dir_summary(out)
    assert summary["kernel"]["ip_local_port_range"] == [40000, 40099]
    assert summary["kernel"]["netns"] != _host_netns()
    assert summary["tuples"]["distinct"] == 100
    assert summary["exhaustion"]["exhausted"] is True
    assert json.loads((out / "lab.json").read_text())["namespaces"] == ["(unnamed, user namespace)"]
    assert _left_behind(before) == []  # none made (and stale ones may be swept)


@pytest.mark.parametrize("engine", ["locust", "uvloop"])
def test_socket_port_range_narrows_the_range_per_socket(tmp_path: Path, engine: str) -> None:
    summary = _lab(
        tmp_path, kernel="", load=f'engine = "{engine}"\nsocket_port_range = [40000, 40049]'
    )
    assert summary["tuples"]["distinct"] == 50
    assert summary["capacity"]["model_ports"] == 50
    assert summary["ports"]["range"] == [32768, 60999]  # the namespace's own, untouched
