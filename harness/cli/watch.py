"""Verbs that look without load: listen (a target), collect, observe."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from harness.cli._base import (
    claim,
    cli,
    endpoint_value,
    force_option,
    in_run_option,
    keep_value,
    logger,
    positive_duration,
    report_observation,
)
from harness.endpoints import Endpoint
from harness.scenario import ListenerClose


@cli.command()
@click.option(
    "--endpoint",
    "endpoints",
    multiple=True,
    default=["127.0.0.1:9000"],
    show_default=True,
    metavar="HOST:PORT",
    callback=endpoint_value,
    help="Address to serve (repeatable); port 0 picks a free port.",
)
@click.option(
    "--close",
    type=click.Choice([c.value for c in ListenerClose if c is not ListenerClose.AUTO]),
    default="wait",
    show_default=True,
    help="wait: for the client to close; first: close right after accept (or the"
    " request); reset: RST (SO_LINGER 0).",
)
@click.option("--response", default="", help="Bytes to send to each connection.")
@click.option("--read-request", is_flag=True, help="Answer and close after the first bytes read.")
@click.option(
    "--keep-alive",
    is_flag=True,
    help="With --read-request and --close wait: answer every request read on a connection.",
)
@click.option("--backlog", default=4096, show_default=True, help="listen() backlog.")
@click.option("--udp", is_flag=True, help="Serve UDP instead: count and answer each datagram.")
@click.option(
    "--http",
    is_flag=True,
    help="Serve HTTP/1.1: a 200 with --response as its body (ok if empty) to every"
    " request; keep-alive as the client asks, under --close wait.",
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Serve over TLS with this certificate (chain, PEM); with --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="The private key (PEM, unencrypted) of --tls-cert.",
)
@click.option(
    "--loop",
    "loop_kind",
    type=click.Choice(["uvloop", "asyncio"]),
    default="uvloop",
    show_default=True,
)
def listen(
    endpoints: Sequence[str],
    close: str,
    response: str,
    read_request: bool,
    keep_alive: bool,
    backlog: int,
    loop_kind: str,
    udp: bool,
    http: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Serve the target endpoints until SIGINT/SIGTERM; print counts as JSON at exit.

    With --udp, UDP endpoints instead: each datagram is counted and answered with
    --response, or echoed. With --http, HTTP/1.1 (requests counted too); with
    --tls-cert and --tls-key, over TLS (raw TCP or HTTP alike).
    """
    from harness.target.listener import Listener, run_listener
    from harness.target.tls import server_context

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together: give both or neither")
    if udp and (http or tls_cert is not None):
        raise click.UsageError("--udp carries neither HTTP nor TLS")
    parsed = [Endpoint.parse(e) for e in endpoints]
    tls = server_context(tls_cert, tls_key) if tls_cert and tls_key else None
    listener = Listener(
        parsed,
        close=ListenerClose(close),
        response=response.encode(),
        read_request=read_request,
        keep_alive=keep_alive,
        backlog=backlog,
        udp=udp,
        http=http,
        tls=tls,
    )
    run_listener(listener, loop_kind=loop_kind)


@cli.command()
@click.option("--once", is_flag=True, help="Print one sample as JSON and exit.")
@click.option(
    "--out", type=click.Path(path_type=Path), help="Directory for samples.parquet (new or empty)."
)
@force_option
@in_run_option
@click.option(
    "--duration",
    default="10m",
    show_default=True,
    callback=positive_duration,
    help="Stop after this long.",
)
@click.option(
    "--interval",
    default="100ms",
    show_default=True,
    callback=positive_duration,
    help="Time between samples.",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="HOST:PORT",
    callback=endpoint_value,
    help="Count sockets to and at this endpoint too (repeatable).",
)
@click.option("--udp", is_flag=True, help="Count connected UDP sockets toward the targets.")
def collect(
    once: bool,
    out: Path | None,
    force: bool,
    in_run: bool,
    duration: float,
    interval: float,
    targets: Sequence[str],
    udp: bool,
) -> None:
    """Sample the kernel's TCP sockets and counters (any host, no load needed).

    On the staging server, `--target 0.0.0.0:443` is wrong: name the address the
    server accepts on, e.g. `--target 10.0.0.5:443`, to see its TIME_WAIT.
    """

    from harness.observe.collector import Collector, run_collector

    resolved = [Endpoint.parse(t, allow_port_zero=False).resolve() for t in targets]
    if once:
        click.echo(json.dumps(Collector(resolved, udp=udp).sample().to_json(), indent=2))
        return
    if out is None:
        raise click.UsageError("give --out DIR (or --once)")
    out = out if in_run else claim(out, force)
    assert out is not None
    count = run_collector(out, resolved, interval=interval, duration=duration, udp=udp)
    click.echo(f"{count} samples in {out / 'samples.parquet'}")


@cli.command()
@click.option(
    "--duration",
    callback=positive_duration,
    default=None,
    help="Stop after this long. Without it, run until SIGINT or SIGTERM (Ctrl-C,"
    " systemctl stop): what was seen is kept either way.",
)
@click.option(
    "--interval",
    callback=positive_duration,
    default="1s",
    show_default=True,
    help="One sample per.",
)
@click.option(
    "--top",
    type=click.IntRange(1, 1000),
    default=20,
    show_default=True,
    help="Paths kept a sample.",
)
@click.option(
    "--out", type=click.Path(path_type=Path), help="Write samples here (a new or empty directory)."
)
@force_option
@in_run_option
@click.option(
    "--prometheus",
    metavar="HOST:PORT",
    callback=endpoint_value,
    help="Serve Prometheus gauges here, e.g. 127.0.0.1:9465 (port 0: any free port).",
)
@click.option(
    "--keep",
    metavar="DURATION|SIZE",
    callback=keep_value,
    help="With --out: write parts (a new one every --rotate, and on SIGHUP) and keep only"
    " the newest this long or this big, e.g. 24h or 500MB; an agent restarted with the same"
    " --out goes on with what it kept. Without it, --out keeps all.",
)
@click.option(
    "--rotate",
    default="1h",
    show_default=True,
    callback=positive_duration,
    help="With --keep: how long each part covers.",
)
@click.option("--plain", is_flag=True, help="Plain lines even on a terminal.")
@click.option(
    "--no-owners",
    is_flag=True,
    help="Do not name the processes holding each path's ports (saves reading /proc's fds).",
)
@click.option("--no-report", is_flag=True, hidden=True, help="Samples only (eph lab --exec).")
@click.option(
    "--all-namespaces",
    is_flag=True,
    help="Every network namespace of the host, not only this one (each pod on a"
    " Kubernetes node), each path with its namespace and that namespace's range (root).",
)
@click.option(
    "--trace",
    is_flag=True,
    help="With --out: record every client connection from the kernel (eBPF, root) into"
    " connections.parquet.",
)
def observe(
    duration: float | None,
    interval: float,
    top: int,
    out: Path | None,
    force: bool,
    in_run: bool,
    prometheus: str | None,
    keep: tuple[float | None, int | None] | None,
    rotate: float,
    plain: bool,
    no_owners: bool,
    no_report: bool,
    all_namespaces: bool,
    trace: bool,
) -> None:
    """Watch every client path of this host: ports held per destination, and how long
    until they run out. Read-only; no load of its own.

    A path is local address -> remote address:port: the kernel hands each one the
    whole ephemeral range. On a terminal the view refreshes every second; otherwise
    a few plain lines every 5 s.
    """
    from harness.observe.session import Observation
    from harness.observe.store import Retention
    from harness.observe.views import PlainView, TerminalView

    if trace and out is None:
        raise click.UsageError("--trace writes connections.parquet: give --out DIR")
    if keep is not None and out is None:
        raise click.UsageError("--keep bounds what --out keeps: give --out DIR")
    if all_namespaces and os.geteuid() != 0:
        raise click.UsageError(
            "--all-namespaces enters each namespace (setns): it needs root (CAP_SYS_ADMIN)"
        )
    retention = None
    if keep is not None:
        retention = Retention(rotate_s=rotate, keep_s=keep[0], keep_bytes=keep[1])
    elif out is not None and duration is None:
        logger.warning(
            "--out without --duration or --keep keeps every sample for as long as eph runs:"
            " add --keep 24h (or a size) to bound the disk"
        )
    views: list[Any] = []
    if prometheus is not None:
        from harness.observe.prometheus import PrometheusView

        endpoint = Endpoint.parse(prometheus, allow_port_zero=True)
        try:
            server = PrometheusView(endpoint.host, endpoint.port, netns=all_namespaces)
        except OSError as exc:
            raise click.UsageError(f"--prometheus {prometheus}: {exc.strerror or exc}") from None
        host, port = server.address
        click.echo(f"Prometheus metrics at http://{host}:{port}/metrics", err=True)
        views.append(server)
    terminal = sys.stdout.isatty() and not plain
    views.append(TerminalView(rows=top) if terminal else PlainView())
    # a restarted agent (--keep) goes on in its own directory; anything else claims --out
    resume = (
        retention is not None and out is not None and not force and (out / "observe.json").exists()
    )
    out = out if in_run or resume else claim(out, force)
    if trace and out is not None:
        from harness.observe.trace import TALLY_FILE

        for view in views:
            if hasattr(view, "watch_trace"):
                view.watch_trace(out / TALLY_FILE)
    observation = Observation(
        duration_s=duration,
        interval_s=interval,
        top=top,
        out=out,
        views=views,
        trace=trace,
        owners=not no_owners,
        retention=retention,
        resume=resume,
        all_namespaces=all_namespaces,
    )
    observation.run()
    click.echo(
        f"observed {observation.samples} samples, stopped by {observation.stop_reason}", err=True
    )
    if out is not None and not no_report:
        report_observation(out)
