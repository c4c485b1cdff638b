"""Locust master/worker mode: the scenario goes out, each worker's run files come back.

Three custom Locust messages, over Locust's own master/worker connection:

``eph_scenario`` (master to each worker, ahead of the first spawn message)
    ``{"scenario": <scenario.json>, "rate_share": 1/workers}``.
``eph_file`` (worker to master, at the end of the test, in 1 MiB chunks)
    ``{"name", "path", "data", "first", "last"}``: one file of the worker's run
    directory (record parts, samples, collector.json, logs).
``eph_host`` (worker to master, after its last file)
    ``{"name", "hostname", "clock_offset_ns", "files", "bytes"}``.
``eph_worker`` (worker to master, as its test starts)
    ``{"name", "hostname", "run_dir", "clock_offset_ns"}``: where its records are
    while it runs, and stay if it dies (:mod:`harness.run.leftovers`).

Locust's connection delivers messages in order, and a worker sends all of this
from its test_stop handler, before its own ``client_stopped``; so once the
master has seen every worker stop, it holds every file. The master writes them
under ``hosts/<name>/`` of its run directory, where ``eph run`` merges them.

Also here: a worker's own collector (``CollectorChild``) and the master's share of
a test (``MasterSession``: the scenario out, progress from the workers' stats).
Imported only by Locust processes (``harness.load.users``, ``harness.load.hooks``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gevent

from harness.files import atomic_write_json
from harness.load.shipping import SHIPPED, SHIPPED_PATH, remember
from harness.observe.collector import collect_command
from harness.records import FLUSH_INTERVAL, host_name
from harness.rundir import HOSTS_DIR, MASTER_PROGRESS, RunDir
from harness.runstate import clock_offset_ns
from harness.scenario import Protocol, Scenario
from harness.supervisor import Stage, Supervisor
from harness.units import format_duration

if TYPE_CHECKING:  # importing locust monkey-patches: only its own processes do
    from locust.env import Environment

__all__ = [
    "CHUNK",
    "CollectorChild",
    "MasterSession",
    "Receiver",
    "clock_offset_ns",
    "master_run_dir",
    "ship",
    "worker_run_dir",
]

logger = logging.getLogger(__name__)

COLLECTOR_START_TIMEOUT = 10.0  # seconds a worker waits for its collector's first sample
CHUNK = 1 << 20  # bytes per eph_file message: heartbeats keep flowing in between
_NAME = re.compile(r"[^\w.-]+")

Send = Callable[[str, dict[str, Any]], None]


def ship(send: Send, run_path: Path, name: str) -> dict[str, Any]:
    """Send a worker's run files to the master; return what ``eph_host`` said."""
    files = total = 0
    for pattern in SHIPPED:
        for path in sorted(run_path.glob(pattern)):
            relative = path.relative_to(run_path).as_posix()
            with open(path, "rb") as source:
                first = True
                while True:
                    data = source.read(CHUNK)
                    last = len(data) < CHUNK
                    send(
                        "eph_file",
                        {
                            "name": name,
                            "path": relative,
                            "data": data,
                            "first": first,
                            "last": last,
                        },
                    )
                    total += len(data)
                    first = False
                    gevent.sleep(0)
                    if last:
                        break
            files += 1
    host = {
        "name": name,
        "hostname": socket.gethostname(),
        "clock_offset_ns": clock_offset_ns(),
        "files": files,
        "bytes": total,
    }
    send("eph_host", host)
    return host


class Receiver:
    """The master's side: each worker's files under ``hosts/<name>/``.

    Two workers that give the same name (two namespaces of one machine share a
    host name) get ``name-2``, ``name-3``... by Locust client id.
    """

    def __init__(self, run_path: Path) -> None:
        self.run_path = run_path
        self.root = run_path / HOSTS_DIR
        self._names: dict[str, str] = {}  # Locust client id -> directory name

    def _directory(self, client_id: str, wanted: str) -> Path:
        name = self._names.get(client_id)
        if name is None:
            base = _NAME.sub("-", wanted).strip(".-") or "worker"
            taken = set(self._names.values())
            name = base
            for n in range(2, 10_000):
                if name not in taken:
                    break
                name = f"{base}-{n}"
            self._names[client_id] = name
        return self.root / name

    @property
    def clients(self) -> list[str]:
        """Locust client ids of the workers that sent anything."""
        return list(self._names)

    def on_file(self, msg: Any, **_: Any) -> None:
        data = msg.data
        relative = str(data.get("path", ""))
        if not SHIPPED_PATH.fullmatch(relative):
            logger.warning("worker %s sent an unexpected file %r; ignored", msg.node_id, relative)
            return
        target = self._directory(msg.node_id, str(data.get("name", ""))) / relative
        target.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        with open(target, "wb" if data.get("first") else "ab") as sink:
            sink.write(data.get("data", b""))

    def _worker_message(self, msg: Any) -> tuple[Path, dict[str, Any]]:
        """A worker's message: its directory here, and its data with the clock shift
        (the worker's stamps plus it are on this host's CLOCK_MONOTONIC) and its id."""
        data = dict(msg.data)
        directory = self._directory(msg.node_id, str(data.get("name", "")))
        data["clock_shift_ns"] = int(data.get("clock_offset_ns", 0)) - clock_offset_ns()
        data["client_id"] = msg.node_id
        return directory, data

    def on_worker(self, msg: Any, **_: Any) -> None:
        """A worker's test started: where its records are, should it never ship them."""
        directory, data = self._worker_message(msg)
        remember(self.run_path, directory.name, data)

    def on_host(self, msg: Any, **_: Any) -> None:
        directory, data = self._worker_message(msg)
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        data["received_at"] = time.time()
        (directory / "host.json").write_text(json.dumps(data, indent=2) + "\n")
        logger.info(
            "worker %s shipped %d files, %.1f MiB",
            directory.name,
            data.get("files", 0),
            data.get("bytes", 0) / 2**20,
        )


# ----------------------------------------------------------------- worker side


def worker_run_dir(scenario: Scenario) -> RunDir:
    """A new directory per test under ``EPH_RUN_DIR`` (``eph worker --out``)."""
    base = Path(os.environ.get("EPH_RUN_DIR", "reports"))
    return RunDir.create(base, f"{scenario.name}-{host_name()}")


class CollectorChild:
    """``eph collect`` for a worker's own host, a child process that never imports locust."""

    def __init__(self, run_dir: RunDir, scenario: Scenario) -> None:
        args = collect_command(
            run_dir.path,
            format_duration(scenario.collector.interval),
            scenario.duration + 600,  # eph stops it first; this bounds a lost worker
            scenario.target.endpoints,
            udp=scenario.load.protocol is Protocol.UDP,
        )
        with open(run_dir.logs / "collector.log", "ab") as log:
            self._children = Supervisor()  # it dies with this process, even on SIGKILL
            self._proc = self._children.start(
                "collector",
                args,
                stage=Stage.OBSERVE,
                grace=15.0,
                death_signal=signal.SIGTERM,
                own_group=False,
                stdout=log,
                stderr=log,
            ).proc
        # sampling before the first connection, as in `eph run` (its stream opens right
        # before its first sample); a collector that cannot start is the log's business
        stream = run_dir.path / "samples.arrows"
        deadline = time.monotonic() + COLLECTOR_START_TIMEOUT
        while not stream.exists() and self._proc.poll() is None and time.monotonic() < deadline:
            gevent.sleep(0.02)
        gevent.sleep(0.05)

    def stop(self) -> None:
        self._children.close()  # SIGTERM, 15 s, SIGKILL: the supervisor's one stop


# ----------------------------------------------------------------- master side


class MasterSession:
    """A master's share of a distributed test: the scenario out, progress written."""

    def __init__(self, environment: Environment, scenario: Scenario) -> None:
        self.environment = environment
        runner: Any = environment.runner  # a MasterRunner
        self.run_dir = RunDir.open(master_run_dir(scenario), create=True)
        self.run_dir.write_scenario(scenario)
        workers = max(1, runner.worker_count)
        runner.send_message(
            "eph_scenario", {"scenario": scenario.to_json(), "rate_share": 1 / workers}
        )
        self._progress = self.run_dir.progress / MASTER_PROGRESS
        self.started = time.time()
        self.write()
        self._writer = gevent.spawn(self._loop)

    def _loop(self) -> None:
        while True:
            gevent.sleep(FLUSH_INTERVAL)
            self.write()

    def write(self, done: bool = False) -> None:
        """Progress from the stats workers report (every few seconds, Locust's pace)."""
        stats = self.environment.stats
        errors: dict[str, int] = {}
        for entry in stats.errors.values():
            errors[str(entry.error)] = errors.get(str(entry.error), 0) + entry.occurrences
        runner = self.environment.runner
        data = {
            "pid": os.getpid(),
            "engine": "distributed",
            "started": self.started,
            "time": time.time(),
            "users": runner.user_count if runner else 0,
            "workers": getattr(runner, "worker_count", 0),
            "attempts": stats.total.num_requests,
            "failures": stats.total.num_failures,
            "errors": errors,
            "done": done,
        }
        atomic_write_json(self._progress, data, indent=None)

    def close(self) -> None:
        self._writer.kill()
        self.write(done=True)


def master_run_dir(scenario: Scenario | None) -> Path:
    """The master's run directory: ``EPH_RUN_DIR`` (``eph run`` sets it), made once."""
    if not _MASTER_DIR:
        given = os.environ.get("EPH_RUN_DIR")
        name = scenario.name if scenario is not None else "master"
        _MASTER_DIR.append(
            Path(given) if given else RunDir.create(Path("reports"), name + "-locust").path
        )
    return _MASTER_DIR[0]


_MASTER_DIR: list[Path] = []
