"""Researcher commands: partitions, synthetic federations, centralized baselines."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass  # sub-commands are added as they land
