"""Locust master/worker mode: the scenario goes out, each worker's run files come back.

Three custom Locust messages, over Locust's own master/worker connection:

``eph_scenario`` (master to each worker, ahead of the first spawn message)
    ``{"scenario": <scenario.json>, "rate_share": 1/workers}``.
``eph_file`` (worker to master, at the end of the test, in 1 MiB chunks)
    ``{"name", "path", "data", "first", "last"}``: one file of the worker's run
    directory (record parts, samples, collector.json, logs).
``eph_host`` (worker to master, after its last file)
    ``{"name", "hostname", "clock_offset_ns", "files", "bytes"}``.

Locust's connection delivers messages in order, and a worker sends all of this
from its test_stop handler, before its own ``client_stopped``; so once the
master has seen every worker stop, it holds every file. The master writes them
under ``hosts/<name>/`` of its run directory, where ``eph run`` merges them.

Imported only by Locust processes (``harness.users``).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent

from harness.rundir import HOSTS_DIR

__all__ = ["CHUNK", "Receiver", "clock_offset_ns", "ship"]

logger = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per eph_file message: heartbeats keep flowing in between
SHIPPED = ("parts/*.arrows", "samples.parquet", "collector.json", "logs/*.log")
_ALLOWED = re.compile(r"(parts/[\w.-]+\.arrows|samples\.parquet|collector\.json|logs/[\w.-]+\.log)")
_NAME = re.compile(r"[^\w.-]+")

Send = Callable[[str, dict[str, Any]], None]


def clock_offset_ns() -> int:
    """Wall clock minus CLOCK_MONOTONIC: what maps this host's stamps onto another's."""
    return time.time_ns() - time.monotonic_ns()


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
        self.root = run_path / HOSTS_DIR
        self._names: dict[str, str] = {}  # Locust client id -> directory name
        self.hosts: dict[str, dict[str, Any]] = {}

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
        if not _ALLOWED.fullmatch(relative):
            logger.warning("worker %s sent an unexpected file %r; ignored", msg.node_id, relative)
            return
        target = self._directory(msg.node_id, str(data.get("name", ""))) / relative
        target.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        with open(target, "wb" if data.get("first") else "ab") as sink:
            sink.write(data.get("data", b""))

    def on_host(self, msg: Any, **_: Any) -> None:
        data = dict(msg.data)
        directory = self._directory(msg.node_id, str(data.get("name", "")))
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        # the worker's stamps plus this shift are on this host's CLOCK_MONOTONIC
        data["clock_shift_ns"] = int(data.get("clock_offset_ns", 0)) - clock_offset_ns()
        data["client_id"] = msg.node_id
        data["received_at"] = time.time()
        (directory / "host.json").write_text(json.dumps(data, indent=2) + "\n")
        self.hosts[directory.name] = data
        logger.info(
            "worker %s shipped %d files, %.1f MiB",
            directory.name,
            data.get("files", 0),
            data.get("bytes", 0) / 2**20,
        )
