"""Command-line plumbing shared by ``dune-cache`` and ``dune-student``: logging and user-facing errors."""
from __future__ import annotations

import logging
import sys

import typer


def new_app(help: str) -> typer.Typer:
    """A CLI app whose ``--help`` and usage errors are formatted by click, not rich: importing rich would add about
    half a second to every ``--help`` (docs/benchmarks.md, "CLI start-up")."""
    return typer.Typer(add_completion=False, no_args_is_help=True, help=help, rich_markup_mode=None)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def fail(exc: BaseException) -> None:
    """Report a user error in one red line (no traceback) and exit with status 2."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)
