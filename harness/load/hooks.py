"""eph's hooks into Locust's events: a session per test, the master's share, the end.

``harness/locustfile.py`` calls :func:`install` once. Then, in each Locust process:

- ``init``: a master registers the workers' file messages, a worker the master's
  scenario message;
- ``test_start``: a master starts its :class:`MasterSession`; any other process
  starts a new user session (``harness.load.users``), a distributed worker with
  the scenario its master sent;
- ``test_stop``: the session closes; a worker reports its last stats and ships
  its run files; a master tells the workers that shipped to quit;
- ``quitting``: a master still running stops first, so its workers' last rows
  are counted;
- ``quit``: sessions close, and plain ``locust -f`` finalizes its run directory.

Imports locust: only for Locust processes.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
from locust import events
from locust.env import Environment
from locust.runners import STATE_RUNNING, STATE_SPAWNING, MasterRunner, WorkerRunner

from harness.errors import EphError
from harness.kernel.parent_death import die_with_parent_after_fork
from harness.load import locust_compat
from harness.load.distributed import MasterSession, Receiver, master_run_dir, ship
from harness.load.shipping import announce
from harness.load.users import current_session, end_sessions, start_session
from harness.records import host_name
from harness.runstate import note_startup_error
from harness.scenario import Scenario

__all__ = ["LOOPBACK", "LocustHooks", "install"]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class LocustHooks:
    """The listeners of one Locust process, and what they keep between events.

    ``scenario`` is None on a distributed worker (``eph worker``): the master
    sends it ahead of the test.
    """

    def __init__(
        self, scenario: Scenario | None, finish: Callable[[Path, int], object] | None = None
    ) -> None:
        self.scenario = scenario
        self._finish = finish  # plain ``locust -f``: merges, summarizes and reports
        self._sequence = itertools.count()  # one session (and part file) per test
        self._received: dict[str, Any] = {}  # a worker's eph_scenario message
        self._masters: dict[int, MasterSession] = {}
        self._receivers: dict[int, Receiver] = {}

    def install(self) -> None:
        die_with_parent_after_fork(signal.SIGKILL)  # Locust's --processes workers die with it
        events.init.add_listener(self.on_init)
        events.init_command_line_parser.add_listener(_loopback_defaults)
        events.test_start.add_listener(self.on_test_start)
        events.test_stop.add_listener(self.on_test_stop)
        events.quit.add_listener(self.on_quit)

    def on_init(self, environment: Environment, **_: Any) -> None:
        # gevent's loop keeps the time of its last turn: after a slow start (imports on
        # a busy host) it is seconds behind, and Locust's --run-time timer, set next,
        # fired at once (0 requests in a "2 s" run, seen under CI load)
        gevent.get_hub().loop.update_now()
        # quitting fires its listeners newest first, and the master runner's own, which
        # quits at once, is added when the runner is made: add ours after that
        events.quitting.add_listener(self.on_quitting)
        runner = environment.runner
        if isinstance(runner, MasterRunner):
            receiver = Receiver(master_run_dir(self.scenario))
            self._receivers[id(environment)] = receiver
            runner.register_message("eph_file", receiver.on_file)
            runner.register_message("eph_host", receiver.on_host)
            runner.register_message("eph_worker", receiver.on_worker)
        elif isinstance(runner, WorkerRunner):
            locust_compat.check()  # at start, not in the middle of the first test
            runner.register_message("eph_scenario", self._on_scenario)

    def _on_scenario(self, msg: Any, **_: Any) -> None:
        self._received.update(msg.data)

    def on_test_start(self, environment: Environment, **_: Any) -> None:
        runner = environment.runner
        if isinstance(runner, MasterRunner):
            self._start_master(environment)  # the master runs no users; its workers record
        elif isinstance(runner, WorkerRunner) and os.environ.get("EPH_WORKER") == "1":
            self._start_worker(environment, runner)
        else:
            if self.scenario is None:
                raise RuntimeError("no scenario: set EPH_SCENARIO")
            try:
                start_session(environment, self.scenario, next(self._sequence))
            except EphError as exc:  # eph's parent says it on the user's terminal
                run_dir = os.environ.get("EPH_RUN_DIR")
                if run_dir:
                    note_startup_error(Path(run_dir), "locust", str(exc))
                raise

    def _start_master(self, environment: Environment) -> None:
        if self.scenario is None:
            raise RuntimeError("a Locust master needs EPH_SCENARIO")
        old = self._masters.pop(id(environment), None)
        if old is not None:
            old.close()
        self._masters[id(environment)] = MasterSession(environment, self.scenario)

    def _start_worker(self, environment: Environment, runner: WorkerRunner) -> None:
        if "scenario" not in self._received:
            logger.error("the master sent no scenario: is it an `eph run --master`?")
            runner.quit()
            return
        start_session(
            environment,
            Scenario.model_validate(self._received["scenario"]),
            next(self._sequence),
            rate_share=float(self._received["rate_share"]),
            collect=True,
        )
        session = current_session(environment)
        if session is not None:  # where this worker's records stay, should it die
            runner.send_message("eph_worker", announce(session.run_dir.path, host_name()))

    def on_test_stop(self, environment: Environment, **_: Any) -> None:
        runner = environment.runner
        session = current_session(environment)
        if session is not None:
            session.close()
            if isinstance(runner, WorkerRunner):
                # the rows close() fed reach the master now, ahead of this worker's
                # "client_stopped"
                locust_compat.report_stats_now(runner)
                if session.collector is not None:
                    ship(runner.send_message, session.run_dir.path, host_name())
        master = self._masters.get(id(environment))
        if master is not None:
            master.close()
        receiver = self._receivers.get(id(environment))
        if receiver is not None and isinstance(runner, MasterRunner):
            # every worker has stopped and shipped; Locust's own quit only reaches
            # workers still in a test, so these would linger for its 60 s heartbeat
            for client_id in receiver.clients:
                runner.send_message("quit", None, client_id)

    def on_quitting(self, environment: Environment, **_: Any) -> None:
        runner = environment.runner
        if isinstance(runner, MasterRunner) and runner.state in (STATE_RUNNING, STATE_SPAWNING):
            # SIGTERM makes a headless master quit, and quit() waits only 0.5 s for
            # the workers' last stats; a uvloop engine takes longer to stop. Stopping
            # first waits until every worker has stopped, so its last rows are counted.
            runner.stop()

    def on_quit(self, **_: Any) -> None:
        for session in end_sessions():
            if os.environ.get("EPH_MANAGED") != "1" and session.collector is None:
                requests = session.environment.stats.total.num_requests
                if self._finish is not None:
                    self._finish(session.run_dir.path, requests)
                    logger.info("eph run directory: %s (report.html)", session.run_dir.path)


def install(
    scenario: Scenario | None, finish: Callable[[Path, int], object] | None = None
) -> LocustHooks:
    """Hook eph into Locust's events (call once, from the locustfile). ``finish`` ends
    a plain ``locust -f``'s run directory, which no eph process will (the locustfile
    hands it ``harness.run.finalize``: this package stays below the run's)."""
    hooks = LocustHooks(scenario, finish)
    hooks.install()
    return hooks


def _loopback_defaults(parser: Any, **_: Any) -> None:
    """Locust's web UI and master listen on every interface by default; eph's bind
    127.0.0.1 unless told otherwise (``--web-host``, ``--master-bind-host``)."""
    parser.set_defaults(web_host=LOOPBACK, master_bind_host=LOOPBACK)
