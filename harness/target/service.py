"""A stand-in service for the ``port-conflict`` lab: it listens on a port inside the
ephemeral range, restarts during the load, and records whether it can bind again.

``python -m harness.target.service --port 40050 --run-dir DIR --restart-at 1 --until 3``

It binds ``127.0.0.1:PORT`` (SO_REUSEADDR, as most servers do) at once, waits for the
load to start (the run's first progress file), closes its socket ``--restart-at``
seconds later, and then tries to bind again every ``--retry`` seconds until it
succeeds or ``--until`` seconds after the load started. While it is down, the
clients' connect() may take its port; each failed bind is recorded with its errno
and the client sockets holding the port, by state. ``service.json`` in the run
directory gets the timeline. It never imports locust, and stops with its parent.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

from harness.files import atomic_write_json
from harness.kernel.exit import run_and_exit
from harness.kernel.parent_death import die_with_parent
from harness.kernel.sockdiag import TcpState, dump_tcp

__all__ = ["bind_service", "main"]

START_TIMEOUT = 120.0  # seconds to wait for the load to start


def bind_service(port: int) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(("127.0.0.1", port))
        server.listen(128)
    except OSError:
        server.close()
        raise
    return server


def _holders(port: int) -> dict[str, int]:
    rows = dump_tcp()
    rows = rows[rows["sport"] == port]
    counts: dict[str, int] = {}
    for state in rows["state"]:
        name = TcpState(int(state)).name
        counts[name] = counts.get(name, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.target.service", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--restart-at", type=float, required=True)
    parser.add_argument("--until", type=float, required=True)
    parser.add_argument("--retry", type=float, default=0.05)
    args = parser.parse_args(argv)
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    die_with_parent(signal.SIGTERM)
    server = bind_service(args.port)
    print(json.dumps({"event": "listening", "port": args.port}), flush=True)
    _wait_for_load(args.run_dir, stop)
    last = _restart(args, server, stop)
    if last is not None:
        last.close()
    return 0


def _wait_for_load(run_dir: Path, stop: list[bool]) -> None:
    """Until the run's first progress file (or a stop, or START_TIMEOUT)."""
    deadline = time.monotonic() + START_TIMEOUT
    while not any((run_dir / "progress").glob("*.json")):
        if stop[0] or time.monotonic() > deadline:
            break
        time.sleep(0.01)


def _restart(
    args: argparse.Namespace, server: socket.socket | None, stop: list[bool]
) -> socket.socket | None:
    """Close at ``--restart-at``, then bind again every ``--retry`` until it works or
    ``--until``; ``service.json`` kept current. The socket it ends with, if any."""
    timeline: dict[str, Any] = {"port": args.port, "restart_at_s": args.restart_at}
    attempts: list[dict[str, Any]] = []
    out = args.run_dir / "service.json"
    began = time.monotonic()
    while not stop[0] and time.monotonic() - began < args.until:
        now = time.monotonic() - began
        if server is not None and now >= args.restart_at:
            server.close()
            server = None
            timeline["stopped_at_s"] = round(now, 3)
        elif server is None:
            try:
                server = bind_service(args.port)
            except OSError as exc:
                attempts.append(_failed_bind(args.port, now, exc))
            else:
                timeline["rebound_at_s"] = round(now, 3)
                break
            # the run may end (and read this file) at any moment: keep it current
            _write(out, timeline, attempts)
        time.sleep(args.retry)
    _write(out, timeline, attempts)
    return server


def _failed_bind(port: int, at: float, exc: OSError) -> dict[str, Any]:
    return {
        "at_s": round(at, 3),
        "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno)),
        "held_by": _holders(port),
    }


def _write(out: Path, timeline: dict[str, Any], attempts: list[dict[str, Any]]) -> None:
    timeline["failed_binds"] = len(attempts)
    timeline["errors"] = sorted({a["errno"] for a in attempts})
    timeline["attempts"] = attempts[:20] + attempts[-5:] if len(attempts) > 25 else attempts
    timeline["rebound"] = "rebound_at_s" in timeline
    atomic_write_json(out, timeline)


if __name__ == "__main__":
    run_and_exit(main)
