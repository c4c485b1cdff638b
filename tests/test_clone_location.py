"""The suite runs from any clone location, even one other users cannot reach."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

# every test that drops to user nobody (see tests/unprivileged.py)
AS_NOBODY = [
    "tests/test_ports.py::test_a_privileged_port_as_an_unprivileged_user_teaches",
    "tests/test_lab.py::test_without_privilege_or_user_namespaces_the_message_says_what_is_needed",
]


def _git(*args: str) -> bytes:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, check=True, timeout=60
    ).stdout


def _clone(into: Path) -> Path:
    """``git clone`` of this checkout as it stands: its commits, plus uncommitted changes
    and new files that git does not ignore."""
    clone = into / "eph"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=60)
    diff = _git("diff", "HEAD", "--binary")
    if diff:
        subprocess.run(["git", "-C", str(clone), "apply"], input=diff, check=True, timeout=60)
    for name in _git("ls-files", "-z", "--others", "--exclude-standard").split(b"\0"):
        if name:
            target = clone / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / os.fsdecode(name), target)
    return clone


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="the tests it runs drop to user nobody: needs root")
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_privilege_dropping_tests_pass_from_a_clone_nobody_can_reach(tmp_path: Path) -> None:
    deny = tmp_path / "deny"
    deny.mkdir()
    deny.chmod(0o700)
    clone = _clone(deny)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # imports from the clone
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *AS_NOBODY],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"{len(AS_NOBODY)} passed" in result.stdout, result.stdout[-3000:]
    assert "skipped" not in result.stdout
