"""Live progress counts failures with the same labels Locust shows."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np

from harness.load.outcome import failure
from harness.load.progress import ProgressCounter, read_progress
from harness.records import ROW_DTYPE


def _rows(pairs: list[tuple[int, int]]) -> np.ndarray:
    rows = np.zeros(len(pairs), dtype=ROW_DTYPE)
    rows["errno"] = [p[0] for p in pairs]
    rows["io_errno"] = [p[1] for p in pairs]
    return rows


def test_counts_and_labels_match_locust_failures(tmp_path: Path) -> None:
    pairs = (
        [(0, 0)] * 6
        + [(errno.EADDRNOTAVAIL, 0)] * 3
        + [(0, errno.ECONNRESET)] * 2
        + [(errno.ETIMEDOUT, 0), (0, errno.ETIMEDOUT)]
    )
    counter = ProgressCounter(tmp_path / "progress" / "1-0.json", "locust")
    counter.update(_rows(pairs[:5]))
    counter.update(_rows(pairs[5:]))
    counter.update(_rows([]))
    counter.write(users=3)
    data = json.loads(counter.path.read_text())
    assert (data["attempts"], data["failures"], data["users"]) == (13, 7, 3)
    expected = {str(failure(e, i)): 0 for e, i in pairs if e or i}
    for e, i in pairs:
        if e or i:
            expected[str(failure(e, i))] += 1
    assert data["errors"] == expected
    assert data["errors"]["ECONNRESET after connect"] == 2
    total = read_progress(counter.path.parent)
    assert (total.processes, total.attempts, total.failures) == (1, 13, 7)
