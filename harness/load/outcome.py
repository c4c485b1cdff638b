"""How an attempt ends, as data: its record's errno columns and Locust's failure.

Every engine (gevent, the uvloop Protocol path, the callback fast path) ends an
attempt one of three ways, told apart by the record's two errno columns:

=================  =========  ============  ==========================================
``Outcome``        ``errno``  ``io_errno``  Locust
=================  =========  ============  ==========================================
``CONNECTED``      0          0             a success
``CONNECT_FAILED`` the cause  0             failure ``EADDRNOTAVAIL``
``IO_FAILED``      0          the cause     failure ``ECONNRESET after connect``
=================  =========  ============  ==========================================

A timeout is one more cause, ``ETIMEDOUT``, in whichever phase it happened.
:func:`columns` turns an exception into the two columns; the engines call it
only on failure, so a success costs nothing here. Everything else works on
flushed rows, in bulk (:func:`classify_rows`, :func:`failure_counts`).

Never imports locust: ``ConnectionFailed`` is a plain exception Locust records.
"""

from __future__ import annotations

import errno as _errno
import socket
from enum import IntEnum

import numpy as np

from harness.errors import HTTP_STATUS, errno_name

__all__ = [
    "INTERRUPTED",
    "NO_REPLY",
    "TIMED_OUT",
    "UNKNOWN",
    "ConnectionFailed",
    "Outcome",
    "classify",
    "classify_rows",
    "columns",
    "connect_result",
    "errno_of",
    "failure",
    "failure_counts",
    "is_status_failure",
    "label",
]

TIMED_OUT = _errno.ETIMEDOUT  # connect_timeout or io_timeout ran out
INTERRUPTED = _errno.ECANCELED  # the attempt was stopped before connect() answered
NO_REPLY = _errno.ENODATA  # the server closed without the reply the scenario waits for
UNKNOWN = _errno.EIO  # an OSError that carries no errno

_AFTER_CONNECT = " after connect"
_MAX_ERRNO = 0xFFFF  # the record's errno columns are uint16


class Outcome(IntEnum):
    """Which phase of an attempt failed, if any (see the module's table)."""

    CONNECTED = 0
    CONNECT_FAILED = 1
    IO_FAILED = 2


# OSError subclasses raised without an errno (asyncio's "Connection lost", a timeout
# from asyncio.timeout or gevent) stand for this one
_BY_CLASS: tuple[tuple[type[OSError], int], ...] = (
    (TimeoutError, TIMED_OUT),
    (ConnectionRefusedError, _errno.ECONNREFUSED),
    (ConnectionResetError, _errno.ECONNRESET),
    (ConnectionAbortedError, _errno.ECONNABORTED),
    (BrokenPipeError, _errno.EPIPE),
)


def errno_of(exc: BaseException) -> int:
    """The errno an attempt records for ``exc``.

    An ``OSError`` gives its own errno, or without one (or with a resolver's
    negative code) its class's (``TimeoutError``: ``ETIMEDOUT``), else ``EIO``.
    Anything else ended the attempt from outside (a cancelled task, a killed
    greenlet, Ctrl-C): ``ECANCELED``.
    """
    if not isinstance(exc, OSError):
        return INTERRUPTED
    code = exc.errno
    if isinstance(code, int) and 0 < code <= _MAX_ERRNO:
        return code
    for cls, number in _BY_CLASS:
        if isinstance(exc, cls):
            return number
    return UNKNOWN


def columns(exc: BaseException, *, connected: bool) -> tuple[int, int]:
    """``(errno, io_errno)`` of an attempt that ended with ``exc``.

    Before the connection was up the cause is connect()'s (``errno``); after, it is
    the exchange's (``io_errno``), and ``errno`` stays 0: the connection was made.
    """
    code = errno_of(exc)
    return (0, code) if connected else (code, 0)


def classify(errno: int, io_errno: int) -> Outcome:
    """The outcome of one record's errno columns."""
    if errno:
        return Outcome.CONNECT_FAILED
    return Outcome.IO_FAILED if io_errno else Outcome.CONNECTED


def classify_rows(rows: np.ndarray) -> np.ndarray:
    """:class:`Outcome` values (``uint8``) of rows with ``errno`` and ``io_errno`` columns."""
    out = np.full(len(rows), Outcome.CONNECTED, dtype=np.uint8)
    out[rows["io_errno"] != 0] = Outcome.IO_FAILED
    out[rows["errno"] != 0] = Outcome.CONNECT_FAILED  # connect's cause wins, as in classify
    return out


def label(errno: int, io_errno: int) -> str:
    """How a failure reads (Locust's error, live progress); ``""`` for a success."""
    if errno:
        return errno_name(errno)
    return errno_name(io_errno) + _AFTER_CONNECT if io_errno else ""


def failure_counts(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """``(errno, io_errno, count)`` for each kind of failure among ``rows``, in bulk."""
    failed = rows[(rows["errno"] != 0) | (rows["io_errno"] != 0)]
    if not len(failed):
        return []
    kinds, counts = np.unique(failed[["errno", "io_errno"]], return_counts=True)
    return [
        (int(kind[0]), int(kind[1]), int(count))
        for kind, count in zip(kinds.tolist(), counts.tolist(), strict=True)
    ]


def is_status_failure(io_errno: int) -> bool:
    """Whether an ``io_errno`` is a response's unexpected status (``HTTP_503``)."""
    return HTTP_STATUS <= io_errno < HTTP_STATUS + 1000


class ConnectionFailed(Exception):
    """What Locust shows for a failed attempt: the errno's name, and the phase."""

    def __init__(self, errno: int, io_errno: int) -> None:
        if not (errno or io_errno):
            raise ValueError("a connection with errno 0 and io_errno 0 did not fail")
        self.errno = errno
        self.io_errno = io_errno
        self.outcome = classify(errno, io_errno)
        super().__init__(label(errno, io_errno))

    def __repr__(self) -> str:
        return f"ConnectionFailed({self.args[0]!r})"


_FAILURES: dict[tuple[int, int], ConnectionFailed] = {}


def failure(errno: int, io_errno: int) -> ConnectionFailed:
    """One shared exception per ``(errno, io_errno)``: failures allocate nothing."""
    key = (errno, io_errno)
    found = _FAILURES.get(key)
    if found is None:
        found = _FAILURES[key] = ConnectionFailed(errno, io_errno)
    return found


def connect_result(sock: socket.socket) -> int | None:
    """What the kernel made of a connect whose wait ended before its answer was read
    (a deadline, a stop): 0 when the handshake had finished, its errno when it had
    failed, None while it is still under way.

    A starved event loop runs its timers before it polls, so a connect the kernel
    finished in time can reach its deadline unread; the server has accepted it, and
    the record must say what the listener counts (conservation)."""
    try:
        sock.getpeername()  # ENOTCONN while the handshake is pending or failed
        return 0
    except OSError:
        pass
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or None
    except OSError as exc:
        return errno_of(exc)
