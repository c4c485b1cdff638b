"""Errors eph raises on purpose, each naming what was wrong and where.

The hierarchy::

    EphError                      anything eph reports to a person (CLI exit code 2)
    ├── ScenarioError             a scenario file, a --set override or a CLI value is wrong
    ├── EndpointError             an endpoint string does not parse (also a ValueError)
    ├── ListenerError             the target listener could not serve an endpoint
    ├── RunError                  a run could not start or a child process failed
    └── RunDirError               a run directory is missing, truncated or corrupt

    SummaryError (a ValueError, from the contract, harness.summary): a summary.json
                                  (or a file feeding it) is of another version or
                                  holds a wrong value; the CLI reports it as its own

A failed *connection* is never an exception here: it is data, recorded with its
errno (see ``harness.records``); :func:`errno_name` is how every part of eph
spells one.
"""

from __future__ import annotations

import errno as _errno
from pathlib import Path

from harness.summary.summary_error import SummaryError

__all__ = [
    "HTTP_MALFORMED",
    "HTTP_STATUS",
    "TLS_ERROR",
    "TLS_VERIFY",
    "EndpointError",
    "EphError",
    "ListenerError",
    "RunDirError",
    "RunError",
    "ScenarioError",
    "SummaryError",
    "errno_name",
]


# Failures of the application's protocols, kept in the records' io_errno column beside
# the kernel's errnos (all below 200 on Linux): a failed connection keeps its kind.
TLS_ERROR = 1000  # the TLS handshake failed (alert, protocol, version)
TLS_VERIFY = 1001  # the server's certificate did not verify
HTTP_MALFORMED = 1002  # the reply was not an HTTP/1.x response
HTTP_STATUS = 1100  # + the status: a response with a status that was not expected
_APPLICATION = {TLS_ERROR: "TLS_ERROR", TLS_VERIFY: "TLS_VERIFY", HTTP_MALFORMED: "HTTP_MALFORMED"}


def errno_name(number: int) -> str:
    """``99`` -> ``"EADDRNOTAVAIL"``, ``1503`` -> ``"HTTP_503"``; unknown numbers stay
    readable."""
    if number >= TLS_ERROR:
        if HTTP_STATUS + 100 <= number < HTTP_STATUS + 600:
            return f"HTTP_{number - HTTP_STATUS}"
        return _APPLICATION.get(number, f"ERRNO{number}")
    return _errno.errorcode.get(number, f"ERRNO{number}")


class EphError(Exception):
    """Base of every error eph reports to a person."""


class ScenarioError(EphError):
    """A scenario value is wrong.

    ``source`` is the file (or ``--set``), ``key`` the dotted key path, ``value``
    what was given and ``expected`` what would have been accepted.
    """

    def __init__(
        self,
        message: str,
        *,
        source: Path | str | None = None,
        key: str | None = None,
        value: object = None,
        expected: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.key = key
        self.value = value
        self.expected = expected
        self.line = line
        where = str(source) if source is not None else "scenario"
        if line is not None:
            where += f", line {line}"
        if key:
            where += f", key '{key}'"
        text = f"{where}: {message}"
        if expected:
            text += f" (expected {expected})"
        super().__init__(text)


class EndpointError(EphError, ValueError):
    """An endpoint string such as ``127.0.0.1:9000`` or ``[::1]:9000`` does not parse."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"endpoint {text!r}: {reason}")


class ListenerError(EphError):
    """The listener could not bind or serve ``endpoint``."""

    def __init__(self, endpoint: str, reason: str) -> None:
        self.endpoint = endpoint
        self.reason = reason
        super().__init__(f"cannot listen on {endpoint}: {reason}")


class RunError(EphError):
    """A run could not start, or one of its processes failed."""


class RunDirError(EphError):
    """A run directory is missing, truncated or corrupt."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"run directory {path}: {reason}")
