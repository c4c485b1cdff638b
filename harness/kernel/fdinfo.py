"""What ``/proc/PID/fdinfo/FD`` says of a BPF map or program: its ``name:\tvalue`` lines.

A map's ``map_type``, ``map_id``, ``key_size`` and ``value_size`` find the recorder's
maps by their owner's pid (:mod:`harness.kernel.bpfmap`); a program's
``recursion_misses`` counts the state changes the kernel did not run it for
(:mod:`harness.kernel.bpf`, :mod:`harness.kernel.recorder`).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["fdinfo"]


def fdinfo(entry: Path) -> dict[str, str]:
    """The fields of one ``/proc/PID/fdinfo/FD``; empty if the fd closed meanwhile."""
    try:
        text = entry.read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
