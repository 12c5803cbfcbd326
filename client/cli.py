"""Hospital-site commands (`oncofed validate`, ...)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass  # sub-commands are added by their modules below as they land
