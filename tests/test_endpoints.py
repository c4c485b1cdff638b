import socket

import pytest

from harness.endpoints import Endpoint
from harness.errors import EndpointError


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:9000", "127.0.0.1", 9000),
        ("[::1]:9000", "::1", 9000),
        ("localhost:443", "localhost", 443),
        ("tcp://10.0.0.1:80", "10.0.0.1", 80),
        ("127.0.0.1:0", "127.0.0.1", 0),
    ],
)
def test_parse(text: str, host: str, port: int) -> None:
    endpoint = Endpoint.parse(text)
    assert (endpoint.host, endpoint.port) == (host, port)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("::1:9000", "IPv6 addresses need brackets"),
        ("127.0.0.1", "expected host:port"),
        ("127.0.0.1:http", "not a number"),
        ("127.0.0.1:70000", "outside 0..65535"),
        ("[::1]9000", r"expected \[IPv6\]:port"),
        ("[nothost]:1", "not an IPv6 address"),
    ],
)
def test_parse_errors_say_why(text: str, reason: str) -> None:
    with pytest.raises(EndpointError, match=reason):
        Endpoint.parse(text)


def test_port_zero_can_be_refused() -> None:
    with pytest.raises(EndpointError, match=r"outside 1\.\.65535"):
        Endpoint.parse("127.0.0.1:0", allow_port_zero=False)


def test_str_round_trips_ipv6() -> None:
    assert str(Endpoint.parse("[::1]:80")) == "[::1]:80"
    assert Endpoint.parse(str(Endpoint("::1", 80))) == Endpoint("::1", 80)


def test_resolve_gives_family() -> None:
    assert Endpoint.parse("[::1]:80").resolve().family == socket.AF_INET6
    resolved = Endpoint.parse("localhost:80").resolve()
    assert resolved.port == 80 and resolved.address in ("127.0.0.1", "::1")
