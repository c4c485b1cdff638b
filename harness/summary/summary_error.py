"""The contract's one error: a ``summary.json`` (or a file that feeds it) that does not
hold what the contract says. eph's CLI reports it like its own errors (exit 2); it
lives here so that the contract imports nothing of eph's."""

from __future__ import annotations

from pathlib import Path

__all__ = ["SummaryError"]


class SummaryError(ValueError):
    """A ``summary.json`` is of another schema version, or a value in it (or in a file
    that feeds it, such as ``listener.json``) is wrong.

    ``source`` is the file, ``key`` the dotted key path, ``value`` what it held
    and ``expected`` what would have been accepted.
    """

    _NOTHING = object()

    def __init__(
        self,
        source: Path | str,
        message: str,
        *,
        key: str | None = None,
        value: object = _NOTHING,
        expected: str | None = None,
    ) -> None:
        self.source = source
        self.key = key
        self.value = None if value is self._NOTHING else value
        self.expected = expected
        text = str(source) + (f", key '{key}'" if key else "") + f": {message}"
        if value is not self._NOTHING:
            text += f" (got {value!r}" + (f", expected {expected})" if expected else ")")
        elif expected:
            text += f" (expected {expected})"
        self.path = Path(source)
        self.reason = text
        super().__init__(text)
