"""The ``eph`` command line (also ``python -m harness``)."""

from __future__ import annotations

import functools
import json
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.text import Text

from harness.endpoints import Endpoint
from harness.errors import EphError
from harness.load.progress import Progress
from harness.scenario import ClosePolicy, ListenerClose, Scenario, load_scenario

if TYPE_CHECKING:
    from harness.report.model import Summary
    from harness.run import RunResult

__all__ = ["main"]

logger = logging.getLogger("harness")
_console = Console(stderr=True)


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("harness").setLevel(min(level, logging.INFO))


_out_option = click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Output directory (default reports/<time>-<name>).",
)
_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a scenario value, e.g. --set load.users=10 (repeatable).",
)


def _duration(_ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    from harness.units import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _port_range(_ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    low, sep, high = value.partition("-")
    if not (sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535):
        raise click.BadParameter(f"{value!r} is not LOW-HIGH within 1-65535", param=param)
    return (int(low), int(high))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """eph: find out when a client runs out of ephemeral ports, before production does."""
    _setup_logging(verbose)
    from harness.kernel.netns import sweep_stale

    sweep_stale()  # namespaces of an eph killed with SIGKILL: cheap, silent if none


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("scenario", type=click.Path(path_type=Path))
@_out_option
@_set_option
@click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="HOST:PORT",
    help="Send load to this server instead (repeatable); drops [listener].",
)
@click.option(
    "--master",
    "as_master",
    is_flag=True,
    help="Be Locust's master: the load comes from `eph worker` processes on other hosts.",
)
@click.option(
    "--expect-workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --master: start once this many workers are connected.",
)
@click.option(
    "--master-bind-host",
    default="127.0.0.1",
    show_default=True,
    help="With --master: the address workers connect to (loopback unless told otherwise).",
)
@click.option(
    "--master-bind-port",
    type=click.IntRange(1, 65535),
    default=5557,
    show_default=True,
    help="With --master: the port workers connect to.",
)
@click.option(
    "--wait-workers",
    default="120s",
    show_default=True,
    callback=_duration,
    help="With --master: how long to wait for the workers.",
)
@click.option(
    "--web",
    "web",
    is_flag=False,
    flag_value="127.0.0.1:8089",
    default=None,
    metavar="[HOST:PORT]",
    help="Locust's web UI during the run, with the Ports tab (127.0.0.1:8089 if no value).",
)
@click.argument("locust_args", nargs=-1, type=click.UNPROCESSED)
def run(
    scenario: Path,
    out: Path | None,
    overrides: Sequence[str],
    targets: Sequence[str],
    as_master: bool,
    expect_workers: int,
    master_bind_host: str,
    master_bind_port: int,
    wait_workers: float,
    web: str | None,
    locust_args: Sequence[str],
) -> None:
    """Run SCENARIO on this host: listener, Locust load, collector, summary and report.

    With --master, the load runs on `eph worker` hosts instead; each records its
    own connections and sockets and ships them here, into one run directory.
    Arguments after `--` go to Locust as they are, e.g. `-- --processes 2`.
    """
    from harness.run import Master, run_scenario

    master = (
        Master(expect_workers, master_bind_host, master_bind_port, wait_workers)
        if as_master
        else None
    )
    _launch(
        "run",
        functools.partial(run_scenario, master=master, web=_web_endpoint(web)),
        load_scenario(scenario, overrides, targets=targets),
        out,
        locust_args,
    )


def _web_endpoint(web: str | None) -> Endpoint | None:
    if web is None:
        return None
    endpoint = Endpoint.parse(web, allow_port_zero=False)
    click.echo(f"Locust's web UI: http://{endpoint}/ (the Ports tab shows this host's paths)")
    return endpoint


@cli.command()
@click.option(
    "--master-host",
    default="127.0.0.1",
    show_default=True,
    help="Where `eph run --master` listens.",
)
@click.option("--master-port", type=click.IntRange(1, 65535), default=5557, show_default=True)
@click.option("--name", help="This host's name in the run. [default: the host name]")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("reports/worker"),
    show_default=True,
    help="Where this worker keeps its own copy of each test's records.",
)
@click.option(
    "--max-time",
    default="2h",
    show_default=True,
    callback=_duration,
    help="Stop after this long even if the master never says so.",
)
def worker(
    master_host: str, master_port: int, name: str | None, out: Path, max_time: float
) -> None:
    """Be a Locust worker of `eph run --master` on another host.

    The master sends the scenario; this host makes the connections, samples its
    own sockets, and ships records and samples to the master at the end. Exits
    when the master quits.
    """
    from harness.run import run_worker

    _console.print(
        f"[bold]eph worker[/] {name or socket.gethostname()}: master {master_host}:{master_port}"
    )
    code = run_worker(
        master_host=master_host,
        master_port=master_port,
        out=out,
        name=name,
        max_seconds=max_time,
    )
    if code not in (0, None):
        raise SystemExit(code)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("scenario", type=click.Path(path_type=Path), required=False)
@_out_option
@_set_option
@click.option(
    "--cleanup",
    is_flag=True,
    help="Only remove the namespaces of labs whose eph is gone (killed), and say which.",
)
@click.option(
    "--exec",
    "command",
    metavar="'CMD ...'",
    help="Run your own client instead of Locust, with EPH_TARGET=host:port, and observe it"
    " (also lab.exec in the scenario).",
)
@click.argument("locust_args", nargs=-1, type=click.UNPROCESSED)
def lab(
    scenario: Path | None,
    out: Path | None,
    overrides: Sequence[str],
    cleanup: bool,
    command: str | None,
    locust_args: Sequence[str],
) -> None:
    """Run SCENARIO in throwaway network namespaces with its [kernel] settings.

    Needs root (ip netns). The namespaces, and every setting made in them, are
    gone when the run ends, however it ends; host settings are never written.
    After a SIGKILL, the next eph command removes them (or --cleanup).

    With --exec, your own client runs in the lab against eph's listener (its
    address in EPH_TARGET) and the ports it takes are observed and reported.
    """
    from harness.lab.topology import run_lab

    if cleanup:
        _cleanup_namespaces()
        return
    if scenario is None:
        raise click.UsageError("Missing argument 'SCENARIO'.")
    loaded = load_scenario(scenario, overrides)
    command = command or loaded.lab.exec
    if command is not None:
        if locust_args:
            raise click.UsageError("--exec runs your client, not Locust: no Locust arguments")
        _lab_exec(loaded, command, out)
        return
    _launch("lab", run_lab, loaded, out, locust_args)


def _lab_exec(scenario: Scenario, command: str, out: Path | None) -> None:
    """eph lab --exec: the client runs, observed; the observation's report is the run's."""
    from harness.lab.exec import failure, run_exec

    run, result = run_exec(scenario, command, out=out)
    _report_observation(run.path)
    error = failure(run, result)
    if error is not None:
        raise error


def _cleanup_namespaces() -> None:
    from harness.kernel.netns import netns_available, remove_stale, removed_namespaces

    problem = netns_available()
    if problem:
        raise click.ClickException(problem)
    remove_stale()
    removed = removed_namespaces()  # with what eph's start removed already
    for name in removed:
        click.echo(f"removed {name}")
    if not removed:
        click.echo("no namespace left by a killed eph")


@cli.command()
@click.argument("scenario", type=click.Path(path_type=Path))
@click.option(
    "--vary",
    "varies",
    multiple=True,
    required=True,
    metavar="KEY.PATH=V1,V2,...",
    help="A grid axis (repeatable): one lab per combination of values.",
)
@_set_option
@_out_option
def sweep(
    scenario: Path, varies: Sequence[str], overrides: Sequence[str], out: Path | None
) -> None:
    """Run SCENARIO in a lab at every point of a grid and compare with the model.

    Example: --vary kernel.ip_local_port_range=40000-40099,40000-40999
    --vary kernel.tcp_tw_reuse=0,1 (four labs).
    """
    from harness.lab.sweep import Vary, run_sweep

    axes = [Vary.parse(v) for v in varies]
    total = 1
    for axis in axes:
        total *= len(axis.values)
    _console.print(f"[bold]eph sweep[/] {scenario}: {total} points")

    def on_point(index: int, count: int, label: str, summary: Summary | None) -> None:
        if summary is None:
            _console.print(f"[{index + 1}/{count}] {label} ...", highlight=False, markup=False)
            return
        capacity = summary.capacity
        _console.print(
            f"[{index + 1}/{count}] {label}: {summary.connections.succeeded} succeeded,"
            f" measured {capacity.measured_rate_per_s}/s, model"
            f" {capacity.model_max_rate_per_s}/s",
            highlight=False,
            markup=False,
        )

    path = run_sweep(scenario, axes, overrides=overrides, out=out, on_point=on_point)
    _console.print(f"comparison: {path / 'comparison.csv'} and {path / 'comparison.png'}")


def _launch(
    verb: str,
    runner: Callable[..., RunResult],
    scenario: Scenario,
    out: Path | None,
    locust_args: Sequence[str],
) -> None:
    for note in scenario.advisories():
        logger.warning("%s", note)
    where = ", ".join(str(e) for e in scenario.target.endpoints)
    _console.print(
        f"[bold]eph {verb}[/] {scenario.name}: {scenario.load.users} users, engine "
        f"{scenario.load.engine.value}, {scenario.duration:g} s toward {where}"
        + (" (embedded listener)" if scenario.listener else "")
    )
    with _ProgressView(_console) as view:
        result = runner(
            scenario,
            out=out,
            progress=view.update,
            locust_args=locust_args,
            on_preflight=_print_preflight,
        )
    _print_result(result.run_dir, result.summary)


def _print_preflight(report: dict[str, Any]) -> None:
    from harness.capacity.preflight import render_text

    _console.print(Text(render_text(report).rstrip(), style="dim"), soft_wrap=True, highlight=False)


class _ProgressView:
    """A live line on a terminal; a log line every few seconds otherwise (CI)."""

    EVERY = 5.0

    def __init__(self, console: Console) -> None:
        self._console = console
        self._status = console.status("starting") if console.is_terminal else None
        self._last = -self.EVERY

    def __enter__(self) -> _ProgressView:
        if self._status is not None:
            self._status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(None, None, None)

    def update(self, elapsed: float, duration: float, progress: Progress) -> None:
        rate = progress.attempts / elapsed if elapsed > 0 else 0.0
        top = ", ".join(f"{k} {v}" for k, v in progress.errors.most_common(2))
        text = (
            f"{elapsed:5.1f}/{duration:g} s  users {progress.users}  connections "
            f"{progress.attempts}  errors {progress.failures}{f' ({top})' if top else ''}"
            f"  {rate:,.0f}/s"
        )
        if self._status is not None:
            self._status.update(text)
        elif elapsed - self._last >= self.EVERY:
            self._last = elapsed
            print(text, file=sys.stderr, flush=True)


def _print_result(run_dir: Path, summary: Summary) -> None:
    conns, exhaustion = summary.connections, summary.exhaustion
    _console.print(
        f"connections: {conns.attempted} attempted, {conns.succeeded} succeeded,"
        f" {conns.failed} failed {conns.errors or ''}; {conns.rate_per_s}/s"
    )
    if exhaustion.exhausted:
        _console.print(
            f"[red]exhausted[/] after {exhaustion.first_failure_s} s"
            f" ({exhaustion.succeeded_before_first_failure} connections first)"
        )
    conservation = summary.conservation
    if not conservation.ok:
        shown = conservation.model_dump(mode="json", exclude_unset=True)
        _console.print(f"[yellow]conservation check failed[/]: {shown}")
    _console.print(f"report: {run_dir / 'report.html'}")


@cli.command()
@click.option(
    "--endpoint",
    "endpoints",
    multiple=True,
    default=["127.0.0.1:9000"],
    show_default=True,
    metavar="HOST:PORT",
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
) -> None:
    """Serve the target endpoints until SIGINT/SIGTERM; print counts as JSON at exit.

    With --udp, UDP endpoints instead: each datagram is counted and answered with
    --response, or echoed.
    """
    from harness.target.listener import Listener, run_listener

    parsed = [Endpoint.parse(e) for e in endpoints]
    listener = Listener(
        parsed,
        close=ListenerClose(close),
        response=response.encode(),
        read_request=read_request,
        keep_alive=keep_alive,
        backlog=backlog,
        udp=udp,
    )
    run_listener(listener, loop_kind=loop_kind)


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--compare", is_flag=True, help="Put the runs side by side in one page.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="The comparison page (default reports/compare-<time>.html).",
)
def report(run_dirs: Sequence[Path], compare: bool, out: Path | None) -> None:
    """Render RUN_DIR's summary.json and report.html again from its stored data.

    With --compare, RUN_DIR A B [...]: one page with the runs side by side, e.g.
    before and after tuning (each run is labelled by its directory name).
    """
    from harness.finalize import load_run, rerender
    from harness.report.observation import is_observation

    if not compare:
        if len(run_dirs) != 1:
            raise click.UsageError("give one RUN_DIR, or --compare A B [...]")
        if is_observation(run_dirs[0]):  # eph observe --out DIR or eph lab --exec
            _report_observation(run_dirs[0])
            return
        _print_result(run_dirs[0], rerender(run_dirs[0]))
        return
    import time

    from harness.report.html import render_comparison

    if len(run_dirs) < 2:
        raise click.UsageError("--compare needs two run directories or more")
    runs = [(path.resolve().name, load_run(path)) for path in run_dirs]
    if out is None:
        out = Path("reports") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    render_comparison(out, runs)
    click.echo(f"comparison: {out}")


@cli.command()
@click.option("--once", is_flag=True, help="Print one sample as JSON and exit.")
@click.option("--out", type=click.Path(path_type=Path), help="Directory for samples.parquet.")
@click.option(
    "--duration", default="10m", show_default=True, callback=_duration, help="Stop after this long."
)
@click.option(
    "--interval",
    default="100ms",
    show_default=True,
    callback=_duration,
    help="Time between samples.",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="HOST:PORT",
    help="Count sockets to and at this endpoint too (repeatable).",
)
@click.option("--udp", is_flag=True, help="Count connected UDP sockets toward the targets.")
def collect(
    once: bool,
    out: Path | None,
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
    count = run_collector(out, resolved, interval=interval, duration=duration, udp=udp)
    click.echo(f"{count} samples in {out / 'samples.parquet'}")


@cli.command()
@click.option(
    "--duration",
    callback=_duration,
    default="10m",
    show_default=True,
    help="Stop after this long (Ctrl-C stops sooner; what was seen is kept).",
)
@click.option(
    "--interval", callback=_duration, default="1s", show_default=True, help="One sample per."
)
@click.option(
    "--top",
    type=click.IntRange(1, 1000),
    default=20,
    show_default=True,
    help="Paths kept a sample.",
)
@click.option("--out", type=click.Path(path_type=Path), help="Write samples here (a directory).")
@click.option(
    "--prometheus",
    metavar="HOST:PORT",
    help="Serve Prometheus gauges here, e.g. 127.0.0.1:9465 (port 0: any free port).",
)
@click.option("--plain", is_flag=True, help="Plain lines even on a terminal.")
@click.option("--no-report", is_flag=True, hidden=True, help="Samples only (eph lab --exec).")
def observe(
    duration: float,
    interval: float,
    top: int,
    out: Path | None,
    prometheus: str | None,
    plain: bool,
    no_report: bool,
) -> None:
    """Watch every client path of this host: ports held per destination, and how long
    until they run out. Read-only; no load of its own.

    A path is local address -> remote address:port: the kernel hands each one the
    whole ephemeral range. On a terminal the view refreshes every second; otherwise
    a few plain lines every 5 s.
    """
    from harness.observe.session import Observation
    from harness.observe.views import PlainView, TerminalView

    views: list[Any] = []
    if prometheus is not None:
        from harness.observe.prometheus import PrometheusView

        endpoint = Endpoint.parse(prometheus, allow_port_zero=True)
        try:
            server = PrometheusView(endpoint.host, endpoint.port)
        except OSError as exc:
            raise click.UsageError(f"--prometheus {prometheus}: {exc.strerror or exc}") from None
        host, port = server.address
        click.echo(f"Prometheus metrics at http://{host}:{port}/metrics", err=True)
        views.append(server)
    terminal = sys.stdout.isatty() and not plain
    views.append(TerminalView(rows=top) if terminal else PlainView())
    observation = Observation(
        duration_s=duration, interval_s=interval, top=top, out=out, views=views
    )
    observation.run()
    click.echo(
        f"observed {observation.samples} samples, stopped by {observation.stop_reason}", err=True
    )
    if out is not None and not no_report:
        _report_observation(out)


def _plan_changes(given: dict[str, Any], rate: float | None) -> dict[str, Any]:
    """What the command line sets over the inputs taken from a directory."""
    changes = {k: v for k, v in given.items() if v is not None}
    if rate:
        changes["rate"] = rate
    return changes


def _report_observation(directory: Path) -> None:
    """summary.json and report.html of an observation directory; the findings echoed."""
    from harness.files import atomic_write
    from harness.report.observation import summarize_observation
    from harness.report.observation_report import observation_findings, render_observation

    summary = summarize_observation(directory)
    atomic_write(directory / "summary.json", summary.model_dump_json(indent=2) + "\n")
    report = render_observation(directory, summary)
    for line in observation_findings(summary):
        click.echo(f"  {line}", err=True)
    click.echo(f"report: {report}", err=True)


@cli.command()
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="New connections/s wanted (all hosts together).",
)
@click.option(
    "--lifetime",
    callback=_duration,
    help="How long a connection lives, connect to close (e.g. 50ms). [default: 0]",
)
@click.option(
    "--close",
    type=click.Choice([c.value for c in ClosePolicy]),
    help="Who closes first. [default: client]",
)
@click.option(
    "--port-range",
    callback=_port_range,
    metavar="LOW-HIGH",
    help="ip_local_port_range. [default: this host's]",
)
@click.option(
    "--reserved", help='ip_local_reserved_ports, e.g. "40000-40009,50000". [default: this host\'s]'
)
@click.option("--tw-reuse", type=click.IntRange(0, 2), help="tcp_tw_reuse. [default: this host's]")
@click.option(
    "--reuse-delay",
    callback=_duration,
    help="tcp_tw_reuse_delay (Linux 6.14+). [default: this host's, or 1s]",
)
@click.option("--sources", type=click.IntRange(min=1), help="Source addresses. [default: 1]")
@click.option(
    "--destinations",
    type=click.IntRange(min=1),
    help="Destination address:port pairs. [default: 1]",
)
@click.option(
    "--loopback", is_flag=True, help="The destinations are loopback (tcp_tw_reuse=2 applies)."
)
@click.option("--hosts", type=click.IntRange(min=1), help="Load-generator hosts. [default: 1]")
@click.option(
    "--keep-port",
    "keep_ports",
    multiple=True,
    type=click.IntRange(1, 65535),
    metavar="PORT",
    help="A port a service listens on, kept out of any range recommended (repeatable);"
    " the ports listening here now are kept too.",
)
@click.option(
    "--from",
    "run_dir",
    type=click.Path(path_type=Path),
    help="Take the inputs from a run directory; compare model and measured.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for tools instead of text.")
def plan(
    rate: float | None,
    lifetime: float | None,
    close: str | None,
    port_range: tuple[int, int] | None,
    reserved: str | None,
    tw_reuse: int | None,
    reuse_delay: float | None,
    sources: int | None,
    destinations: int | None,
    loopback: bool,
    hosts: int | None,
    keep_ports: Sequence[int],
    run_dir: Path | None,
    as_json: bool,
) -> None:
    """What rate a setup sustains, and what reaches the rate you need (sends no load).

    Unset settings come from this host's kernel (read, never written), or with
    --from from the run. The sysctl.d snippet is printed for you to apply by hand.
    """
    from dataclasses import replace

    from harness.capacity.plan import (
        from_kernel,
        from_observation,
        from_run,
        make_plan,
        render_text,
    )
    from harness.kernel.sysctls import read_kernel
    from harness.report.model import Summary
    from harness.report.observation import ObserveSummary, is_observation
    from harness.rundir import RunDir

    given: dict[str, Any] = {
        "lifetime_s": lifetime,
        "close": ClosePolicy(close) if close else None,
        "port_range": port_range,
        "reserved": reserved,
        "tw_reuse": tw_reuse,
        "reuse_delay_ms": round(reuse_delay * 1000) if reuse_delay is not None else None,
        "sources": sources,
        "destinations": destinations,
        "loopback": loopback or None,
        "hosts": hosts,
    }
    measured = None
    if run_dir is not None and is_observation(run_dir):
        try:
            inputs, measured = from_observation(ObserveSummary.read(run_dir / "summary.json"))
        except ValueError as exc:
            raise click.UsageError(f"--from {run_dir}: {exc}") from None
        inputs = replace(inputs, **_plan_changes(given, rate))
    elif run_dir is not None:
        run = RunDir.open(run_dir)
        inputs, measured = from_run(
            Summary.load(run.summary), Scenario.model_validate(run.read_json("scenario.json"))
        )
        inputs = replace(inputs, **_plan_changes(given, rate))
    elif rate is None:
        raise click.UsageError("give --rate N (new connections/s), or --from RUN_DIR")
    else:
        inputs = from_kernel(read_kernel(), rate, **given)
    # services' ports: given, and those listening where the run was (or here) now
    found = _listening_ports(run_dir)
    inputs = replace(inputs, keep_ports=tuple(sorted({*keep_ports, *found})))
    result = make_plan(inputs)
    if as_json:
        data = result.to_json()
        if measured is not None:
            data["measured"] = {k: {"model": m, "measured": v} for k, (m, v) in measured.items()}
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(render_text(result, measured), nl=False)


def _listening_ports(run_dir: Path | None) -> list[int]:
    """Ports local services listen on: the run's preflight (``--from``), else this host's."""
    from harness.capacity.preflight import listening_ports, preflight

    if run_dir is not None:
        try:
            return listening_ports(json.loads((run_dir / "preflight.json").read_text()))
        except (OSError, ValueError, KeyError):
            return []
    return listening_ports(preflight())


@cli.command("preflight")
@click.argument("scenario", required=False, type=click.Path(path_type=Path))
@_set_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for tools instead of text.")
def preflight_command(scenario: Path | None, overrides: Sequence[str], as_json: bool) -> None:
    """The port range here and what could collide with it, before any load (read-only).

    With SCENARIO, also its concurrency against RLIMIT_NOFILE. Lists every local
    listening TCP port and bound UDP port inside the ephemeral range that is not
    in ip_local_reserved_ports, with the process holding it.
    """
    from harness.capacity.preflight import preflight, render_text

    loaded = None
    if scenario is not None and str(scenario) == "-":
        loaded = Scenario.model_validate(json.loads(sys.stdin.read()))
    elif scenario is not None:
        loaded = load_scenario(scenario, overrides)
    report = preflight(loaded)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_text(report), nl=False)


@cli.command()
@click.argument("scenarios", nargs=-1, required=True, type=click.Path(path_type=Path))
@_set_option
def validate(scenarios: Sequence[Path], overrides: Sequence[str]) -> None:
    """Check scenario files; print each one's name and any advice."""
    for path in scenarios:
        scenario = load_scenario(path, overrides)
        click.echo(f"{path}: ok ({scenario.name})")
        for note in scenario.advisories():
            click.echo(f"  warning: {note}")


@cli.command("schema")
@click.argument("name", type=click.Choice(["summary"]))
def schema_command(name: str) -> None:
    """Print the JSON Schema of a run directory's file: summary (summary.json)."""
    from harness.report.model import summary_schema

    click.echo(json.dumps(summary_schema(), indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cli.main(
            args=list(argv) if argv is not None else None, prog_name="eph", standalone_mode=False
        )
    except EphError as exc:
        # verbatim: no markup (messages quote "[listener]"), no hard wrap (copy-pastable)
        _console.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
