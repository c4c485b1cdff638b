"""``load.processes``: ``auto`` by default, settled once per run, said and recorded."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from harness.errors import RunError, ScenarioError
from harness.run.placement import PROCESSES_ENV, Master, Placement, choose_processes
from harness.scenario import Scenario, load_scenario

from .conftest import eph, run_dir_summary, write_scenario

LAB = Placement(load=("ip", "netns", "exec", "ephlab-1-client"))


@pytest.fixture(autouse=True)
def _the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite sets EPH_LOAD_PROCESSES=1 (conftest); here the default itself is tested."""
    monkeypatch.delenv(PROCESSES_ENV, raising=False)


def _scenario(*, listener: bool = False, users: int = 50, processes: object = None) -> Scenario:
    load: dict[str, object] = {"users": users}
    if processes is not None:
        load["processes"] = processes
    data: dict[str, object] = {
        "name": "p",
        "description": "test",
        "target": {"endpoints": ["127.0.0.1:9000"]},
        "load": load,
    }
    if listener:
        data["listener"] = {}
    return Scenario.model_validate(data)


def test_auto_is_the_default() -> None:
    assert _scenario().load.processes == "auto"


@pytest.mark.parametrize(
    ("cpus", "listener", "placement", "count", "why"),
    [
        (1, False, Placement(), 1, "auto: 1 CPU eph may run on"),
        (2, False, Placement(), 2, "auto: 2 CPUs eph may run on"),
        (8, False, Placement(), 8, "auto: 8 CPUs eph may run on"),
        # a server beside the load gets a CPU of its own once there are three
        (8, True, Placement(), 7, "less one for the embedded listener"),
        (3, False, LAB, 2, "less one for the lab's target"),
        (2, True, Placement(), 2, "the embedded listener shares them: too few to leave it one"),
        (2, False, LAB, 2, "the lab's target shares them"),
        (1, True, Placement(), 1, "auto: 1 CPU eph may run on"),
    ],
)
def test_auto_takes_the_cpus_less_one_for_a_server_beside_them(
    cpus: int, listener: bool, placement: Placement, count: int, why: str
) -> None:
    chosen = choose_processes(_scenario(listener=listener), placement, cpus=cpus)
    assert (chosen.count, chosen.asked, chosen.cpus) == (count, "auto", cpus)
    assert why in chosen.why


def test_auto_starts_no_process_without_a_user() -> None:
    chosen = choose_processes(_scenario(users=3), Placement(), cpus=16)
    assert chosen.count == 3 and "capped at load.users = 3" in chosen.why


@pytest.mark.parametrize(("asked", "count"), [(1, 1), (5, 5), (0, 6)])
def test_a_number_pins_it(asked: int, count: int) -> None:
    chosen = choose_processes(_scenario(processes=asked, listener=True), Placement(), cpus=6)
    assert (chosen.count, chosen.asked) == (count, str(asked))
    assert chosen.why.startswith(f"load.processes = {asked}")


def test_a_master_runs_no_load_of_its_own() -> None:
    chosen = choose_processes(_scenario(), Placement(), Master(workers=3), cpus=8)
    assert chosen.count == 1 and "worker" in chosen.why


def test_the_environment_sets_the_default_and_a_scenario_still_pins_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PROCESSES_ENV, "3")
    chosen = choose_processes(_scenario(), Placement(), cpus=8)
    assert (chosen.count, chosen.why) == (
        3,
        f"{PROCESSES_ENV}=3, the default where the scenario does not say",
    )
    assert choose_processes(_scenario(processes=5), Placement(), cpus=8).count == 5
    assert choose_processes(_scenario(processes="auto"), Placement(), cpus=8).count == 8


@pytest.mark.parametrize("value", ["many", "0", "2000"])
def test_a_bad_default_in_the_environment_is_said_before_any_load(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(PROCESSES_ENV, value)
    with pytest.raises(RunError, match=f"{PROCESSES_ENV} = '?{value}'? is not"):
        choose_processes(_scenario(), Placement(), cpus=8)


@pytest.mark.parametrize("value", ['"all"', "2000", "-1", "true", "1.5"])
def test_anything_but_auto_or_a_count_is_refused_saying_where_and_what(
    tmp_path: Path, value: str
) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "p"\ndescription = "t"\n[target]\nendpoints = ["127.0.0.1:9"]\n'
        f"[load]\nprocesses = {value}\n"
    )
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    said = str(caught.value)
    assert f"{path}, line 6, key 'load.processes'" in said
    assert 'expected "auto" or a number of processes, 0 (one per CPU) to 1024' in said


class _Running:
    """A child that keeps running: what ``_wait_for_start`` polls."""

    def poll(self) -> None:
        return None


@pytest.mark.parametrize(
    ("by_master", "processes", "at", "bounds"),
    [
        # the master's report is there at once; with local processes it does not count
        (False, 1, (0.5,), (0.5, 4.0)),
        (True, 1, (0.5,), (0.0, 0.4)),
        # two processes: the load starts when the second is ready, not the first
        (False, 2, (0.0, 0.6), (0.6, 4.0)),
    ],
)
def test_the_loads_time_starts_once_every_load_process_is_ready(
    tmp_path: Path,
    by_master: bool,
    processes: int,
    at: tuple[float, ...],
    bounds: tuple[float, float],
) -> None:
    """With local processes Locust's master reports before it forks its workers: timed
    from that, a short run ended before any engine started. Timed from the first worker,
    a 3 s run under CI's load had rows from one of two: the second's engine was ready
    seconds later. The master's report counts only for a distributed master, whose
    workers report through it."""
    import threading

    from harness.run.lifecycle import _wait_for_start
    from harness.rundir import MASTER_PROGRESS, RunDir
    from harness.supervisor import Interrupt

    run = RunDir.open(tmp_path / "run", create=True)
    run.progress.mkdir(parents=True, exist_ok=True)
    (run.progress / MASTER_PROGRESS).write_text("{}")
    workers = [
        threading.Timer(delay, (run.progress / f"{101 + i}-0.json").write_text, args=("{}",))
        for i, delay in enumerate(at)
    ]
    for worker in workers:
        worker.start()
    began = time.monotonic()
    with Interrupt() as interrupt:
        started = _wait_for_start(
            _Running(),  # type: ignore[arg-type]
            run,
            interrupt,
            5.0,
            by_master=by_master,
            processes=processes,
        )
    for worker in workers:
        worker.join()
    waited = started - began
    # the wait polls every 0.05 s; the upper bounds stay well inside its own 5 s
    low, high = bounds
    assert low <= waited < high, waited


def test_a_process_that_is_never_ready_is_said_and_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from harness.run import lifecycle
    from harness.rundir import RunDir
    from harness.supervisor import Interrupt

    monkeypatch.setattr(lifecycle, "ALL_STARTED_GRACE", 0.3)
    run = RunDir.open(tmp_path / "run", create=True)
    run.progress.mkdir(parents=True, exist_ok=True)
    (run.progress / "101-0.json").write_text("{}")
    began = time.monotonic()
    with Interrupt() as interrupt, caplog.at_level("WARNING"):
        started = lifecycle._wait_for_start(
            _Running(),  # type: ignore[arg-type]
            run,
            interrupt,
            5.0,
            processes=3,
        )
    assert 0.3 <= started - began < 4.0  # the grace, not the 5 s timeout
    assert "1 of 3 Locust processes ready" in caplog.text


def test_a_uvloop_engine_says_it_is_ready_before_any_user(tmp_path: Path) -> None:
    """Its first frame is empty, comes with no user yet and is no flush: a flush carries
    the CPU interval it closes (``t_ns`` from the monotonic clock), the ready frame none.
    The Locust process times its start from it, not from the spawn (imports took
    seconds under load); without it, the first frame was the first flush."""
    import json
    import subprocess
    import sys

    from harness.load.uvloop_engine import read_frame_cpu
    from harness.scenario import parse_scenario

    scenario = parse_scenario(
        'name = "ready"\n[target]\nendpoints = ["127.0.0.1:9"]\n[load]\nengine = "uvloop"\n'
    )
    (tmp_path / "s.json").write_text(json.dumps(scenario.to_json()))
    command = [sys.executable, "-m", "harness.load.uvloop_engine"]
    command += ["--scenario", str(tmp_path / "s.json"), "--part", str(tmp_path / "p.arrows")]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            first = read_frame_cpu(child.stdout)  # type: ignore[arg-type]
            assert first is not None and len(first.rows) == 0
            assert first.cpu.t_ns == 0, first.cpu  # not a flush
            child.stdin.close()  # no user was ever sent: it stops, having made nothing
            flushes = []
            while (frame := read_frame_cpu(child.stdout)) is not None:  # type: ignore[arg-type]
                flushes.append(frame)
            assert flushes and all(f.cpu.t_ns > 0 for f in flushes), flushes
            assert sum(len(f.rows) for f in flushes) == 0 and child.wait(timeout=30) == 0
        finally:
            child.kill()


SCENARIO = """
name = "auto"
description = "test"
duration = "3s"
[target]
endpoints = ["127.0.0.1:0"]
[listener]
[load]
engine = "{engine}"
users = 8
spawn_rate = 100
rate = 200
"""


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("engine", "affinity"), [("uvloop", None), ("locust", None), ("uvloop", "0")]
)
def test_a_run_says_what_it_chose_and_why_and_records_it(
    tmp_path: Path, engine: str, affinity: str | None
) -> None:
    """At the defaults, a run takes this machine's CPUs (its affinity, so ``taskset -c 0``
    gives one), says so before the load, records it, and its counts still agree. 3 s:
    under CI's load the second process started its engine over a second after the
    first, and a 1 s run had rows from one."""
    if affinity is not None and shutil.which("taskset") is None:
        pytest.skip("taskset (util-linux) is not installed")
    cpus = 1 if affinity is not None else len(os.sched_getaffinity(0))
    scenario = write_scenario(tmp_path / "s.toml", SCENARIO.format(engine=engine))
    prefix = ["taskset", "-c", affinity] if affinity is not None else []
    out = tmp_path / "run"
    done = eph(["run", str(scenario), "--out", str(out)], cwd=tmp_path, prefix=prefix)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = run_dir_summary(out)
    chosen = summary["load_processes"]
    assert (chosen["count"], chosen["asked"], chosen["cpus"]) == (cpus, "auto", cpus)
    said = " ".join(done.stderr.split())
    plural = "es" if cpus != 1 else ""
    assert f"load: {cpus} Locust process{plural}; {chosen['why']}" in said
    assert summary["conservation"]["ok"] is True, summary["conservation"]
    rows = pq.read_table(out / "connections.parquet", columns=["pid", "start_ns"])
    assert len(set(rows.column("pid").to_pylist())) == cpus, "rows from each process it chose"
    # none connected before eph said every process was ready (each is ready at its own
    # moment, and the first connected from then, ahead of the window and the others)
    go = json.loads((out / "progress" / "go").read_text())["monotonic_ns"]
    assert pc.min(rows.column("start_ns")).as_py() >= go


LAB = """
name = "auto-lab"
description = "a lab at the defaults: flat out, any one process exhausts the 300 ports"
duration = "2s"
[target]
endpoints = ["127.0.0.1:9000"]
[listener]
[load]
rate = 0
engine = "{engine}"
users = 10
spawn_rate = 100
backoff = "20ms"
[kernel]
ip_local_port_range = [40000, 40299]
tcp_tw_reuse = 0
"""


@pytest.mark.netns
@pytest.mark.e2e
@pytest.mark.parametrize("engine", ["uvloop", "locust"])
def test_conservation_is_exact_at_the_defaults_in_a_lab(tmp_path: Path, engine: str) -> None:
    """A lab at the defaults: one process per CPU, the range exhausted, and every count
    agreeing, the kernel's too: its active opens are the attempts that sent a SYN plus
    the workers' connections to their master, which sits outside the range (inside, it
    took one of the 300 ports)."""
    cpus = len(os.sched_getaffinity(0))
    scenario = write_scenario(tmp_path / "s.toml", LAB.format(engine=engine))
    out = tmp_path / "run"
    done = eph(["lab", str(scenario), "--out", str(out)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = run_dir_summary(out)
    chosen = summary["load_processes"]
    expected = cpus if cpus <= 2 else cpus - 1  # the lab's target shares the CPUs
    assert chosen["count"] == min(expected, 10), chosen  # never more than the users
    if chosen["count"] > 1:
        assert not 40000 <= chosen["master_port"] <= 40299, chosen
    cons = summary["conservation"]
    assert cons["ok"] is True and cons["attempts_match_kernel"] is True, cons
    assert cons["kernel_other_opens"] >= (chosen["count"] if chosen["count"] > 1 else 0), cons
    assert summary["ports"]["distinct_used"] == 300, summary["ports"]
    assert summary["exhaustion"]["exhausted"] is True
