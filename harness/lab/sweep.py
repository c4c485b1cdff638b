"""``eph sweep``: one lab per point of a grid of settings, compared with the model.

    eph sweep scenarios/tw-reuse.toml \\
        --vary kernel.ip_local_port_range=40000-40099,40000-40999 --vary kernel.tcp_tw_reuse=0,1

Every point is validated before the first one runs. The sweep directory holds
each point's run directory, ``comparison.parquet`` / ``.csv`` (one row a point)
and ``comparison.png`` (measured against the model: sustained rate and time to
exhaustion).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from harness.errors import ScenarioError
from harness.lab.topology import run_lab
from harness.rundir import RunDir
from harness.scenario import Scenario, load_scenario
from harness.summary import Summary

__all__ = ["Vary", "check_points", "run_sweep", "sweep_points"]

logger = logging.getLogger(__name__)

PointSink = Callable[[int, int, str, Summary | None], None]


@dataclass(frozen=True)
class Vary:
    key: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Vary:
        key, sep, rest = text.partition("=")
        values = tuple(v.strip() for v in _split(rest) if v.strip())
        if not sep or not key.strip() or not values:
            raise ScenarioError(
                f"--vary {text!r} is not key.path=v1,v2,...",
                source="--vary",
                expected="e.g. kernel.tcp_tw_reuse=0,1",
            )
        return cls(key.strip(), values)


def _split(text: str) -> list[str]:
    """Split on commas outside brackets, so that [40000, 40099] stays one value."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def sweep_points(
    path: Path, varies: Sequence[Vary], overrides: Sequence[str] = ()
) -> list[tuple[str, Scenario]]:
    """Every point of the grid as (label, scenario), each loaded and checked: a bad
    value is an error naming its ``--vary`` before any lab starts."""
    keys = [v.key for v in varies]
    points: list[tuple[str, Scenario]] = []
    for combo in itertools.product(*(v.values for v in varies)):
        sets = [f"{k}={value}" for k, value in zip(keys, combo, strict=True)]
        points.append((" ".join(sets), load_scenario(path, overrides, varies=sets)))
    return points


def check_points(path: Path, varies: Sequence[Vary], overrides: Sequence[str] = ()) -> int:
    """How many points the grid has, once every one of them has loaded."""
    return len(sweep_points(path, varies, overrides))


def run_sweep(
    path: Path,
    varies: Sequence[Vary],
    *,
    overrides: Sequence[str] = (),
    out: Path | None = None,
    on_point: PointSink | None = None,
    report: bool = True,
) -> Path:
    """One lab per point of the grid, each in its own directory under the sweep's, and
    the comparison of every point with the model. ``report``: False leaves each point's
    report.html to ``eph report`` (the sweep's own comparison is always written)."""
    keys = [v.key for v in varies]
    points = sweep_points(path, varies, overrides)
    base = points[0][1].name if points else "sweep"
    sweep = (
        RunDir.create(Path("reports"), f"sweep-{base}")
        if out is None
        else RunDir.open(out, create=True)
    )
    rows = []
    for index, (label, scenario) in enumerate(points):
        if on_point is not None:
            on_point(index, len(points), label, None)
        name = re.sub(r"[^A-Za-z0-9.=_-]+", "_", label)[:80]
        result = run_lab(scenario, out=sweep.path / f"{index:02d}-{name}", report=report)
        rows.append(
            _row(index, label, dict(zip(keys, label.split(" "), strict=True)), result.summary)
        )
        if on_point is not None:
            on_point(index, len(points), label, result.summary)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, sweep.path / "comparison.parquet")
    pacsv.write_csv(table, sweep.path / "comparison.csv")
    _figure(rows).savefig(sweep.path / "comparison.png", dpi=100)
    return sweep.path


def _row(index: int, label: str, sets: dict[str, str], summary: Summary) -> dict[str, Any]:
    """One point of the comparison table: its settings, and measured against the model."""
    capacity = summary.capacity
    return {
        "point": index,
        "label": label,
        **{key: text.partition("=")[2] for key, text in sets.items()},
        "attempted": summary.connections.attempted,
        "succeeded": summary.connections.succeeded,
        "distinct_tuples": summary.tuples.distinct if summary.tuples is not None else None,
        "exhausted": summary.exhaustion.exhausted,
        "measured_rate_per_s": capacity.measured_rate_per_s,
        "measured_sustained_rate_per_s": capacity.measured_sustained_rate_per_s,
        "model_max_rate_per_s": capacity.model_max_rate_per_s,
        "measured_time_to_exhaustion_s": capacity.measured_time_to_exhaustion_s,
        "model_time_to_exhaustion_s": capacity.model_time_to_exhaustion_s,
        "model_ports": capacity.model_ports,
        "kernel_tw_recycled": (
            summary.time_wait.kernel_tw_recycled if summary.time_wait is not None else None
        ),
    }


# one panel each: measured column, model column, unit, title
_PANELS = (
    (
        "measured_sustained_rate_per_s",
        "model_max_rate_per_s",
        "connections/s",
        "Sustained rate once the range ran out: measured vs the model's ceiling",
    ),
    (
        "measured_time_to_exhaustion_s",
        "model_time_to_exhaustion_s",
        "seconds",
        "Time to exhaustion: measured vs model (at the offered rate)",
    ),
)


def _figure(rows: list[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 1)
    # values on the ticks, one axis per line; the keys once, under the axis
    parts = [[p.partition("=") for p in row["label"].split(" ")] for row in rows]
    labels = ["\n".join(value for _, _, value in point) for point in parts]
    keys = " / ".join(key.rsplit(".", 1)[-1] for key, _, _ in parts[0]) if parts else ""
    for ax, (measured, model, unit, title) in zip(axes, _PANELS, strict=True):
        _measured_against_model(ax, rows, measured, model)
        ax.set_xticks(list(range(len(rows))), labels, fontsize=8)
        ax.set_xlabel(keys)
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    axes[0].set_yscale("symlog", linthresh=1.0)
    return fig


def _measured_against_model(
    ax: Axes, rows: list[dict[str, Any]], measured: str, model: str, width: float = 0.38
) -> None:
    """A pair of bars per point: measured (left) and the model (right)."""
    for offset, column, name, color in (
        (-width / 2, measured, "measured", "tab:blue"),
        (width / 2, model, "model", "tab:orange"),
    ):
        ax.bar(
            [i + offset for i in range(len(rows))],
            [row[column] or 0 for row in rows],
            width,
            label=name,
            color=color,
        )
