"""Column helpers the analyses share: rows selected in Arrow, dictionary codes, quantiles."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from harness.summary import Quantiles

__all__ = [
    "ALL_SCOPE",
    "codes",
    "equals",
    "quantiles",
    "scope_mask",
    "scope_prefix_mask",
    "time_bins",
]

ALL_SCOPE = "all"  # the collector's scope for the whole namespace's sockets and counters


def equals(table: pa.Table, column: str, value: str) -> np.ndarray:
    """Rows whose ``column`` equals ``value``, compared in Arrow (not per row in Python),
    as a numpy bool array; a null never matches."""
    if not table.num_rows:
        return np.zeros(0, dtype=bool)
    found = pc.fill_null(pc.equal(table.column(column), value), False)
    return np.asarray(found.to_numpy(zero_copy_only=False), dtype=bool)


def scope_mask(samples: pa.Table, scope: str = ALL_SCOPE) -> np.ndarray:
    """Sample rows of one collector scope (``all`` unless named)."""
    return equals(samples, "scope", scope)


def scope_prefix_mask(samples: pa.Table, prefix: str) -> np.ndarray:
    """Sample rows whose scope starts with ``prefix`` (``to `` or ``at ``)."""
    if not samples.num_rows:
        return np.zeros(0, dtype=bool)
    scope = samples.column("scope")
    if pa.types.is_dictionary(scope.type):
        scope = scope.cast(pa.string())
    found = pc.fill_null(pc.starts_with(scope, prefix), False)
    return np.asarray(found.to_numpy(zero_copy_only=False), dtype=bool)


def codes(table: pa.Table, name: str) -> np.ndarray:
    """A column's dictionary codes (or its values) as int64, for keys built in bulk."""
    column = table.column(name).combine_chunks()
    if pa.types.is_dictionary(column.type):
        return np.asarray(column.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)


def quantiles(values: np.ndarray) -> Quantiles | None:
    if not len(values):
        return None
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return Quantiles(
        p50=round(float(p50), 4),
        p90=round(float(p90), 4),
        p99=round(float(p99), 4),
        min=round(float(values.min()), 4),
    )


def time_bins(seconds: np.ndarray) -> tuple[np.ndarray, float]:
    """Whole bins only: a last, partial bin would read as a false drop in rate."""
    span = float(seconds.max()) if len(seconds) else 0.0
    width = 0.1 if span <= 10 else 1.0 if span <= 600 else 10.0
    count = max(1, int(span // width))
    return np.arange(count + 1) * width, width
