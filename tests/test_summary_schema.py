"""summary.json's published JSON Schema: the committed copy is the model's, and a real
run's summary.json validates against it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from harness.cli import main
from harness.summary import SCHEMA_VERSION, Summary, summary_schema

from .conftest import ROOT, eph, write_scenario

COMMITTED = ROOT / "docs" / "summary.schema.json"


def test_the_committed_schema_is_the_models() -> None:
    """docs/summary.schema.json cannot drift: `eph schema summary > docs/summary.schema.json`."""
    assert json.loads(COMMITTED.read_text()) == summary_schema()


def test_eph_schema_summary_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    main(["schema", "summary"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == summary_schema()
    assert printed["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    assert "connections" in printed["required"]
    jsonschema.Draft202012Validator.check_schema(printed)


@pytest.fixture(scope="module")
def real_summary(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``eph run`` of a one-second scenario against its own listener on loopback."""
    tmp_path = tmp_path_factory.mktemp("schema-run")
    scenario = write_scenario(
        tmp_path / "s.toml",
        """
name = "schema"
duration = "1s"
[target]
endpoints = ["127.0.0.1:0"]
[listener]
[load]
engine = "uvloop"
users = 5
spawn_rate = 100
rate = 200
connect_timeout = "1s"
io_timeout = "1s"
""",
    )
    out = tmp_path / "run"
    result = eph(["run", str(scenario), "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(json.loads((out / "summary.json").read_text()))


@pytest.mark.e2e
def test_a_real_runs_summary_validates_against_the_schema(real_summary: dict[str, Any]) -> None:
    schema = json.loads(COMMITTED.read_text())
    jsonschema.validate(real_summary, schema, cls=jsonschema.Draft202012Validator)
    assert real_summary["connections"]["succeeded"] > 0
    assert Summary.from_json(real_summary).to_json() == real_summary  # read back unchanged


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("schema_version",), 1),
        (("connections", "succeeded"), "many"),
        (("exhaustion", "exhausted_at"), 1.0),  # a key the schema does not know
    ],
)
def test_the_schema_rejects_what_the_model_rejects(
    real_summary: dict[str, Any], path: tuple[str, ...], value: object
) -> None:
    broken = copy.deepcopy(real_summary)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, summary_schema(), cls=jsonschema.Draft202012Validator)
    with pytest.raises(ValueError):
        Summary.model_validate(broken)


@pytest.mark.e2e
def test_the_subprocess_cli_prints_the_same(tmp_path: Path) -> None:
    result = eph(["schema", "summary"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(COMMITTED.read_text())
