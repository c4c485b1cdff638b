"""Run ``eph`` as user nobody, from a checkout that nobody may not be able to reach.

``setpriv --reuid=65534 ... python -m harness`` with ``PYTHONPATH=<checkout>``
breaks as soon as the checkout, its venv or the interpreter sits under a
directory other users cannot traverse (a clone under /root, a 0700 temp dir):
the child dies with "No module named harness", or worse, quietly imports some
other checkout through the venv's editable-install finder.

So the child starts as root and, before dropping privileges, opens every
directory it imports from (this checkout first, then ``sys.path``) and points
``sys.path``, every loaded package's ``__path__`` and any argument naming a
file in the checkout at ``/proc/self/fd/N/...``: a directory opened while it
could be stays reachable through its descriptor, whatever its parents' modes.
Then it becomes nobody (uid and gid 65534, no supplementary groups; setuid()
from root clears every capability), checks that ``harness`` comes from this
checkout, and runs ``python -m harness``. Everything eph does, it does as nobody.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

NOBODY = 65534

_LAUNCH = """
import os, runpy, sys

root, uid, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
sys.path.insert(0, root)
opened = {}
for entry in sys.path:
    if entry and entry not in opened and os.path.isdir(entry):
        opened[entry] = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
longest_first = sorted(opened, key=len, reverse=True)


def through(path):
    for entry in longest_first:
        if path == entry or path.startswith(entry.rstrip("/") + "/"):
            return f"/proc/self/fd/{opened[entry]}{path[len(entry):]}"
    return path


sys.path[:] = [through(entry) if entry else entry for entry in sys.path]
for module in list(sys.modules.values()):
    paths = getattr(module, "__path__", None)
    if isinstance(paths, list):
        paths[:] = [through(p) for p in paths]
sys.path_importer_cache.clear()
args = [through(a) if a.startswith(root.rstrip("/") + "/") else a for a in args]

os.setgroups([])
os.setgid(uid)
os.setuid(uid)

import harness

if not harness.__file__.startswith(through(os.path.join(root, "harness")) + "/"):
    sys.exit(f"harness was imported from {harness.__file__}, not from {root}")
sys.argv = ["eph", *args]
runpy.run_module("harness", run_name="__main__", alter_sys=True)
"""


def eph_as_nobody(
    args: Sequence[str],
    *,
    root: Path,
    cwd: Path | str = "/",
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``eph *args`` as nobody, with ``harness`` from ``root``; needs root to start."""
    if os.geteuid() != 0:
        raise PermissionError("dropping to nobody needs root")
    return subprocess.run(
        [sys.executable, "-c", _LAUNCH, str(root), str(NOBODY), *args],
        cwd=cwd,
        env=dict(os.environ if env is None else env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
