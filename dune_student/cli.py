"""``dune-student``: train a student from cached teacher features (stage 2; see README)."""
from __future__ import annotations

import typer

from . import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
def version() -> None:
    """Print the package version."""
    typer.echo(__version__)
