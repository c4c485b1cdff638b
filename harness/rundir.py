"""The run directory: where one run's scenario, records, stats and report live.

Layout::

    reports/<YYYYmmdd-HHMMSS>-<name>/
        scenario.json         the resolved scenario (what actually ran)
        connections.parquet   one row per connection attempt
        summary.json          the figures, see harness.summary (the contract)
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
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import RunDirError, RunError
from harness.files import atomic_write_json
from harness.scenario import Scenario

__all__ = ["HOSTS_DIR", "MASTER_PROGRESS", "RunDir", "claim_out", "describe_contents"]

logger = logging.getLogger(__name__)

HOSTS_DIR = "hosts"  # a distributed run's workers, one directory each
MASTER_PROGRESS = "master.json"  # in progress/: a Locust master's, its workers' summed
_MODE = 0o750  # run directories are never world-writable (nor readable)
# what marks a directory as eph's, and what it then holds (first match names it)
_KINDS = (
    ("comparison.csv", "a sweep"),
    ("observe.json", "an observation"),
    ("scenario.json", "a run"),
    ("state.json", "a run"),
    ("summary.json", "a run"),
    ("connections.parquet", "a run"),
    ("samples.parquet", "a collector's samples"),
)


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
            raise RunDirError(
                path, "is a file, not a run directory" if path.exists() else "no such directory"
            )
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
    def load_go(self) -> Path:
        """Written by ``eph run`` once every local Locust process is ready (the
        CLOCK_MONOTONIC ns it decided at): until then none connects (``EPH_LOAD_GATE``)."""
        return self.path / "progress" / "go"

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

    def write_scenario(self, scenario: Scenario, *, replace: bool = False) -> None:
        """``scenario.json``: what this run runs. The run's own process writes it with
        ``replace`` (its scenario is the one that runs, whatever the directory held);
        Locust's processes only fill it in when it is absent (``locust -f`` alone)."""
        if replace or not self.scenario.exists():
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


def describe_contents(path: Path) -> str | None:
    """What an existing directory holds, in words (``"a run (scenario.json, ...)"``);
    None when it is empty."""
    try:
        names = sorted(child.name for child in path.iterdir())
    except OSError as exc:
        raise RunDirError(path, f"cannot be read ({exc.strerror or exc})") from None
    if not names:
        return None
    kind = next((what for marker, what in _KINDS if marker in names), None)
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    if kind is None:
        return f"{len(names)} entries eph did not write ({shown})"
    return f"{kind} ({shown})"


def claim_out(path: Path, *, force: bool = False, flag: str = "--out") -> Path:
    """Make ``path`` the new, empty directory of one command's output, or say why not.

    A run directory is written by one command, once: a directory that already holds
    anything is refused (``RunDirError``, exit 2), so nothing recorded is ever written
    over. With ``force`` the old one is moved aside, beside it, never deleted; the
    new name is logged and returned in the error's stead. A path that is a file, or
    where no directory can be made, is an error naming it.
    """
    if path.is_symlink() or path.exists():
        if not path.is_dir():
            raise RunDirError(
                path,
                f"{flag} names a file, not a directory: give a directory that does not exist yet",
            )
        held = describe_contents(path)
        if held is not None and not force:
            raise RunDirError(
                path,
                f"already holds {held}. eph never writes over a run: give {flag} a new"
                f" directory such as {_fresh(path)}, or add --force to move this one aside"
                f" to {_aside(path).name} (nothing is deleted)",
            )
        if held is not None:
            moved = _aside(path)
            try:
                path.rename(moved)
            except OSError as exc:
                raise RunDirError(path, f"cannot be moved aside: {exc.strerror or exc}") from None
            logger.warning("--force: %s held %s; moved it aside to %s", path, held, moved)
    try:
        path.mkdir(mode=_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(path, f"{flag}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunDirError(path, f"{flag}: not writable by this user")
    return path


def _fresh(path: Path) -> Path:
    """The first of ``path-2``, ``path-3``, ... that does not exist."""
    for n in range(2, 10_000):
        candidate = path.with_name(f"{path.name}-{n}")
        if not (candidate.exists() or candidate.is_symlink()):
            return candidate
    return path.with_name(f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _aside(path: Path) -> Path:
    """Where ``--force`` moves an old directory: beside it, named for when it was last
    written (its mtime), so the name a refusal says is the name ``--force`` then uses,
    whatever second the two fall in."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    for suffix in ["", *(f"-{n}" for n in range(2, 1000))]:
        candidate = path.with_name(f"{path.name}.replaced-{stamp}{suffix}")
        if not (candidate.exists() or candidate.is_symlink()):
            return candidate
    raise RunDirError(path, "no free name to move it aside to")


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
