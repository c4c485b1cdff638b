"""``state.json``: where a run's lifecycle stood, written as it moves on.

A run that ends normally leaves ``finished``. A run whose ``eph`` process was
killed (SIGKILL, the OOM killer, a power cut) leaves the phase it was in, with
the pid and host of that process: ``eph report`` then knows that the run did
not end, that nobody is still writing the directory (the pid is gone), and
that the summary it writes is of a crashed run (:mod:`harness.run.crash`).

Each write replaces the file atomically: a reader sees one whole state or the
one before it, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from harness.errors import RunDirError
from harness.files import atomic_write, atomic_write_json

__all__ = [
    "STATE_FILE",
    "Phase",
    "RunState",
    "clock_offset_ns",
    "note_startup_error",
    "noting_errors",
    "read_state",
    "startup_error",
    "write_state",
]

STATE_FILE = "state.json"
STARTUP_ERROR = "{child}.error"  # in logs/: a child's one-paragraph reason it could not start


class Phase(StrEnum):
    """A run's lifecycle, in order."""

    STARTING = "starting"  # children starting, Locust not yet making connections
    LOADING = "loading"  # the load runs
    STOPPING = "stopping"  # the children stop, in the supervisor's order
    FINALIZING = "finalizing"  # merging parts, writing summary and report
    FINISHED = "finished"


class RunState(BaseModel):
    """One line of a run's life: the phase, and whose process it is."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    phase: Phase
    pid: int
    host: str
    pid_started: float | None = None
    """The process's start time (seconds since boot, /proc): a pid reused later is not it."""
    updated_at: float
    """Seconds since the epoch."""
    started_at: float | None = None
    """When the run started (wall clock)."""
    load_started_at: float | None = None
    """When the load started (wall clock)."""
    load_ended_at: float | None = None
    """When the load ended (wall clock): with ``load_started_at``, the load's window."""
    load_duration_s: float | None = None
    """The load's window on the monotonic clock, as ``summary.json``'s ``duration_s``."""
    locust_launched_at: float | None = None
    """When eph launched Locust (wall clock): to the first record, the load's start-up."""
    clock_offset_ns: int | None = None
    """Wall clock minus CLOCK_MONOTONIC on the run's host: maps record stamps to wall time."""
    expected_workers: int | None = None
    """A distributed master's ``--expect-workers``: a crashed one still names its missing."""
    load_processes: dict[str, Any] | None = None
    """How many Locust processes the run chose, and why (the summary's ``load_processes``)."""
    stop_reason: str | None = None
    error: str | None = None
    """The error that ended eph before the run finished (not a kill: that leaves none)."""

    def alive(self) -> bool | None:
        """Whether the process that wrote this still runs: None when it ran on another host."""
        if self.host != socket.gethostname():
            return None
        started = _process_started(self.pid)
        if started is None:
            return False
        return self.pid_started is None or abs(started - self.pid_started) < 0.05


def clock_offset_ns() -> int:
    """Wall clock minus CLOCK_MONOTONIC: what maps this host's stamps onto another's."""
    return time.time_ns() - time.monotonic_ns()


def write_state(run_path: Path, phase: Phase, **facts: Any) -> RunState:
    """Record ``phase`` for this process; facts given before (start times) are kept."""
    previous = read_state(run_path)
    kept = previous.model_dump(exclude={"phase", "updated_at"}) if previous else {}
    state = RunState.model_validate(
        {
            **kept,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "pid_started": _process_started(os.getpid()),
            **facts,
            "phase": phase,
            "updated_at": time.time(),
        }
    )
    atomic_write_json(run_path / STATE_FILE, state.model_dump(mode="json"))
    return state


@contextlib.contextmanager
def noting_errors(run_path: Path) -> Iterator[None]:
    """An error that ends eph mid-run is noted in ``state.json``, in the phase it struck."""
    try:
        yield
    except Exception as exc:
        state = read_state(run_path)
        if state is not None:
            write_state(run_path, state.phase, error=f"{type(exc).__name__}: {exc}")
        raise


def note_startup_error(run_path: Path, child: str, message: str) -> None:
    """A child (Locust, a worker) could not start its load: ``message``, one paragraph,
    goes to ``logs/<child>.error``, where :func:`startup_error` finds it for the
    parent, who says it on the user's terminal instead of "exited before starting"."""
    logs = run_path / "logs"
    logs.mkdir(mode=0o750, exist_ok=True)
    atomic_write(logs / STARTUP_ERROR.format(child=child), message.strip() + "\n")


def startup_error(run_path: Path) -> str | None:
    """The first reason a child left in ``logs/`` for not starting; None if none did."""
    for path in sorted((run_path / "logs").glob(STARTUP_ERROR.format(child="*"))):
        try:
            text = path.read_text(errors="replace").strip()
        except OSError:
            continue
        if text:
            return text
    return None


def read_state(run_path: Path) -> RunState | None:
    """The run's state; None for a run directory from before eph wrote one."""
    path = run_path / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RunDirError(run_path, f"{STATE_FILE} is unreadable ({exc})") from None
    try:
        return RunState.model_validate(data)
    except ValueError as exc:  # pydantic's ValidationError
        raise RunDirError(run_path, f"{STATE_FILE} does not validate ({exc})") from None


def _process_started(pid: int) -> float | None:
    """Seconds after boot that ``pid`` started (/proc/PID/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    if fields[0] == "Z":
        return None  # a zombie: dead, its parent has not reaped it yet
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")
