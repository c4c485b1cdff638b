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

import pytest

from harness.kernel.netns import Namespace

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
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if found is None:
        if os.environ.get("EPH_REQUIRE_BROWSER") == "1":  # make test: system-deps installs it
            pytest.fail("nginx is missing: `make system-deps` installs it")
        pytest.skip("nginx is not installed (make system-deps)")
    return found


@contextlib.contextmanager
def nginx(ns: Namespace, prefix: Path, listen: str, access_log: bool = False) -> Iterator[Path]:
    """nginx serving ``200 ok`` on ``listen`` inside ``ns``; yields its prefix directory."""
    prefix.mkdir(parents=True, exist_ok=True)
    access = f"{prefix}/access.log" if access_log else "off"
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, listen=listen, access=access))
    proc = subprocess.Popen(
        ns.command([nginx_binary(), "-c", str(conf), "-p", str(prefix)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = listen.rsplit(":", 1)[-1]
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
