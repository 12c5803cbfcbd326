"""`oncofed schema ...`: commands on the consortium's feature schema."""

from __future__ import annotations

from typing import NoReturn

import typer

schema_app = typer.Typer(help="Create and check the consortium's feature schema.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(schema_app, name="schema")


@schema_app.command("show")
def show(path: str = typer.Argument(..., help="schema JSON file")) -> None:
    """Print a schema's modalities, classes and content hash (what models are checked against, not the file's
    SHA-256); refuses a malformed file."""
    from shared_models.schema import FeatureSchema, SchemaError

    try:
        s = FeatureSchema.load(path)
    except SchemaError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=2)
    typer.echo(f"schema {s.name!r} version {s.version}  content hash {s.content_hash()}")
    typer.echo(f"label column {s.label_column!r}, {s.n_classes} classes: {', '.join(s.classes)}")
    for m in s.modalities:
        typer.echo(f"  {m.name:<14} {m.kind.value:<8} {m.n_features:>6} features  transform={m.transform.value}")


def _split(values: list[str] | None) -> list[str]:
    """Repeated flags and comma-separated lists both work: --log1p a --log1p b == --log1p a,b."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


@schema_app.command("infer")
def infer(
    cohort_dir: str = typer.Argument(..., help="pooled cohort directory (labels + one table per modality)"),
    label: str = typer.Option(..., "--label", help="label column of the labels table"),
    out: str = typer.Option(..., "--out", help="schema JSON file to write"),
    name: str | None = typer.Option(None, "--name", help="schema name (default: the directory's name)"),
    id_column: str = typer.Option("patient", "--id-column", help="patient id column, first in every table"),
    modalities: str | None = typer.Option(
        None, "--modalities", help="comma-separated modalities in schema order (default: every table, sorted)"),
    exclude: list[str] | None = typer.Option(None, "--exclude", help="MODALITY:COLUMN to leave out (repeatable)"),
    tabular: list[str] | None = typer.Option(None, "--tabular", help="make these modalities tabular (repeatable)"),
    omics: list[str] | None = typer.Option(None, "--omics", help="make these modalities omics (repeatable)"),
    log1p: list[str] | None = typer.Option(None, "--log1p", help="log1p-transform these modalities' numeric columns"),
    max_levels: int = typer.Option(32, "--max-levels", help="most distinct values a text column may have"),
    description: str = typer.Option("", "--description", help="schema description"),
    describe: list[str] | None = typer.Option(None, "--describe", help="MODALITY=TEXT description (repeatable)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing schema file"),
) -> None:
    """Derive a schema from a pooled cohort: classes, one modality per table, column types and levels."""
    from pathlib import Path

    from shared_models.infer import InferError, InferOptions, infer_schema
    from shared_models.site_data import TableError

    out_path = Path(out)
    descriptions = {}
    for item in describe or []:
        mod, sep, text = item.partition("=")
        if not sep or not mod.strip():
            fail(f"--describe {item!r}: write it as MODALITY=TEXT, e.g. --describe 'mirna=miRNA expression'")
        descriptions[mod.strip()] = text
    if out_path.exists() and not force:
        fail(f"{out_path} exists; choose another --out or pass --force to overwrite it")
    options = InferOptions(
        label_column=label, name=name, id_column=id_column,
        modalities=_split([modalities]) if modalities is not None else None,
        exclude=_split(exclude), tabular=_split(tabular), omics=_split(omics), log1p=_split(log1p),
        max_levels=max_levels, description=description, modality_descriptions=descriptions,
    )
    try:
        result = infer_schema(cohort_dir, options)
    except (InferError, TableError) as e:
        fail(str(e))
    s = result.schema
    s.save(out_path)
    typer.echo(f"wrote {out_path}: schema {s.name!r}  content hash {s.content_hash()}")
    typer.echo(f"label column {s.label_column!r}, {s.n_classes} classes: {', '.join(s.classes)}")
    for m in s.modalities:
        note = result.notes[m.name]
        typer.echo(f"  {m.name:<14} {m.n_features:>6} features  transform={m.transform.value:<6} {note}")


def fail(message: str) -> NoReturn:
    """An error a person reads (it names the file, the flag or the setting, and the fix) on stderr, then exit 2: no
    traceback for bad input. Every `oncofed schema` and simulation command's."""
    typer.echo(message, err=True)
    raise typer.Exit(code=2)
