"""The NAT model: its formulas on hand-worked cases, its levers, and eph plan --nat."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.capacity.levers import Lever
from harness.capacity.nat_model import (
    CONNTRACK_TIME_WAIT_S,
    NatCapacityModel,
    make_nat_plan,
    nat_levers,
    render_nat_text,
)
from harness.cli import cli
from harness.scenario import parse_scenario

from .conftest import eph

# 100 ports on one address, 10 ms flows, a 2 s TIME_WAIT the NAT holds:
# 100 / (0.01 + 2) = 49.75 new connections/s
SMALL = NatCapacityModel(ports=100, lifetime_s=0.01, time_wait_s=2.0)


def test_the_pool_is_ports_times_addresses_per_destination() -> None:
    model = replace(SMALL, addresses=3, destinations=4)
    assert model.pool == 300
    assert model.concurrent_limit == 1200


def test_a_held_time_wait_keeps_each_port_for_lifetime_plus_the_hold() -> None:
    assert SMALL.busy_s == pytest.approx(2.01)
    assert SMALL.max_rate_per_s == pytest.approx(49.75, abs=0.01)


def test_above_the_maximum_the_pool_fills_after_pool_over_rate() -> None:
    assert SMALL.time_to_exhaustion_s(100.0) == pytest.approx(1.0)
    assert SMALL.time_to_exhaustion_s(49.0) is None
    # two destinations: each gets half the rate and its own pool of 100
    assert replace(SMALL, destinations=2).time_to_exhaustion_s(400.0) == pytest.approx(0.5)


def test_a_linux_nat_that_evicts_closing_entries_is_held_by_live_flows_only() -> None:
    linux = replace(SMALL, holds_time_wait=False)
    assert linux.hold_s == 0 and linux.busy_s == pytest.approx(0.01)
    assert linux.max_rate_per_s == pytest.approx(10_000.0)
    assert linux.time_to_exhaustion_s(100.0) is None


def test_nothing_holding_a_port_is_no_nat_limit() -> None:
    model = NatCapacityModel(ports=10, holds_time_wait=False)
    assert model.max_rate_per_s is None and model.time_to_exhaustion_s(1e9) is None


def test_pooling_divides_the_connection_rate() -> None:
    pooled = replace(SMALL, requests_per_connection=5)
    assert pooled.connection_rate(100.0) == pytest.approx(20.0)
    assert pooled.max_rate_per_s == pytest.approx(49.75, abs=0.01)  # connections/s
    assert pooled.max_request_rate_per_s == pytest.approx(5 * 49.75, abs=0.05)
    assert pooled.time_to_exhaustion_s(100.0) is None
    assert pooled.time_to_exhaustion_s(500.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("ports", 0), ("addresses", -1), ("destinations", 1.5), ("lifetime_s", -1.0)],
)
def test_bad_inputs_say_which_and_what_was_expected(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{field} = .*expected"):
        replace(SMALL, **{field: value})


def _levers(model: NatCapacityModel, goal: float) -> dict[str, Lever]:
    return {lever.name: lever for lever in nat_levers(model, goal)}


def test_two_addresses_double_the_rate() -> None:
    assert replace(SMALL, addresses=2).max_rate_per_s == pytest.approx(2 * 49.75, abs=0.01)
    lever = _levers(SMALL, 90.0)["more NAT addresses"]
    assert lever.applies == {"addresses": 2}
    assert lever.reaches_goal


def test_server_first_close_does_not_help_a_nat() -> None:
    for model in (SMALL, replace(SMALL, holds_time_wait=False)):
        lever = _levers(model, 100.0)["server-first close"]
        assert lever.max_rate_per_s == pytest.approx(model.max_rate_per_s, abs=0.01)
        assert not lever.applies
        assert lever.change.startswith("does not help here")
    assert "whoever closes first" in _levers(SMALL, 100.0)["server-first close"].change


def test_each_lever_does_what_it_claims() -> None:
    """Apply each lever's change to the model and compute the rate again."""
    for model, goal in ((SMALL, 100.0), (replace(SMALL, requests_per_connection=5), 1000.0)):
        levers = nat_levers(model, goal)
        names = {lever.name for lever in levers}
        assert {"more NAT addresses", "shorter NAT TIME_WAIT", "keep-alive or pooling"} <= names
        for lever in levers:
            rate = replace(model, **lever.applies).max_request_rate_per_s
            assert rate == pytest.approx(lever.max_rate_per_s, abs=0.01)
            assert lever.reaches_goal == (rate is None or rate >= goal * (1 - 1e-9))


def test_a_shorter_time_wait_is_the_one_that_reaches_the_goal() -> None:
    model = NatCapacityModel(ports=64, lifetime_s=0.0, time_wait_s=120.0)  # 0.53/s
    lever = _levers(model, 2.0)["shorter NAT TIME_WAIT"]
    assert lever.applies == {"time_wait_s": 32.0}
    assert lever.max_rate_per_s == pytest.approx(2.0) and lever.reaches_goal


def test_pooling_asks_for_enough_requests_per_connection() -> None:
    lever = _levers(SMALL, 240.0)["keep-alive or pooling"]
    assert lever.applies == {"requests_per_connection": 5}
    assert lever.reaches_goal


NAT_SCENARIO = """
name = "nat"
[target]
endpoints = ["192.0.2.10:80", "192.0.2.10:81", "192.0.2.10:80"]
[load]
rate = 300.0
hold = "50ms"
requests_per_connection = 4
http = true
[lab]
topology = "nat"
[lab.nat]
addresses = ["198.51.100.1", "198.51.100.2"]
ports = "20000-20063"
hold_time_wait = true
tcp_timeout_time_wait = "30s"
"""


def test_from_scenario_reads_lab_nat_and_the_distinct_endpoints() -> None:
    model = NatCapacityModel.from_scenario(parse_scenario(NAT_SCENARIO), 0.05)
    assert (model.ports, model.addresses, model.destinations) == (64, 2, 2)
    assert model.time_wait_s == 30.0 and model.holds_time_wait
    assert model.requests_per_connection == 4 and model.lifetime_s == 0.05


def test_from_scenario_without_lab_nat_is_a_linux_masquerade() -> None:
    text = 'name = "n"\n[target]\nendpoints = ["192.0.2.1:80"]\n[lab]\ntopology = "nat"\n'
    model = NatCapacityModel.from_scenario(parse_scenario(text), 0.0)
    assert model.ports == 64512 and model.addresses == 1
    assert model.time_wait_s == CONNTRACK_TIME_WAIT_S and not model.holds_time_wait


def test_the_text_says_why_the_client_sees_timeouts() -> None:
    text = render_nat_text(make_nat_plan(SMALL, 100.0))
    assert "sustainable: 49.75/s" in text and "full after 1 s" in text
    assert "no EADDRNOTAVAIL" in text and "verdict: SHORT" in text
    assert "the goal fits" in render_nat_text(make_nat_plan(SMALL, 40.0))


SMALL_ARGS = ["plan", "--nat", "--nat-ports", "100", "--nat-time-wait", "2s"]


def test_cli_in_process_text_and_json() -> None:
    runner = CliRunner()
    args = [*SMALL_ARGS, "--lifetime", "10ms", "--rate", "100"]
    text = runner.invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert "sustainable: 49.75/s" in text.output and "[code] server-first close" in text.output
    data = json.loads(runner.invoke(cli, [*args, "--json"]).output)
    assert data["max_rate_per_s"] == pytest.approx(49.75, abs=0.01)
    assert data["time_to_exhaustion_s"] == pytest.approx(1.0)
    assert data["pool"] == 100 and data["meets_goal"] is False
    linux = json.loads(runner.invoke(cli, [*args, "--linux-nat", "--json"]).output)
    assert linux["max_rate_per_s"] == pytest.approx(10_000.0)


def test_cli_a_range_of_ports_and_addresses() -> None:
    args = ["plan", "--nat", "--nat-ports", "20000-20063", "--nat-addresses", "2", "--rate", "1"]
    data = json.loads(CliRunner().invoke(cli, [*args, "--json"]).output)
    assert data["pool"] == 128 and data["hold_s"] == 120.0  # the clouds' rule by default


def test_cli_reads_a_nat_scenario_under_the_options(tmp_path: Path) -> None:
    path = tmp_path / "nat.toml"
    path.write_text(NAT_SCENARIO)
    runner = CliRunner()
    data = json.loads(runner.invoke(cli, ["plan", "--scenario", str(path), "--json"]).output)
    inputs = data["inputs"]
    assert inputs["rate"] == 300.0 and inputs["lifetime_s"] == 0.05
    assert (inputs["ports"], inputs["addresses"], inputs["destinations"]) == (64, 2, 2)
    assert data["connection_rate_per_s"] == 75.0
    given = ["--nat-addresses", "4", "--linux-nat", "--rate", "10", "--json"]
    over = json.loads(runner.invoke(cli, ["plan", "--scenario", str(path), *given]).output)
    assert over["inputs"]["addresses"] == 4 and over["inputs"]["holds_time_wait"] is False
    assert over["inputs"]["rate"] == 10.0


def test_cli_refuses_a_scenario_without_the_nat_topology(tmp_path: Path) -> None:
    path = tmp_path / "single.toml"
    path.write_text('name = "s"\n[target]\nendpoints = ["192.0.2.1:80"]\n')
    result = CliRunner().invoke(cli, ["plan", "--scenario", str(path), "--rate", "1"])
    assert result.exit_code == 2 and 'expected "nat"' in result.output


def test_cli_end_to_end_says_what_is_wrong(tmp_path: Path) -> None:
    ok = eph([*SMALL_ARGS, "--lifetime", "10ms", "--rate", "100"], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "more NAT addresses: 149.3/s" in ok.stdout
    bad = eph(["plan", "--nat", "--nat-ports", "70000", "--rate", "5"], cwd=tmp_path)
    assert bad.returncode == 2 and "'70000' is neither a port count" in bad.stderr
    missing = eph(["plan", "--nat"], cwd=tmp_path)
    assert missing.returncode == 2 and "give --rate N" in missing.stderr
    mixed = eph(["plan", "--nat", "--rate", "5", "--port-range", "1024-2047"], cwd=tmp_path)
    assert mixed.returncode == 2 and "--port-range: the client host's setup" in mixed.stderr
    alone = eph(["plan", "--rate", "5", "--nat-addresses", "2"], cwd=tmp_path)
    assert alone.returncode == 2 and "need --nat" in alone.stderr


def _nat_run(tmp_path: Path, scenario_text: str) -> Path:
    """A run directory as a NAT lab leaves it, as far as the plan reads: the scenario
    and a summary with the offered rate and the connections' measured lifetime."""
    from harness.summary import Capacity

    from .tables import exhausted_summary

    run = tmp_path / "run"
    run.mkdir()
    scenario = parse_scenario(scenario_text)
    (run / "scenario.json").write_text(json.dumps(scenario.to_json()))
    summary = exhausted_summary()
    summary.capacity = Capacity(offered_rate_per_s=300.0, model_lifetime_s=0.05)
    (run / "summary.json").write_text(json.dumps(summary.to_json()))
    return run


def test_cli_plans_a_nat_lab_run_from_its_directory(tmp_path: Path) -> None:
    """eph plan --from RUN --nat reads the run's [lab.nat], offered rate and measured
    lifetime, as --scenario reads a scenario's; the options still win."""
    run = _nat_run(tmp_path, NAT_SCENARIO)
    runner = CliRunner()
    data = json.loads(runner.invoke(cli, ["plan", "--from", str(run), "--nat", "--json"]).output)
    inputs = data["inputs"]
    assert inputs["rate"] == 300.0 and inputs["lifetime_s"] == 0.05
    assert (inputs["ports"], inputs["addresses"], inputs["destinations"]) == (64, 2, 2)
    over = runner.invoke(cli, ["plan", "--from", str(run), "--nat", "--rate", "10", "--json"])
    assert json.loads(over.output)["inputs"]["rate"] == 10.0
    (tmp_path / "single").mkdir()
    single = _nat_run(tmp_path / "single", 'name = "s"\n[target]\nendpoints = ["192.0.2.1:80"]\n')
    refused = runner.invoke(cli, ["plan", "--from", str(single), "--nat"])
    assert refused.exit_code == 2 and 'not "nat"' in refused.output
    both = runner.invoke(cli, ["plan", "--from", str(run), "--nat", "--scenario", str(run)])
    assert both.exit_code == 2 and "give one" in both.output
