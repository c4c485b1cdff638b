"""Who holds a path's ports: the process behind each socket, through its inode.

sock_diag gives every socket's inode; ``/proc/PID/fd`` links name the inodes each
process holds (``socket:[INODE]``). :class:`OwnerIndex` reads those links for every
process into two sorted arrays, and looks a sample's inodes up in bulk
(``np.searchsorted``). Reading every fd of the host is the cost, so the index is
read again only when a sample meets more than :data:`STALE_SHARE` of owned sockets
it does not know, and not more often than every ``refresh_s``; between two reads,
sockets it does not know are counted as ``unattributed``.

TIME_WAIT sockets have no inode and no owner any more: they are ``unattributed``
too, and the view says so (``--trace`` records the process that opened each
connection, in ``connections.parquet``).

A process's name (``/proc/PID/comm``), its cgroup (``/proc/PID/cgroup``, the v2
line) and the container in that cgroup, when it names one (Docker, containerd,
CRI-O and the kubelet put the 64-hex container ID in the last part), are read
once per pid.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["OWNERS_TOP", "OwnerIndex", "PortOwner", "container_of"]

OWNERS_TOP = 5  # owners kept per path, most ports first
STALE_SHARE = 0.1  # of a sample's owned sockets unknown to the index: read it again
_CONTAINER = re.compile(r"(?:^|[-/:])([0-9a-f]{64})(?:\.scope)?$")
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


class PortOwner(NamedTuple):
    """A process holding ports toward one path."""

    pid: int
    comm: str
    cgroup: str
    container: str | None  # the container ID's first 12 characters, or the pod's UID
    ports: int


def container_of(cgroup: str) -> str | None:
    """The container (or, failing that, the Kubernetes pod) a cgroup path names."""
    found = _CONTAINER.search(cgroup.rstrip("/"))
    if found:
        return found.group(1)[:12]
    pod = _POD.search(cgroup)
    return f"pod {pod.group(1).replace('_', '-')}" if pod else None


@dataclass(frozen=True)
class _Process:
    comm: str
    cgroup: str
    container: str | None


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


@dataclass
class OwnerIndex:
    """Socket inode to pid, for one host (its /proc), read in bulk and kept."""

    refresh_s: float = 5.0
    proc: Path = Path("/proc")
    clock: Callable[[], float] = time.monotonic
    reads: int = 0  # how many times every fd was read
    last_read_ms: float = 0.0
    _inodes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64), repr=False)
    _pids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    _read_at: float | None = field(default=None, repr=False)
    _processes: dict[int, _Process] = field(default_factory=dict, repr=False)

    def pids(self, inodes: np.ndarray) -> np.ndarray:
        """The pid holding each inode (0: none known, or no inode: TIME_WAIT)."""
        owned = inodes > 0
        found = self._lookup(inodes)
        unknown = owned & (found == 0)
        if owned.any() and unknown.sum() > STALE_SHARE * owned.sum() and self._may_read():
            self.read()
            found = self._lookup(inodes)
        return found

    def _may_read(self) -> bool:
        return self._read_at is None or self.clock() - self._read_at >= self.refresh_s

    def _lookup(self, inodes: np.ndarray) -> np.ndarray:
        if not len(self._inodes):
            return np.zeros(len(inodes), np.int64)
        keys = inodes.astype(np.uint64)
        at = np.minimum(np.searchsorted(self._inodes, keys), len(self._inodes) - 1)
        return np.where(self._inodes[at] == keys, self._pids[at], 0)

    def read(self) -> None:
        """Every process's socket fds: one readlink each (measured: docs/operations)."""
        began = time.perf_counter()
        inodes: list[int] = []
        pids: list[int] = []
        root = str(self.proc)
        for name in os.listdir(root):
            if not name.isdigit():
                continue
            try:
                fds = os.scandir(f"{root}/{name}/fd")
            except OSError:  # gone, or not ours to read
                continue
            pid = int(name)
            with fds:
                for fd in fds:
                    try:
                        link = os.readlink(fd.path)
                    except OSError:
                        continue
                    if link.startswith("socket:["):
                        inodes.append(int(link[8:-1]))
                        pids.append(pid)
        order = np.argsort(np.array(inodes, np.uint64), kind="stable")
        self._inodes = np.array(inodes, np.uint64)[order]
        self._pids = np.array(pids, np.int64)[order]
        alive = set(pids)
        self._processes = {p: v for p, v in self._processes.items() if p in alive}
        self._read_at = self.clock()
        self.reads += 1
        self.last_read_ms = (time.perf_counter() - began) * 1000

    def describe(self, pid: int, ports: int) -> PortOwner:
        found = self._processes.get(pid)
        if found is None:
            cgroup = ""
            for line in _read(f"{self.proc}/{pid}/cgroup").splitlines():
                if line.startswith("0::"):  # the unified (v2) hierarchy
                    cgroup = line[3:]
            cgroup = cgroup or _read(f"{self.proc}/{pid}/cgroup").strip().split(":")[-1]
            comm = _read(f"{self.proc}/{pid}/comm").strip() or "?"
            found = self._processes[pid] = _Process(comm, cgroup, container_of(cgroup))
        return PortOwner(pid, found.comm, found.cgroup, found.container, ports)

    def owners(
        self, path_of_row: np.ndarray, inodes: np.ndarray, paths: int
    ) -> tuple[list[list[PortOwner]], np.ndarray]:
        """Per path (``path_of_row`` numbers the rows' paths 0..paths-1): its owners,
        most ports first (at most :data:`OWNERS_TOP`), and its sockets with no owner
        known (each row one socket, one port of its path)."""
        pid = self.pids(inodes)
        known = pid > 0
        unattributed = np.bincount(path_of_row[~known], minlength=paths)
        result: list[list[PortOwner]] = [[] for _ in range(paths)]
        if known.any():
            pairs, counts = np.unique(
                np.stack([path_of_row[known], pid[known]]), axis=1, return_counts=True
            )
            order = np.lexsort((-counts, pairs[0]))  # by path, then most ports first
            for path, owner, count in zip(
                pairs[0][order].tolist(),
                pairs[1][order].tolist(),
                counts[order].tolist(),
                strict=True,
            ):
                if len(result[path]) < OWNERS_TOP:
                    result[path].append(self.describe(owner, count))
        return result, unattributed
