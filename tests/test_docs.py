"""The manual: the README is a front door whose links lead somewhere, and the MkDocs
site builds with --strict (a broken link or anchor fails it) with every verb and
every option of the command line, and every scenario key, on its reference pages."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from harness.cli import cli
from harness.scenario import Scenario

from .conftest import ROOT

README_LIMIT = 20 * 1024  # bytes: the front door, not the manual


def test_the_readme_is_a_front_door_whose_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= README_LIMIT
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which is not there"
    for verb in ("make loadtest", "make test", "eph observe", "eph lab", "eph plan"):
        assert verb in text


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    mkdocs = Path(sys.executable).with_name("mkdocs")
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(mkdocs.parent) + ":/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page.read_text()))


@pytest.mark.docs
def test_the_site_lists_every_verb_with_every_option(site: Path) -> None:
    page = _text(site / "reference" / "cli" / "index.html")
    assert isinstance(cli, click.Group)
    for name, command in cli.commands.items():
        assert f"eph {name}" in page, name
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                for opt in param.opts:
                    assert opt in page, f"eph {name} {opt}"


@pytest.mark.docs
def test_the_site_lists_every_scenario_key(site: Path) -> None:
    page = _text(site / "reference" / "scenario" / "index.html")

    def walk(model: type, prefix: str) -> list[str]:
        keys = []
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            keys.append(prefix + name)
            sub = field.annotation
            for arg in (sub, *getattr(sub, "__args__", ())):
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    keys += walk(arg, f"{prefix}{name}.")
                    break
        return keys

    for key in walk(Scenario, ""):
        assert key in page, key


@pytest.mark.docs
def test_the_site_lists_the_summary_keys_and_serves_the_schema(site: Path) -> None:
    page = _text(site / "reference" / "summary" / "index.html")
    for key in ("connections.attempted", "exhaustion.first_failure_s", "capacity"):
        assert key in page, key
    assert (site / "summary.schema.json").read_text() == (
        ROOT / "docs" / "summary.schema.json"
    ).read_text()
