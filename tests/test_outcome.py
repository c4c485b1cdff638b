"""The one outcome classifier every engine records through."""

from __future__ import annotations

import asyncio
import errno
import itertools
import socket

import numpy as np
import pytest

from harness.load.outcome import (
    INTERRUPTED,
    NO_REPLY,
    TIMED_OUT,
    UNKNOWN,
    ConnectionFailed,
    Outcome,
    classify,
    classify_rows,
    columns,
    errno_of,
    failure,
    failure_counts,
    label,
)
from harness.records import ROW_DTYPE


class _GeventLikeTimeout(TimeoutError):
    """What the gevent engine raises from its waits: a TimeoutError without errno."""


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        # what the kernel raises carries its errno
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), errno.ECONNREFUSED),
        (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), errno.EADDRNOTAVAIL),
        (OSError(errno.EMFILE, "Too many open files"), errno.EMFILE),
        (OSError(errno.ETIMEDOUT, "Connection timed out"), errno.ETIMEDOUT),
        # OSError(ETIMEDOUT, ...) is built as a TimeoutError; the errno still wins
        (TimeoutError(errno.EHOSTUNREACH, "odd, but its own errno"), errno.EHOSTUNREACH),
        # no errno: the class says which
        (TimeoutError(), TIMED_OUT),
        (_GeventLikeTimeout(), TIMED_OUT),
        (ConnectionRefusedError(), errno.ECONNREFUSED),
        (ConnectionResetError("Connection lost"), errno.ECONNRESET),
        (ConnectionAbortedError(), errno.ECONNABORTED),
        (BrokenPipeError(), errno.EPIPE),
        # a plain OSError without errno, or with a resolver's negative code
        (OSError("no errno at all"), UNKNOWN),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), UNKNOWN),
        (OSError(70_000, "does not fit the uint16 column"), UNKNOWN),
        # stopped from outside
        (asyncio.CancelledError(), INTERRUPTED),
        (KeyboardInterrupt(), INTERRUPTED),
    ],
    ids=repr,
)
def test_errno_of(exc: BaseException, expected: int) -> None:
    assert errno_of(exc) == expected


def test_eph_s_own_causes_are_distinct_errnos_a_report_can_name() -> None:
    """A record keeps a cause eph found (a timeout, a stop, no reply, something else)
    as an errno: each must be a failure (not 0), unlike the others, and one the
    kernel names, so that the report, Locust and DuckDB all print a word for it."""
    causes = (TIMED_OUT, INTERRUPTED, NO_REPLY, UNKNOWN)
    assert 0 not in causes and len(set(causes)) == len(causes)
    assert all(errno.errorcode.get(cause) for cause in causes), causes
    assert TIMED_OUT == errno.ETIMEDOUT  # what the kernel itself reports for a connect timeout


def test_columns_put_the_cause_in_its_phase() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    assert columns(refused, connected=False) == (errno.ECONNREFUSED, 0)
    assert columns(ConnectionResetError(), connected=True) == (0, errno.ECONNRESET)
    assert columns(TimeoutError(), connected=False) == (errno.ETIMEDOUT, 0)
    assert columns(TimeoutError(), connected=True) == (0, errno.ETIMEDOUT)


@pytest.mark.parametrize(
    ("err", "io_err", "outcome", "text"),
    [
        (0, 0, Outcome.CONNECTED, ""),
        (errno.EADDRNOTAVAIL, 0, Outcome.CONNECT_FAILED, "EADDRNOTAVAIL"),
        (errno.ETIMEDOUT, 0, Outcome.CONNECT_FAILED, "ETIMEDOUT"),
        (0, errno.ECONNRESET, Outcome.IO_FAILED, "ECONNRESET after connect"),
        (0, errno.ETIMEDOUT, Outcome.IO_FAILED, "ETIMEDOUT after connect"),
        # both set (no engine records that): connect's cause wins
        (errno.ECONNREFUSED, errno.EPIPE, Outcome.CONNECT_FAILED, "ECONNREFUSED"),
        (4000, 0, Outcome.CONNECT_FAILED, "ERRNO4000"),
    ],
)
def test_classify_and_label(err: int, io_err: int, outcome: Outcome, text: str) -> None:
    assert classify(err, io_err) is outcome
    assert label(err, io_err) == text


def _rows(pairs: list[tuple[int, int]]) -> np.ndarray:
    rows = np.zeros(len(pairs), dtype=ROW_DTYPE)
    rows["errno"] = [p[0] for p in pairs]
    rows["io_errno"] = [p[1] for p in pairs]
    return rows


def test_rows_classify_as_each_row_does() -> None:
    values = (0, errno.ECONNREFUSED, errno.ETIMEDOUT)
    pairs = list(itertools.product(values, values))
    assert classify_rows(_rows(pairs)).tolist() == [classify(e, i) for e, i in pairs]
    assert classify_rows(_rows([])).tolist() == []


def test_failure_counts_group_each_kind() -> None:
    pairs = [(0, 0)] * 5 + [(99, 0)] * 3 + [(0, 104)] * 2 + [(110, 0)]
    assert sorted(failure_counts(_rows(pairs))) == [(0, 104, 2), (99, 0, 3), (110, 0, 1)]
    assert failure_counts(_rows([(0, 0)] * 4)) == []
    assert failure_counts(_rows([])) == []


def test_locust_failure_names_the_errno_and_phase() -> None:
    connect = failure(errno.EADDRNOTAVAIL, 0)
    io = failure(0, errno.ECONNRESET)
    assert str(connect) == "EADDRNOTAVAIL" and connect.outcome is Outcome.CONNECT_FAILED
    assert str(io) == "ECONNRESET after connect" and io.outcome is Outcome.IO_FAILED
    assert repr(io) == "ConnectionFailed('ECONNRESET after connect')"
    assert failure(errno.EADDRNOTAVAIL, 0) is connect  # shared: a failure allocates nothing
    with pytest.raises(ValueError, match="did not fail"):
        ConnectionFailed(0, 0)
