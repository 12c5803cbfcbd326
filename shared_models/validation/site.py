"""`validate_site`: every file of a site directory, in the order the report lists them."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from shared_models.limits import MIN_COUNT
from shared_models.schema import FeatureSchema
from shared_models.site_data import LABELS_STEM
from shared_models.validation.check import Check
from shared_models.validation.inventory import inventory
from shared_models.validation.labels import check_labels
from shared_models.validation.messages import MAX_NAMES, names, plural
from shared_models.validation.report import ModalitySummary, Problem, SiteSummary, ValidationReport
from shared_models.validation.summary import modality_summary, site_summary
from shared_models.validation.tables import check_modality


def validate_site(schema: FeatureSchema, site_dir: str | Path, min_count: int = MIN_COUNT) -> ValidationReport:
    """Check every file of a site directory against the schema. Never raises for bad input."""
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    start = time.perf_counter()
    check = Check(schema, min_count)
    summary = _check_site(check, Path(site_dir))
    return ValidationReport(problems=check.problems, summary=summary, seconds=time.perf_counter() - start)


def _check_site(check: Check, site_dir: Path) -> SiteSummary:
    """The directory, the labels, each modality's table, then the patients no table covers."""
    schema = check.schema
    empty = site_summary(check, site_dir, [ModalitySummary(m.name, None, m.n_features, list(m.features), [], 0,
                                                           None, None) for m in schema.modalities], None)
    if not site_dir.is_dir():
        what = "is a file, not a directory" if site_dir.exists() else "does not exist"
        check.add("error", "no_site_dir", f"{site_dir} {what}",
                  "pass the site directory that holds labels.csv and one table per modality")
        return empty
    try:
        paths = inventory(check, site_dir)
    except OSError as e:
        check.add("error", "unreadable", f"cannot list the directory ({e.strerror})",
                  "check the path and that you may read it")
        return empty
    if LABELS_STEM in paths:
        check.labels = check.guarded(paths[LABELS_STEM], lambda p: check_labels(check, p))
    else:
        check.add("error", "no_labels", "no labels table",
                  f"add labels.csv (or .tsv, .txt, .parquet, optionally gzipped) with the columns "
                  f"{schema.id_column!r} and {schema.label_column!r}")
    summaries, checked = [], {}
    for m in schema.modalities:
        path = paths.get(m.name)
        result = check.guarded(path, lambda p, m=m: check_modality(check, m, p)) if path else None
        if result is not None:
            checked[m.name] = result
        summaries.append(modality_summary(check, m, path, result))
    if not any(p for name, p in paths.items() if name != LABELS_STEM):
        check.add("error", "no_modality", "the site has no table for any modality of the schema: nothing to "
                  "train on", f"add at least one of {names([m + '.csv' for m in schema.modality_names])}")
    elif check.labels is not None and checked:
        covered = pd.Index([]).append([c.ids for c in checked.values()])
        orphans = check.labels.ids.difference(covered)
        if len(orphans):
            check.add("warning", "no_data", f"{plural(len(orphans), 'labelled patient')} with no row in any "
                      "modality table: unusable for training", "add their data, or ignore this if they have "
                      "none", check.labels.file, rows=orphans[:MAX_NAMES])
    _another_schema(check, paths, checked)
    return site_summary(check, site_dir, summaries, check.labels)


# the problems whose fix is a guess at making the data fit the schema (a rename, a near level, a table name):
# harmful when the schema itself is the wrong one
GUESSED_FIXES = frozenset({"no_label_column", "no_schema_features", "unknown_level", "unknown_label", "unrelated_file", "absent_features",
                           "extra_columns", "misnamed_table", "misnamed_columns"})


def _another_schema(check: Check, paths: dict, checked: dict) -> None:
    """No label column and few of the schema's features by name in the tables present: the data is most likely of
    another schema (another consortium's, or a schema file not this consortium's). Said first, and the renames and
    near levels the other problems suggest (male -> 'female', 411 column renames) are withheld: followed, they
    would make one cohort's tables pass as another's."""
    if not any(p.code == "no_label_column" for p in check.problems):
        return
    schema = check.schema
    offered = sum(m.n_features for m in schema.modalities if m.name in paths)
    found = sum(len(c.present) for c in checked.values())
    if not offered or found >= 0.1 * offered:
        return
    foreign = sorted(p.file for p in check.problems if p.code == "unrelated_file")
    withheld = "see the first error (this data is likely of another schema) before changing anything here"
    check.problems[:] = [Problem("error", "another_schema", f"the tables match little of schema {schema.name!r}: "
                                 f"labels.csv has no {schema.label_column!r} column, {found:,} of the "
                                 f"{offered:,} features of the modalities present are columns here"
                                 + (f", and {plural(len(foreign), 'table')} the schema does not know "
                                    f"({names(foreign)})" if foreign else ""),
                                 "check --schema: it must be your consortium's (the trust/schema.json of your site "
                                 "directory, from `oncofed site init`); if it is, this data was exported for another "
                                 "schema: export it in this one's columns and classes (docs/site-data.md). The "
                                 "other problems' renames are withheld: they would only make the tables look like "
                                 "this schema")
                         ] + [replace(p, fix=withheld) if p.code in GUESSED_FIXES else p for p in check.problems]
