"""Leaving a process without the C++ destructors of its native libraries.

pyarrow's thread pools are C++ objects that the C library destroys after Python
has finished (``exit()`` runs them). Now and then one of their threads is still
joinable then, and ``std::terminate`` aborts the process ("terminate called
without an active exception", exit -6) after all its work was done and its files
written: seen here once in about 100 ``eph observe --trace`` stops under load (the same
report upstream: apache/arrow#34314). The parent then reads a crash where there
was none.

:func:`run_and_exit` runs a process's ``main`` and leaves as Python would, less
that last step: the non-daemon threads are joined, the ``atexit`` functions run
(logging's flush among them), the standard streams are flushed, then ``_exit``.
Every entry point of eph's own processes ends with it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

__all__ = ["exit_process", "run_and_exit"]


def run_and_exit(main: Callable[[], object]) -> NoReturn:
    """``main()``, then :func:`exit_process` with what it returned or raised as
    ``SystemExit`` (any other exception prints its traceback and exits 1, as Python
    does)."""
    try:
        status = main()
    except SystemExit as exc:
        status = exc.code
    except BaseException:  # printed as Python would, then the same exit
        sys.excepthook(*sys.exc_info())
        status = 1
    exit_process(status)


def exit_process(status: object = 0) -> NoReturn:
    """Exit with ``status`` (``SystemExit``'s meaning: ``None`` is 0, an int is the
    code, anything else is printed to stderr and gives 1) after Python's own exit
    work and before the C library's."""
    if status is None:
        code = 0
    elif isinstance(status, int):
        code = status & 0xFF
    else:
        print(status, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
