"""What eph needs of Locust beyond its documented API, in one place.

Only one thing, today: a worker reporting its stats *now*. Locust's worker
reports on a timer (``WORKER_REPORT_INTERVAL``); at the end of a test eph needs
the rows it has just fed to reach the master ahead of the worker's
``client_stopped``, and Locust has no public call for that. :func:`report_stats_now`
does what ``WorkerRunner`` does on its timer, with public calls only
(``events.report_to_master``, ``runner.send_message``); what it still relies on
is the name of the message the master treats as a worker's report, ``"stats"``.

:func:`check` verifies every such reliance against the installed Locust and
raises :class:`LocustChanged` naming what is missing and the version;
``tests/test_locust_compat.py`` runs it, so an upgrade that breaks one fails
there, not in the middle of a distributed run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import locust
from locust.event import Events
from locust.runners import MasterRunner, WorkerRunner

__all__ = ["LOCUST_VERSION", "WORKER_REPORT", "LocustChanged", "check", "report_stats_now"]

LOCUST_VERSION: str = locust.__version__
WORKER_REPORT = "stats"  # the message a worker's stats travel in, worker to master


class LocustChanged(RuntimeError):
    """The installed Locust lacks something eph relies on."""

    def __init__(self, needed: str, why: str) -> None:
        self.needed = needed
        self.version = LOCUST_VERSION
        super().__init__(
            f"Locust {LOCUST_VERSION} has no {needed} ({why}); "
            "eph supports the Locust versions pyproject.toml allows"
        )


def report_stats_now(runner: WorkerRunner) -> None:
    """Send this worker's stats to the master now, as its report timer would."""
    data: dict[str, Any] = {}
    runner.environment.events.report_to_master.fire(client_id=runner.client_id, data=data)
    runner.send_message(WORKER_REPORT, data)


def _has_event(name: str) -> bool:
    return name in inspect.get_annotations(Events)


def _master_handles(message: str) -> bool:
    try:
        source = inspect.getsource(MasterRunner)
    except (OSError, TypeError):  # no source installed: nothing to read, assume it is there
        return True
    return f'"{message}"' in source or f"'{message}'" in source


def _worker_sets(attribute: str) -> bool:
    try:
        source = inspect.getsource(WorkerRunner.__init__)
    except (OSError, TypeError):
        return True
    return f"self.{attribute} =" in source


def _needs() -> tuple[tuple[str, str, Callable[[], bool]], ...]:
    """(what, why eph needs it, whether the installed Locust has it)"""
    return (
        (
            "Events.report_to_master",
            "fills a worker's stats report",
            lambda: _has_event("report_to_master"),
        ),
        (
            "WorkerRunner.send_message",
            "sends a worker's report and eph's files",
            lambda: callable(vars(WorkerRunner).get("send_message")),  # not Runner's stub
        ),
        (
            "WorkerRunner.client_id",
            "names the worker in its report",
            lambda: _worker_sets("client_id"),
        ),
        (
            f'"{WORKER_REPORT}" message handled by MasterRunner',
            "the master's side of a worker's report",
            lambda: _master_handles(WORKER_REPORT),
        ),
    )


def check() -> None:
    """Raise :class:`LocustChanged` for the first reliance the installed Locust breaks."""
    for needed, why, present in _needs():
        if not present():
            raise LocustChanged(needed, why)
