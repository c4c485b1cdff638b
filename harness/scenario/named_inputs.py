"""What a scenario names outside itself, checked before anything starts.

A scenario is more than its values: ``load.tls`` names PEM files and ``lab.exec``
(or ``eph lab --exec``) a program. A missing one used to surface in a child's log
half a minute into a run; :func:`check_inputs` finds it at once, for ``eph
validate`` as for ``run``, ``lab`` and ``sweep``, and names the key, the value
and, when the scenario came from a file, its line.
"""

from __future__ import annotations

import os
import shlex
import shutil
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.errors import ScenarioError
from harness.scenario.definition import Scenario

__all__ = ["SHELL_WORDS", "check_command", "check_inputs", "command_argv"]

# the first word of a command line that the shell itself runs (no program to find)
SHELL_WORDS = frozenset(
    {".", ":", "[", "!", "{", "(", "case", "cd", "command", "eval", "exec", "export", "for"}
    | {"if", "read", "set", "test", "time", "ulimit", "until", "while"}
)

# where the error points: the key's line in the scenario's text, when there is one
LineOf = Callable[[Sequence[str]], int | None]


def check_inputs(
    scenario: Scenario, *, source: Path | str = "scenario", line_of: LineOf | None = None
) -> None:
    """Every file and program ``scenario`` names exists and can be used here."""
    tls = scenario.load.tls
    if tls is not None and not tls.insecure and tls.ca_file is not None:
        _pem(source, line_of, "ca_file", tls.ca_file, _verify_locations)
    if tls is not None and tls.cert_file is not None and tls.key_file is not None:
        _pem(source, line_of, "key_file", tls.key_file, None)
        key_file = tls.key_file
        _pem(source, line_of, "cert_file", tls.cert_file, lambda p: _cert_chain(p, key_file))
    if scenario.lab.exec is not None:
        line = line_of(["lab", "exec"]) if line_of else None
        check_command(scenario.lab.exec, source=source, key="lab.exec", line=line)


def command_argv(text: str | Sequence[str]) -> list[str]:
    """The argv to run: a command line runs through ``/bin/sh -c`` (so ``$EPH_TARGET``
    expands), a list as it is."""
    if isinstance(text, str):
        return ["/bin/sh", "-c", text]
    return list(text)


def check_command(
    text: str | Sequence[str],
    *,
    source: Path | str = "--exec",
    key: str | None = "lab.exec",
    line: int | None = None,
) -> list[str]:
    """The argv of ``text``; its program must exist here. An empty command, one that does
    not split (an open quote), or a program that is neither a path nor on PATH is a
    :class:`ScenarioError` naming where it was typed."""

    def error(message: str, value: object, expected: str) -> ScenarioError:
        return ScenarioError(
            message, source=source, key=key, line=line, value=value, expected=expected
        )

    try:
        words = shlex.split(text) if isinstance(text, str) else list(text)
    except ValueError as exc:
        raise error(f"the command does not parse: {exc}", text, "a shell command line") from None
    if not words:
        raise error(f"the command is empty (got {text!r})", text, "a command line, e.g. 'curl ...'")
    first = words[0]
    if "=" in first or first in SHELL_WORDS:
        return command_argv(text)
    if shutil.which(first) is None:
        why = "not found"
        if "/" in first:
            why = "not an executable file" if Path(first).exists() else "no such file"
        raise error(
            f"command {why}: {first!r} (not an executable path, and not on PATH)",
            first,
            "a program that exists here",
        )
    return command_argv(text)


def _pem(
    source: Path | str,
    line_of: LineOf | None,
    key: str,
    value: str,
    load: Callable[[str], None] | None,
) -> None:
    """``load.tls.<key>`` names a readable regular file that ``load`` accepts."""
    path = Path(value)
    line = line_of(["load", "tls", key]) if line_of else None

    def error(message: str) -> ScenarioError:
        return ScenarioError(
            message, source=source, key=f"load.tls.{key}", line=line, expected="a PEM file"
        )

    if not path.exists():
        where = f" (relative to {Path.cwd()})" if not path.is_absolute() else ""
        raise error(f"no such file: {value}{where}")
    if not path.is_file():
        raise error(f"not a regular file: {value}")
    if not os.access(path, os.R_OK):
        raise error(f"not readable by this user: {value}")
    if load is None:
        return
    try:
        load(value)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise error(f"cannot load {value}: {exc}") from None


def _verify_locations(path: str) -> None:
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(path)


def _cert_chain(cert: str, key: str) -> None:
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
