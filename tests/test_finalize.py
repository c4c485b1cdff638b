"""Finalizing and re-rendering run directories, including broken ones."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main
from harness.endpoints import ResolvedEndpoint
from harness.errors import RunDirError, SummaryError
from harness.records import RecordWriter
from harness.run.finalize import finalize, load_run, rerender
from harness.rundir import RunDir
from harness.scenario import parse_scenario
from harness.summary import SCHEMA_VERSION, Summary

from .tables import write_nat

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
        port = 40000 + i if not err else 0
        writer.add((start, start + 50_000, start + 80_000, address, port, 0, err, 0, 0, 0, 0, 0))
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
    assert again.to_json() == first
    assert again.interrupted is True and again.duration_s == 2.5
    assert again.conservation.succeeded_match_listener is True
    assert (path / "report.html").exists()
    assert Summary.load(path / "summary.json") == again


def test_a_run_with_nat_samples_has_the_nat_figure_and_one_without_has_none(
    tmp_path: Path,
) -> None:
    path = _run_dir(tmp_path)
    assert "NAT pool" not in (path / "report.html").read_text()
    pngs = (path / "report.html").read_text().count("data:image/png;base64,")
    start = 1_000_000_000
    t_ns = [start + k * 20_000_000 for k in range(7)]
    write_nat(path, t_ns, [0, 40, 80, 100, 100, 100, 0], [0, 0, 0, 0, 0, 0, 0], pool=100)
    rerender(path)
    html = (path / "report.html").read_text()
    assert "NAT pool against the client" in html
    assert html.count("data:image/png;base64,") == pngs + 1
    assert Summary.load(path / "summary.json").nat is not None


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
    assert again.connections.attempted == 120
    assert again.exhaustion.succeeded_before_first_failure == 100


def test_a_version_1_summary_is_written_again_as_the_current_version(tmp_path: Path) -> None:
    """v1 had the same keys: what only the run knew survives `eph report`."""
    path = _run_dir(tmp_path)
    first = json.loads((path / "summary.json").read_text())
    old = {**first, "schema_version": 1}
    (path / "summary.json").write_text(json.dumps(old))
    expected = rf"key 'schema_version'.*\(got 1, expected {SCHEMA_VERSION}\)"
    with pytest.raises(SummaryError, match=expected):
        Summary.load(path / "summary.json")
    again = rerender(path)
    assert again.schema_version == SCHEMA_VERSION
    assert again.to_json() == first
    assert json.loads((path / "summary.json").read_text())["schema_version"] == SCHEMA_VERSION


def test_compare_writes_an_old_summary_again(tmp_path: Path) -> None:
    path = _run_dir(tmp_path)
    data = json.loads((path / "summary.json").read_text())
    (path / "summary.json").write_text(json.dumps({**data, "schema_version": 1}))
    assert load_run(path).summary.schema_version == SCHEMA_VERSION


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s["connections"].update(succeeded="many"),
            r"summary\.json, key 'connections\.succeeded': has a wrong value \(got 'many',"
            r" expected a valid integer",
        ),
        (
            lambda s: s["exhaustion"].pop("exhausted"),
            r"key 'exhaustion\.exhausted': is missing",
        ),
        (
            lambda s: s.update(exhaustion_s=3),
            r"key 'exhaustion_s': is not a summary key",
        ),
    ],
)
def test_a_malformed_summary_names_file_key_value_and_expected(
    tmp_path: Path,
    change: Callable[[dict[str, Any]], object],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _run_dir(tmp_path)
    data = json.loads((path / "summary.json").read_text())
    change(data)
    (path / "summary.json").write_text(json.dumps(data))
    with pytest.raises(SummaryError, match=message) as caught:
        Summary.load(path / "summary.json")
    assert caught.value.source == path / "summary.json"
    # the contract's own error (it imports nothing of eph's); the CLI reports it as its own
    with pytest.raises(SystemExit) as exited:
        main(["plan", "--from", str(path)])
    assert exited.value.code == 2
    assert re.search(message, capsys.readouterr().err.replace("\n", " "))


def test_plan_from_a_run_directory_reads_its_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness.cli import main

    path = _run_dir(tmp_path)
    main(["plan", "--from", str(path), "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["inputs"]["port_range"] == [40000, 40099] and plan["inputs"]["tw_reuse"] == 0
    assert plan["measured"]["ports before the first failure"] == {"model": 100, "measured": 100}
    data = json.loads((path / "summary.json").read_text())
    (path / "summary.json").write_text(json.dumps({**data, "schema_version": 1}))
    with pytest.raises(SystemExit) as exited:  # a clear error, no traceback
        main(["plan", "--from", str(path)])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "summary.json, key 'schema_version'" in error and "eph report RUN_DIR" in error


def test_a_wrong_value_in_a_file_feeding_the_summary_names_it(tmp_path: Path) -> None:
    path = _run_dir(tmp_path)
    (path / "listener.json").write_text(json.dumps({"accepted": "lots"}))
    with pytest.raises(SummaryError, match=r"listener\.json, key 'accepted': has a wrong value"):
        rerender(path)
