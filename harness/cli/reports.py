"""Verbs that read or plan: report, plan, preflight, schema."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from harness.cli._base import (
    cli,
    duration_value,
    port_range_value,
    print_result,
    report_observation,
    set_option,
)
from harness.cli._nat import nat_options, plan_nat
from harness.scenario import ClosePolicy, Scenario, load_scenario

if TYPE_CHECKING:
    from harness.capacity.plan import Measured, PlanInputs


# eph report rewrites only what is derived from the records, and says so
_DERIVED_ONLY = "wrote {files} again from the run's records; no record was changed"


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--compare", is_flag=True, help="Put the runs side by side in one page.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="The comparison page (default reports/compare-<time>.html).",
)
@click.option(
    "--collect-from",
    "collect_from",
    multiple=True,
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    metavar="WORKER_DIR",
    help="A distributed run's worker that never shipped: fold in the records it kept"
    " in its own run directory (repeatable; the summary names them).",
)
def report(
    run_dirs: Sequence[Path], compare: bool, out: Path | None, collect_from: Sequence[Path]
) -> None:
    """Render RUN_DIR's summary.json and report.html again from its stored data.

    A run that crashed (its eph process died) is summarized from what its parts
    hold, and says so. With --compare, RUN_DIR A B [...]: one page with the runs
    side by side, e.g. before and after tuning (each run is labelled by its
    directory name).
    """
    from harness.report.observation import is_observation
    from harness.run.finalize import load_run, rerender

    if collect_from and compare:
        raise click.UsageError("--collect-from folds workers into one RUN_DIR, not --compare")
    if not compare:
        if len(run_dirs) != 1:
            raise click.UsageError("give one RUN_DIR, or --compare A B [...]")
        if is_observation(run_dirs[0]):  # eph observe --out DIR or eph lab --exec
            report_observation(run_dirs[0])
            click.echo(_DERIVED_ONLY.format(files="summary.json and report.html"), err=True)
            return
        print_result(run_dirs[0], rerender(run_dirs[0], collect_from))
        click.echo(_DERIVED_ONLY.format(files="summary.json and report.html"), err=True)
        return
    import time

    from harness.report.html import render_comparison

    if len(run_dirs) < 2:
        raise click.UsageError("--compare needs two run directories or more")
    if out is not None and out.is_dir():
        raise click.BadParameter(
            f"{str(out)!r} is a directory: give the comparison page's file name", param_hint="--out"
        )
    runs = [(path.resolve().name, load_run(path)) for path in run_dirs]
    if out is None:
        out = Path("reports") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.html"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        render_comparison(out, runs)
    except OSError as exc:
        raise click.BadParameter(
            f"{str(out)!r}: cannot write it ({exc.strerror or exc})", param_hint="--out"
        ) from None
    click.echo(f"comparison: {out}")


@cli.command()
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="New connections/s wanted (all hosts together).",
)
@click.option(
    "--lifetime",
    callback=duration_value,
    help="How long a connection lives, connect to close (e.g. 50ms). [default: 0]",
)
@click.option(
    "--close",
    type=click.Choice([c.value for c in ClosePolicy]),
    help="Who closes first. [default: client]",
)
@click.option(
    "--port-range",
    callback=port_range_value,
    metavar="LOW-HIGH",
    help="ip_local_port_range. [default: this host's]",
)
@click.option(
    "--reserved", help='ip_local_reserved_ports, e.g. "40000-40009,50000". [default: this host\'s]'
)
@click.option("--tw-reuse", type=click.IntRange(0, 2), help="tcp_tw_reuse. [default: this host's]")
@click.option(
    "--reuse-delay",
    callback=duration_value,
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
@nat_options
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
    **_nat: Any,  # --nat and its options: plan_nat reads them from the context
) -> None:
    """What rate a setup sustains, and what reaches the rate you need (sends no load).

    Unset settings come from this host's kernel (read, never written), or with
    --from from the run. The sysctl.d snippet is printed for you to apply by hand.
    With --nat (or --scenario), the same for a source NAT's pool instead.
    """
    from dataclasses import replace

    from harness.capacity.plan import make_plan, render_text

    if plan_nat(click.get_current_context().params):
        return
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
    inputs, measured = _plan_inputs(given, rate, run_dir)
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


def _plan_inputs(
    given: dict[str, Any], rate: float | None, run_dir: Path | None
) -> tuple[PlanInputs, Measured | None]:
    """The plan's inputs: a run's or an observation's (--from), else this host's kernel."""
    from dataclasses import replace

    from harness.capacity.plan import from_kernel, from_observation, from_run
    from harness.kernel.sysctls import read_kernel
    from harness.report.observation import is_observation
    from harness.rundir import RunDir
    from harness.summary import ObserveSummary, Summary

    if run_dir is not None and is_observation(run_dir):
        try:
            inputs, measured = from_observation(ObserveSummary.read(run_dir / "summary.json"))
        except ValueError as exc:
            raise click.UsageError(f"--from {run_dir}: {exc}") from None
    elif run_dir is not None:
        run = RunDir.open(run_dir)
        inputs, measured = from_run(
            Summary.load(run.summary), Scenario.model_validate(run.read_json("scenario.json"))
        )
    elif rate is None:
        raise click.UsageError("give --rate N (new connections/s), or --from RUN_DIR")
    else:
        return from_kernel(read_kernel(), rate, **given), None
    return replace(inputs, **_plan_changes(given, rate)), measured


def _plan_changes(given: dict[str, Any], rate: float | None) -> dict[str, Any]:
    """What the command line sets over the inputs taken from a directory."""
    changes = {k: v for k, v in given.items() if v is not None}
    if rate:
        changes["rate"] = rate
    return changes


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
@set_option
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


@cli.command("schema")
@click.argument("name", type=click.Choice(["summary"]))
def schema_command(name: str) -> None:
    """Print the JSON Schema of a run directory's file: summary (summary.json)."""
    from harness.summary import summary_schema

    click.echo(json.dumps(summary_schema(), indent=2))
