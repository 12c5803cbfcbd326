"""Derive a feature schema from a pooled cohort directory laid out like a site.

The cohort directory holds `labels.<ext>` and one table per modality (see `site_data`). Each table
becomes one modality named after its file stem, with its columns as features in file order:

- classes: the sorted distinct labels;
- kind: a table with text columns, with fewer than `OMICS_MIN_FEATURES` columns, or whose columns are
  mostly 0/1 is `tabular`; any other (numeric and wide) table is `omics`; `--tabular`/`--omics` override;
- tabular columns: text -> categorical with sorted levels, only 0/1 values -> binary, else numeric;
- transform: `log1p` for the modalities asked for, `none` otherwise.

Every decision is recorded as a note so that a person can check it before the consortium adopts
the schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shared_models.schema import ColumnType, FeatureSchema, ModalityKind, SchemaError, Transform
from shared_models.site_data import (
    LABELS_STEM,
    MISSING_TOKENS,
    TABLE_SUFFIXES,
    numeric_column,
    read_table,
)

OMICS_MIN_FEATURES = 100  # an all-numeric table narrower than this is tabular (e.g. 41 CNV arms)
DEFAULT_MAX_LEVELS = 32


class InferError(ValueError):
    """Input that a schema cannot be derived from; the message names the file or flag and the fix."""


@dataclass
class InferOptions:
    label_column: str
    name: str | None = None
    id_column: str = "patient"
    modalities: list[str] | None = None  # order and selection; default: every table, sorted by name
    exclude: list[str] = field(default_factory=list)  # "modality:column"
    tabular: list[str] = field(default_factory=list)
    omics: list[str] = field(default_factory=list)
    log1p: list[str] = field(default_factory=list)
    max_levels: int = DEFAULT_MAX_LEVELS
    description: str = ""
    modality_descriptions: dict[str, str] = field(default_factory=dict)


@dataclass
class InferResult:
    schema: FeatureSchema
    notes: dict[str, str]  # modality -> why it got its kind and column types


@dataclass
class _Column:
    type: ColumnType
    levels: list[str] | None = None
    minimum: float = float("nan")  # numeric columns only


def cohort_tables(cohort_dir: Path) -> dict[str, Path]:
    """Table files of a cohort directory by stem (labels included). Raises on a stem found twice."""
    found: dict[str, list[Path]] = {}
    for p in sorted(cohort_dir.iterdir()):
        if not p.is_file():
            continue
        for suffix in TABLE_SUFFIXES:
            if p.name.endswith(suffix) and len(p.name) > len(suffix):
                found.setdefault(p.name[: -len(suffix)], []).append(p)
                break
    twice = {stem: paths for stem, paths in found.items() if len(paths) > 1}
    if twice:
        stem, paths = next(iter(twice.items()))
        raise InferError(f"{cohort_dir}: table {stem!r} is there twice ({', '.join(p.name for p in paths)}); "
                         "keep one file per table")
    return {stem: paths[0] for stem, paths in found.items()}


def infer_schema(cohort_dir: str | Path, options: InferOptions) -> InferResult:
    cohort_dir = Path(cohort_dir)
    if not cohort_dir.is_dir():
        raise InferError(f"{cohort_dir}: cohort directory not found")
    if options.max_levels < 1:
        raise InferError(f"--max-levels must be at least 1 (got {options.max_levels})")
    tables = cohort_tables(cohort_dir)
    if LABELS_STEM not in tables:
        raise InferError(f"{cohort_dir}: no labels table; add labels.csv with the id column "
                         f"{options.id_column!r} and the label column {options.label_column!r}")
    classes = _classes(tables.pop(LABELS_STEM), options)
    if not tables:
        raise InferError(f"{cohort_dir}: no modality tables besides labels; add one table per modality "
                         "(<modality>.csv, .tsv or .parquet, optionally .gz)")
    names = _modality_order(cohort_dir, tables, options)
    excluded = _parse_exclude(options.exclude, names)
    for flag, mods in (("--tabular", options.tabular), ("--omics", options.omics), ("--log1p", options.log1p),
                       ("--describe", list(options.modality_descriptions))):
        _check_modalities(flag, mods, names)
    both = sorted(set(options.tabular) & set(options.omics))
    if both:
        raise InferError(f"modality {both[0]!r} is given to both --tabular and --omics; choose one")

    modalities, notes = [], {}
    for name in names:
        path = tables[name]
        df = read_table(path, options.id_column)
        missing_cols = [c for c in excluded.get(name, []) if c not in df.columns]
        if missing_cols:
            raise InferError(f"--exclude {name}:{missing_cols[0]}: {path.name} has no column {missing_cols[0]!r} "
                             f"(columns start {list(df.columns)[:5]})")
        df = df.drop(columns=excluded.get(name, []))
        if df.shape[1] == 0:
            raise InferError(f"{path.name}: no feature columns left after --exclude; drop the modality with "
                             "--modalities instead")
        columns = _describe_columns(path, df, options.max_levels)
        kind, why = _kind(name, path, columns, options)
        transform = Transform.log1p if name in options.log1p else Transform.none
        if transform is Transform.log1p:
            _check_log1p(path, columns)
        modality = {"name": name, "kind": kind.value, "features": list(df.columns), "transform": transform.value,
                    "description": options.modality_descriptions.get(name, "")}
        if kind is ModalityKind.tabular:
            modality["column_types"] = {c: col.type.value for c, col in columns.items()
                                        if col.type is not ColumnType.numeric}
            modality["levels"] = {c: col.levels for c, col in columns.items() if col.type is ColumnType.categorical}
        counts = {t: sum(col.type is t for col in columns.values()) for t in ColumnType}
        mixed = kind is ModalityKind.tabular and counts[ColumnType.numeric] < len(columns)
        detail = ", ".join(f"{n} {t.value}" for t, n in counts.items() if n) if mixed else ""
        notes[name] = why + (f"; {detail}" if detail else "")
        if excluded.get(name):
            notes[name] += f"; excluded {', '.join(excluded[name])}"
        modalities.append(modality)

    raw = {"name": options.name or cohort_dir.resolve().name, "id_column": options.id_column,
           "label_column": options.label_column, "classes": classes, "modalities": modalities,
           "description": options.description}
    try:
        schema = FeatureSchema.from_dict(raw, source=f"schema inferred from {cohort_dir}")
    except SchemaError as e:
        raise InferError(str(e)) from None
    return InferResult(schema=schema, notes=notes)


def _classes(labels_path: Path, options: InferOptions) -> list[str]:
    df = read_table(labels_path, options.id_column, (options.label_column,))  # class "01" stays "01"
    if options.label_column not in df.columns:
        raise InferError(f"{labels_path}: no label column {options.label_column!r} (columns: "
                         f"{list(df.columns)[:10]}); pass the right --label")
    labels = df[options.label_column].astype("string").str.strip()
    missing = labels.isna() | (labels == "")
    if missing.any():
        first = list(labels.index[missing][:3])
        raise InferError(f"{labels_path}: {int(missing.sum())} patient(s) have no {options.label_column!r} "
                         f"(e.g. {first}); drop their rows or fill in their label")
    dup = df.index.duplicated()
    if dup.any():
        raise InferError(f"{labels_path}: patient id {df.index[dup][0]!r} is listed more than once; "
                         "keep one row per patient")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise InferError(f"{labels_path}: column {options.label_column!r} has only the class {classes}; "
                         "a classifier needs at least two classes")
    return classes


def _modality_order(cohort_dir: Path, tables: dict[str, Path], options: InferOptions) -> list[str]:
    if options.modalities is None:
        return sorted(tables)
    names = list(options.modalities)
    unknown = [n for n in names if n not in tables]
    if unknown:
        raise InferError(f"--modalities: {cohort_dir} has no table {unknown[0]!r}; its tables are {sorted(tables)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InferError(f"--modalities: {dupes[0]!r} is listed twice; list each modality once")
    if not names:
        raise InferError("--modalities: list at least one modality")
    return names


def _parse_exclude(items: list[str], names: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        mod, sep, col = item.partition(":")
        if not sep or not mod or not col:
            raise InferError(f"--exclude {item!r}: write it as MODALITY:COLUMN, e.g. --exclude clinical:gender")
        if mod not in names:
            raise InferError(f"--exclude {item!r}: no modality {mod!r}; the modalities are {names}")
        out.setdefault(mod, []).append(col)
    return out


def _check_modalities(flag: str, mods: list[str], names: list[str]) -> None:
    unknown = [m for m in mods if m not in names]
    if unknown:
        raise InferError(f"{flag} {unknown[0]}: no modality {unknown[0]!r}; the modalities are {names}")


def _describe_columns(path: Path, df: pd.DataFrame, max_levels: int) -> dict[str, _Column]:
    columns: dict[str, _Column] = {}
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])]
    if numeric:  # vectorised: omics tables have thousands of columns
        vals = df[numeric].to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
        vals[~np.isfinite(vals)] = np.nan
        observed = ~np.isnan(vals)
        empty = ~observed.any(axis=0)
        if empty.any():
            _no_values(path, numeric[int(np.argmax(empty))])
        is_binary = np.all(~observed | (vals == 0) | (vals == 1), axis=0)
        minimum = np.nanmin(vals, axis=0)
        for j, c in enumerate(numeric):
            columns[c] = _Column(ColumnType.binary if is_binary[j] else ColumnType.numeric, minimum=float(minimum[j]))
    for c in df.columns:
        if c in columns:
            continue
        nums, bad = numeric_column(df[c])
        if len(bad) == 0:  # text cells that are all numbers or missing tokens
            if np.isnan(nums).all():
                _no_values(path, c)
            observed = nums[~np.isnan(nums)]
            binary = bool(np.isin(observed, (0.0, 1.0)).all())
            columns[c] = _Column(ColumnType.binary if binary else ColumnType.numeric, minimum=float(observed.min()))
            continue
        text = df[c].astype("string").str.strip()
        text = text[~(text.isna() | text.isin(MISSING_TOKENS))]
        levels = sorted(set(text))
        if len(levels) > max_levels:
            share_numbers = 1 - len(bad) / max(len(text), 1)
            hint = (f"it is mostly numbers with text cells such as {sorted(set(bad))[:3]}: clean those cells"
                    if share_numbers > 0.5 else "it looks like free text or an id")
            raise InferError(f"{path.name}: column {c!r} has {len(levels)} distinct text values, more than "
                             f"--max-levels {max_levels}; {hint}, or leave it out with --exclude "
                             f"{path.name.split('.')[0]}:{c}, or raise --max-levels")
        columns[c] = _Column(ColumnType.categorical, levels=levels)
    return {c: columns[c] for c in df.columns}


def _no_values(path: Path, column: str) -> None:
    raise InferError(f"{path.name}: column {column!r} has no values at all; leave it out with --exclude "
                     f"{path.name.split('.')[0]}:{column}")


def _kind(name: str, path: Path, columns: dict[str, _Column], options: InferOptions) -> tuple[ModalityKind, str]:
    text = [c for c, col in columns.items() if col.type is ColumnType.categorical]
    n_binary = sum(col.type is ColumnType.binary for col in columns.values())
    if name in options.omics:
        if text:
            raise InferError(f"--omics {name}: {path.name} has text column {text[0]!r}, and omics features are "
                             f"numeric; use --tabular {name} or leave the column out with --exclude {name}:{text[0]}")
        return ModalityKind.omics, "omics (--omics)"
    if name in options.tabular:
        return ModalityKind.tabular, "tabular (--tabular)"
    if text:
        return ModalityKind.tabular, f"tabular: text column {text[0]!r}"
    if len(columns) < OMICS_MIN_FEATURES:
        return ModalityKind.tabular, f"tabular: {len(columns)} numeric columns (< {OMICS_MIN_FEATURES})"
    if 2 * n_binary >= len(columns):
        return ModalityKind.tabular, f"tabular: {n_binary} of {len(columns)} columns are 0/1"
    return ModalityKind.omics, f"omics: {len(columns)} numeric columns"


def _check_log1p(path: Path, columns: dict[str, _Column]) -> None:
    for c, col in columns.items():
        if col.type is ColumnType.numeric and not col.minimum > -1:
            raise InferError(f"--log1p {path.name.split('.')[0]}: column {c!r} in {path.name} has the value "
                             f"{col.minimum:g}, and log1p needs values above -1; drop --log1p for this modality")
