"""The package's public surface, and what importing it does not do."""

from __future__ import annotations

import subprocess
import sys

import harness

from .conftest import ROOT


def test_all_names_exist_and_are_public() -> None:
    for name in harness.__all__:
        assert hasattr(harness, name), name
        assert not name.startswith("_")
    public = {n for n, v in vars(harness).items() if not n.startswith("_") and isinstance(v, type)}
    assert public <= set(harness.__all__)


def test_import_has_no_heavy_side_effects() -> None:
    """The listener's and collector's processes import harness: never locust or gevent."""
    code = (
        "import sys, harness, harness.target.listener, harness.records, harness.run; "
        "print(sorted(m for m in ('locust', 'gevent', 'matplotlib.pyplot') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
