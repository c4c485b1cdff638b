"""Rows selected in Arrow: one helper for every scope and host comparison."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from harness.report.columns import equals, quantiles, scope_mask, scope_prefix_mask
from harness.report.hosts import host_mask

from .tables import connections_table

SCOPES = ["all", "to 127.0.0.1:9000", None, "at 127.0.0.1:9000", "all", "to [::1]:9000"]


@pytest.mark.parametrize("encode", [False, True])
def test_scope_selection_matches_python_and_skips_nulls(encode: bool) -> None:
    column = pa.array(SCOPES, pa.string())
    samples = pa.table({"scope": column.dictionary_encode() if encode else column})
    expected_all = np.array([s == "all" for s in SCOPES])
    assert scope_mask(samples).tolist() == expected_all.tolist()
    assert scope_mask(samples, "to 127.0.0.1:9000").tolist() == [
        False,
        True,
        False,
        False,
        False,
        False,
    ]
    to = scope_prefix_mask(samples, "to ")
    assert to.dtype == np.bool_
    assert to.tolist() == [s is not None and s.startswith("to ") for s in SCOPES]


def test_an_empty_table_selects_nothing() -> None:
    empty = pa.table({"scope": pa.array([], pa.string())})
    assert scope_mask(empty).shape == (0,) and scope_mask(empty).dtype == np.bool_
    assert scope_prefix_mask(empty, "to ").shape == (0,)


def test_hosts_are_selected_by_the_same_helper() -> None:
    a = connections_table([(0, 10, 40000, 0), (1, 10, 40001, 0)], host="w1")
    b = connections_table([(2, 10, 40002, 0)], host="w2")
    table = pa.concat_tables([a, b], promote_options="permissive").unify_dictionaries()
    assert host_mask(table, "w2").tolist() == [False, False, True]
    assert equals(table, "host", "nobody").tolist() == [False, False, False]


def test_quantiles() -> None:
    found = quantiles(np.arange(101, dtype=float))
    assert found is not None
    assert (found.p50, found.p90, found.p99, found.min) == (50.0, 90.0, 99.0, 0.0)
    assert quantiles(np.zeros(0)) is None
