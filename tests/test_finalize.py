"""Finalizing and re-rendering run directories, including broken ones."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from harness.endpoints import ResolvedEndpoint
from harness.errors import RunDirError
from harness.finalize import finalize, rerender
from harness.records import RecordWriter
from harness.rundir import RunDir
from harness.scenario import parse_scenario

SCENARIO = 'name = "r"\n[target]\nendpoints = ["127.0.0.1:9000"]\n[listener]\n'


def _run_dir(tmp_path: Path, n: int = 120) -> Path:
    run = RunDir.open(tmp_path / "run", create=True)
    run.write_scenario(parse_scenario(SCENARIO))
    writer = RecordWriter(
        run.parts / "locust-1-0.arrows",
        close="client",
        engine="locust",
        endpoints=[ResolvedEndpoint(socket.AF_INET, "127.0.0.1", 9000)],
    )
    address = writer.address_id("127.0.0.1")
    for i in range(n):
        start = 1_000_000_000 + i * 1_000_000
        err = 99 if i >= 100 else 0
        writer.add(
            (start, start + 50_000, start + 80_000, address, 40000 + i if not err else 0, 0, err, 0)
        )
    writer.close()
    run.write_json("listener.json", {"accepted": 100})
    finalize(
        run.path,
        interrupted=True,
        started_at=1_700_000_000.0,
        duration_s=2.5,
        kernel={"ip_local_port_range": [40000, 40099], "tcp_tw_reuse": 0},
        listener={"accepted": 100},
    )
    return run.path


def test_rerender_keeps_what_only_the_run_knew(tmp_path: Path) -> None:
    path = _run_dir(tmp_path)
    first = json.loads((path / "summary.json").read_text())
    (path / "report.html").unlink()
    again = rerender(path)
    assert again == first
    assert again["interrupted"] is True and again["duration_s"] == 2.5
    assert again["conservation"]["succeeded_match_listener"] is True
    assert (path / "report.html").exists()


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="no such directory"):
        rerender(tmp_path / "nope")


def test_directory_without_records(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match=r"has no connections\.parquet"):
        rerender(tmp_path / "empty")


def test_corrupt_records(tmp_path: Path) -> None:
    path = _run_dir(tmp_path)
    (path / "connections.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(RunDirError, match=r"connections\.parquet is unreadable"):
        rerender(path)


def test_truncated_scenario(tmp_path: Path) -> None:
    path = _run_dir(tmp_path)
    text = (path / "scenario.json").read_text()
    (path / "scenario.json").write_text(text[: len(text) // 2])
    with pytest.raises(RunDirError, match=r"scenario\.json is not valid JSON"):
        rerender(path)


def test_truncated_summary_is_recomputed(tmp_path: Path) -> None:
    path = _run_dir(tmp_path)
    (path / "summary.json").write_text('{"schema_version": 1, "connec')
    again = rerender(path)
    assert again["connections"]["attempted"] == 120
    assert again["exhaustion"]["succeeded_before_first_failure"] == 100
