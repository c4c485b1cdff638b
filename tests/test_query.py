"""The manual's "Querying a run" (docs/guides/querying.md): its snippets, as written
there, against a real run directory, their answers checked against the same questions
put to pyarrow and numpy here."""

from __future__ import annotations

import collections
import contextlib
import json
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.conftest import EPH, ROOT, eph, write_scenario

pytestmark = pytest.mark.e2e

PLACEHOLDER = "reports/20261204-120000-default"
# two targets: one accepts, one refuses (errors); at thousands of connections a second
# over 28,232 ports, loopback's tcp_tw_reuse hands tuples out again a second after
# their close (reuses per port)
SCENARIO = """
name = "query"
duration = "4s"
[target]
endpoints = {endpoints}
[load]
engine = "uvloop"
users = 20
spawn_rate = 1000
close = "client"
backoff = "1ms"
connect_timeout = "1s"
"""


@contextlib.contextmanager
def _targets() -> Iterator[list[str]]:
    """eph's listener (accepts; the port it bound reported on its first line) and a
    port that refuses (a socket bound, never listening): both on port 0."""
    listener = subprocess.Popen(
        [*EPH, "listen", "--endpoint", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))
    with listener, refusing:
        try:
            first = listener.stdout.readline() if listener.stdout is not None else "{}"
            accepting = json.loads(first).get("endpoints", [])
            yield [*accepting, f"127.0.0.1:{refusing.getsockname()[1]}"]
        finally:
            listener.terminate()
            listener.wait(timeout=10)


def readme_snippets() -> list[str]:
    """The manual's query snippets (docs/guides/querying.md), as a reader copies them."""
    text = (ROOT / "docs" / "guides" / "querying.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, dict[str, Any]]:
    """A short loopback run, and what every snippet of the manual found in it."""
    tmp = tmp_path_factory.mktemp("query")
    run = tmp / "run"
    with _targets() as endpoints:
        scenario = write_scenario(tmp / "s.toml", SCENARIO.format(endpoints=json.dumps(endpoints)))
        done = eph(["run", str(scenario), "--out", str(run)], cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    found: dict[str, Any] = {}
    snippets = readme_snippets()
    assert len(snippets) == 4, (
        "the query snippets in docs/guides/querying.md moved: this test reads them"
    )
    assert PLACEHOLDER in snippets[0]  # the first sets `run`, the others use it
    for snippet in snippets:
        exec(snippet.replace(PLACEHOLDER, str(run)), found)
    return pq.read_table(run / "connections.parquet"), found


def _seconds(table: pa.Table) -> np.ndarray:
    start = table.column("start_ns").to_numpy()
    return np.asarray((start - start.min()) // 1_000_000_000)


def test_errors_by_second(answers: tuple[pa.Table, dict[str, Any]]) -> None:
    table, found = answers
    errno, second = table.column("errno").to_numpy(), _seconds(table)
    failed = errno != 0
    counts = collections.Counter(zip(second[failed].tolist(), errno[failed].tolist(), strict=True))
    assert counts, "the run had failures to count (one target refuses)"
    assert found["errors_by_second"] == sorted((s, e, n) for (s, e), n in counts.items())


def test_reuses_per_port(answers: tuple[pa.Table, dict[str, Any]]) -> None:
    table, found = answers
    ok = table.filter(pc.equal(table.column("errno"), 0))
    names = [
        pc.cast(ok.column(c), pa.string()).to_numpy(zero_copy_only=False)
        for c in ("local_addr", "remote_addr")
    ]
    port, remote_port = ok.column("local_port").to_numpy(), ok.column("remote_port").to_numpy()
    start = ok.column("start_ns").to_numpy()
    end = start + ok.column("close_us").to_numpy().astype(np.int64) * 1000
    last_close: dict[tuple[str, int, str, int], int] = {}
    reuses: collections.Counter[int] = collections.Counter()
    for i in np.argsort(start, kind="stable"):
        tuple_ = (names[0][i], int(port[i]), names[1][i], int(remote_port[i]))
        if tuple_ in last_close and start[i] - last_close[tuple_] < 60e9:
            reuses[int(port[i])] += 1
        last_close[tuple_] = int(end[i])
    assert reuses, "the run reused tuples (loopback's tcp_tw_reuse)"
    assert found["reuses_per_port"] == sorted(reuses.items(), key=lambda x: (-x[1], x[0]))


def test_top_destinations(answers: tuple[pa.Table, dict[str, Any]]) -> None:
    table, found = answers
    remote = pc.cast(table.column("remote_addr"), pa.string()).to_pylist()
    ports = table.column("remote_port").to_pylist()
    ok = (table.column("errno").to_numpy() == 0).tolist()
    attempts: collections.Counter[str] = collections.Counter()
    succeeded: collections.Counter[str] = collections.Counter()
    for address, port, connected in zip(remote, ports, ok, strict=True):
        attempts[f"{address}:{port}"] += 1
        succeeded[f"{address}:{port}"] += connected
    expected = sorted(
        ((d, n, succeeded[d]) for d, n in attempts.items()), key=lambda x: (-x[1], x[0])
    )
    assert found["top_destinations"] == expected[:10]


def test_polars_per_second_and_latency(answers: tuple[pa.Table, dict[str, Any]]) -> None:
    table, found = answers
    errno, second = table.column("errno").to_numpy(), _seconds(table)
    counts = collections.Counter(zip(second.tolist(), errno.tolist(), strict=True))
    assert found["per_second"].rows() == sorted((s, e, n) for (s, e), n in counts.items())
    connect = table.column("connect_us").to_numpy()[errno == 0] / 1000
    quantiles = found["connect_ms"].row(0)
    assert quantiles == pytest.approx(np.percentile(connect, [50, 90, 99]))


def test_the_snippets_name_the_file_a_run_writes(tmp_path: Path) -> None:
    """The placeholder stands for a run directory, and each snippet reads its records."""
    for snippet in readme_snippets()[:3]:
        assert "'{run}/connections.parquet'" in snippet
