"""What every command shares: one-line errors and the --config option."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file")]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on one line and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
