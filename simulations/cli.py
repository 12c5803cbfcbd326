"""Researcher commands: baselines on pooled cohorts (and, later, partitions and experiment grids)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("train-central")(train_central)


def train_central(
    cohort: str = typer.Option("pancan33", help="'pancan33' (vendored with OncoFed) or a cohort directory"),
    epochs: int = typer.Option(30, min=1),
    seed: int = typer.Option(0),
) -> None:
    """Train the shared model centrally on a pooled cohort (the yardstick for federated results)."""
    raise typer.Exit(code=0)
