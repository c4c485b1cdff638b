"""Child processes that do not outlive their parent.

A collector or relay left behind by a parent that was killed (``kill -9``, OOM)
would go on sampling or forwarding until its own time bound. Linux's
``PR_SET_PDEATHSIG`` sends it a signal the moment its parent dies; the child
handles it as any stop request, so it still finishes its files.
"""

from __future__ import annotations

import ctypes
import os
import signal

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask for ``sig`` when the parent dies; send it now if the parent is already gone."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # it died before the request: nobody will send the signal
        os.kill(os.getpid(), sig)
