"""A throwaway NAT lab for tests: client ns -> router ns (nftables SNAT) -> server ns.

The client is 10.77.0.2, the server 10.78.0.2; the router source-NATs TCP
leaving toward the server to ``NAT_ADDRESS`` and a port pool. Every namespace is
an ``ephtest-<pid>-<n>`` one, deleted on every exit path; every process started
here is killed on the way out, and every loop in the scripts is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from harness.kernel.netns import Namespace, run_checked

from .conftest import ROOT, require_tools

CLIENT = "10.77.0.2"
SERVER = "10.78.0.2"
NAT_ADDRESS = "198.51.100.1"
LIFETIME = 120  # seconds any helper process may live, whatever happens
STEP_TIMEOUT = 60  # seconds for one step (connecting, dumping)

# In the server namespace: accept every connection and hold it until the peer
# closes; prints the port it listens on.
LISTENER = r"""
import resource, selectors, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
deadline = time.monotonic() + float(sys.argv[1])
server = socket.create_server(("0.0.0.0", 0), backlog=4096)
print(server.getsockname()[1], flush=True)
sel = selectors.DefaultSelector()
sel.register(server, selectors.EVENT_READ)
while time.monotonic() < deadline:
    for key, _ in sel.select(timeout=0.5):
        if key.fileobj is server:
            conn, _ = server.accept()
            sel.register(conn, selectors.EVENT_READ)
        elif not key.fileobj.recv(4096):
            sel.unregister(key.fileobj)
            key.fileobj.close()
"""

# In the client namespace: open argv[3] connections at once (non-blocking),
# report how many were made within argv[4] s, hold them until a line on stdin,
# close them, wait for the line after.
HOLDER = r"""
import errno, json, resource, selectors, socket, sys, time
host, port, count, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (count + 100, count + 100))
sel = selectors.DefaultSelector()
pending = []
for _ in range(count):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((host, port))
    sel.register(s, selectors.EVENT_WRITE)
    pending.append(s)
done, deadline = [], time.monotonic() + wait
while len(done) < count and time.monotonic() < deadline:
    for key, _ in sel.select(timeout=0.1):
        sel.unregister(key.fileobj)
        if key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            done.append(key.fileobj)
        else:
            key.fileobj.close()
print(json.dumps({"connected": len(done)}), flush=True)
sys.stdin.readline()
for s in pending:
    s.close()
print("closed", flush=True)
sys.stdin.readline()
"""

# In the client namespace: argv[3] connections one after another, each closed by
# the client at once (its conntrack entry goes to TIME_WAIT).
CHURN = r"""
import socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
deadline, made = time.monotonic() + 60, 0
while made < count and time.monotonic() < deadline:
    with socket.create_connection((host, port), timeout=2):
        made += 1
print(made, flush=True)
"""


@dataclass
class NatLab:
    client: Namespace
    router: Namespace
    server: Namespace
    port: int  # the server's listening port

    def in_router(self, code: str, timeout: float = STEP_TIMEOUT) -> Any:
        """Run ``code`` (Python printing one JSON value) in the router; its value."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            self.router.command([sys.executable, "-c", code]),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=True,
        ).stdout
        return json.loads(out.splitlines()[-1])

    def churn(self, count: int) -> int:
        """``count`` connections opened and closed one after another; how many were made."""
        out = subprocess.run(
            self.client.command([sys.executable, "-c", CHURN, SERVER, str(self.port), str(count)]),
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT + 10,
            check=True,
        ).stdout
        return int(out)


def nat_lab_available() -> None:
    """The tools the lab is built with: missing, they fail the test under make test."""
    require_tools("nft", "ip", "conntrack")


@contextlib.contextmanager
def nat_lab(pool: str = "20000-20099") -> Iterator[NatLab]:
    """The three namespaces, their links and routes, SNAT to ``NAT_ADDRESS:pool``,
    and a listener in the server namespace."""
    nat_lab_available()
    with (
        Namespace("ephtest") as client,
        Namespace("ephtest") as router,
        Namespace("ephtest") as server,
    ):
        _link(client, "ct0", "10.77.0.2/24", router, "rc0", "10.77.0.1/24")
        _link(server, "st0", "10.78.0.2/24", router, "rs0", "10.78.0.1/24")
        run_checked(["ip", "-n", client.name, "route", "add", "default", "via", "10.77.0.1"])
        run_checked(
            ["ip", "-n", server.name, "route", "add", "198.51.100.0/24", "via", "10.78.0.1"]
        )
        router.set_sysctl("net.ipv4.ip_forward", 1)
        rules = (
            "table ip ephnat {\n chain post {\n"
            "  type nat hook postrouting priority srcnat;\n"
            f'  oifname "rs0" meta l4proto tcp snat to {NAT_ADDRESS}:{pool}\n }}\n}}\n'
        )
        subprocess.run(router.command(["nft", "-f", "-"]), input=rules, text=True, check=True)
        with _process(server.command([sys.executable, "-c", LISTENER, str(LIFETIME)])) as listener:
            assert listener.stdout is not None
            port = int(listener.stdout.readline())
            yield NatLab(client, router, server, port)


@contextlib.contextmanager
def hold(lab: NatLab, count: int, wait: float = 3.0) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """``count`` connections from the client held open: (how many connected, the holder).

    Write a line to the holder's stdin to close them (it answers "closed").
    """
    args = [sys.executable, "-c", HOLDER, SERVER, str(lab.port), str(count), str(wait)]
    with _process(lab.client.command(args), stdin=subprocess.PIPE) as holder:
        assert holder.stdout is not None
        yield json.loads(holder.stdout.readline())["connected"], holder


def close_held(holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "closed"


@contextlib.contextmanager
def _process(args: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True, **kwargs) as proc:
        try:
            yield proc
        finally:
            proc.kill()  # the with block then closes its pipes and waits


def _link(a: Namespace, a_dev: str, a_addr: str, b: Namespace, b_dev: str, b_addr: str) -> None:
    peer = ["peer", "name", b_dev, "netns", b.name]
    run_checked(["ip", "link", "add", a_dev, "netns", a.name, "type", "veth", *peer])
    for ns, dev, address in ((a, a_dev, a_addr), (b, b_dev, b_addr)):
        run_checked(["ip", "-n", ns.name, "addr", "add", address, "dev", dev])
        run_checked(["ip", "-n", ns.name, "link", "set", dev, "up"])
