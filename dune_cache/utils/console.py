"""Command-line plumbing shared by ``dune-cache`` and ``dune-student``: logging and user-facing errors, both with
credentials in URLs redacted (:mod:`.redaction`)."""
from __future__ import annotations

import logging
import sys

import typer

from .redaction import RedactingFilter, redact_text


def new_app(help: str) -> typer.Typer:
    """A CLI app whose ``--help`` and usage errors are formatted by click, not rich: importing rich would add about
    half a second to every ``--help`` (docs/benchmarks.md, "CLI start-up")."""
    return typer.Typer(add_completion=False, no_args_is_help=True, help=help, rich_markup_mode=None)


def setup_logging(verbose: bool) -> None:
    """Log to stderr (DEBUG with ``verbose``, else INFO), URLs in every message redacted."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def fail(exc: BaseException) -> None:
    """Report a user error in one red line (no traceback, URLs redacted) and exit with status 2."""
    typer.secho(f"error: {redact_text(str(exc))}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)
