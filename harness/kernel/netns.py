"""Throwaway network namespaces: kernel settings for one run only.

Each namespace is named ``<prefix>-<pid>-<n>`` so that parallel runs and the
leftovers of a crashed one never collide, and it is deleted on every exit path
of the ``with`` block. An eph killed with SIGKILL deletes nothing: the next eph
command of any verb calls :func:`sweep_stale`, which deletes every ``eph*``
namespace whose pid is gone (listing ``/run/netns`` costs no subprocess), and
``eph lab --cleanup`` does the same on demand. Sysctls are written inside the namespace only (with
``ip netns exec``, whose /proc/sys/net is the namespace's own); nothing here
ever writes a host setting. Commands are argument lists, never shell strings.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from harness.errors import RunError

__all__ = [
    "Namespace",
    "netns_available",
    "remove_stale",
    "removed_namespaces",
    "run_checked",
    "sweep_stale",
]

logger = logging.getLogger(__name__)

_counter = itertools.count(1)
_NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts named namespaces
_ANY_EPH = "eph[a-z]*"  # eph's prefixes: eph (labs), ephtest, ephdist (tests)
_removed: list[str] = []  # what this process deleted as stale, for `eph lab --cleanup`


def netns_available() -> str | None:
    """``None`` when namespaces can be made here, else why not (for a clear message)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root"
    if shutil.which("ip") is None:
        return "the 'ip' command (Debian package iproute2) is missing"
    return None


class Namespace:
    """``with Namespace() as ns: subprocess.run(ns.command(["eph", ...]))``."""

    def __init__(self, prefix: str = "eph") -> None:
        self.name = f"{prefix}-{os.getpid()}-{next(_counter)}"
        self._created = False

    def __enter__(self) -> Namespace:
        problem = netns_available()
        if problem:
            raise RunError(problem)
        remove_stale(self.name.rsplit("-", 2)[0])
        _ip("netns", "add", self.name)
        self._created = True
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()

    def delete(self) -> None:
        """Stop whatever still runs inside (a namespace outlives its deletion while a
        process holds it), then delete it."""
        if self._created:
            self._created = False
            _kill_inside(self.name)
            result = subprocess.run(
                ["ip", "netns", "delete", self.name], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                logger.error("could not delete namespace %s: %s", self.name, result.stderr.strip())

    def command(self, args: Sequence[str]) -> list[str]:
        """``args`` to run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def set_sysctl(self, key: str, value: str | int | Sequence[int]) -> None:
        """Write ``net.ipv4.x``-style ``key`` inside this namespace only."""
        if not isinstance(value, str | int):
            value = " ".join(str(v) for v in value)
        path = "/proc/sys/" + key.replace(".", "/")
        result = subprocess.run(
            self.command(["tee", path]),
            input=f"{value}\n",
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RunError(f"cannot set {key} = {value} in {self.name}: {result.stderr.strip()}")

    def add_address(self, address: str, device: str = "lo") -> None:
        _ip("-n", self.name, "addr", "add", address, "dev", device)


def _kill_inside(name: str) -> None:
    listing = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
    )
    for pid in (int(p) for p in listing.stdout.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        logger.warning("killed pid %d still running in namespace %s", pid, name)


def remove_stale(prefix: str | None = None) -> list[str]:
    """Delete ``<prefix>-<pid>-<n>`` namespaces whose process is gone (a killed run's),
    first stopping anything still inside; every eph prefix when ``prefix`` is None."""
    pattern = re.compile(rf"({re.escape(prefix) if prefix else _ANY_EPH})-(\d+)-\d+")
    removed = []
    for name in _names():
        match = pattern.fullmatch(name)
        if match and not _alive(int(match.group(2))):
            _kill_inside(name)
            result = subprocess.run(
                ["ip", "netns", "delete", name], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                logger.error("could not delete namespace %s: %s", name, result.stderr.strip())
                continue
            logger.warning(
                "removed namespace %s: the eph that made it (pid %s) is gone", name, match.group(2)
            )
            removed.append(name)
    _removed.extend(removed)
    return removed


def sweep_stale() -> list[str]:
    """At eph's start: :func:`remove_stale` for every eph prefix, where it may; quiet
    (and without a subprocess) unless there is something to remove; never raises."""
    if os.geteuid() != 0 or not os.access(_NETNS_DIR, os.W_OK):
        return []  # not root, or root of a user namespace: the host's mounts are not ours
    try:
        return remove_stale()
    except OSError as exc:  # no `ip`: nothing of eph's can be there either
        logger.debug("no namespace sweep: %s", exc)
        return []


def removed_namespaces() -> list[str]:
    """Every namespace this process has removed as stale so far."""
    return list(_removed)


def _names() -> list[str]:
    try:
        return sorted(os.listdir(_NETNS_DIR))
    except OSError:  # no namespace was ever made here
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_checked(args: Sequence[str]) -> None:
    """Run a command (an argument list, never a shell string); its stderr in the error."""
    result = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RunError(f"{' '.join(args)}: {result.stderr.strip()}")


def _ip(*args: str) -> None:
    run_checked(["ip", *args])
