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


def test_a_masters_sum_counts_only_when_its_workers_write_elsewhere(tmp_path: Path) -> None:
    """Local ``--processes`` workers write their own progress beside their master's sum
    of them: counting both doubled the attempts (and a max_connections stop came at
    half). A distributed master's workers are on other hosts: its sum is all there is."""
    progress = tmp_path / "progress"
    progress.mkdir()

    def write(name: str, attempts: int) -> None:
        data = {"users": 5, "attempts": attempts, "failures": 1, "errors": {}, "started": 1.0}
        (progress / name).write_text(json.dumps(data))

    write("master.json", 30)
    assert read_progress(progress).attempts == 30
    write("101-0.json", 12)
    write("102-0.json", 18)
    total = read_progress(progress)
    assert (total.processes, total.attempts, total.failures) == (2, 30, 2)
