"""HTTP/1.1 and TLS for the churn engines: requests built once, responses parsed in C.

An HTTP connection sends ``load.requests_per_connection`` requests one after the
other, reading each response whole (Content-Length, chunked, or to EOF) before
the next. The last request says ``Connection: close`` only when the server is to
close first (``load.close = "server"``); otherwise the client closes, and its
TIME_WAIT is what the run measures.

Responses are parsed by ``httptools`` (llhttp, in C), one parser per connection
and two callbacks per response. A failed connection keeps its kind in the
record's ``io_errno``: ``TLS_ERROR``, ``TLS_VERIFY``, ``HTTP_MALFORMED``, or
``HTTP_STATUS + status`` for a status not expected (``harness.errors``).

Never imports locust.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import httptools

from harness.endpoints import ResolvedEndpoint
from harness.errors import HTTP_MALFORMED, HTTP_STATUS, TLS_ERROR, TLS_VERIFY, ScenarioError
from harness.scenario import ClosePolicy, HttpConfig, Scenario, TlsConfig

__all__ = [
    "HeadResponses",
    "HttpPlan",
    "Response",
    "TlsPlan",
    "client_context",
    "request_bytes",
    "response_reader",
    "tls_errno",
]

logger = logging.getLogger(__name__)


def request_bytes(http: HttpConfig, endpoint: ResolvedEndpoint, *, close: bool) -> bytes:
    """One request as it goes on the wire; ``Host`` is the endpoint as written unless the
    scenario's headers name one."""
    host = endpoint.host or endpoint.address
    if ":" in host:
        host = f"[{host}]"
    headers = {"Host": f"{host}:{endpoint.port}", "User-Agent": "eph", "Accept": "*/*"}
    named = {name.lower() for name in http.headers}
    headers = {k: v for k, v in headers.items() if k.lower() not in named}
    headers.update(http.headers)
    body = http.body.encode()
    if body or http.method in ("POST", "PUT", "PATCH"):
        headers["Content-Length"] = str(len(body))
    if close:
        headers["Connection"] = "close"
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"{http.method} {http.path} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body


@dataclass(frozen=True, slots=True)
class HttpPlan:
    """What every HTTP connection does, settled once per process."""

    method: str
    path: str
    per_connection: int  # requests over one connection
    # per endpoint: (a request that keeps the connection, the connection's last one)
    requests: tuple[tuple[bytes, bytes], ...]
    accepted: tuple[bool, ...]  # by status code, 0..999: whether it counts as success

    @classmethod
    def from_scenario(
        cls, scenario: Scenario, endpoints: tuple[ResolvedEndpoint, ...]
    ) -> HttpPlan | None:
        http = scenario.load.http
        if http is None:
            return None
        server_closes = scenario.load.close is ClosePolicy.SERVER
        requests = tuple(
            (
                request_bytes(http, endpoint, close=False),
                request_bytes(http, endpoint, close=server_closes),
            )
            for endpoint in endpoints
        )
        return cls(
            method=http.method,
            path=http.path,
            per_connection=scenario.load.requests_per_connection,
            requests=requests,
            accepted=tuple(100 <= code < 600 and http.accepts(code) for code in range(1000)),
        )

    def request(self, endpoint: int, number: int) -> bytes:
        """The ``number``-th request (from 1) of a connection to ``endpoint``."""
        keep, last = self.requests[endpoint]
        return last if number >= self.per_connection else keep


class Response:
    """The responses read over one connection, parsed as the bytes arrive.

    ``done`` counts whole responses; ``status`` is the last one's, or the first
    that was not expected (then ``failed`` is its ``io_errno``).
    """

    __slots__ = ("_accepted", "_headers", "_parser", "done", "failed", "rx", "status")

    def __init__(self, accepted: tuple[bool, ...]) -> None:
        self._accepted = accepted
        self._parser = httptools.HttpResponseParser(self)
        self._headers = False  # the current response's headers are in
        self.done = 0
        self.status = 0
        self.failed = 0
        self.rx = 0

    def on_headers_complete(self) -> None:
        self._headers = True

    def on_message_complete(self) -> None:
        self._end()

    def _end(self) -> None:
        self._headers = False
        self.done += 1
        if not self.failed:
            status = self._parser.get_status_code()
            self.status = status
            if not self._accepted[status if 0 <= status < 1000 else 0]:
                self.failed = HTTP_STATUS + status

    def feed(self, data: bytes) -> None:
        """Bytes read from the connection; a reply that is not HTTP sets ``failed``."""
        self.rx += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.failed = self.failed or HTTP_MALFORMED

    def eof(self) -> None:
        """The server closed: a response without a length ends here."""
        if self._headers:
            self._end()


class HeadResponses:
    """The responses to HEAD requests read over one connection: a status line and
    headers each, never a body, whatever their Content-Length says (RFC 9110, 9.3.2).

    httptools' parser cannot be told from Python that a response has no body (llhttp's
    skip-body return of on_headers_complete is not passed through), so it would wait
    for Content-Length bytes that never come. A header block ends at its blank line;
    splitting there is all HEAD needs. Same fields and methods as :class:`Response`.
    """

    __slots__ = ("_accepted", "_buffer", "done", "failed", "rx", "status")

    MAX_HEADER = 65_536  # a header block longer than this is not an HTTP response

    def __init__(self, accepted: tuple[bool, ...]) -> None:
        self._accepted = accepted
        self._buffer = b""
        self.done = self.status = self.failed = self.rx = 0

    def feed(self, data: bytes) -> None:
        self.rx += len(data)
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            block, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            version, _, rest = block.partition(b" ")
            code = rest[:3]
            if not (version.startswith(b"HTTP/1.") and code.isdigit()):
                self.failed = self.failed or HTTP_MALFORMED
                self._buffer = b""
                return
            status = int(code)
            if status < 200:
                continue  # informational: the final response follows
            self.done += 1
            if not self.failed:
                self.status = status
                if not self._accepted[status]:
                    self.failed = HTTP_STATUS + status
        if len(self._buffer) > self.MAX_HEADER:
            self.failed = self.failed or HTTP_MALFORMED
            self._buffer = b""

    def eof(self) -> None:
        """The server closed: what is left is a cut header block, no response."""


def response_reader(plan: HttpPlan) -> Response | HeadResponses:
    """The reader of one connection's responses: HEAD's have no body."""
    return HeadResponses(plan.accepted) if plan.method == "HEAD" else Response(plan.accepted)


@dataclass(frozen=True, slots=True)
class TlsPlan:
    """The client's TLS context and the name each endpoint is verified as."""

    context: ssl.SSLContext
    server_names: tuple[str | None, ...]  # per endpoint; None sends no SNI (an address)

    @classmethod
    def from_scenario(
        cls,
        scenario: Scenario,
        endpoints: tuple[ResolvedEndpoint, ...],
    ) -> TlsPlan | None:
        tls = scenario.load.tls
        if tls is None:
            return None
        context = client_context(tls)
        names = tuple(tls.server_name or e.host or e.address for e in endpoints)
        return cls(context, names)


def client_context(tls: TlsConfig) -> ssl.SSLContext:
    """An ``SSLContext`` for the scenario's ``[load.tls]``; a file that is missing or not
    PEM is a :class:`ScenarioError` naming the key and the file.

    The class is looked up here, not bound at import: in a Locust process it is gevent's
    (its own ``super()`` calls need that), elsewhere the standard one.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif tls.ca_file is not None:
        _load(context.load_verify_locations, "ca_file", tls.ca_file)
    else:
        context.load_default_certs()
    if tls.cert_file is not None and tls.key_file is not None:
        _check_file("key_file", tls.key_file)
        _load(lambda path: context.load_cert_chain(path, tls.key_file), "cert_file", tls.cert_file)
    return context


def _check_file(key: str, path: str) -> None:
    if not Path(path).is_file():
        raise ScenarioError(
            f"no such file: {path}", key=f"load.tls.{key}", value=path, expected="a PEM file"
        )


def _load(call: object, key: str, path: str) -> None:
    _check_file(key, path)
    try:
        call(path)  # type: ignore[operator]
    except (ssl.SSLError, OSError) as exc:
        raise ScenarioError(
            f"cannot load {path}: {exc}",
            key=f"load.tls.{key}",
            value=path,
            expected="a PEM file",
        ) from None


_warned: set[tuple[int, str]] = set()


def tls_errno(exc: BaseException, server_name: str | None = None) -> int | None:
    """The ``io_errno`` of a failed handshake (``None``: not TLS's, e.g. a reset). The
    first failure of each kind toward each name is logged, with the reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = TLS_VERIFY
        reason = exc.verify_message or str(exc)
    elif isinstance(exc, ssl.SSLError):
        code, reason = TLS_ERROR, exc.reason or str(exc)
    else:
        return None
    key = (code, server_name or "")
    if key not in _warned:
        _warned.add(key)
        what = "certificate verification" if code == TLS_VERIFY else "handshake"
        hint = " (set load.tls.ca_file, or insecure = true)" if code == TLS_VERIFY else ""
        logger.error("TLS %s failed for %s: %s%s", what, server_name, reason, hint)
    return code
