"""report.html in a real browser: headless Chromium loads every figure and paints a page.

`make test` installs Debian's chromium (Makefile target `system-deps`) and sets
EPH_REQUIRE_BROWSER=1, so there a missing browser fails the test instead of
skipping it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from .browser import chromium
from .conftest import ROOT, eph

pytestmark = [pytest.mark.netns, pytest.mark.e2e]


def _headless(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_figure_loads_and_the_page_is_not_blank(tmp_path: Path) -> None:
    browser = chromium()
    out = tmp_path / "run"
    result = eph(
        [
            "lab",
            str(ROOT / "scenarios" / "tw-reuse.toml"),
            "--set",
            "duration=1500ms",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        report=True,  # the page is the subject
    )
    assert result.returncode == 0, result.stderr[-2000:]
    url = (out / "report.html").as_uri()
    dom = _headless(browser, "--virtual-time-budget=10000", "--dump-dom", url)
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None, dom.stderr[-2000:]
    figures = re.search(r'data-figures="(\d+)"', body.group(0))
    loaded = re.search(r'data-figures-loaded="(\d+)"', body.group(0))
    assert figures and loaded, f"the page's load script did not run: {body.group(0)}"
    assert int(figures.group(1)) == 9
    assert loaded.group(1) == figures.group(1), "a figure did not decode"

    shot = tmp_path / "report.png"
    _headless(browser, "--window-size=1200,4000", f"--screenshot={shot}", url)
    pixels = image.imread(shot)[..., :3]
    not_white = (pixels < 0.95).any(axis=-1).mean()
    rgb = (pixels * 255).astype(np.uint32).reshape(-1, 3)
    # one integer per colour: np.unique(axis=0) on the 4.8M rows took 10.6 s of CPU
    colours = len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]))
    assert not_white > 0.05, f"only {not_white:.1%} of the page is painted"
    assert colours > 100, f"{colours} colours: text only, no plots?"
