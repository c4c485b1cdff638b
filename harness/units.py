"""Durations as people write them in scenarios: ``"100ms"``, ``"10s"``, ``"2m"``."""

from __future__ import annotations

import re

__all__ = ["format_duration", "human_duration", "parse_duration", "parse_size"]

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h)\s*$")


def parse_duration(text: str) -> float:
    """Return seconds for ``text``; raise ``ValueError`` naming the accepted forms."""
    match = _PATTERN.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: write a number and a unit (us, ms, s, m, h),"
            ' e.g. "100ms", "10s", "2m"'
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest exact spelling that :func:`parse_duration` reads back."""
    for unit, scale in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3)):
        value = seconds / scale
        if value >= 1 and abs(value - round(value)) < 1e-9:
            return f"{round(value)}{unit}"
    if seconds == 0:
        return "0ms"
    return f"{seconds * 1e3:g}ms"


def human_duration(seconds: float) -> str:
    """For people, not for parsing back: ``12.3 s``, ``4.2 min``, ``1.5 h``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$")
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


def parse_size(text: str) -> int:
    """Return bytes for ``text`` (``500MB``, ``2GiB``); raise ``ValueError`` saying how."""
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"{text!r} is not a size: write a number and a unit (B, KB, MB, GB, KiB, MiB,"
            ' GiB), e.g. "500MB"'
        )
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
