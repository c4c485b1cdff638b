"""Every network namespace of the host, and a thread that works inside each in turn.

``eph observe --all-namespaces`` samples each network namespace from the root one:
on a Kubernetes node each pod has its own. They are found through ``/proc``: each
process's ``/proc/PID/ns/net`` names its namespace by inode; ``/run/netns/NAME``
adds those that ``ip netns`` made (a namespace may hold no process). Each is named
by ``ip netns``'s name where it has one (init's is ``host``), else by its processes
(``nginx[812]``, the lowest pid first), and always carries its inode.

Python 3.11 has no ``os.setns``, so :class:`NamespaceThread` calls ``setns(2)``
through ctypes, on one helper thread only: a network namespace is a thread's own
(``current->nsproxy``), so the rest of eph stays where it was. Inside, a sock_diag
socket opened there dumps that namespace's sockets, and ``/proc/sys/net`` reads
its sysctls (``/proc/thread-self/net`` its counters). After each call the thread
goes back to its first namespace. Needs ``CAP_SYS_ADMIN`` (root).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

__all__ = ["NamespaceThread", "NetNamespace", "host_namespaces"]

CLONE_NEWNET = 0x40000000
PROC = Path("/proc")
RUN_NETNS = Path("/run/netns")
NAMED_PROCESSES = 2  # processes named in a namespace's label

T = TypeVar("T")


@dataclass
class NetNamespace:
    """One network namespace: its inode, a path that enters it, who is in it."""

    inode: int
    path: Path  # /proc/PID/ns/net or /run/netns/NAME
    name: str | None = None  # ip netns's name; "host" for init's (pid 1's) namespace
    processes: list[tuple[int, str]] = field(default_factory=list)  # (pid, comm), by pid

    @property
    def label(self) -> str:
        """``name``, else its first processes (``nginx[812]``), else its inode."""
        if self.name:
            return self.name
        if self.processes:
            shown = [f"{comm}[{pid}]" for pid, comm in self.processes[:NAMED_PROCESSES]]
            more = len(self.processes) - NAMED_PROCESSES
            return ", ".join(shown) + (f" +{more}" if more > 0 else "")
        return f"netns:{self.inode}"


def host_namespaces(proc: Path = PROC, run_netns: Path = RUN_NETNS) -> list[NetNamespace]:
    """Every network namespace of the host that ``proc`` shows, this process's first."""
    found: dict[int, NetNamespace] = {}
    own = os.stat(proc / "self" / "ns" / "net").st_ino
    init = _init_namespace(proc)
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            inode = os.stat(entry / "ns" / "net").st_ino
            comm = (entry / "comm").read_text().strip()
        except OSError:  # gone meanwhile, or a kernel thread's
            continue
        ns = found.setdefault(inode, NetNamespace(inode, entry / "ns" / "net"))
        ns.processes.append((int(entry.name), comm))
    try:
        named = sorted(run_netns.iterdir())
    except OSError:
        named = []
    for path in named:
        try:
            inode = os.stat(path).st_ino
        except OSError:
            continue
        ns = found.setdefault(inode, NetNamespace(inode, path))
        ns.name, ns.path = path.name, path
    for ns in found.values():
        ns.processes.sort()
        if ns.inode == init and ns.name is None:
            ns.name = "host"
    return sorted(found.values(), key=lambda ns: (ns.inode != own, ns.inode))


def _init_namespace(proc: Path) -> int | None:
    """The inode of init's network namespace: pid 1's, or (where /proc/1 is closed to
    us) kthreadd's, whose kernel threads all live there; None if neither shows."""
    for pid, comm in (("1", None), ("2", "kthreadd")):
        try:
            if comm is None or (proc / pid / "comm").read_text().strip() == comm:
                return os.stat(proc / pid / "ns" / "net").st_ino
        except OSError:
            continue
    return None


class NamespaceThread:
    """A helper thread that runs functions inside a given network namespace.

    ``with NamespaceThread() as inside: inside.call(ns.path, fn)``: ``fn()`` runs on
    the helper thread (a one-worker executor), entered into the namespace at
    ``path``, and its result (or exception) comes back; then the thread goes back to
    where it started.
    """

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eph-setns")

    def __enter__(self) -> NamespaceThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, path: Path, fn: Callable[[], T]) -> T:
        """``fn()`` inside the namespace at ``path``."""
        return self._worker.submit(self._inside, path, fn).result()

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        os.close(self._home)

    def _setns(self, fd: int) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns: {os.strerror(code)}")

    def _inside(self, path: Path, fn: Callable[[], T]) -> T:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._setns(fd)
        finally:
            os.close(fd)
        try:
            return fn()
        finally:
            self._setns(self._home)
