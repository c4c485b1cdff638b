"""The CLI in-process (click's runner); end-to-end runs are in test_run_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli, main

from .conftest import ROOT


def test_help_lists_the_verbs() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for verb in ("run", "listen", "validate"):
        assert verb in result.output


def test_validate_every_shipped_scenario() -> None:
    paths = [str(p) for p in sorted((ROOT / "scenarios").glob("*.toml"))]
    result = CliRunner().invoke(cli, ["validate", *paths])
    assert result.exit_code == 0, result.output
    assert result.output.count(": ok (") == len(paths)


def test_validate_prints_parity_warning(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        'name = "p"\n[target]\nendpoints = ["127.0.0.1:1"]\n'
        "[kernel]\nip_local_port_range = [40000, 40100]\n"
    )
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 0
    assert "warning:" in result.output and "same parity" in result.output


def test_errors_exit_2_with_one_paragraph(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "b"\n[target]\nendpoints = ["127.0.0.1:1"]\n[load]\nusers = -1\n')
    with pytest.raises(SystemExit) as caught:
        main(["validate", str(path)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "bad.toml, line 5, key 'load.users'" in err
    assert "Traceback" not in err


def test_set_error_names_set(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["validate", str(ROOT / "scenarios" / "default.toml"), "--set", "load.usres=3"])
    assert caught.value.code == 2
    assert "--set, key 'load.usres'" in capsys.readouterr().err
