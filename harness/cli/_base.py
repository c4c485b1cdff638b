"""The command group, its shared options, and how results are shown."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from harness.summary import Summary

logger = logging.getLogger("harness")
console = Console(stderr=True)


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("harness").setLevel(min(level, logging.INFO))


out_option = click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Output directory, new or empty (default reports/<time>-<name>).",
)
force_option = click.option(
    "--force",
    is_flag=True,
    help="--out may hold an earlier run: move it aside to OUT.replaced-TIME (never"
    " deleted) and start afresh.",
)
# a directory eph made for this run already (eph lab's own children): not claimed again
in_run_option = click.option("--in-run", is_flag=True, hidden=True)


def claim(out: Path | None, force: bool) -> Path | None:
    """``--out`` as a new, empty directory, or an error before anything starts: a run
    directory is written by one command, once (:func:`harness.rundir.claim_out`)."""
    if out is None:
        return None
    from harness.rundir import claim_out

    return claim_out(out, force=force)


set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a scenario value, e.g. --set load.users=10 (repeatable).",
)


def duration_value(_ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    from harness.units import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: {exc}", param=param) from None


def positive_duration(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> float | None:
    """A duration that must be above zero: an interval, a bound on time."""
    seconds = duration_value(ctx, param, value)
    if seconds is not None and seconds <= 0:
        raise click.BadParameter(f"{value!r} is not above zero (e.g. 1s, 100ms)", param=param)
    return seconds


def keep_value(
    _ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[float | None, int | None] | None:
    """``--keep``: a duration (24h) or a size (500MB), above zero: (seconds, bytes)."""
    from harness.units import parse_duration, parse_size

    if value is None:
        return None
    for parse, which in ((parse_duration, 0), (parse_size, 1)):
        try:
            amount = parse(value)
        except ValueError:
            continue
        if amount <= 0:
            raise click.BadParameter(f"{value!r} is not above zero", param=param)
        return (float(amount), None) if which == 0 else (None, int(amount))
    raise click.BadParameter(
        f"{value!r} is neither a duration (e.g. 24h, 90m) nor a size (e.g. 500MB, 2GiB)",
        param=param,
    )


def endpoint_value(_ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """HOST:PORT checked where it was typed, so that the error names the flag."""
    from harness.endpoints import Endpoint
    from harness.errors import EndpointError

    texts = value if isinstance(value, tuple) else (value,)
    for text in texts:
        if text is None:
            continue
        try:
            Endpoint.parse(text, allow_port_zero=param.name in ("prometheus", "endpoints"))
        except EndpointError as exc:
            raise click.BadParameter(f"{text!r}: {exc.reason}", param=param) from None
    return value


def port_range_value(_ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    low, sep, high = value.partition("-")
    if not (sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535):
        raise click.BadParameter(f"{value!r} is not LOW-HIGH within 1-65535", param=param)
    return (int(low), int(high))


# where each verb is defined: only its module is imported to run it. The listener and
# collector of every run are `eph listen` and `eph collect` children; with every verb
# loaded, each spent 0.31 s of CPU importing the command line, 0.07 s with its own
VERBS = {
    "run": "runs",
    "worker": "runs",
    "lab": "runs",
    "sweep": "runs",
    "validate": "runs",
    "listen": "watch",
    "collect": "watch",
    "observe": "watch",
    "report": "reports",
    "plan": "reports",
    "preflight": "reports",
    "schema": "reports",
}


def load_verbs(names: Iterable[str] = VERBS) -> None:
    """Import the modules that define ``names`` (every verb by default): importing one
    registers its commands on :data:`cli`."""
    for module in sorted({VERBS[name] for name in names if name in VERBS}):
        importlib.import_module(f"harness.cli.{module}")


class _VerbGroup(click.Group):
    """The ``eph`` group: a verb's module is imported when the verb is asked for."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        load_verbs([cmd_name])
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        load_verbs()
        return super().list_commands(ctx)


@click.group(cls=_VerbGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """eph: find out when a client runs out of ephemeral ports, before production does."""
    _setup_logging(verbose)
    # whatever the umask, nothing eph makes is group- or world-writable (the run
    # directory itself is 0750; TLS keys 0600); its children inherit this
    os.umask(os.umask(0o022) | 0o022)
    from harness.kernel.netns import sweep_stale

    sweep_stale()  # namespaces of an eph killed with SIGKILL: cheap, silent if none


def print_preflight(report: dict[str, Any]) -> None:
    from harness.capacity.preflight import render_text

    console.print(Text(render_text(report).rstrip(), style="dim"), soft_wrap=True, highlight=False)


def print_result(run_dir: Path, summary: Summary, *, report: bool = True) -> None:
    conns, exhaustion = summary.connections, summary.exhaustion
    console.print(
        f"connections: {conns.attempted} attempted, {conns.succeeded} succeeded,"
        f" {conns.failed} failed {conns.errors or ''}; {conns.rate_per_s}/s"
    )
    if exhaustion.exhausted:
        console.print(
            f"[red]exhausted[/] after {exhaustion.first_failure_s} s"
            f" ({exhaustion.succeeded_before_first_failure} connections first)"
        )
    if summary.crash is not None:
        console.print(f"[red]crashed[/]: {summary.crash.finding()}")
    if conns.attempted == 0 and not summary.interrupted:
        from harness.report.html import findings

        said = [line for line in findings(summary) if line.startswith("No connection was")]
        for line in said:
            console.print(f"[yellow]never started[/]: {line}", soft_wrap=True)
    for worker in summary.distributed.missing if summary.distributed else []:
        console.print(f"[yellow]missing worker[/]: {worker.finding()}")
    conservation = summary.conservation
    if not conservation.ok:
        shown = conservation.model_dump(mode="json", exclude_unset=True)
        console.print(f"[yellow]conservation check failed[/]: {shown}")
    if report:
        console.print(f"report: {run_dir / 'report.html'}")
    else:
        console.print(
            f"summary: {run_dir / 'summary.json'} (eph report {run_dir} renders the report)"
        )


def report_observation(directory: Path) -> None:
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
