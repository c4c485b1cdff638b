"""Verbs that make load: run, worker, lab (and lab --exec), sweep, validate."""

from __future__ import annotations

import functools
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

from harness.cli._base import (
    claim,
    cli,
    console,
    endpoint_value,
    force_option,
    in_run_option,
    out_option,
    positive_duration,
    print_preflight,
    print_result,
    report_observation,
    set_option,
)
from harness.endpoints import Endpoint
from harness.load.progress import Progress
from harness.scenario import Scenario, load_scenario
from harness.scenario.named_inputs import check_command

if TYPE_CHECKING:
    from harness.run.lifecycle import RunResult
    from harness.summary import Summary

logger = logging.getLogger("harness")


no_report_option = click.option(
    "--no-report",
    is_flag=True,
    help="Write summary.json but not report.html (eph report RUN renders it later).",
)

trace_option = click.option(
    "--trace",
    is_flag=True,
    help="Also record every client connection from the kernel (eBPF; root, and the recorder"
    " make setup builds, else bpftrace).",
)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("scenario", type=click.Path(path_type=Path))
@out_option
@force_option
@set_option
@click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="HOST:PORT",
    callback=endpoint_value,
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
    callback=positive_duration,
    help="With --master: how long to wait for the workers.",
)
@click.option(
    "--web",
    "web",
    is_flag=False,
    flag_value="127.0.0.1:8089",
    default=None,
    metavar="[HOST:PORT]",
    callback=endpoint_value,
    help="Locust's web UI during the run, with the Ports tab (127.0.0.1:8089 if no value).",
)
@trace_option
@no_report_option
@click.argument("locust_args", nargs=-1, type=click.UNPROCESSED)
def run(
    scenario: Path,
    out: Path | None,
    force: bool,
    overrides: Sequence[str],
    targets: Sequence[str],
    as_master: bool,
    expect_workers: int,
    master_bind_host: str,
    master_bind_port: int,
    wait_workers: float,
    web: str | None,
    trace: bool,
    no_report: bool,
    locust_args: Sequence[str],
) -> None:
    """Run SCENARIO on this host: listener, Locust load, collector, summary and report.

    With --master, the load runs on `eph worker` hosts instead; each records its
    own connections and sockets and ships them here, into one run directory.
    Arguments after `--` go to Locust as they are, e.g. `-- --processes 2`.
    """
    from harness.run.lifecycle import Master, run_scenario

    master = (
        Master(expect_workers, master_bind_host, master_bind_port, wait_workers)
        if as_master
        else None
    )
    loaded = load_scenario(scenario, overrides, targets=targets)  # and the files it names
    out = claim(out, force)
    _launch(
        "run",
        functools.partial(run_scenario, master=master, web=_web_endpoint(web), trace=trace),
        loaded,
        out,
        locust_args,
        report=not no_report,
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
    callback=positive_duration,
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
    from harness.run.worker import run_worker

    console.print(
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
@out_option
@force_option
@in_run_option
@set_option
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
@trace_option
@no_report_option
@click.argument("locust_args", nargs=-1, type=click.UNPROCESSED)
def lab(
    scenario: Path | None,
    out: Path | None,
    force: bool,
    in_run: bool,
    overrides: Sequence[str],
    cleanup: bool,
    command: str | None,
    trace: bool,
    no_report: bool,
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
    loaded = load_scenario(scenario, overrides)  # lab.exec's program, when it has one
    if command is not None:  # an empty one is refused, never taken for "not given"
        check_command(command, source=f"--exec {command!r}", key=None)
    command = command if command is not None else loaded.lab.exec
    if command is not None and locust_args:
        raise click.UsageError("--exec runs your client, not Locust: no Locust arguments")
    if command is not None and no_report:
        raise click.UsageError(
            "--no-report goes with Locust's load: a lab with --exec writes its observation's"
            " summary and report together"
        )
    if command is None and trace:
        raise click.UsageError("--trace in a lab goes with --exec (or eph run --trace)")
    out = out if in_run else claim(out, force)
    if command is not None:
        _lab_exec(loaded, command, out, trace)
        return
    _launch("lab", run_lab, loaded, out, locust_args, report=not no_report)


def _lab_exec(scenario: Scenario, command: str, out: Path | None, trace: bool) -> None:
    """eph lab --exec: the client runs, observed; the observation's report is the run's."""
    from harness.lab.exec import failure, run_exec

    run, result = run_exec(scenario, command, out=out, trace=trace)
    report_observation(run.path)
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
@set_option
@out_option
@force_option
@no_report_option
def sweep(
    scenario: Path,
    varies: Sequence[str],
    overrides: Sequence[str],
    out: Path | None,
    force: bool,
    no_report: bool,
) -> None:
    """Run SCENARIO in a lab at every point of a grid and compare with the model.

    Example: --vary kernel.ip_local_port_range=40000-40099,40000-40999
    --vary kernel.tcp_tw_reuse=0,1 (four labs).
    """
    from harness.lab.sweep import Vary, check_points, run_sweep

    axes = [Vary.parse(v) for v in varies]
    total = check_points(scenario, axes, overrides)  # every point, before any lab
    out = claim(out, force)
    console.print(f"[bold]eph sweep[/] {scenario}: {total} points")

    def on_point(index: int, count: int, label: str, summary: Summary | None) -> None:
        if summary is None:
            console.print(f"[{index + 1}/{count}] {label} ...", highlight=False, markup=False)
            return
        capacity = summary.capacity
        console.print(
            f"[{index + 1}/{count}] {label}: {summary.connections.succeeded} succeeded,"
            f" measured {capacity.measured_rate_per_s}/s, model"
            f" {capacity.model_max_rate_per_s}/s",
            highlight=False,
            markup=False,
        )

    path = run_sweep(
        scenario, axes, overrides=overrides, out=out, on_point=on_point, report=not no_report
    )
    console.print(f"comparison: {path / 'comparison.csv'} and {path / 'comparison.png'}")


def _launch(
    verb: str,
    runner: Callable[..., RunResult],
    scenario: Scenario,
    out: Path | None,
    locust_args: Sequence[str],
    *,
    report: bool = True,
) -> None:
    for note in scenario.advisories():
        logger.warning("%s", note)
    where = ", ".join(str(e) for e in scenario.target.endpoints)
    console.print(
        f"[bold]eph {verb}[/] {scenario.name}: {scenario.load.users} users, engine "
        f"{scenario.load.engine.value}, {scenario.duration:g} s toward {where}"
        + (" (embedded listener)" if scenario.listener else "")
    )
    with _ProgressView(console) as view:
        result = runner(
            scenario,
            out=out,
            progress=view.update,
            locust_args=locust_args,
            on_preflight=print_preflight,
            report=report,
        )
    print_result(result.run_dir, result.summary, report=report)


class _ProgressView:
    """A live line on a terminal; a log line every few seconds otherwise (CI)."""

    EVERY = 5.0

    def __init__(self, console: Console) -> None:
        self.console = console
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


@cli.command()
@click.argument("scenarios", nargs=-1, required=True, type=click.Path(path_type=Path))
@set_option
def validate(scenarios: Sequence[Path], overrides: Sequence[str]) -> None:
    """Check scenario files; print each one's name and any advice."""
    for path in scenarios:
        scenario = load_scenario(path, overrides)
        click.echo(f"{path}: ok ({scenario.name})")
        for note in scenario.advisories():
            click.echo(f"  warning: {note}")
