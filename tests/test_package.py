"""The package's public surface, and what importing it does not do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import harness

from .conftest import ROOT


def _python(code: str, *args: str) -> str:
    """What ``code`` prints in a fresh interpreter, from the checkout."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def test_all_names_exist_and_are_public() -> None:
    for name in harness.__all__:
        assert hasattr(harness, name), name
        assert not name.startswith("_")
    public = {n for n, v in vars(harness).items() if not n.startswith("_") and isinstance(v, type)}
    assert public <= set(harness.__all__)


def test_import_has_no_heavy_side_effects() -> None:
    """The listener's and collector's processes import harness: never locust or gevent."""
    code = (
        "import sys, harness, harness.target.listener, harness.records, harness.run.lifecycle; "
        "print(sorted(m for m in ('locust', 'gevent', 'matplotlib.pyplot') "
        "if m in sys.modules))"
    )
    out = _python(code)
    assert out.strip() == "[]"


LIGHT = r"""
import json, sys
from harness.cli import main
try:
    main([*sys.argv[1:], "--help"])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m in (
    "harness.scenario.definition", "harness.cli.runs", "harness.cli.reports", "numpy",
    "pyarrow", "matplotlib", "jinja2"))))
"""


@pytest.mark.parametrize("verb", ["listen", "collect"])
def test_a_childs_verb_loads_only_its_own_part_of_the_command_line(verb: str) -> None:
    """Every run starts ``eph listen`` and ``eph collect`` children: neither builds the
    scenario model nor loads the other verbs, numpy or the report (0.31 s of CPU each
    when every verb was loaded, 0.10 s since)."""
    out = _python(LIGHT, verb)
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_the_whole_command_line_is_there_for_a_reader() -> None:
    """``harness.cli.cli`` (the manual's reference, a script) has every verb loaded."""
    code = "import harness.cli as c; print(sorted(c.cli.commands))"
    out = _python(code)
    from harness.cli._base import VERBS

    assert out.strip() == str(sorted(VERBS))


def test_a_run_without_its_report_never_loads_matplotlib() -> None:
    """``--no-report`` skips the report: and with it 0.44 s of importing its libraries."""
    code = (
        "import sys, harness.run.lifecycle, harness.run.finalize; "
        "print(sorted(m for m in ('matplotlib', 'jinja2') if m in sys.modules))"
    )
    out = _python(code)
    assert out.strip() == "[]"


WALK = r"""
import importlib, json, pkgutil, sys
import harness

LOCUST_SIDE = ("harness.load", "harness.locustfile")
HEAVY = ("locust", "gevent")
checked, culprits = [], {}
for info in pkgutil.walk_packages(harness.__path__, "harness."):
    name = info.name
    if any(name == side or name.startswith(side + ".") for side in LOCUST_SIDE):
        continue
    importlib.import_module(name)
    checked.append(name)
    for heavy in HEAVY:
        if heavy in sys.modules and heavy not in culprits:
            culprits[heavy] = name  # the first module whose import pulled it in
print(json.dumps({"checked": checked, "culprits": culprits}))
"""


def test_nothing_outside_load_imports_locust_or_gevent() -> None:
    """Every module outside ``harness/load/`` and the locustfile, walked with pkgutil:
    importing it pulls in neither locust nor gevent (locust monkey-patches on import)."""
    out = subprocess.run(
        [sys.executable, "-c", WALK], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["culprits"] == {}, f"imported by: {result['culprits']}"
    # the walk found the package's rooms, not an empty list
    checked = set(result["checked"])
    for module in (
        "harness.cli",
        "harness.run.lifecycle",
        "harness.records",
        "harness.target.listener",
    ):
        assert module in checked, module
    assert not any(name.startswith("harness.load") for name in checked)


def test_the_contract_loads_nothing_of_the_machinery() -> None:
    """``harness.summary`` in a fresh interpreter: pydantic and the standard library,
    and of eph only the package root and its error tree."""
    code = (
        "import sys, json, harness.summary; "
        "harness.summary.Summary, harness.summary.ObserveSummary; "
        "harness.summary.summary_schema(); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('harness', 'numpy', 'pyarrow', 'matplotlib', 'locust', 'gevent'))))"
    )
    out = _python(code)
    loaded = set(json.loads(out))
    assert {m for m in loaded if not m.startswith("harness.summary")} <= {
        "harness",
        "harness.errors",
    }, loaded


def test_mypy_tells_a_table_from_a_handle_on_a_file(tmp_path: Path) -> None:
    """stubs/pyarrow gives pyarrow's containers classes: a large run's handle handed
    where a table is declared (the crash section's old bug) is a type error."""
    snippet = tmp_path / "confusion.py"
    snippet.write_text(
        "import pyarrow as pa\n"
        "from pathlib import Path\n"
        "from harness.report.ondisk import OnDisk\n"
        "def rows(table: pa.Table) -> int:\n"
        "    return len(table)\n"
        "rows(pa.table({'a': [1]}))\n"
        "rows(OnDisk(Path('r.parquet'), 3))\n"
    )
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
         "--config-file", str(ROOT / "pyproject.toml"), str(snippet)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    errors = [line for line in checked.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, checked.stdout
    assert "confusion.py:7:" in errors[0] and '"OnDisk"; expected "Table"' in errors[0]


_THREADS_AFTER_NUMPY = """
import os, sys
if sys.argv[1] == "eph":
    from harness.__main__ import one_blas_thread
    one_blas_thread()
import numpy
print(len(os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS starts one thread per CPU")
def test_eph_imports_numpy_without_a_blas_thread_per_cpu() -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}

    def threads(how: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _THREADS_AFTER_NUMPY, how],
            capture_output=True, text=True, env=env, check=True, cwd=ROOT,
        )  # fmt: skip
        return int(out.stdout)

    assert threads("plain") > 1  # OpenBLAS's own choice: the subject is real here
    assert threads("eph") == 1
