"""What a distributed worker ships to its master, and how it announces itself.

A worker tells its master, as its test starts, its name, host, run directory and
clock (``announce``, kept in ``worker.json`` too); the master keeps every
announcement in ``workers.json`` (``remember``). At the end a worker ships the
files ``SHIPPED`` names. When one never ships, ``harness.run.leftovers`` finds its
files from these announcements (``eph report --collect-from``).
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any

from harness.errors import RunDirError
from harness.files import atomic_write_json
from harness.runstate import clock_offset_ns

__all__ = [
    "SHIPPED",
    "SHIPPED_PATH",
    "WORKERS_FILE",
    "WORKER_FILE",
    "announce",
    "announced",
    "remember",
]

WORKER_FILE = "worker.json"  # in a worker's own run directory
WORKERS_FILE = "workers.json"  # in the master's: every worker that announced itself
# what a worker ships (or --collect-from copies): its records, samples (a stream
# when its collector died with it), the collector's kernel reading, its logs
SHIPPED = ("parts/*.arrows", "samples.parquet", "samples.arrows", "collector.json", "logs/*.log")
SHIPPED_PATH = re.compile(
    r"(parts/[\w.-]+\.arrows|samples\.(parquet|arrows)|collector\.json|logs/[\w.-]+\.log)"
)


def announce(run_path: Path, name: str) -> dict[str, Any]:
    """What a worker tells its master at the start (and keeps in ``worker.json``)."""
    data = {
        "name": name,
        "hostname": socket.gethostname(),
        "run_dir": str(run_path.resolve()),
        "clock_offset_ns": clock_offset_ns(),
        "announced_at": time.time(),
    }
    atomic_write_json(run_path / WORKER_FILE, data)
    return data


def remember(run_path: Path, name: str, data: dict[str, Any]) -> None:
    """The master's side: ``name`` (its directory under ``hosts/``) announced ``data``."""
    found = announced(run_path)
    found[name] = {**data, "name": name}
    atomic_write_json(run_path / WORKERS_FILE, found)


def announced(run_path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((run_path / WORKERS_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RunDirError(run_path, f"{WORKERS_FILE} is unreadable ({exc})") from None
    return dict(data) if isinstance(data, dict) else {}
