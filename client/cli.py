"""Hospital-site commands (`oncofed validate`, ...)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)


def validate(
    schema: Path = typer.Option(..., "--schema", help="the consortium's schema JSON"),
    data: Path = typer.Option(..., "--data", help="the site directory: labels.csv and one table per modality"),
    min_count: int = typer.Option(5, "--min-count", min=1,
                                  help="smallest class size the site may train on and report"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON (for programs)"),
) -> None:
    """Check a site's data against the schema: every problem at once, or a summary.

    Exit code 0: ready to train (warnings allowed); 1: data problems; 2: the schema file is unusable.
    """
    from shared_models.schema import FeatureSchema, SchemaError
    from shared_models.validation import validate_site

    try:
        feature_schema = FeatureSchema.load(schema)
    except (SchemaError, UnicodeDecodeError) as e:  # load lets a non-UTF-8 file through as UnicodeDecodeError
        message = str(e) if isinstance(e, SchemaError) else f"{schema}: not a text (UTF-8) JSON file"
        typer.echo(f"{message}\nfix: pass the consortium's schema JSON file", err=True)
        raise typer.Exit(code=2)
    report = validate_site(feature_schema, data, min_count=min_count)
    typer.echo(report.to_json() if as_json else report.format_report())
    raise typer.Exit(code=0 if report.ok else 1)
