"""The ``eph`` command line (also ``python -m harness``).

One click group (``_base``) and its verbs by what they do: ``runs`` make load
(run, worker, lab, sweep, validate), ``watch`` looks without load (listen,
collect, observe), ``reports`` reads and plans (report, plan, preflight,
schema). Input errors exit with code 2 and one paragraph, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
from rich.text import Text

from harness.cli import _base
from harness.cli._base import console, load_verbs
from harness.errors import EphError, SummaryError

__all__ = ["cli", "main"]


def __getattr__(name: str) -> click.Group:
    """``cli``, every verb loaded: the group as a whole, for a reader (the manual's
    reference, a test). ``main`` loads only the verb it runs."""
    if name != "cli":
        raise AttributeError(f"module 'harness.cli' has no attribute {name!r}")
    load_verbs()
    return _base.cli


def main(argv: Sequence[str] | None = None) -> None:
    try:
        _base.cli.main(
            args=list(argv) if argv is not None else None, prog_name="eph", standalone_mode=False
        )
    except (EphError, SummaryError) as exc:
        # verbatim: no markup (messages quote "[listener]"), no hard wrap (copy-pastable)
        console.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as exc:
        # one paragraph, like eph's own errors: what was typed, where, and where help is
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        text = Text.assemble(("error: ", "bold red"), exc.format_message() + hint)
        console.print(text, soft_wrap=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
