"""The target listener, in-process under uvloop and the default asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509

from harness.endpoints import Endpoint
from harness.errors import ListenerError, RunError
from harness.run.placement import _listen_command
from harness.scenario import ListenerClose, parse_scenario
from harness.target.listener import Listener
from harness.target.tls import listener_certificate, make_throwaway_certificate, server_context

from .conftest import own_loopback, tcp_states

LOCAL = Endpoint("127.0.0.1", 0)


@pytest.fixture(params=["uvloop", "asyncio"])
def run_loop(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine on the chosen loop; fail on any unhandled loop exception."""

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        errors: list[dict[str, Any]] = []

        async def guarded() -> Any:
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lambda _loop, context: errors.append(context))
            return await coro

        result = uvloop.run(guarded()) if request.param == "uvloop" else asyncio.run(guarded())
        assert not errors, errors
        return result

    return run


async def _churn(
    port: int, count: int, send: bytes = b"", read: bool = True, host: str = "127.0.0.1"
) -> list[bytes]:
    """Open ``count`` connections one after another; return what each received."""
    received = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(host, port)
        if send:
            writer.write(send)
        data = b""
        if read:  # until the listener closes (or resets)
            try:
                data = await asyncio.wait_for(reader.read(100), 2.0)
            except ConnectionResetError:
                data = b"<reset>"
        received.append(data)
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()
    return received


async def _serve_and_churn(
    listener: Listener, count: int, send: bytes = b"", read: bool = True
) -> tuple[int, list[bytes], int]:
    await listener.start()
    bound = listener.bound[0]
    port = bound.port
    received = await _churn(port, count, send, read, host=bound.host)
    await listener.drain(quiet=0.05)
    await listener.close()
    stats = listener.stats()
    assert stats.loop_errors == 0
    return stats.total, received, port


def test_counts_every_accept(run_loop: Callable[..., Any]) -> None:
    accepted, _, _ = run_loop(_serve_and_churn(Listener([LOCAL]), 50, read=False))
    assert accepted == 50


def test_serves_several_endpoints_and_ipv6(run_loop: Callable[..., Any]) -> None:
    async def scenario() -> dict[str, int]:
        listener = Listener([LOCAL, LOCAL, Endpoint("::1", 0)])
        await listener.start()
        try:
            bound = listener.bound
            # distinct endpoints; 127.0.0.1 and ::1 may well get the same port number
            assert len({(e.host, e.port) for e in bound}) == 3
            for endpoint, count in zip(bound, (3, 5, 7), strict=True):
                for _ in range(count):
                    _, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
                    writer.close()
            await listener.drain(quiet=0.05)
        finally:
            await listener.close()
        return listener.stats().accepted

    accepted = run_loop(scenario())
    assert sorted(accepted.values()) == [3, 5, 7]
    assert any(name.startswith("[::1]:") for name in accepted)


def test_response_bytes_then_close_first(run_loop: Callable[..., Any]) -> None:
    own = Endpoint(own_loopback(), 0)  # counted apart from other tests' sockets
    listener = Listener([own], close=ListenerClose.FIRST, response=b"hello")
    accepted, received, port = run_loop(_serve_and_churn(listener, 20))
    assert accepted == 20
    assert received == [b"hello"] * 20
    # the listener closed first: TIME_WAIT sits on its side, not the clients'
    states = tcp_states(port, own.host)
    assert states["local"].get("TIME-WAIT", 0) >= 20
    assert states["remote"].get("TIME-WAIT", 0) == 0


def test_read_request_answers_after_the_request(run_loop: Callable[..., Any]) -> None:
    listener = Listener([LOCAL], close=ListenerClose.FIRST, response=b"ok", read_request=True)
    _, received, _ = run_loop(_serve_and_churn(listener, 5, send=b"GET / HTTP/1.0\r\n\r\n"))
    assert received == [b"ok"] * 5


def test_reset_leaves_no_time_wait(run_loop: Callable[..., Any]) -> None:
    own = Endpoint(own_loopback(), 0)  # counted apart from other tests' sockets
    listener = Listener([own], close=ListenerClose.RESET)
    accepted, received, port = run_loop(_serve_and_churn(listener, 20))
    assert accepted == 20
    assert set(received) <= {b"<reset>", b""}
    states = tcp_states(port, own.host)
    assert states["local"].get("TIME-WAIT", 0) == 0
    assert states["remote"].get("TIME-WAIT", 0) == 0


def test_wait_policy_leaves_time_wait_on_the_client(run_loop: Callable[..., Any]) -> None:
    own = Endpoint(own_loopback(), 0)  # counted apart from other tests' sockets
    listener = Listener([own], close=ListenerClose.WAIT)
    _, _, port = run_loop(_serve_and_churn(listener, 20, read=False))
    states = tcp_states(port, own.host)
    assert states["remote"].get("TIME-WAIT", 0) >= 20
    assert states["local"].get("TIME-WAIT", 0) == 0


def test_port_in_use_is_a_clear_error(run_loop: Callable[..., Any]) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(ListenerError, match=f"127.0.0.1:{port}: address already in use"):
            run_loop(Listener([Endpoint("127.0.0.1", port)]).start())
    finally:
        holder.close()


def test_auto_must_be_resolved() -> None:
    with pytest.raises(ValueError, match="AUTO"):
        Listener([LOCAL], close=ListenerClose.AUTO)


def test_errno_constants_are_linux() -> None:
    # the records and the model speak Linux errnos; fail loudly elsewhere
    assert errno.EADDRNOTAVAIL == 99


def test_throwaway_certificate_files(tmp_path: Path) -> None:
    made = listener_certificate(tmp_path, [Endpoint("10.1.2.3", 443)], names=["staging.test"])
    assert made.cert_file.parent == tmp_path / "tls"
    assert (made.key_file.stat().st_mode & 0o777) == 0o600
    assert made.ca_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    server_context(made.cert_file, made.key_file)  # a pair that loads
    leaf = x509.load_pem_x509_certificate(made.cert_file.read_bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"staging.test", "localhost"}
    addresses = {str(a) for a in names.get_values_for_type(x509.IPAddress)}
    assert addresses == {"10.1.2.3", "127.0.0.1", "::1"}


def test_missing_or_wrong_certificate_files_are_clear_errors(tmp_path: Path) -> None:
    cert = make_throwaway_certificate(tmp_path / "cert", ["127.0.0.1"])
    missing = tmp_path / "nope.pem"
    with pytest.raises(ListenerError, match=f"certificate file {missing} does not exist"):
        server_context(missing, cert.key_file)
    with pytest.raises(ListenerError, match=f"private key file {missing} does not exist"):
        server_context(cert.cert_file, missing)
    with pytest.raises(ListenerError, match=f"private key file {cert.cert_file} holds no PEM"):
        server_context(cert.cert_file, cert.cert_file)
    with pytest.raises(ListenerError, match=f"certificate file {tmp_path} is a directory"):
        server_context(tmp_path, cert.key_file)
    other = make_throwaway_certificate(tmp_path / "other", ["127.0.0.1"])
    with pytest.raises(ListenerError, match="does not go with certificate file"):
        server_context(cert.cert_file, other.key_file)


SCENARIO = """\
name = "t"
duration = "1s"

[target]
endpoints = ["127.0.0.1:9000"]

[listener]

[load]
{load}
"""


def test_listen_command_serves_what_the_scenario_asks(tmp_path: Path) -> None:
    cert = make_throwaway_certificate(tmp_path, ["127.0.0.1"])
    plain = _listen_command(parse_scenario(SCENARIO.format(load="")))
    assert "--http" not in plain and "--tls-cert" not in plain
    http = parse_scenario(SCENARIO.format(load="tls = true\n[load.http]"))
    args = _listen_command(http, cert)
    assert "--http" in args and "--read-request" in args
    assert args[args.index("--tls-cert") + 1] == str(cert.cert_file)
    assert args[args.index("--tls-key") + 1] == str(cert.key_file)
    with pytest.raises(RunError, match="listener_certificate"):
        _listen_command(http)  # TLS asked, no certificate given
