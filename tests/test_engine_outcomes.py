"""The gevent and uvloop engines record the same outcome for the same event.

A loopback server that refuses, closes without a reply, or resets; each engine
makes a few attempts against it, and both must write the same errno columns.
The gevent engine runs in a subprocess (gevent stays out of the test process).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from harness.load.churn import ChurnPlan
from harness.load.uvloop_engine import UvloopChurn
from harness.records import RecordWriter, read_part
from harness.scenario import parse_scenario

from .conftest import ROOT

ATTEMPTS = 4
SERVER_DELAY = 0.1  # the server waits this long after accepting: the client is waiting

GEVENT_SCRIPT = r"""
import json, sys
from pathlib import Path
from harness.load.churn import ChurnPlan
from harness.load.gevent_engine import GeventChurn
from harness.load.outcome import failure
from harness.records import RecordWriter
from harness.scenario import parse_scenario

plan = ChurnPlan.from_scenario(parse_scenario(sys.argv[1]))
writer = RecordWriter(Path(sys.argv[2]), endpoints=plan.endpoints, close="x", engine="locust")
seen = []
churn = GeventChurn(
    plan, writer, lambda t, e, i, ms, rx, n: seen.append(str(failure(e, i)) if e or i else "")
)
for target in [plan.targets[0]] * int(sys.argv[3]):
    churn.attempt(target)
writer.close()
print(json.dumps(seen))
"""


@contextlib.contextmanager
def _server(mode: str) -> Iterator[int]:
    """A port that refuses (``refuse``), or a server that closes (``fin``) or resets
    (``rst``) each connection it accepts, after ``SERVER_DELAY``."""
    if mode == "refuse":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            yield probe.getsockname()[1]
        return
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(0.1)

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                time.sleep(SERVER_DELAY)
                if mode == "rst":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield listener.getsockname()[1]
        finally:
            stop.set()
            thread.join(timeout=5)


def _scenario(port: int, reply: str) -> str:
    return (
        f'name = "o"\n[target]\nendpoints = ["127.0.0.1:{port}"]\n'
        f'[load]\nreply = "{reply}"\nconnect_timeout = "2s"\nio_timeout = "2s"\n'
    )


def _pairs(path: Path) -> list[tuple[int, int]]:
    table = read_part(path).table
    return list(
        zip(table.column("errno").to_pylist(), table.column("io_errno").to_pylist(), strict=True)
    )


def _uvloop(text: str, path: Path) -> list[tuple[int, int]]:
    plan = ChurnPlan.from_scenario(parse_scenario(text))
    writer = RecordWriter(path, endpoints=plan.endpoints, close="x", engine="uvloop")
    churn = UvloopChurn(plan, writer, io.BytesIO())

    async def run() -> None:
        for _ in range(ATTEMPTS):
            await churn.attempt(plan.targets[0])

    uvloop.run(run())
    writer.close()
    return _pairs(path)


def _gevent(text: str, path: Path) -> tuple[list[tuple[int, int]], list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT, text, str(path), str(ATTEMPTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return _pairs(path), json.loads(out)


@pytest.mark.parametrize(
    ("mode", "reply", "expected", "locust_error"),
    [
        ("refuse", "data", (errno.ECONNREFUSED, 0), "ECONNREFUSED"),
        ("fin", "data", (0, errno.ENODATA), "ENODATA after connect"),
        ("rst", "eof", (0, errno.ECONNRESET), "ECONNRESET after connect"),
        ("fin", "eof", (0, 0), ""),
    ],
)
def test_both_engines_record_the_same_outcome(
    tmp_path: Path, mode: str, reply: str, expected: tuple[int, int], locust_error: str
) -> None:
    with _server(mode) as port:
        text = _scenario(port, reply)
        uvloop_rows = _uvloop(text, tmp_path / "uvloop.arrows")
        gevent_rows, gevent_errors = _gevent(text, tmp_path / "gevent.arrows")
    assert uvloop_rows == [expected] * ATTEMPTS
    assert gevent_rows == [expected] * ATTEMPTS
    assert gevent_errors == [locust_error] * ATTEMPTS


def test_protocol_path_stays_off_the_fast_path() -> None:
    """These cases exercise UvloopChurn's Protocols, not the callback fast path."""
    from harness.load.fastpath import CallbackChurn

    for reply in ("data", "eof"):
        plan = ChurnPlan.from_scenario(parse_scenario(_scenario(9, reply)))
        assert not CallbackChurn.applies(plan)
