"""Locust users that churn TCP connections, and their per-process session.

Imports locust (and so gevent's monkey-patching): only for Locust processes,
through ``harness/locustfile.py``. The listener and collector never import it.
``harness.load.hooks`` starts and closes the sessions on Locust's events.

Configuration comes from the environment, because Locust imports the
locustfile (and picks its User class) before parsing its own arguments:

- ``EPH_SCENARIO``: a scenario TOML, or the resolved ``scenario.json`` of a run
  (default ``scenarios/default.toml``);
- ``EPH_RUN_DIR``: where records go (default a new ``reports/<time>-<name>-locust``);
- ``EPH_MANAGED=1``: set by ``eph run``, which finalizes the run directory itself;
  without it, the Locust process finalizes it at exit;
- ``EPH_RATE_SHARE``: this process's share of ``load.rate`` (default 1);
- ``EPH_WORKER=1``: set by ``eph worker``: the scenario comes from the master,
  each test records into a new directory under ``EPH_RUN_DIR`` with a collector
  of its own, and ships it to the master at the end (``harness.load.distributed``);
- ``EPH_HOST_NAME``: this load generator's name in the records (default the host name).

Locust's ``--host`` (or the web UI's host field), when given, replaces the
scenario's target endpoints: ``--host 127.0.0.1:9000``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import gevent.event
from gevent import subprocess as gsubprocess
from locust import User, task
from locust.env import Environment

from harness.endpoints import Endpoint
from harness.load.churn import ChurnPlan, Target
from harness.load.cpu_meter import CpuMeter, cpu_part_path
from harness.load.distributed import CollectorChild, worker_run_dir
from harness.load.gevent_engine import GeventChurn
from harness.load.outcome import failure, is_status_failure
from harness.load.pacing import Pacer
from harness.load.progress import ProgressCounter
from harness.load.stats import feed_cpu, feed_rows
from harness.load.uvloop_engine import read_frame_cpu
from harness.records import FLUSH_INTERVAL, RecordWriter
from harness.rundir import RunDir
from harness.runstate import note_startup_error
from harness.scenario import Engine, Scenario, load_scenario
from harness.supervisor import Stage, Supervisor

__all__ = [
    "EphUser",
    "current_session",
    "end_sessions",
    "scenario_from_environ",
    "start_session",
    "user_class",
]

logger = logging.getLogger(__name__)

UVLOOP_IDLE = 1.0  # how often a uvloop-engine user wakes up; it only holds a slot
GATE_POLL = 0.005  # seconds between looks for eph's word that every process is ready
GATE_LIMIT = 120.0  # past this, users go without it (eph gives up sooner: its start timeout)
DEFAULT_SCENARIO = Path("scenarios/default.toml")


def scenario_from_environ() -> Scenario:
    path = Path(os.environ.get("EPH_SCENARIO", DEFAULT_SCENARIO))
    if path.suffix == ".json":
        return Scenario.model_validate(json.loads(path.read_text()))
    return load_scenario(path)


class _Session:
    """Everything one Locust process shares between its users for one test."""

    def __init__(
        self,
        environment: Environment,
        scenario: Scenario,
        sequence: int,
        *,
        rate_share: float | None = None,
        collect: bool = False,
    ) -> None:
        if environment.host:
            scenario = scenario.with_endpoints(
                [Endpoint.parse(environment.host, allow_port_zero=False)]
            )
        self.environment = environment
        self.scenario = scenario
        self.run_dir = worker_run_dir(scenario) if collect else _run_dir(scenario)
        self.run_dir.write_scenario(scenario)
        # a distributed worker records its own host's sockets, and ships them at the end
        self.collector = CollectorChild(self.run_dir, scenario) if collect else None
        share = (
            rate_share if rate_share is not None else float(os.environ.get("EPH_RATE_SHARE", "1"))
        )
        self.plan = ChurnPlan.from_scenario(scenario, rate_share=share)
        self.names = self.plan.names
        self.request_type = self.plan.request_type
        self.engine = scenario.load.engine
        self.targets = self.plan.cycle()
        self.pacer = Pacer(self.plan.rate) if self.plan.rate > 0 else None
        pid = os.getpid()
        self.progress = ProgressCounter(
            self.run_dir.progress / f"{pid}-{sequence}.json", self.engine
        )
        self.writer: RecordWriter | None = None
        self.bridge: _UvloopBridge | None = None
        self.cpu = self._start_engine(f"{pid}-{sequence}", share)
        # under eph run, no user connects before every local process is ready
        self.gate = _Gate(self.run_dir.load_go) if os.environ.get("EPH_LOAD_GATE") else None
        self._fire: Callable[..., None] = environment.events.request.fire
        self._closed = False
        # the first progress file tells `eph run` this process makes connections: a
        # uvloop engine's comes when the child says it is ready (``_UvloopBridge``)
        self.flush()
        self._flusher = gevent.spawn(self._flush_loop)

    def _start_engine(self, tag: str, share: float) -> CpuMeter:
        """This process's engine (gevent churn, or the bridge to a uvloop child) and its
        CPU meter: a uvloop child meters its own, and this process then only drives it."""
        label = "locust" if self.engine is Engine.LOCUST else "uvloop-driver"
        meter = CpuMeter(cpu_part_path(self.run_dir.parts, f"{label}-{tag}"), engine=label)
        if self.engine is Engine.LOCUST:
            part = self.run_dir.parts / f"locust-{tag}.arrows"
            self.writer = RecordWriter(
                part, endpoints=self.plan.endpoints, close=self.plan.close_label, engine="locust"
            )
            self.churn = GeventChurn(self.plan, self.writer, self._on_result)
        else:
            self.bridge = _UvloopBridge(self, self.run_dir.parts / f"uvloop-{tag}.arrows", share)
        return meter

    def _on_result(
        self, target: Target, err: int, io_err: int, elapsed_ms: float, rx: int, requests: int
    ) -> None:
        """One connection to Locust: one request, or for HTTP its responses and its
        failure (``harness.records.request_events``), each its share of the time."""
        name, fire, kind = self.names[target.index], self._fire, self.request_type
        failed = bool(err or io_err)
        succeeded = requests - is_status_failure(io_err)  # that response is the failure
        share = elapsed_ms / max(succeeded + failed, 1)
        for _ in range(succeeded):
            fire(
                request_type=kind,
                name=name,
                response_time=share,
                response_length=rx // requests,
                exception=None,
                context={},
            )
        if failed or not requests:
            fire(
                request_type=kind,
                name=name,
                response_time=share,
                response_length=0 if requests else rx,
                exception=failure(err, io_err) if failed else None,
                context={},
            )

    def _flush_loop(self) -> None:
        while True:
            gevent.sleep(FLUSH_INTERVAL)
            self.flush()

    def flush(self, done: bool = False) -> None:
        """One interval: rows to the part file, counted; at ``done`` the last one."""
        if self.writer is not None:
            rows = self.writer.close() if done else self.writer.flush()
            self.progress.update(rows)
            interval = self.cpu.close(rows) if done else self.cpu.tick(rows)
            feed_cpu(self.environment.stats, interval)
        elif done:
            self.cpu.close()
        else:
            self.cpu.tick()
        if done or self.bridge is None or self.bridge.ready:
            self.write_progress(done=done)

    def write_progress(self, done: bool = False) -> None:
        runner = self.environment.runner
        self.progress.write(users=runner.user_count if runner else 0, done=done)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._flusher.kill()
        if self.gate is not None:
            self.gate.close()
        if self.bridge is not None:
            self.bridge.stop()
        self.flush(done=True)
        if self.collector is not None:
            self.collector.stop()


class _Gate:
    """Holds this process's users until ``eph run`` says every Locust process is ready.

    Each process was ready at its own moment (a uvloop engine's start takes a few
    tenths of a second, more under load), and the first connected meanwhile: before
    the run's window, which starts at the last, and ahead of the others' pacing. One
    greenlet looks for eph's word (:attr:`RunDir.load_go`) every :data:`GATE_POLL` s;
    the users wait on an event. Bounded: past :data:`GATE_LIMIT` s the users go."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.open = gevent.event.Event()
        self._watch = gevent.spawn(self._look)

    def _look(self) -> None:
        deadline = time.monotonic() + GATE_LIMIT
        while not self.path.exists() and time.monotonic() < deadline:
            gevent.sleep(GATE_POLL)
        self.open.set()

    def wait(self) -> None:
        self.open.wait()

    def close(self) -> None:
        self._watch.kill(block=False)


class _UvloopBridge:
    """The uvloop engine child of one Locust process: users in, rows and stats out."""

    def __init__(self, session: _Session, part: Path, share: float) -> None:
        self._session = session
        self.users = 0
        self.ready = False  # the child's first (empty) frame came: its loop runs
        self._stopping = False
        scenario_path = session.run_dir.path / f"scenario-{os.getpid()}.json"
        scenario_path.write_text(json.dumps(session.scenario.to_json()))
        log = open(session.run_dir.logs / f"uvloop-{os.getpid()}.log", "ab")  # noqa: SIM115
        self._children = Supervisor()  # the engine dies with this process, even on SIGKILL
        self._proc: Any = self._children.start(  # its pipes are gevent files
            "uvloop engine",
            [
                sys.executable,
                "-m",
                "harness.load.uvloop_engine",
                "--scenario",
                str(scenario_path),
                "--part",
                str(part),
                "--rate-share",
                str(share),
            ],
            stage=Stage.LOAD,
            grace=5.0,
            own_group=False,  # a Ctrl-C at a plain `locust` reaches it (and it ignores it)
            stdin=gsubprocess.PIPE,
            stdout=gsubprocess.PIPE,
            stderr=log,
        ).proc
        log.close()
        self._reader = gevent.spawn(self._read)

    def add_users(self, delta: int) -> None:
        self.users += delta
        self._send({"users": self.users})

    def _send(self, command: dict[str, Any]) -> None:
        try:
            self._proc.stdin.write(json.dumps(command).encode() + b"\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            logger.error("uvloop engine (pid %s) is gone", self._proc.pid)

    def _read(self) -> None:
        session = self._session
        stats = session.environment.stats
        while (frame := read_frame_cpu(self._proc.stdout)) is not None:
            feed_rows(stats, frame.rows, session.names, session.request_type)
            feed_cpu(stats, frame.cpu)  # the child's CPU; it writes its own CPU part
            session.progress.update(frame.rows)
            if not self.ready:
                self.ready = True
                session.write_progress()
        if not self.ready and not self._stopping:
            code = self._proc.wait()
            note_startup_error(
                session.run_dir.path,
                f"uvloop-{os.getpid()}",
                f"the uvloop engine of Locust process {os.getpid()} exited (code {code})"
                f" before it was ready: see {session.run_dir.logs / f'uvloop-{os.getpid()}.log'}",
            )

    def stop(self) -> None:
        self._stopping = True
        self._send({"stop": True})
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        plan = self._session.plan
        limit = plan.connect_timeout + plan.io_timeout + plan.hold + 10.0
        self._reader.join(timeout=limit)
        self._children.close()  # SIGTERM, 5 s, SIGKILL: the supervisor's one stop
        self._reader.join(timeout=5)


def _run_dir(scenario: Scenario) -> RunDir:
    given = os.environ.get("EPH_RUN_DIR")
    if given:
        return RunDir.open(Path(given), create=True)
    return RunDir.create(Path("reports"), scenario.name + "-locust")


# ----------------------------------------------------------------- sessions


_sessions: dict[int, _Session] = {}  # by id(environment): one test's session at a time


def start_session(
    environment: Environment,
    scenario: Scenario,
    sequence: int,
    *,
    rate_share: float | None = None,
    collect: bool = False,
) -> None:
    """A new session for ``environment``'s test; the previous one, if any, closes."""
    old = _sessions.pop(id(environment), None)
    if old is not None:
        old.close()
    _sessions[id(environment)] = _Session(
        environment, scenario, sequence, rate_share=rate_share, collect=collect
    )


def current_session(environment: Environment) -> _Session | None:
    return _sessions.get(id(environment))


def end_sessions() -> list[_Session]:
    """Close every session (Locust is quitting) and return them."""
    ended = list(_sessions.values())
    _sessions.clear()
    for session in ended:
        session.close()
    return ended


def _session(environment: Environment) -> _Session:
    found = _sessions.get(id(environment))
    if found is None:
        raise RuntimeError("eph session missing: was harness.load.hooks.install() called?")
    return found


# ----------------------------------------------------------------- users


class EphUser(User):
    """Each user is one concurrent connection loop, of the scenario's engine.

    One class for both engines, chosen per test by the session: a distributed
    worker learns the scenario (so the engine) only when its test starts, and
    Locust's master and workers must name the same user class.
    """

    abstract = True  # made concrete by the locustfile, through user_class()

    def wait_time(self) -> float:
        """A uvloop engine's user only holds its slot: it idles in Locust's wait, where a
        stop ends it at once. Idle inside the task, it held every stop up to
        ``UVLOOP_IDLE``, and the engine went on connecting meanwhile: a 1 s run at
        100/s recorded 66 connections after its window."""
        return UVLOOP_IDLE if self.session.bridge is not None else 0.0

    def on_start(self) -> None:
        self.session = _session(self.environment)
        if self.session.gate is not None:
            self.session.gate.wait()
        if self.session.bridge is not None:
            self.session.bridge.add_users(1)

    def on_stop(self) -> None:
        session = getattr(self, "session", None)
        if session is not None and session.bridge is not None:
            session.bridge.add_users(-1)

    @task
    def churn(self) -> None:
        session = self.session
        if session.bridge is not None:
            return  # the uvloop engine child does the work; the user waits (wait_time)
        if session.pacer is not None:
            delay = session.pacer.delay()
            if delay > 0:
                gevent.sleep(delay)
        if session.churn.attempt(next(session.targets)) and session.plan.backoff:
            gevent.sleep(session.plan.backoff)  # a failed connect: do not spin a core


def user_class() -> type[EphUser]:
    """The concrete user class, named ``EphUser`` for Locust's UI and its workers."""
    return type("EphUser", (EphUser,), {"abstract": False, "__module__": EphUser.__module__})
