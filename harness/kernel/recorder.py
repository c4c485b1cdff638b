"""The connection recorder's loader: ``connections.bpf.o`` into the kernel, until told to stop.

``python -m harness.kernel.recorder NETNS`` loads the two raw-tracepoint programs
of ``connections.bpf.c`` (built by ``make setup``) through libbpf, which resolves
their reads of the kernel's types against its BTF, tells them the namespace to
watch, attaches ``first`` then ``second``, and prints :data:`~harness.kernel.bpf.READY_LINE`.
The rows are drained from outside (:mod:`harness.kernel.bpfmap`, by this
process's pid). On SIGTERM or SIGINT it detaches the programs and prints, as
bpftrace would, what closed after the last drain (``@r[...]: 1`` lines), then
``@inserted: N`` (rows made) and ``@missed: N`` (state changes neither program
saw: ``first``'s recursion misses less those ``second`` took).

libbpf (``libbpf1``, a dependency of bpftrace) is called through ctypes: Debian
packages no Python binding of it, and bcc would compile the program at every
start. libbpf opens, loads and attaches; the counters and rows are read with the
drainer's own ``bpf()`` calls (:mod:`harness.kernel.bpfmap`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from importlib import resources
from pathlib import Path

from harness.kernel.bpfmap import PERCPU_ARRAY, drain, find_map, lookup_percpu, open_map
from harness.kernel.exit import run_and_exit
from harness.kernel.fdinfo import fdinfo
from harness.kernel.parent_death import die_with_parent

__all__ = ["OBJECT", "OpenCount", "Recorder", "main", "object_path"]

OBJECT = "connections.bpf.o"  # beside this module, built by make setup
PROGRAMS = ("first", "second")  # attached in this order
# the slots of its per-CPU array `counts` (the enum of connections.bpf.c)
INSERTED, RESCUED, OPENED, DROPPED = range(4)


def object_path() -> Path:
    """Where the built program is (it may not exist: make setup builds it);
    ``EPH_RECORDER_OBJECT`` names another (the tests' broken one)."""
    given = os.environ.get("EPH_RECORDER_OBJECT")
    return Path(given) if given else Path(str(resources.files(__package__).joinpath(OBJECT)))


class _Libbpf:
    """The few libbpf calls the loader makes, typed for ctypes."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        p, i, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
        for name, restype, argtypes in (
            ("bpf_object__open_file", p, [s, p]),
            ("bpf_object__load", i, [p]),
            ("bpf_object__close", None, [p]),
            ("bpf_object__find_program_by_name", p, [p, s]),
            ("bpf_object__find_map_fd_by_name", i, [p, s]),
            ("bpf_program__attach", p, [p]),
            ("bpf_program__fd", i, [p]),
            ("bpf_link__destroy", i, [p]),
            ("bpf_map_update_elem", i, [i, p, p, ctypes.c_uint64]),
            ("libbpf_strerror", i, [i, s, ctypes.c_size_t]),
        ):
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        self.lib = lib

    def check(self, result: int | None, what: str) -> int:
        """``result`` of a call that returns NULL or a negative number on error."""
        if result is None or result < 0:
            code = ctypes.get_errno() or (-result if result else 0)
            text = ctypes.create_string_buffer(256)  # libbpf's own codes (4000 on) too
            self.lib.libbpf_strerror(code, text, len(text))
            raise OSError(code, f"{what}: {text.value.decode(errors='replace')}")
        return result


class Recorder:
    """The loaded programs, their maps, and the links that attach them."""

    def __init__(self, path: Path, netns: int) -> None:
        self.bpf = _Libbpf()
        lib, check = self.bpf.lib, self.bpf.check
        self.obj = check(lib.bpf_object__open_file(str(path).encode(), None), f"open {path}")
        self.links: list[int] = []
        try:
            check(lib.bpf_object__load(self.obj), "load (the kernel's verifier said no)")
            self.rows = self._map_fd("rows")
            self.counts = self._map_fd("counts")
            key, value = ctypes.c_uint32(0), ctypes.c_uint64(netns)
            check(
                lib.bpf_map_update_elem(
                    self._map_fd("netns"), ctypes.byref(key), ctypes.byref(value), 0
                ),
                "set the namespace",
            )
            self.programs = {}
            for name in PROGRAMS:
                prog = check(lib.bpf_object__find_program_by_name(self.obj, name.encode()), name)
                self.programs[name] = prog
                self.links.append(check(lib.bpf_program__attach(prog), f"attach {name}"))
        except BaseException:
            self.close()
            raise

    def _map_fd(self, name: str) -> int:
        fd = self.bpf.lib.bpf_object__find_map_fd_by_name(self.obj, name.encode())
        return self.bpf.check(fd, f"map {name}")

    def detach(self) -> None:
        for link in self.links:
            self.bpf.lib.bpf_link__destroy(link)
        self.links = []

    def close(self) -> None:
        self.detach()
        self.bpf.lib.bpf_object__close(self.obj)

    def count(self, slot: int) -> int:
        """A slot of ``counts``, summed over the CPUs."""
        return int(lookup_percpu(self.counts, slot).sum())

    def recursion_misses(self, name: str) -> int:
        """State changes the kernel did not run program ``name`` for (its fdinfo)."""
        fd = self.bpf.lib.bpf_program__fd(self.programs[name])
        return int(fdinfo(Path(f"/proc/self/fdinfo/{fd}")).get("recursion_misses", 0))

    def missed(self) -> int:
        """State changes neither program saw."""
        return max(0, self.recursion_misses("first") - self.count(RESCUED))

    def print_rows(self, out: object = sys.stdout) -> int:
        """What is left in ``rows``, as bpftrace prints a map: ``@r[a, ..., comm]: 1``."""
        from harness.kernel.bpf import KEY_DTYPE, KEY_SIZE  # its layout; lean at start

        keys = drain(self.rows, KEY_SIZE).view(KEY_DTYPE).reshape(-1)
        integers = [name for name in KEY_DTYPE.names or () if name != "comm"]
        lines = []
        for key in keys:
            numbers = ", ".join(str(int(key[name])) for name in integers)
            comm = bytes(key["comm"]).split(b"\0", 1)[0].decode(errors="replace")
            lines.append(f"@r[{numbers}, {comm}]: 1\n")
        print("".join(lines), end="", file=out)  # type: ignore[call-overload]
        return len(lines)


class OpenCount:
    """How many connections a running recorder (process ``pid``) follows that have not
    closed yet, read from outside it: its ``counts`` map, opened by id."""

    def __init__(self, pid: int) -> None:
        self.fd = open_map(find_map(pid, 4, PERCPU_ARRAY, 8))

    def __enter__(self) -> OpenCount:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def left(self) -> int:
        opened, inserted, dropped = (
            int(lookup_percpu(self.fd, slot).sum()) for slot in (OPENED, INSERTED, DROPPED)
        )
        return opened - inserted - dropped


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m harness.kernel.recorder NETNS_INODE", file=sys.stderr)
        return 2
    from harness.kernel.bpf import READY_LINE

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: stop.set())
    die_with_parent(signal.SIGTERM)
    try:
        recorder = Recorder(object_path(), int(args[0]))
    except OSError as exc:
        print(f"eph recorder: {exc}", file=sys.stderr)
        return 1
    try:
        print(READY_LINE, flush=True)
        while not stop.wait(1.0):
            pass
        recorder.detach()
        recorder.print_rows()
        print(f"@inserted: {recorder.count(INSERTED)}")
        print(f"@missed: {recorder.missed()}")
        print(f"@rescued: {recorder.count(RESCUED)}", flush=True)
    finally:
        recorder.close()
    return 0


if __name__ == "__main__":
    run_and_exit(main)
