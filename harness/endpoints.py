"""Endpoints: ``host:port`` strings, parsed strictly and resolved once.

IPv6 literals need brackets (``[::1]:9000``): without them the last colon is
ambiguous, and guessing would send load to the wrong place.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from harness.errors import EndpointError

__all__ = ["Endpoint", "ResolvedEndpoint"]


@dataclass(frozen=True, slots=True)
class ResolvedEndpoint:
    """An endpoint with its address looked up: what ``connect()`` takes."""

    family: socket.AddressFamily
    address: str
    port: int
    host: str = ""  # the name as written (TLS's SNI, HTTP's Host); the address if none

    @property
    def sockaddr(self) -> tuple[Any, ...]:
        return (self.address, self.port)

    def __str__(self) -> str:
        return _format(self.address, self.port)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A destination or listening address, as the user wrote it."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, allow_port_zero: bool = True) -> Endpoint:
        text = text.strip()
        if text.startswith("tcp://"):
            text = text[len("tcp://") :]
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise EndpointError(text, "expected [IPv6]:port, e.g. [::1]:9000")
            port_text = rest[1:]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise EndpointError(text, f"{host!r} is not an IPv6 address") from None
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise EndpointError(text, "expected host:port, e.g. 127.0.0.1:9000")
            if ":" in host:
                raise EndpointError(text, f"IPv6 addresses need brackets: [{host}]:{port_text}")
        if not port_text.isdigit():
            raise EndpointError(text, f"port {port_text!r} is not a number")
        port = int(port_text)
        low = 0 if allow_port_zero else 1
        if not low <= port <= 65535:
            raise EndpointError(text, f"port {port} is outside {low}..65535")
        return cls(host, port)

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def resolve(self) -> ResolvedEndpoint:
        """Look the host up once, so that no DNS happens on the hot path."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise EndpointError(str(self), f"cannot resolve {self.host!r}: {exc}") from None
        family, _, _, _, sockaddr = infos[0]
        return ResolvedEndpoint(
            socket.AddressFamily(family), str(sockaddr[0]), self.port, self.host
        )

    def with_port(self, port: int) -> Endpoint:
        return Endpoint(self.host, port)

    def __str__(self) -> str:
        return _format(self.host, self.port)


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
