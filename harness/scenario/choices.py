"""The scenario's named choices: plain enums, no pydantic.

Apart from the model (``harness.scenario.definition``) so that a process that only
needs a choice (``eph listen --close``, the listener and collector children of every
run) does not build the model: that import is 0.14 s of CPU.
"""

from __future__ import annotations

import enum

__all__ = [
    "ClosePolicy",
    "Emulation",
    "Engine",
    "ListenerClose",
    "Protocol",
    "Reply",
    "Topology",
]


class ClosePolicy(enum.StrEnum):
    """Who ends a connection, and so where TIME_WAIT lands."""

    CLIENT = "client"  # the client sends FIN first: TIME_WAIT on the client
    SERVER = "server"  # the client waits for the server's FIN: TIME_WAIT on the server
    RESET = "reset"  # the client closes with SO_LINGER 0: an RST, no TIME_WAIT


class ListenerClose(enum.StrEnum):
    """What the listener does with an accepted connection."""

    AUTO = "auto"  # follow load.close: "first" for server, "wait" otherwise
    WAIT = "wait"  # wait for the client to close
    FIRST = "first"  # close first, right after accept (or after the request bytes)
    RESET = "reset"  # reset it (SO_LINGER 0)


class Engine(enum.StrEnum):
    LOCUST = "locust"  # gevent sockets inside Locust users
    UVLOOP = "uvloop"  # a uvloop child process per Locust process


class Protocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"  # connected UDP sockets: connect() allocates the port, close frees it


class Reply(enum.StrEnum):
    """What the client waits for after sending, before holding and closing."""

    NONE = "none"
    DATA = "data"  # the first bytes of a reply
    EOF = "eof"  # the server closing its side


class Topology(enum.StrEnum):
    SINGLE = "single"  # listener, load and collector in one namespace, over loopback
    PAIR = "pair"  # client and server namespaces joined by a veth pair
    NAT = "nat"  # client, router and server namespaces: the router SNATs to [lab.nat]


class Emulation(enum.StrEnum):
    """What puts ``delay``/``jitter``/``loss`` on the pair's link."""

    AUTO = "auto"  # netem when the kernel has it, else the relay
    NETEM = "netem"  # a veth pair with the netem qdisc on each end
    RELAY = "relay"  # a TUN device in each namespace and eph's userspace relay
