"""The labels table: every patient's class, read as training reads it; small classes are noted, never counted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared_models.site_data import MISSING_TOKENS
from shared_models.validation.cells import decode_bytes
from shared_models.validation.check import MAX_PER_CHECK, Check
from shared_models.validation.hints import closest
from shared_models.validation.messages import MAX_NAMES, names, plural
from shared_models.validation.reading import read, unique_rows
from shared_models.validation.report import Problem


@dataclass
class Labels:
    file: str  # the labels table's name, for messages about other tables
    all_ids: pd.Index  # every id in the labels table
    ids: pd.Index  # unique ids with a label in the schema's classes
    codes: np.ndarray  # class index per id in `ids`


def check_labels(check: Check, path: Path) -> Labels | None:
    """The labelled patients, or None when the table cannot be read (reported)."""
    df = read(check, path, (check.schema.label_column,))  # as text: class '01' is not the number 1
    if df is None:
        return None
    df = unique_rows(check, df, path, is_labels=True)
    col, classes = check.schema.label_column, check.schema.classes
    if col not in df.columns:
        close = closest(col, list(df.columns))
        check.add("error", "no_label_column", f"no label column {col!r} (columns: {names(list(df.columns))})",
                  f"rename {close!r} to {col!r}" if close else f"add the column {col!r} (the schema's "
                  "label_column) with each patient's class", path.name, col)
        return Labels(path.name, df.index, pd.Index([]), np.zeros(0, np.int64))
    raw = df[col]
    if raw.dtype == object:
        block, undecodable = decode_bytes(raw.to_numpy(dtype=object)[:, None])
        if undecodable:
            check.add("error", "not_utf8", "labels that are not valid UTF-8 text", "save the file with UTF-8 "
                      "encoding", path.name, col)
        raw = pd.Series(block[:, 0], index=raw.index, dtype=object)
    labels = raw.astype("string").str.strip()  # as read_site reads them
    known = labels.isin(classes).fillna(False).to_numpy(bool)
    missing = (labels.isna() | labels.isin(MISSING_TOKENS)).fillna(True).to_numpy(bool) & ~known
    if missing.any():
        ids = df.index[missing]
        check.add("error", "missing_label", f"{plural(len(ids), 'patient')} without a label",
                  f"fill in their class ({', '.join(classes)}) or delete their rows", path.name, col,
                  ids[:MAX_NAMES])
    outside = ~known & ~missing
    found = []
    for value, ids in df.index[outside].groupby(labels[outside].to_numpy()).items():
        close = closest(str(value), classes)
        hint = f"did you mean {close!r}? " if close else ""
        found.append(Problem("error", "unknown_label", f"label {value!r} ({plural(len(ids), 'patient')}) is "
                             "not a class of the schema", f"{hint}use one of the schema's classes "
                             f"({', '.join(classes)}) or delete these patients' rows", path.name, col,
                             tuple(ids[:MAX_NAMES])))
    check.problems += found[:MAX_PER_CHECK]
    if len(found) > MAX_PER_CHECK:
        check.add("error", "unknown_label", f"{plural(len(found) - MAX_PER_CHECK, 'more label')} outside the "
                  "schema's classes", found[0].fix, path.name, col)
    lookup = {c: i for i, c in enumerate(classes)}
    valid = labels[known]
    result = Labels(path.name, df.index, valid.index, valid.map(lookup).to_numpy(np.int64))
    counts = np.bincount(result.codes, minlength=len(classes))
    small = [c for c, n in zip(classes, counts) if 0 < n < check.min_count]
    for c in small:
        # A warning, not an error: a hospital's few patients of a rare cancer still train (DP-SGD
        # protects each record); what the minimum forbids is reporting their count. No count and no
        # ids appear here, and the summary suppresses them.
        check.add("warning", "small_class", f"class {c!r} has fewer than {check.min_count} patients at this site; "
                  "they train, but their count is never reported outside the site",
                  "nothing to do; to drop them instead, remove their rows from "
                  f"{path.name}", path.name, col)
    return result
