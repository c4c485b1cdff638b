"""The target listener's HTTP/1.1 and TLS modes, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httptools
import pytest

from harness.endpoints import Endpoint
from harness.scenario import ListenerClose
from harness.target.listener import Listener, ListenerStats
from harness.target.tls import (
    ThrowawayCert,
    make_throwaway_certificate,
    server_context,
)

from . import test_listener
from .conftest import EPH, ROOT, own_loopback, tcp_states
from .test_listener import LOCAL

run_loop = test_listener.run_loop  # the same fixture: each test on uvloop and on asyncio

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
GET_CLOSE = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
READ_TIMEOUT = 2.0

Response = tuple[int, dict[bytes, bytes], bytes]  # status, headers (lower-case), body


class _Responses:
    """HTTP responses parsed as they arrive (httptools' response parser)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[Response] = []
        self._headers: dict[bytes, bytes] = {}
        self._body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self._headers, self._body))
        self._headers, self._body = {}, b""


_OPEN: list[_Client] = []  # closed by _serve even when a test fails midway


class _Client:
    """One connection to the listener; reads whole responses, and whether it ended."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.responses = _Responses()
        _OPEN.append(self)

    @classmethod
    async def connect(
        cls, port: int, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> _Client:
        hostname = "127.0.0.1" if tls is not None else None
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=hostname
        )
        return cls(reader, writer)

    async def ask(self, request: bytes, count: int = 1) -> list[Response]:
        """Send ``request`` (one or more requests), read ``count`` more responses."""
        self.writer.write(request)
        want = len(self.responses.done) + count
        while len(self.responses.done) < want:
            data = await asyncio.wait_for(self.reader.read(65536), READ_TIMEOUT)
            assert data, f"EOF after {len(self.responses.done)} of {want} responses"
            self.responses.parser.feed_data(data)
        return self.responses.done[want - count : want]

    async def more(self, wait: float = 0.3) -> bytes | None:
        """What comes next within ``wait`` seconds: None if nothing, b"" if the server
        ended the connection (EOF or RST)."""
        try:
            return await asyncio.wait_for(self.reader.read(65536), wait)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


async def _serve(listener: Listener, talk: Callable[[int], Any]) -> tuple[Any, ListenerStats, int]:
    """Start ``listener``, run ``talk(port)``, stop; what talk returned, the stats, port."""
    await listener.start()
    port = listener.bound[0].port
    try:
        result = await talk(port)
        await listener.drain(quiet=0.05)
    finally:
        while _OPEN:  # a server waits for its connections to close
            await _OPEN.pop().close()
        await asyncio.wait_for(listener.close(), READ_TIMEOUT)
    stats = listener.stats()
    assert stats.loop_errors == 0
    return result, stats, port


def test_get_gets_200_with_the_body(run_loop: Callable[..., Any]) -> None:
    async def talk(port: int) -> list[Response]:
        client = await _Client.connect(port)
        answers = await client.ask(GET)
        await client.close()
        return answers

    [(status, headers, body)], stats, _ = run_loop(
        _serve(Listener([LOCAL], http=True, response=b"hello"), talk)
    )
    assert (status, body) == (200, b"hello")
    assert headers[b"content-length"] == b"5"
    assert headers[b"content-type"] == b"text/plain"
    assert b"connection" not in headers
    assert stats.to_json()["requests"] == 1


def test_empty_response_answers_ok(run_loop: Callable[..., Any]) -> None:
    async def talk(port: int) -> list[Response]:
        client = await _Client.connect(port)
        answers = await client.ask(GET)
        await client.close()
        return answers

    [(status, headers, body)], _, _ = run_loop(_serve(Listener([LOCAL], http=True), talk))
    assert (status, body, headers[b"content-length"]) == (200, b"ok\n", b"3")


def test_keep_alive_answers_every_request_on_one_connection(
    run_loop: Callable[..., Any],
) -> None:
    async def talk(port: int) -> tuple[list[Response], bool]:
        client = await _Client.connect(port)
        answers = await client.ask(GET + GET, count=2)  # pipelined, in one segment
        answers += await client.ask(GET)  # then one more on the same connection
        still_open = await client.more() is None
        await client.close()
        return answers, still_open

    (answers, still_open), stats, _ = run_loop(_serve(Listener([LOCAL], http=True), talk))
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert still_open
    assert stats.total == 1
    assert sum(stats.requests.values()) == 3
    assert stats.to_json()["requests"] == 3


@pytest.mark.parametrize(
    "request_bytes",
    [GET_CLOSE, b"GET / HTTP/1.0\r\n\r\n"],
    ids=["connection-close", "http-1.0"],
)
def test_a_closing_request_makes_the_server_close_first(
    run_loop: Callable[..., Any], request_bytes: bytes
) -> None:
    async def talk(port: int) -> tuple[list[Response], bool]:
        client = await _Client.connect(port)
        answers = await client.ask(request_bytes)
        ended = await client.more(READ_TIMEOUT) == b""
        await client.close()
        return answers, ended

    ([(status, headers, _)], ended), _, port = run_loop(_serve(Listener([LOCAL], http=True), talk))
    assert status == 200 and headers[b"connection"] == b"close"
    assert ended
    # the server closed first: TIME_WAIT on its side
    assert tcp_states(port)["local"].get("TIME-WAIT", 0) >= 1


def test_http_1_0_keep_alive_is_confirmed(run_loop: Callable[..., Any]) -> None:
    async def talk(port: int) -> tuple[list[Response], bool]:
        client = await _Client.connect(port)
        answers = await client.ask(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 1)
        still_open = await client.more() is None
        await client.close()
        return answers, still_open

    ([(_, headers, _)], still_open), _, _ = run_loop(_serve(Listener([LOCAL], http=True), talk))
    assert headers[b"connection"].lower() == b"keep-alive" and still_open


def test_a_body_is_read_and_answered_once(run_loop: Callable[..., Any]) -> None:
    async def talk(port: int) -> tuple[list[Response], bool]:
        client = await _Client.connect(port)
        client.writer.write(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello")
        await asyncio.sleep(0.05)  # the body arrives in two segments
        answers = await client.ask(b" world")
        chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        answers += await client.ask(
            b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
        )
        quiet = await client.more() is None  # no third answer, and still open
        await client.close()
        return answers, quiet

    (answers, quiet), stats, _ = run_loop(_serve(Listener([LOCAL], http=True), talk))
    assert [status for status, _, _ in answers] == [200, 200]
    assert quiet
    assert sum(stats.requests.values()) == 2  # one answer each: the bodies were no requests


def test_head_gets_no_body(run_loop: Callable[..., Any]) -> None:
    async def talk(port: int) -> list[Response]:
        client = await _Client.connect(port)
        client.writer.write(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
        # a HEAD answer has no body though Content-Length says 3: read its bytes raw
        head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        answers = await client.ask(GET)  # the next answer starts right after the head
        await client.close()
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 3" in head
        return answers

    [(status, _, body)], _, _ = run_loop(_serve(Listener([LOCAL], http=True), talk))
    assert (status, body) == (200, b"ok\n")


def test_a_malformed_request_gets_400_and_a_close(run_loop: Callable[..., Any]) -> None:
    async def talk(port: int) -> tuple[list[Response], bool]:
        client = await _Client.connect(port)
        answers = await client.ask(b"NOT HTTP AT ALL\r\n\r\n")
        ended = await client.more(READ_TIMEOUT) == b""
        await client.close()
        return answers, ended

    ([(status, headers, _)], ended), stats, _ = run_loop(_serve(Listener([LOCAL], http=True), talk))
    assert status == 400 and headers[b"connection"] == b"close"
    assert ended
    assert sum(stats.requests.values()) == 0
    assert sum(stats.bad_requests.values()) == 1


def test_cli_counts_the_400s_it_answers_curl() -> None:
    """curl with a method httptools will not parse (a space in it): a 400 each, counted
    apart from the 200s in what ``eph listen`` says when it stops."""
    proc, port = _start_cli(["--http"])
    try:
        url = f"http://127.0.0.1:{port}/"
        statuses = [
            subprocess.run(
                ["/usr/bin/curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *method, url],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            for method in ([], ["-X", "BAD METHOD"], [], ["-X", "BAD METHOD"], ["-X", "WHAT IS"])
        ]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert statuses == ["200", "400", "200", "400", "400"]
    stopped = json.loads(out.strip().splitlines()[-1])
    assert (stopped["accepted"], stopped["requests"], stopped["bad_requests"]) == (5, 2, 3)


@pytest.mark.parametrize("close", [ListenerClose.FIRST, ListenerClose.RESET])
def test_close_policies_end_after_the_first_answer(
    run_loop: Callable[..., Any], close: ListenerClose
) -> None:
    own = Endpoint(own_loopback(), 0)  # its sockets counted apart from other tests'

    async def talk(port: int) -> tuple[bytes, bool]:
        client = await _Client.connect(port, host=own.host)
        client.writer.write(GET + GET)  # two asked, one answered
        try:
            data = await asyncio.wait_for(client.reader.read(65536), READ_TIMEOUT)
        except ConnectionResetError:
            data = b"<reset>"
        ended = await client.more(READ_TIMEOUT) == b""
        await client.close()
        return data, ended

    (data, ended), stats, port = run_loop(_serve(Listener([own], http=True, close=close), talk))
    assert ended
    assert sum(stats.requests.values()) == 1
    local = tcp_states(port, own.host)["local"].get("TIME-WAIT", 0)
    if close is ListenerClose.FIRST:
        assert data.count(b"HTTP/1.1 200") == 1 and b"Connection: close" in data
        assert local >= 1
    else:
        assert local == 0


# TLS


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayCert:
    return make_throwaway_certificate(tmp_path_factory.mktemp("tls"), ["127.0.0.1", "localhost"])


@pytest.mark.parametrize("http", [True, False], ids=["http", "tcp"])
def test_tls_client_with_the_ca_verifies_and_gets_the_answer(
    run_loop: Callable[..., Any], cert: ThrowawayCert, http: bool
) -> None:
    client_context = ssl.create_default_context(cafile=str(cert.ca_file))

    async def talk(port: int) -> bytes:
        client = await _Client.connect(port, tls=client_context)
        if http:
            [(status, _, body)] = await client.ask(GET_CLOSE)
            assert status == 200
        else:  # raw TCP: the response bytes, then the listener closes (first)
            body = await asyncio.wait_for(client.reader.read(100), READ_TIMEOUT)
        await client.close()
        return body

    tls = server_context(cert.cert_file, cert.key_file)
    close = ListenerClose.WAIT if http else ListenerClose.FIRST
    listener = Listener([LOCAL], http=http, tls=tls, close=close, response=b"secret\n")
    body, stats, _ = run_loop(_serve(listener, talk))
    assert body == b"secret\n"
    assert stats.total == 1


def test_tls_client_without_the_ca_fails_verification(
    run_loop: Callable[..., Any], cert: ThrowawayCert
) -> None:
    async def talk(port: int) -> None:
        with pytest.raises(ssl.SSLCertVerificationError):
            await _Client.connect(port, tls=ssl.create_default_context())

    tls = server_context(cert.cert_file, cert.key_file)
    _, stats, _ = run_loop(_serve(Listener([LOCAL], http=True, tls=tls), talk))
    assert stats.total == 1 and sum(stats.requests.values()) == 0


def _start_cli(args: list[str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [*EPH, "listen", "--endpoint", "127.0.0.1:0", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise AssertionError(f"eph listen failed: {proc.stderr.read() if proc.stderr else ''}")
    endpoint = json.loads(line)["endpoints"][0]
    return proc, int(endpoint.rsplit(":", 1)[1])


def test_cli_serves_http_over_tls_to_curl(cert: ThrowawayCert) -> None:
    tls = ["--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file)]
    proc, port = _start_cli(["--http", *tls])
    try:
        url = f"https://127.0.0.1:{port}/"
        curl = subprocess.run(
            ["/usr/bin/curl", "-sS", "--cacert", str(cert.ca_file), url, url],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert curl.returncode == 0, curl.stderr
        assert curl.stdout == "ok\n" * 2  # two requests, over one kept-alive connection
        refused = subprocess.run(
            ["/usr/bin/curl", "-sS", url], capture_output=True, timeout=30, check=False
        )
        assert refused.returncode == 60  # curl: the peer's certificate did not verify
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["event"] == "stopped"
    assert stopped["accepted"] == 2 and stopped["requests"] == 2


def test_cli_names_a_missing_certificate(tmp_path: Path, cert: ThrowawayCert) -> None:
    missing = tmp_path / "missing.pem"
    result = subprocess.run(
        [*EPH, "listen", "--http", "--tls-cert", str(missing), "--tls-key", str(cert.key_file)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert f"certificate file {missing} does not exist" in result.stderr
    half = subprocess.run(
        [*EPH, "listen", "--tls-cert", str(cert.cert_file)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert half.returncode == 2 and "--tls-key" in half.stderr
