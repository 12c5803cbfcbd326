"""One modality table: its columns against the schema's features, its patients against the labels, then its cells."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared_models.schema import Modality
from shared_models.validation.cells import check_cells, check_columns
from shared_models.validation.check import Check
from shared_models.validation.hints import id_mismatch_hint, misnamed_pairs, rename_hints
from shared_models.validation.leakage import check_leakage
from shared_models.validation.messages import MAX_NAMES, names, plural
from shared_models.validation.reading import read, unique_rows


@dataclass
class Checked:
    """One modality table after the checks: its cleaned matrix, for the summary."""

    ids: pd.Index
    present: list[str]
    extra: list[str]
    values: np.ndarray  # (rows, present) float64, NaN = missing or unusable


# a prediction table of a modality this wide, mostly of columns that are not its features, is of another kind
FOREIGN_MIN_FEATURES = 20


def check_modality(check: Check, m: Modality, path: Path) -> Checked | None:
    df = read(check, path)
    if df is None:
        return None
    return check_frame(check, m, df, path)


def check_frame(check: Check, m: Modality, df: pd.DataFrame, path: Path) -> Checked | None:
    """Every check of one table; None when no column is usable (reported).

    One function, so that the order of the checks, which is the order of the report, reads top to bottom.
    """
    df = unique_rows(check, df, path, is_labels=False)
    file = path.name
    columns = list(df.columns)
    present = [f for f in m.features if f in df.columns]
    features = set(m.features)
    extra = [c for c in columns if c not in features]
    absent = [f for f in m.features if f not in df.columns]
    renames = rename_hints(absent, extra)
    unknown = extra  # the extra columns no schema feature surely is (the warning's; the summary lists every extra)
    if not present:
        hint = f"rename the columns as in the schema, e.g. {renames}" if renames else \
            f"name the columns as the schema does (e.g. {names(m.features[:3])})"
        found = f"columns start {names(columns[:3])}" if columns else "the table has no column but the ids"
        check.add("error", "no_schema_features", f"none of the schema's {m.n_features:,} {m.name!r} features is a "
                  f"column here ({found})", hint, file)
        return None
    misnamed = misnamed_pairs(absent, extra)
    if misnamed:
        # schema features written differently (case, spaces, punctuation, the same digits; or one affix on many
        # columns): read as they are, training would mask them for every patient and a prediction would score every
        # patient without them, each on less data than the table plainly meant to give. Other near names, which
        # may be other features, stay an extra_columns warning with the rename as a hint.
        listed = names([f"{a!r} -> {b!r}" for a, b in misnamed[:4]], quote=False, total=len(misnamed))
        then = (f", then send the {m.name} table again" if check.for_prediction else
                "; read as they are, training would mask those features for every patient")
        check.add("error", "misnamed_columns", f"columns that are schema features written differently: {listed}",
                  f"rename them as in the schema ({listed}) in {file}{then}", file)
        if check.for_prediction:
            return None
        # training's report goes on with the rest of the table (every problem at once), not repeating these below
        absent = [f for f in absent if f not in {b for _, b in misnamed}]
        unknown = [c for c in extra if c not in {a for a, _ in misnamed}]
        renames = rename_hints(absent, unknown)
    if absent and not check.for_prediction:  # a prediction reports coverage per patient instead
        rename = f"; or rename: {renames}" if renames else ""
        check.add("warning", "absent_features", f"absent: {len(absent):,} of the schema's {m.n_features:,} "
                  f"{m.name!r} features ({len(absent) / m.n_features:.0%}): {names(absent)}; they are masked at "
                  "training", f"nothing, if the site does not measure them{rename}", file)
    if check.for_prediction and m.n_features >= FOREIGN_MIN_FEATURES and len(extra) > len(present):
        # a table of another kind saved under this modality's name: scoring it would be a guess (a modality of a
        # few columns, like clinical fields, comes within wider exports: its other columns are only reported)
        check.add("error", "foreign_columns", f"{len(extra):,} of the {len(columns):,} columns are not "
                  f"{m.name!r} features ({names(extra)}); only {plural(len(present), 'column')} "
                  f"({names(present)}) belong to the modality", f"check that this is the {m.name} table; "
                  f"its columns must be the schema's {m.name!r} features (e.g. {names(m.features[:3])})", file)
        return None
    if unknown:
        fix = "nothing, unless one of them should be a schema feature (then check its spelling)"
        if renames:
            fix += f": {renames}"
        if any(c == "" or c.startswith("Unnamed:") for c in unknown):
            fix += "; an unnamed column is usually a saved row index: export without it (pandas: index=False)"
        check.add("warning", "extra_columns", f"{plural(len(unknown), 'column')} not in the schema, ignored: "
                  f"{names(unknown)}", fix, file)
    if check.labels is not None and len(check.labels.all_ids):
        _check_overlap(check, df.index, file)
    values, unusable, texts = check_cells(check, m, df[present], file)
    if check.for_prediction:  # empty or constant columns are normal in a few patients
        return Checked(df.index, present, extra, values)
    check_columns(check, m, present, values, unusable, file)
    if check.labels is not None and len(check.labels.ids):
        check_leakage(check, m, present, values, texts, df.index, file)
    return Checked(df.index, present, extra, values)


def _check_overlap(check: Check, ids: pd.Index, file: str) -> None:
    """The table's patients against the labels': none in common is an error, some unlabelled a warning."""
    labels = check.labels
    common = ids.intersection(labels.all_ids)
    if len(common) == 0:
        check.add("error", "no_common_patients", f"no patient id in common with {labels.file} "
                  f"(ids here look like {names(list(ids[:2]))}, in {labels.file} like "
                  f"{names(list(labels.all_ids[:2]))})", id_mismatch_hint(ids, labels.all_ids)
                  or "use the same patient ids in every table", file, check.schema.id_column)
    elif len(common) < len(ids):
        stray = ids.difference(labels.all_ids)
        check.add("warning", "unlabelled_rows", f"{plural(len(stray), 'row')} of patients not in "
                  f"{labels.file}, ignored", "nothing, unless they should have labels", file,
                  check.schema.id_column, stray[:MAX_NAMES])
