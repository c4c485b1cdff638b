"""Child processes that do not outlive their parent.

A listener, collector or Locust left behind by a parent that was killed
(``kill -9``, OOM) would go on holding ports, sampling or making connections
until its own time bound. Linux's ``PR_SET_PDEATHSIG`` sends a process a signal
the moment its parent dies. Three ways to ask for it:

- :func:`death_signal_preexec`: a ``preexec_fn`` for ``subprocess.Popen``, run in
  the child between fork and exec (what ``harness.supervisor`` uses). The setting
  survives ``execve`` of ordinary binaries, so it holds through ``ip netns exec``
  and ``unshare``, which exec the command in place (no fork);
- :func:`die_with_parent`: from the child itself, at its start;
- :func:`die_with_parent_after_fork`: in every child this process forks later
  without exec (Locust's ``--processes`` workers).

The kernel sends the signal when the *thread* that forked the child exits, not
the whole process: fork from the main thread or one that outlives the child.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

__all__ = ["death_signal_preexec", "die_with_parent", "die_with_parent_after_fork"]

_PR_SET_PDEATHSIG = 1
_after_fork_signal: list[int] = []  # the signal die_with_parent_after_fork registered


def _prctl() -> Callable[..., int]:
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask for ``sig`` when the parent dies; send it now if the parent is already gone."""
    parent = os.getppid()
    _prctl()(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # it died before the request: nobody will send the signal
        os.kill(os.getpid(), sig)


def death_signal_preexec(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when the calling process dies.

    prctl is looked up here, in the parent, so that the child between fork and exec
    only makes two system calls. A parent that died before the request (the child
    was then adopted) makes the child send itself ``sig`` at once.
    """
    prctl = _prctl()
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def die_with_parent_after_fork(sig: int = signal.SIGKILL) -> None:
    """Every child this process forks from now on gets ``sig`` when this process dies.

    For forks without exec that this code does not make itself (Locust's
    ``--processes`` workers). Registering twice registers once.
    """
    if _after_fork_signal:
        return
    _after_fork_signal.append(sig)
    prctl = _prctl()
    parent: list[int] = [os.getpid()]

    def before() -> None:
        parent[0] = os.getpid()

    def after_in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent[0]:
            os.kill(os.getpid(), sig)

    os.register_at_fork(before=before, after_in_child=after_in_child)
