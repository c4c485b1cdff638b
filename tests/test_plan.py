"""eph plan: the model's numbers, levers that do what they claim, and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from harness.capacity.plan import PlanInputs, from_kernel, from_run, make_plan, render_text
from harness.kernel.sysctls import SYSCTLS
from harness.scenario import ClosePolicy, parse_scenario

from .conftest import eph
from .tables import exhausted_summary

# The default (docs/kernel.md "Reuse"): 28,232 ports, 60 s of TIME_WAIT -> 470/s
DEFAULT = PlanInputs(rate=2000.0, port_range=(32768, 60999), tw_reuse=0)


def test_the_default_range_sustains_470_per_second() -> None:
    plan = make_plan(DEFAULT)
    assert plan.usable_ports == 28232
    assert plan.max_rate_per_s == pytest.approx(28232 / 60, abs=0.1)
    assert plan.time_to_exhaustion_s == pytest.approx(28232 / 2000, abs=1e-3)
    assert plan.headroom == pytest.approx(28232 / 60 / 2000 - 1, abs=1e-3)
    assert not plan.meets_goal


def test_a_goal_within_reach_has_headroom_and_never_exhausts() -> None:
    plan = make_plan(replace(DEFAULT, rate=235.0))
    assert plan.meets_goal and plan.time_to_exhaustion_s is None
    assert plan.headroom == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize(
    "inputs",
    [
        DEFAULT,
        replace(DEFAULT, rate=30_000, lifetime_s=0.2),
        replace(DEFAULT, rate=500, sources=2, destinations=3, reserved="40000-40999"),
        replace(DEFAULT, rate=5000, close=ClosePolicy.SERVER, lifetime_s=10.0),
        replace(DEFAULT, rate=100_000, tw_reuse=1, reuse_delay_ms=1000),
    ],
)
def test_each_lever_does_what_it_claims(inputs: PlanInputs) -> None:
    """Apply each lever's change to the inputs and run the model again."""
    plan = make_plan(inputs)
    assert plan.levers
    for lever in plan.levers:
        if lever.kind == "kernel":  # the snippet's sysctls say the same as the change
            assert set(lever.sysctls) <= {"net.ipv4." + k for k in _sysctl_names()}
            assert _apply(inputs, lever.sysctls) == replace(inputs, **lever.applies)
        if lever.applies:
            rate = replace(inputs, **lever.applies).model().max_rate_per_s
            assert rate == pytest.approx(lever.max_rate_per_s, abs=0.1)
            assert lever.reaches_goal == (rate is None or rate >= inputs.rate)


def _sysctl_names() -> set[str]:
    return {
        path.removeprefix("net/ipv4/") for path in SYSCTLS.values() if path.startswith("net/ipv4/")
    }


def _apply(inputs: PlanInputs, sysctls: dict[str, str]) -> PlanInputs:
    changes: dict[str, object] = {}
    for key, value in sysctls.items():
        name = key.removeprefix("net.ipv4.")
        if name == "ip_local_port_range":
            low, high = value.split()
            changes["port_range"] = (int(low), int(high))
        elif name == "tcp_tw_reuse":
            changes["tw_reuse"] = int(value)
        elif name == "tcp_tw_reuse_delay":
            changes["reuse_delay_ms"] = int(value)
        elif name == "tcp_timestamps":
            changes["timestamps"] = int(value)
    return replace(inputs, **changes)


def test_the_snippet_is_a_sysctl_d_file_that_reaches_the_goal() -> None:
    plan = make_plan(DEFAULT)
    lines = [line for line in plan.sysctl_snippet.splitlines() if not line.startswith("#")]
    assert lines == ["net.ipv4.tcp_tw_reuse = 1"]
    assert "apply by hand" in plan.sysctl_snippet
    text = render_text(plan)
    assert "verdict: SHORT" in text and "470/s" in text


def test_host_settings_fill_what_is_not_given() -> None:
    kernel = {"ip_local_port_range": [10000, 10999], "tcp_tw_reuse": 1, "tcp_timestamps": 1}
    inputs = from_kernel(kernel, 100.0, hosts=3)
    assert inputs.port_range == (10000, 10999) and inputs.tw_reuse == 1 and inputs.hosts == 3
    assert not inputs.reuse_delay_settable  # no tcp_tw_reuse_delay_ms: before Linux 6.14


def test_cli_text_and_json(tmp_path: Path) -> None:
    args = ["plan", "--rate", "2000", "--port-range", "32768-60999", "--tw-reuse", "0"]
    text = eph([*args, "--lifetime", "50ms"], cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "sustainable: 470/s" in text.stdout and "net.ipv4.tcp_tw_reuse = 1" in text.stdout
    data = json.loads(eph([*args, "--json"], cwd=tmp_path).stdout)
    assert data["max_rate_per_s"] == pytest.approx(470.5, abs=0.1)
    assert data["meets_goal"] is False and data["inputs"]["close"] == "client"


def test_cli_says_what_is_wrong(tmp_path: Path) -> None:
    missing = eph(["plan"], cwd=tmp_path)
    assert missing.returncode == 2 and "give --rate N" in missing.stderr
    bad = eph(["plan", "--rate", "5", "--port-range", "60000-1000"], cwd=tmp_path)
    assert bad.returncode == 2 and "'60000-1000' is not LOW-HIGH" in bad.stderr
    duration = eph(["plan", "--rate", "5", "--lifetime", "5 parsecs"], cwd=tmp_path)
    assert duration.returncode == 2 and "not a duration" in duration.stderr


def test_from_run_takes_the_runs_setup_and_what_it_measured() -> None:
    scenario = parse_scenario(
        'name = "r"\n[target]\nendpoints = ["127.0.0.1:9000", "127.0.0.1:9001"]\n'
        '[load]\nclose = "client"\nsocket_port_range = [40050, 41000]\n'
    )
    summary = exhausted_summary(
        offered_rate_per_s=200.0,
        model_lifetime_s=0.002,
        measured_time_to_exhaustion_s=0.5,
        measured_sustained_rate_per_s=1.5,
    )
    inputs, measured = from_run(summary, scenario)
    assert inputs.rate == 200.0 and inputs.lifetime_s == 0.002
    assert inputs.port_range == (40050, 40099)  # the socket's range narrows the kernel's
    assert inputs.destinations == 2 and inputs.loopback and inputs.tw_reuse == 0
    assert not inputs.reuse_delay_settable  # the run's kernel had no tcp_tw_reuse_delay
    assert measured["ports before the first failure"] == (100, 100)
    assert measured["time to exhaustion (s)"] == (0.5, 0.5)
    assert measured["sustained rate after it (/s)"][1] == 1.5


def test_from_run_without_an_offered_rate_uses_the_measured_one() -> None:
    scenario = parse_scenario('name = "r"\n[target]\nendpoints = ["10.0.0.1:80"]\n')
    inputs, _ = from_run(exhausted_summary(), scenario)
    assert inputs.rate == 200.0 and not inputs.loopback


def test_the_soft_limit_is_where_the_even_half_fills() -> None:
    """(ports / 2) / (lifetime + hold): 235/s for the default range without reuse."""
    plan = make_plan(replace(DEFAULT, rate=300.0))
    assert plan.meets_goal and plan.slows_down
    assert plan.soft_rate_per_s == pytest.approx(28232 / 2 / 60, abs=0.1)
    assert plan.time_to_slow_s == pytest.approx(14116 / 300, abs=1e-3)
    text = render_text(plan)
    assert "soft limit: 235/s  = 14,116 ports (the even half)" in text
    assert "but connects slow down after 47.0533 s" in text
    assert not make_plan(replace(DEFAULT, rate=200.0)).slows_down


def test_a_random_window_per_socket_has_no_soft_limit_and_is_a_lever() -> None:
    plan = make_plan(replace(DEFAULT, rate=300.0))
    window = next(lever for lever in plan.levers if lever.name == "random port window per socket")
    assert window.soft_rate_per_s is None and window.reaches_goal
    assert "load.socket_port_window" in window.change
    reuse = next(lever for lever in plan.levers if lever.name == "TIME_WAIT reuse")
    assert reuse.soft_rate_per_s == pytest.approx(28232 / 2 / 1.0, rel=0.01)
    windowed = make_plan(replace(DEFAULT, rate=300.0, socket_window=64))
    assert windowed.soft_rate_per_s is None and not windowed.slows_down
    assert "soft limit: none (a random IP_LOCAL_PORT_RANGE window" in render_text(windowed)
    # under the soft limit there is nothing for the window to fix
    assert all(
        lever.name != "random port window per socket"
        for lever in make_plan(replace(DEFAULT, rate=100.0)).levers
    )


def test_tcp_max_tw_buckets_under_the_ports_leaves_only_lifetimes_holding_them() -> None:
    """Past the buckets a close skips TIME_WAIT: its port is free at once."""
    capped = replace(DEFAULT, tw_buckets=10_000, lifetime_s=0.1)
    model = capped.model()
    assert model.max_rate_per_s == pytest.approx((28232 - 10_000) / 0.1)
    assert model.soft_rate_per_s == pytest.approx((14116 - 10_000) / 0.1)
    assert replace(DEFAULT, tw_buckets=10_000).model().max_rate_per_s is None  # no lifetime
    roomy = replace(DEFAULT, tw_buckets=131_072).model()  # the default: more than the ports
    assert roomy.max_rate_per_s == pytest.approx(28232 / 60)
    kernel = {"ip_local_port_range": [32768, 60999], "tcp_max_tw_buckets": 10}
    assert from_kernel(kernel, 1.0).tw_buckets == 10


def test_a_lifetime_only_bound_past_any_connect_rate_is_no_client_side_port_limit() -> None:
    """Server-first close with 43 us connections: not '656,558,140/s' but no limit."""
    plan = make_plan(replace(DEFAULT, rate=2000.0, lifetime_s=43e-6))
    server = next(lever for lever in plan.levers if lever.name == "server-first close")
    assert server.max_rate_per_s is None and server.reaches_goal
    assert "server-first close: no client-side port limit" in render_text(plan)
    long_lived = replace(DEFAULT, close=ClosePolicy.SERVER, lifetime_s=10.0).model()
    assert long_lived.max_rate_per_s == pytest.approx(28232 / 10)  # ports still bound it


def test_from_run_sets_the_runs_cliff_beside_the_model() -> None:
    from harness.summary import LatencyCliff

    scenario = parse_scenario('name = "r"\n[target]\nendpoints = ["127.0.0.1:9000"]\n')
    summary = exhausted_summary(offered_rate_per_s=200.0)
    summary.latency_cliff = LatencyCliff(
        detected=True,
        onset_occupancy=0.5,
        before_p50_ms=0.009,
        after_p50_ms=0.9,
        ratio=100.0,
        rate_before_per_s=48000.0,
        rate_after_per_s=900.0,
    )
    _, measured = from_run(summary, scenario)
    assert measured["slow connects from occupancy"] == (0.5, 0.5)
    assert measured["connect p50 before/after (ms)"][1] == "0.009 -> 0.9 (100.0x)"
    assert measured["successes/s before/after"][1] == "48,000 -> 900"


# The holdout (issue 26): a lab of 300 ports made to exhaust, offered 20,134/s for 3 s
EXHAUSTING = PlanInputs(rate=20_134.0, port_range=(40000, 40299), tw_reuse=0)


def test_a_lever_past_its_practical_bound_is_marked_ranked_last_and_never_recommended() -> None:
    from harness.capacity.levers import PRACTICAL
    from harness.report.html import recommendations_from_plan

    plan = make_plan(EXHAUSTING)
    by_name = {lever.name: lever for lever in plan.levers}
    for name, attr in (("more source addresses", "sources"), ("more load-generator hosts",
                                                              "hosts")):  # fmt: skip
        lever = by_name[name]
        assert lever.applies[attr] > PRACTICAL[attr] and not lever.practical
        assert f"{lever.applies[attr]:,} {attr} is past what is practical" in lever.limit
    assert not by_name["keep-alive or pooling"].practical  # 4,027 requests per connection
    assert not by_name["shorter reuse delay"].practical  # 14 ms
    ranks = [(not lever.practical, not lever.reaches_goal) for lever in plan.levers]
    assert ranks == sorted(ranks)  # practical and reaching first
    text = render_text(plan)
    assert "impractical: 4,027 sources" in text
    assert "tcp_tw_reuse_delay" not in plan.sysctl_snippet  # an impractical one is not applied
    advice = recommendations_from_plan(plan, exhausted=True)
    assert advice and all("4,027" not in line for line in advice)
    assert any("server-first close" in line for line in advice)  # the one that is practical


def test_past_every_practical_lever_is_one_line_with_the_most_any_gives() -> None:
    from harness.capacity.plan import past_every_practical_lever
    from harness.report.html import recommendations_from_plan

    far = make_plan(replace(EXHAUSTING, rate=5_000_000.0, lifetime_s=0.05))
    line = past_every_practical_lever(far)
    assert line is not None and "5,000,000/s is past every practical lever" in line
    assert "the most one gives is" in line
    assert recommendations_from_plan(far, exhausted=True) == [
        line + " (eph plan --from RUN_DIR lists each lever with its figure.)"
    ]
    assert past_every_practical_lever(make_plan(DEFAULT)) is None  # reuse suffices


def test_one_practical_lever_suffices_and_comes_first() -> None:
    from harness.report.html import recommendations_from_plan

    plan = make_plan(DEFAULT)
    first = plan.levers[0]
    assert (first.name, first.practical, first.reaches_goal) == ("TIME_WAIT reuse", True, True)
    advice = recommendations_from_plan(plan, exhausted=True)
    assert advice[1].startswith("[kernel] TIME_WAIT reuse, up to 28,232/s")  # no lifetime
    assert all("impractical" not in line for line in advice)


def test_a_rate_that_holds_only_by_overflowing_time_wait_is_named_not_counted() -> None:
    """2,000/s of 50 ms connections: 5 source addresses hold 141,160 ports in TIME_WAIT,
    past the host's 131,072 buckets. The model's rate there (TIME_WAIT skipped) is not the
    lever's figure; the figure is what TIME_WAIT allows, as for 5 hosts."""
    inputs = replace(DEFAULT, lifetime_s=0.05, tw_buckets=131_072)
    by_name = {lever.name: lever for lever in make_plan(inputs).levers}
    sources, hosts = by_name["more source addresses"], by_name["more load-generator hosts"]
    assert sources.applies == {"sources": 5} and hosts.applies == {"hosts": 5}
    assert sources.max_rate_per_s == pytest.approx(5 * 28232 / 60.05, abs=0.1)
    assert sources.max_rate_per_s == hosts.max_rate_per_s
    overflow = replace(inputs, sources=5).model().max_rate_per_s
    assert sources.overflow_rate_per_s == pytest.approx(overflow, abs=0.1) and overflow > 100_000
    assert "TCPTimeWaitOverflow" in sources.caveat and hosts.overflow_rate_per_s is None


@pytest.mark.parametrize(("hold_s", "compared"), [(60.0, False), (0.2, True)])
def test_the_sustained_rate_is_compared_only_once_ports_could_have_come_back(
    hold_s: float, compared: bool
) -> None:
    """A 1 s run exhausted at 0.5 s: with TIME_WAIT's 60 s hold no port has come back, so
    the finding says when one would, not "-100% against the model"; with a 0.2 s reuse
    delay ports came back during the run, and the two are compared."""
    from harness.report.html import findings

    summary = exhausted_summary(
        model_ports=100, model_max_rate_per_s=100 / hold_s, model_hold_s=hold_s,
        measured_sustained_rate_per_s=0.0 if not compared else 480.0,
    )  # fmt: skip
    said = "\n".join(findings(summary))
    assert ("against the model" in said) is compared
    if not compared:
        assert "No port had come back yet" in said and "about 59.5 s later" in said
