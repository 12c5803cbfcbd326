"""`oncofed schema ...`: commands on the consortium's feature schema."""

from __future__ import annotations

import typer

schema_app = typer.Typer(help="Create and check the consortium's feature schema.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(schema_app, name="schema")


@schema_app.command("show")
def show(path: str = typer.Argument(..., help="schema JSON file")) -> None:
    """Print a schema's modalities, classes and content hash (refuses a malformed file)."""
    from shared_models.schema import FeatureSchema, SchemaError

    try:
        s = FeatureSchema.load(path)
    except SchemaError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    typer.echo(f"schema {s.name!r} version {s.version}  hash {s.content_hash()}")
    typer.echo(f"label column {s.label_column!r}, {s.n_classes} classes: {', '.join(s.classes)}")
    for m in s.modalities:
        typer.echo(f"  {m.name:<14} {m.kind.value:<8} {m.n_features:>6} features  transform={m.transform.value}")
