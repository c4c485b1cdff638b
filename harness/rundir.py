"""The run directory: where one run's scenario, records, stats and report live.

Layout::

    reports/<YYYYmmdd-HHMMSS>-<name>/
        scenario.json         the resolved scenario (what actually ran)
        connections.parquet   one row per connection attempt
        summary.json          the figures, see harness.report.summary
        report.html           self-contained report
        locust_*.csv, locust.json   Locust's own statistics (no --html by default)
        listener.json         the embedded listener's counts
        logs/                 eph.log, locust.log, listener.log, uvloop-*.log
        parts/                per-process record streams (merged, then removed)
        progress/             per-process live counters
        hosts/<name>/         a distributed run's worker: host.json, samples, logs
    reports/latest -> the newest run
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import RunDirError, RunError
from harness.files import atomic_write_json
from harness.scenario import Scenario

__all__ = ["HOSTS_DIR", "RunDir"]

HOSTS_DIR = "hosts"  # a distributed run's workers, one directory each
_MODE = 0o750  # run directories are never world-writable (nor readable)


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def create(cls, base: Path, name: str) -> RunDir:
        """A new, uniquely named directory under ``base``; ``base/latest`` points at it."""
        base.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ["", *(f"-{n}" for n in range(2, 1000))]:
            path = base / f"{stamp}-{name}{suffix}"
            try:
                path.mkdir(mode=_MODE)
            except FileExistsError:
                continue
            run = cls(path)
            run._make_children()
            run._point_latest()
            return run
        raise RunDirError(base, "could not find a free run directory name")

    @classmethod
    def open(cls, path: Path, *, create: bool = False) -> RunDir:
        if create:
            path.mkdir(mode=_MODE, parents=True, exist_ok=True)
        elif not path.is_dir():
            raise RunDirError(path, "no such directory")
        run = cls(path)
        if create:
            run._make_children()
        return run

    def _make_children(self) -> None:
        for child in (self.parts, self.progress, self.logs):
            child.mkdir(mode=_MODE, exist_ok=True)

    def _point_latest(self) -> None:
        latest = self.path.parent / "latest"
        tmp = self.path.parent / f".latest-{os.getpid()}"
        try:
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.path.name)
            os.replace(tmp, latest)
        except OSError:
            pass  # a filesystem without symlinks: the directory itself is what matters

    @property
    def parts(self) -> Path:
        return self.path / "parts"

    def parts_bytes(self) -> int:
        """The bytes the record parts hold: the merge writes up to as much again."""
        total = 0
        for part in self.parts.rglob("*"):
            try:
                total += part.stat().st_size
            except OSError:  # merged and removed meanwhile
                continue
        return total

    @property
    def progress(self) -> Path:
        return self.path / "progress"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def connections(self) -> Path:
        return self.path / "connections.parquet"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    @property
    def scenario(self) -> Path:
        return self.path / "scenario.json"

    def write_scenario(self, scenario: Scenario) -> None:
        if not self.scenario.exists():
            self.write_json("scenario.json", scenario.to_json())

    def read_scenario(self) -> Scenario:
        return Scenario.model_validate(self.read_json("scenario.json"))

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_json(self.path / name, data)

    def read_json(self, name: str) -> Any:
        target = self.path / name
        try:
            return json.loads(target.read_text())
        except FileNotFoundError:
            raise RunDirError(self.path, f"{name} is missing") from None
        except ValueError as exc:
            raise RunDirError(self.path, f"{name} is not valid JSON ({exc})") from None


def min_free_bytes() -> int:
    """The space a run leaves free on its disk: it stops before the disk fills, so that
    the merge and the report still fit (``EPH_MIN_FREE_MB``, default 64)."""
    try:
        return int(float(os.environ.get("EPH_MIN_FREE_MB", "64")) * 2**20)
    except ValueError:
        raise RunError(
            f"EPH_MIN_FREE_MB = {os.environ['EPH_MIN_FREE_MB']!r} is not a number of MiB"
        ) from None


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize
