"""What every command shares: one-line errors and the --config option."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file")]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on one line and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def refusals_text(entry: Mapping[str, Any]) -> str:
    """A leaderboard entry's refusals and flagged uploads, by reason: ``harmful 2, flagged low_gain 1``."""
    parts = [f"{k} {n}" for k, n in sorted(entry["refusals"].items())]
    parts += [f"flagged {k} {n}" for k, n in sorted((entry.get("flagged") or {}).items())]
    return ", ".join(parts)
