"""The uvloop engine's callback fast path, in-process against real loopback sockets."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import uvloop

from harness.endpoints import Endpoint
from harness.load.churn import ChurnPlan
from harness.load.fastpath import CallbackChurn
from harness.records import RecordWriter, read_part
from harness.scenario import parse_scenario
from harness.target.listener import Listener


def _plan(port: int, load: str = "") -> ChurnPlan:
    scenario = parse_scenario(
        f'name = "f"\n[target]\nendpoints = ["127.0.0.1:{port}"]\n[load]\n{load}\n'
    )
    return ChurnPlan.from_scenario(scenario)


def _churn(plan: ChurnPlan, path: Path, users: int, seconds: float) -> dict[str, np.ndarray]:
    """Run ``users`` for ``seconds``, stop, and return every recorded row."""
    writer = RecordWriter(
        path, endpoints=plan.endpoints, close=plan.close.value, engine="uvloop", pid=os.getpid()
    )
    churn = CallbackChurn(plan, writer, io.BytesIO())

    async def run() -> None:
        churn.set_users(users)
        await asyncio.sleep(seconds)
        await churn.stop()

    uvloop.run(run())
    writer.close()
    return _columns(path)


def _columns(path: Path) -> dict[str, np.ndarray]:
    table = read_part(path).table
    return {name: table.column(name).to_numpy() for name in ("errno", "local_port", "connect_us")}


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("close", ["client", "reset"])
def test_every_connection_is_recorded_and_accepted(tmp_path: Path, close: str) -> None:
    async def scenario() -> tuple[int, CallbackChurn, RecordWriter]:
        listener = Listener([Endpoint("127.0.0.1", 0)])
        await listener.start()
        plan = _plan(listener.bound[0].port, f'close = "{close}"')
        writer = RecordWriter(
            tmp_path / "p.arrows", endpoints=plan.endpoints, close=close, engine="uvloop", pid=1
        )
        churn = CallbackChurn(plan, writer, io.BytesIO())
        churn.set_users(8)
        await asyncio.sleep(0.5)
        await churn.stop()
        await listener.drain(quiet=0.05)
        await listener.close()
        return listener.stats().total, churn, writer

    accepted, churn, writer = uvloop.run(scenario())
    writer.close()
    rows = _columns(tmp_path / "p.arrows")
    assert len(rows["errno"]) > 500
    assert (rows["errno"] == 0).all()
    assert len(rows["errno"]) == accepted  # conservation: each success reached the listener
    assert (rows["local_port"] > 0).all()
    # nothing left connecting or waiting (the listener's own sockets may linger here,
    # so the open-fd count is checked in the timeout test, which has no listener)
    assert not churn._inflight and not churn._active


def test_connects_that_hang_end_as_timeouts(tmp_path: Path) -> None:
    """A listener that never accepts, backlog 0: after the queue fills, SYNs are
    dropped and connect() hangs until the sweeper closes it at connect_timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        plan = _plan(server.getsockname()[1], 'connect_timeout = "200ms"\nbackoff = "10ms"')
        fds = _open_fds()
        rows = _churn(plan, tmp_path / "p.arrows", users=4, seconds=1.0)
        assert _open_fds() <= fds + 1
    waited_ms = rows["connect_us"][rows["errno"] == errno.ETIMEDOUT] / 1000
    assert len(waited_ms) >= 4
    assert (waited_ms >= 200).all() and (waited_ms < 200 + 150).all(), waited_ms


def test_refused_connects_are_data_and_back_off(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rows = _churn(_plan(port, 'backoff = "50ms"'), tmp_path / "p.arrows", users=2, seconds=0.5)
    assert (rows["errno"] == errno.ECONNREFUSED).all()
    # two users, one attempt per 50 ms each: ~20 in 0.5 s, never a tight loop
    assert 10 <= len(rows["errno"]) <= 30


def test_only_plain_churn_takes_the_fast_path() -> None:
    assert CallbackChurn.applies(_plan(9000))
    assert CallbackChurn.applies(_plan(9000, 'close = "reset"'))
    assert not CallbackChurn.applies(_plan(9000, 'close = "server"'))
    assert not CallbackChurn.applies(_plan(9000, 'send = "GET / HTTP/1.0\\r\\n\\r\\n"'))
    assert not CallbackChurn.applies(_plan(9000, 'hold = "10ms"'))
