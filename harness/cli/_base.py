"""The command group, its shared options, and how results are shown."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from harness.report.model import Summary

logger = logging.getLogger("harness")
console = Console(stderr=True)


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("harness").setLevel(min(level, logging.INFO))


out_option = click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Output directory (default reports/<time>-<name>).",
)
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
        raise click.BadParameter(str(exc), param=param) from None


def port_range_value(_ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
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


def print_preflight(report: dict[str, Any]) -> None:
    from harness.capacity.preflight import render_text

    console.print(Text(render_text(report).rstrip(), style="dim"), soft_wrap=True, highlight=False)


def print_result(run_dir: Path, summary: Summary) -> None:
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
    for worker in summary.distributed.missing if summary.distributed else []:
        console.print(f"[yellow]missing worker[/]: {worker.finding()}")
    conservation = summary.conservation
    if not conservation.ok:
        shown = conservation.model_dump(mode="json", exclude_unset=True)
        console.print(f"[yellow]conservation check failed[/]: {shown}")
    console.print(f"report: {run_dir / 'report.html'}")


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
