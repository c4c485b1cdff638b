"""Live progress: each load process writes a small JSON file, ``eph run`` sums them.

Files rather than a socket: the load processes are Locust (gevent) processes,
and a file replaced atomically every flush costs nothing, survives any of them
dying, and needs no protocol.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.files import atomic_write_json
from harness.load.outcome import failure_counts, label
from harness.rundir import MASTER_PROGRESS

__all__ = ["Progress", "ProgressCounter", "read_progress"]


class ProgressCounter:
    """Counts flushed rows of one process."""

    def __init__(self, path: Path, engine: str) -> None:
        self.path = path
        self.engine = engine
        self.started = time.time()
        self.attempts = 0
        self.failures = 0
        self.errors: Counter[str] = Counter()
        path.parent.mkdir(parents=True, exist_ok=True)

    def update(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        self.attempts += len(rows)
        for errno, io_errno, count in failure_counts(rows):
            self.failures += count
            self.errors[label(errno, io_errno)] += count

    def write(self, *, users: int, done: bool = False) -> None:
        data = {
            "pid": os.getpid(),
            "engine": self.engine,
            "started": self.started,
            "time": time.time(),
            "users": users,
            "attempts": self.attempts,
            "failures": self.failures,
            "errors": dict(self.errors),
            "done": done,
        }
        atomic_write_json(self.path, data, indent=None)


@dataclass
class Progress:
    """All load processes of a run, summed."""

    processes: int = 0
    users: int = 0
    attempts: int = 0
    failures: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    started: float | None = None

    @property
    def running(self) -> bool:
        return self.processes > 0


def read_progress(directory: Path) -> Progress:
    """Every load process's progress, summed. A Locust master's (``master.json``) sums
    its workers' as Locust reports them: it counts only when no worker writes here (its
    workers are on other hosts), or its local ``--processes`` would be counted twice."""
    total = Progress()
    paths = list(directory.glob("*.json"))
    local = [p for p in paths if p.name != MASTER_PROGRESS]
    for path in local or paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # replaced under our feet, or a process died mid-write
        total.processes += 1
        total.users += int(data.get("users", 0))
        total.attempts += int(data.get("attempts", 0))
        total.failures += int(data.get("failures", 0))
        total.errors.update(data.get("errors", {}))
        started = float(data.get("started", 0))
        total.started = started if total.started is None else min(total.started, started)
    return total
