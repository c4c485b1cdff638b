"""Servers eph did not write, for tests: nginx from Debian, run inside a namespace."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from harness.kernel.netns import Namespace

from .conftest import require

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {access};
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 100000;
    server {{
        listen {listen};
        {tls}
        location / {{ return 200 "ok\\n"; }}
        location = /unavailable {{ return 503 "down\\n"; }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    require(None if found else "missing: nginx")
    assert found is not None
    return found


@contextlib.contextmanager
def nginx(
    ns: Namespace,
    prefix: Path,
    listen: str,
    access_log: bool = False,
    tls: tuple[Path, Path] | None = None,
    extra: str = "",
) -> Iterator[Path]:
    """nginx serving ``200 ok`` (and ``503`` at ``/unavailable``) on ``listen`` inside
    ``ns``, over TLS with ``tls`` = (certificate, key) PEM files; yields its prefix."""
    prefix.mkdir(parents=True, exist_ok=True)
    access = f"{prefix}/access.log" if access_log else "off"
    conf = prefix / "nginx.conf"
    directives = ""
    if tls is not None:
        listen += " ssl"
        directives = f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]}; {extra}"
    conf.write_text(NGINX_CONF.format(prefix=prefix, listen=listen, access=access, tls=directives))
    proc = subprocess.Popen(
        ns.command([nginx_binary(), "-c", str(conf), "-p", str(prefix)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = listen.split()[0].rsplit(":", 1)[-1]
        deadline = time.monotonic() + 10
        while True:
            out = subprocess.run(
                ns.command(["ss", "-ltnH", f"sport = :{port}"]), capture_output=True, text=True
            ).stdout
            if out.strip():
                break
            assert proc.poll() is None, (prefix / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not start listening"
            time.sleep(0.05)
        yield prefix
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def certificate(directory: Path, *names: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``names`` (trustme): (ca, cert, key)."""
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert(*names)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.cert_pem.write_to_path(str(paths[0]))
    server.cert_chain_pems[0].write_to_path(str(paths[1]))
    server.private_key_pem.write_to_path(str(paths[2]))
    return paths


def access_count(prefix: Path) -> int:
    """Requests in an nginx access log (``nginx(..., access_log=True)``)."""
    path = prefix / "access.log"
    return len(path.read_text().splitlines()) if path.exists() else 0
