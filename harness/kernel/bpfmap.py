"""Drain the recorder's BPF map from outside bpftrace, thousands of rows per syscall.

bpftrace's own ``print()`` of a map costs about 4 µs of its CPU per row (a
lookup syscall, then formatting, then a delete syscall per key): at 40,000
connections a second that is a sixth of a core taken from the load it watches,
and traced churn measured 0.82 of untraced. Here one
``BPF_MAP_LOOKUP_AND_DELETE_BATCH`` call moves up to :data:`BATCH` keys into a
numpy buffer, and the rows become Arrow columns in bulk. No Python binding of
libbpf is packaged for Debian, and bcc compiles its own programs rather than
opening another's maps, so the four ``bpf()`` commands used are called here
through ctypes.

The map is found by its owner's pid: ``/proc/PID/fdinfo`` names each BPF map's
id and key size; ``BPF_MAP_GET_FD_BY_ID`` opens it. The fd held here keeps the
map alive after bpftrace exits, so the last drain loses nothing.

Run as ``python -m harness.kernel.bpfmap PID KEY_SIZE OUT [--host H] [--tally JSON]``: it
drains every ``--interval`` into the Arrow IPC stream ``OUT`` (and, with ``--tally``,
rewrites the rows' failures and latency per destination there: eph observe's live
metrics) until SIGTERM or until PID exits, drains once more, and exits.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import functools
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from harness.kernel.exit import run_and_exit
from harness.kernel.fdinfo import fdinfo

__all__ = [
    "BATCH", "PERCPU_ARRAY", "MapNotFound", "drain", "find_map", "lookup_percpu", "open_map",
    "possible_cpus",
]  # fmt: skip

BATCH = 8192  # keys per syscall: a hash map's batch must hold its fullest bucket
_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_LOOKUP_ELEM, _MAP_GET_FD_BY_ID, _LOOKUP_AND_DELETE_BATCH = 1, 14, 25
_HASH, PERCPU_ARRAY = 1, 6


class MapNotFound(LookupError):
    pass


class _IdAttr(ctypes.Structure):
    _fields_ = [("map_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]  # fmt: skip


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]  # fmt: skip


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64),
                ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]  # fmt: skip


_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(command: int, attr: ctypes.Structure) -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"bpf() syscall number unknown on {platform.machine()}")
    result = int(_libc.syscall(number, command, ctypes.byref(attr), ctypes.sizeof(attr)))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def find_map(pid: int, key_size: int, map_type: int = _HASH, value_size: int | None = None) -> int:
    """The id of the map of ``map_type`` (a hash map unless told) with keys of
    ``key_size`` bytes (and values of ``value_size``, when given) that ``pid`` holds."""
    for entry in Path(f"/proc/{pid}/fdinfo").iterdir():
        fields = fdinfo(entry)
        if (
            fields.get("map_type") == str(map_type)
            and fields.get("key_size") == str(key_size)
            and (value_size is None or fields.get("value_size") == str(value_size))
        ):
            return int(fields["map_id"])
    raise MapNotFound(f"process {pid} holds no map of type {map_type} with {key_size}-byte keys")


@functools.cache
def possible_cpus(path: Path = Path("/sys/devices/system/cpu/possible")) -> int:
    """How many values a per-CPU map holds per key (``0-1`` -> 2)."""
    count = 0
    for span in path.read_text().strip().split(","):
        low, _, high = span.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def lookup_percpu(fd: int, key: int) -> np.ndarray:
    """Slot ``key`` of the per-CPU array map ``fd`` (8-byte values): one per CPU."""
    values = np.zeros(possible_cpus(), np.uint64)
    index = ctypes.c_uint32(key)
    attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(index), value=values.ctypes.data)
    _bpf(_LOOKUP_ELEM, attr)
    return values


def open_map(map_id: int) -> int:
    """An fd of BPF map ``map_id`` (root)."""
    return _bpf(_MAP_GET_FD_BY_ID, _IdAttr(map_id=map_id))


def drain(fd: int, key_size: int, value_size: int = 8) -> np.ndarray:
    """Every key of the hash map ``fd``, deleted as read: ``key_size``-byte rows (uint8).

    Keys inserted meanwhile are either in this drain or the next, never both.
    """
    cap = BATCH
    keys = np.empty((cap, key_size), np.uint8)
    values = np.empty(cap * value_size, np.uint8)
    token_in, token_out = ctypes.c_uint64(), ctypes.c_uint64()
    got: list[np.ndarray] = []
    attr = _BatchAttr(map_fd=fd)
    first = True
    while True:
        attr.in_batch = 0 if first else ctypes.addressof(token_in)
        attr.out_batch = ctypes.addressof(token_out)
        attr.keys, attr.values, attr.count = keys.ctypes.data, values.ctypes.data, cap
        try:
            _bpf(_LOOKUP_AND_DELETE_BATCH, attr)
            done = False
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  # a bucket fuller than the batch: never at BATCH
                raise
            if exc.errno != errno.ENOENT:
                raise
            done = True
        if attr.count:
            got.append(keys[: attr.count].copy())
        if done:
            break
        token_in.value = token_out.value
        first = False
    return np.concatenate(got) if got else np.empty((0, key_size), np.uint8)


def _run(
    pid: int, key_size: int, out: Path, host: str, interval: float, tally: Path | None = None
) -> int:
    from harness.kernel import bpf  # its columns; imported here to keep this module lean

    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    fd = open_map(find_map(pid, key_size))
    with bpf.RowWriter(out, host, tally) as writer:
        alive: Callable[[], bool] = lambda: Path(f"/proc/{pid}").exists()  # noqa: E731
        while not stop and alive():
            writer.write(drain(fd, key_size))
            time.sleep(interval)
        writer.write(drain(fd, key_size))
    os.close(fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pid", type=int)
    parser.add_argument("key_size", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--host", default=platform.node())
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--tally", type=Path, help="keep the rows' tally here (JSON)")
    args = parser.parse_args(argv)
    try:
        return _run(args.pid, args.key_size, args.out, args.host, args.interval, args.tally)
    except (OSError, MapNotFound) as exc:
        print(f"bpf map drain: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    run_and_exit(main)
