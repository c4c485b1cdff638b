"""The target listener's HTTP/1.1 mode: each connection's bytes parsed in C by
httptools (one parser per connection, request bodies, chunked or not, handled by it),
each complete request answered with a 200 built once per listener.

Also the RST close (SO_LINGER 0) that both of the listener's TCP protocols use.
Never imports locust.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import typing
from dataclasses import dataclass

import httptools

from harness.scenario import ListenerClose

__all__ = ["EndpointCounter", "HttpConnection", "Replies", "close_with_reset", "http_replies"]

_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass
class EndpointCounter:
    """What one served endpoint has seen: connections accepted, requests answered."""

    accepted: int = 0
    requests: int = 0  # HTTP requests answered with a 200
    bad_requests: int = 0  # requests that did not parse, answered with a 400


def close_with_reset(transport: asyncio.Transport) -> None:
    """Close with a RST (SO_LINGER 0): no TIME_WAIT on either side."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


@dataclass(frozen=True, slots=True)
class Replies:
    """Every answer of the HTTP mode, built once per listener."""

    keep: bytes  # 200; the connection stays open
    keep_10: bytes  # 200 to an HTTP/1.0 client that asked for keep-alive
    last: bytes  # 200 with Connection: close; then the server closes
    bad: bytes  # 400 with Connection: close; then the server closes
    body_size: int  # cut from a 200 answering HEAD


def http_replies(body: bytes) -> Replies:
    body = body or b"ok\n"
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nContent-Type: text/plain\r\n"
    bad = b"bad request\n"
    return Replies(
        keep=f"{head}\r\n".encode() + body,
        keep_10=f"{head}Connection: keep-alive\r\n\r\n".encode() + body,
        last=f"{head}Connection: close\r\n\r\n".encode() + body,
        bad=b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\nContent-Type: text/plain"
        b"\r\nConnection: close\r\n\r\n%s" % (len(bad), bad),
        body_size=len(body),
    )


class HttpConnection(asyncio.Protocol):
    """HTTP/1.1: each complete request gets the prebuilt 200; one that does not parse,
    a 400 and a close. Keep-alive as the request asks (``should_keep_alive``) under
    ``close = wait``; ``first`` and ``reset`` end the connection after one answer.
    The server closes first when it ends one (TIME_WAIT on the server)."""

    __slots__ = ("_close", "_counter", "_ended", "_parser", "_replies", "_transport")

    def __init__(self, counter: EndpointCounter, close: ListenerClose, replies: Replies) -> None:
        counter.accepted += 1
        self._counter = counter
        self._close = close
        self._replies = replies
        # one parser per connection; it calls on_message_complete (the only callback)
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._ended = False  # answered for the last time: what else arrives is dropped

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._parser = None  # it holds our bound method: break the cycle, free at once

    def eof_received(self) -> bool:
        return False  # the client closed: close our side too

    def data_received(self, data: bytes) -> None:
        if self._ended or self._parser is None:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            raise  # our own bug: the loop's handler counts it
        except httptools.HttpParserUpgrade:
            self._end(b"")  # nothing but HTTP/1.1 is spoken here
        except httptools.HttpParserError:
            self._counter.bad_requests += 1
            self._end(self._replies.bad)

    def on_message_complete(self) -> None:
        parser, transport, replies = self._parser, self._transport, self._replies
        if self._ended or parser is None or transport is None:
            return  # pipelined past the last answer
        self._counter.requests += 1
        head_only = parser.get_method() == b"HEAD"
        if self._close is ListenerClose.WAIT and parser.should_keep_alive():
            reply = replies.keep if parser.get_http_version() == "1.1" else replies.keep_10
            transport.write(reply[: -replies.body_size] if head_only else reply)
        else:
            self._end(replies.last[: -replies.body_size] if head_only else replies.last)

    def _end(self, reply: bytes) -> None:
        self._ended = True
        transport = self._transport
        if transport is None:
            return
        if reply:
            transport.write(reply)
        if self._close is ListenerClose.RESET:
            close_with_reset(transport)
        else:
            transport.close()
