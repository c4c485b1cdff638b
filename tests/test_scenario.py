"""Scenario loading: every shipped file validates; every bad input says what and where."""

from pathlib import Path

import pytest

from harness.endpoints import Endpoint
from harness.errors import ScenarioError
from harness.scenario import ClosePolicy, Engine, ListenerClose, load_scenario, parse_scenario

from .conftest import ROOT

SCENARIOS = sorted((ROOT / "scenarios").glob("*.toml"))

MINIMAL = """\
name = "t"
duration = "1s"

[target]
endpoints = ["127.0.0.1:9000"]
"""


def test_there_are_scenarios() -> None:
    assert len(SCENARIOS) >= 4


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_every_shipped_scenario_loads(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    assert scenario.description, "every scenario says what to expect"


def test_defaults_fill_in() -> None:
    scenario = parse_scenario(MINIMAL)
    assert scenario.load.engine is Engine.LOCUST
    assert scenario.load.close is ClosePolicy.CLIENT
    assert scenario.load.backoff == pytest.approx(0.01)
    assert scenario.collector.interval == pytest.approx(0.1)
    assert scenario.target.endpoints == [Endpoint("127.0.0.1", 9000)]


def test_the_issue_schema_is_accepted_verbatim() -> None:
    scenario = load_scenario(ROOT / "scenarios" / "exhaust-small-range.toml")
    assert scenario.kernel.ip_local_port_range == (40000, 40099)
    assert scenario.kernel.tcp_tw_reuse == 0
    assert scenario.duration == 10.0


def test_resolved_json_round_trips() -> None:
    from harness.scenario import Scenario

    scenario = load_scenario(ROOT / "scenarios" / "exhaust-small-range.toml")
    again = Scenario.model_validate(scenario.to_json())
    assert again == scenario


def error_of(text: str, *overrides: str) -> ScenarioError:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text, source="s.toml", overrides=overrides)
    return caught.value


def test_malformed_toml_names_file_and_line() -> None:
    error = error_of(MINIMAL + "\n[load\nusers = 3\n")
    assert error.line == 7
    assert "s.toml, line 7: malformed TOML" in str(error)


def test_unknown_key_suggests_the_closest() -> None:
    error = error_of(MINIMAL + "\n[load]\nuser = 3\n")
    assert error.key == "load.user"
    assert "did you mean 'load.users'?" in str(error)
    assert error.line == 8


def test_unknown_section_lists_valid_ones() -> None:
    error = error_of(MINIMAL + "\n[lod]\nusers = 3\n")
    assert "unknown key 'lod'; did you mean 'load'?" in str(error)


def test_wrong_type_is_not_coerced() -> None:
    error = error_of(MINIMAL + '\n[load]\nusers = "50"\n')
    assert error.key == "load.users"
    assert "'50'" in str(error) and "integer" in str(error)


def test_port_outside_range() -> None:
    error = error_of(MINIMAL + "\n[kernel]\nip_local_port_range = [40000, 70000]\n")
    assert error.key == "kernel.ip_local_port_range.1"
    assert "65535" in str(error)


def test_range_low_above_high() -> None:
    error = error_of(MINIMAL + "\n[kernel]\nip_local_port_range = [40099, 40000]\n")
    assert "low end 40099 is above high end 40000" in str(error)


def test_link_impairments_need_the_pair_topology() -> None:
    error = error_of(MINIMAL + '\n[lab]\ndelay = "20ms"\n')
    assert error.key == "lab"
    assert 'topology = "pair"' in str(error)
    assert parse_scenario(MINIMAL, overrides=["lab.topology=pair", "lab.delay=20ms"]).lab.impaired


def test_unknown_emulation_lists_the_choices() -> None:
    error = error_of(MINIMAL, "lab.emulation=tc")
    assert error.key == "lab.emulation"
    assert "relay" in str(error) and "netem" in str(error)


def test_same_parity_range_is_a_warning_not_an_error() -> None:
    scenario = parse_scenario(MINIMAL + "\n[kernel]\nip_local_port_range = [40000, 40100]\n")
    assert any("same parity" in note for note in scenario.advisories())
    scenario = parse_scenario(MINIMAL + "\n[kernel]\nip_local_port_range = [40000, 40099]\n")
    assert not any("same parity" in note for note in scenario.advisories())


@pytest.mark.parametrize("value", ['"10"', "10", '"ten seconds"', '"-1s"'])
def test_bad_durations(value: str) -> None:
    error = error_of(MINIMAL.replace('duration = "1s"', f"duration = {value}"))
    assert error.key == "duration"
    assert "duration" in str(error)


def test_ipv6_endpoint_without_brackets() -> None:
    error = error_of(MINIMAL.replace("127.0.0.1:9000", "::1:9000"))
    assert error.key == "target.endpoints.0"
    assert "IPv6 addresses need brackets: [::1]:9000" in str(error)


def test_port_zero_needs_the_embedded_listener() -> None:
    error = error_of(MINIMAL.replace(":9000", ":0"))
    assert "only an embedded [listener]" in str(error)
    assert parse_scenario(MINIMAL.replace(":9000", ":0") + "\n[listener]\n").listener is not None


def test_bad_source_address() -> None:
    error = error_of(MINIMAL + '\n[load]\nsource_addresses = ["127.0.0.300"]\n')
    assert "source_addresses[0] = '127.0.0.300' is not an IP address" in str(error)


def test_bad_reserved_ports() -> None:
    error = error_of(MINIMAL + '\n[kernel]\nip_local_reserved_ports = "40000-"\n')
    assert "ip_local_reserved_ports" in str(error)


def test_set_overrides_typed_values() -> None:
    scenario = parse_scenario(
        MINIMAL, overrides=["load.users=7", "duration=3s", "load.close=server", "load.rate=2.5"]
    )
    assert scenario.load.users == 7
    assert scenario.duration == 3.0
    assert scenario.load.close is ClosePolicy.SERVER
    assert scenario.load.rate == 2.5
    assert scenario.listener_close is ListenerClose.WAIT  # no listener: nothing to follow


def test_set_unknown_path_suggests() -> None:
    error = error_of(MINIMAL, "load.usrs=3")
    assert error.source == "--set"
    assert "did you mean 'load.users'?" in str(error)


def test_set_path_through_a_value() -> None:
    error = error_of(MINIMAL, "duration.x=3")
    assert "'duration' is a value, not a table" in str(error)


def test_set_without_equals() -> None:
    assert "is not key.path=value" in str(error_of(MINIMAL, "load.users"))


def test_targets_replace_endpoints_and_drop_listener() -> None:
    text = MINIMAL + "\n[listener]\n"
    scenario = parse_scenario(text, targets=["10.1.2.3:443"])
    assert scenario.listener is None
    assert scenario.target.endpoints == [Endpoint("10.1.2.3", 443)]


def test_listener_close_follows_load_close() -> None:
    text = MINIMAL + "\n[listener]\n"
    assert parse_scenario(text, overrides=["load.close=server"]).listener_close is (
        ListenerClose.FIRST
    )
    assert parse_scenario(text).listener_close is ListenerClose.WAIT


def test_missing_file() -> None:
    with pytest.raises(ScenarioError, match="no such file"):
        load_scenario("/nonexistent/x.toml")


def test_kernel_differences_are_named() -> None:
    from harness.run.lifecycle import kernel_differences

    scenario = load_scenario(
        ROOT / "scenarios" / "exhaust-small-range.toml", ["kernel.tcp_tw_reuse_delay=1000ms"]
    )
    host = {
        "ip_local_port_range": [32768, 60999],
        "tcp_tw_reuse": 0,
        "tcp_timestamps": 1,
        "tcp_tw_reuse_delay_ms": 1000,
    }
    notes = kernel_differences(scenario, host)
    assert len(notes) == 1
    assert "kernel.ip_local_port_range = [40000, 40099] is not applied here" in notes[0]
    same = {**host, "ip_local_port_range": [40000, 40099]}
    assert kernel_differences(scenario, same) == []


def test_kernel_settings_in_the_kernels_names_and_units() -> None:
    from harness.lab.topology import lab_sysctls

    scenario = parse_scenario(
        MINIMAL
        + """
[kernel]
ip_local_port_range = "40000-40099"
tcp_tw_reuse_delay = "100ms"
tcp_fin_timeout = "30s"
somaxconn = 128
"""
    )
    assert scenario.kernel.in_kernel_units() == {
        "ip_local_port_range": [40000, 40099],
        "tcp_tw_reuse_delay_ms": 100,
        "tcp_fin_timeout": 30,
        "somaxconn": 128,
    }
    assert lab_sysctls(scenario) == {
        "net.ipv4.ip_local_port_range": "40000 40099",
        "net.ipv4.tcp_tw_reuse_delay": "100",
        "net.ipv4.tcp_fin_timeout": "30",
        "net.core.somaxconn": "128",
    }


def test_a_target_on_port_443_speaks_tls_unless_the_scenario_says() -> None:
    text = 'name = "s"\n[target]\nendpoints = ["127.0.0.1:9000"]\n'
    assert parse_scenario(text, targets=["staging.internal:443"]).load.tls is not None
    assert parse_scenario(text, targets=["staging.internal:8443"]).load.tls is None
    plain = text + "[load]\ntls = false\n"
    assert parse_scenario(plain, targets=["staging.internal:443"]).load.tls is None
