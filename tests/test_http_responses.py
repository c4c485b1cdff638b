"""Reading responses off the wire, bytes in: whole responses counted, statuses judged."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.errors import HTTP_MALFORMED, HTTP_STATUS
from harness.load.http_client import HeadResponses, Response

ACCEPTED = tuple(200 <= code < 400 for code in range(1000))
HEAD_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 612\r\nContent-Type: text/html\r\n\r\n"
HEAD_503 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 19\r\n\r\n"


@given(st.lists(st.integers(1, 40), max_size=8))
def test_head_responses_end_at_their_blank_line_however_the_bytes_arrive(cuts: list[int]) -> None:
    """Three answers to HEAD (a 100 first) with a Content-Length and no body, cut into
    reads anywhere: three responses, the last status kept, nothing waited for."""
    wire = b"HTTP/1.1 100 Continue\r\n\r\n" + HEAD_200 * 2 + HEAD_503
    reader, at = HeadResponses(ACCEPTED), 0
    for size in cuts:
        reader.feed(wire[at : at + size])
        at += size
    reader.feed(wire[at:])
    assert (reader.done, reader.status, reader.rx) == (3, 503, len(wire))
    assert reader.failed == HTTP_STATUS + 503


def test_a_get_reader_waits_for_the_body_that_head_never_gets() -> None:
    """Why HEAD has its own reader: httptools waits for Content-Length's bytes."""
    get = Response(ACCEPTED)
    get.feed(HEAD_200)
    assert get.done == 0
    head = HeadResponses(ACCEPTED)
    head.feed(HEAD_200)
    assert (head.done, head.status, head.failed) == (1, 200, 0)


@pytest.mark.parametrize("wire", [b"SSH-2.0-OpenSSH_9.2\r\n\r\n", b"X" * 70_000])
def test_what_is_not_an_http_response_is_malformed(wire: bytes) -> None:
    reader = HeadResponses(ACCEPTED)
    reader.feed(wire)
    assert (reader.done, reader.failed) == (0, HTTP_MALFORMED)
