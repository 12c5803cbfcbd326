"""Cells and columns of a modality table, converted as training converts them.

Each check runs on the whole matrix at once (one pass over all cells), so a site with 12,000 features is
checked in about the time it takes to read it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from shared_models.schema import ColumnType, Modality, Transform
from shared_models.site_data import categorical_codes, numeric_column
from shared_models.validation.check import Check
from shared_models.validation.hints import closest, number_fix
from shared_models.validation.messages import MAX_EXAMPLES, MAX_NAMES, examples, names, plural, value_text
from shared_models.validation.report import Problem

FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_cells(check: Check, m: Modality, df: pd.DataFrame, file: str):
    """Convert every cell as training does; report non-numbers, infinities, values the type forbids.

    Returns the (rows, features) matrix with NaN for missing or unusable cells, a mask of columns
    whose cells could not be read (already reported), and their text for the leakage check.
    """
    cols = list(df.columns)
    values = np.full((len(df), len(cols)), np.nan)
    unusable = np.zeros(len(cols), bool)
    texts: dict[int, pd.Series] = {}
    kind = {c: m.column_type(c) for c in cols}
    _numbers(check, df, kind, values, unusable, texts, file)
    _levels(check, m, df, kind, values, unusable, texts, file)
    _ranges(check, m, kind, cols, values, df.index, file)
    values[~np.isfinite(values)] = np.nan
    return values, unusable, texts


def _numbers(check: Check, df: pd.DataFrame, kind: dict, values: np.ndarray, unusable: np.ndarray,
             texts: dict[int, pd.Series], file: str) -> None:
    """Numeric and binary columns into `values`; cells that are not numbers (or not UTF-8) reported."""
    n, cols, ids = len(df), list(df.columns), df.index
    num = [j for j, c in enumerate(cols) if kind[c] is not ColumnType.categorical]
    is_num_dtype = np.array([pd.api.types.is_numeric_dtype(t) for t in df.dtypes])
    direct = [j for j in num if is_num_dtype[j]]
    if direct:
        values[:, direct] = df.iloc[:, direct].to_numpy(dtype=np.float64, na_value=np.nan)
    text_cols = [j for j in num if not is_num_dtype[j]]
    bad_found, undecodable = [], []
    if text_cols:
        block = df.iloc[:, text_cols].to_numpy(dtype=object)
        block, undecodable_cols = decode_bytes(block)
        for k in undecodable_cols:
            undecodable.append(cols[text_cols[k]])
        # One vectorised pass over every text cell, with the rules training uses.
        nums, bad = numeric_column(pd.Series(block.ravel(order="F"), dtype=object))
        values[:, text_cols] = nums.reshape((n, len(text_cols)), order="F")
        if len(bad):
            pos = bad.index.to_numpy()
            col_k, row = pos // max(n, 1), pos % max(n, 1)
            cells = bad.to_numpy(dtype=object)
            for k in np.unique(col_k):
                j = text_cols[k]
                sel = col_k == k
                unusable[j] = True
                texts[j] = pd.Series(block[:, k])
                shown = list(zip(cells[sel][:MAX_EXAMPLES], ids[row[sel][:MAX_EXAMPLES]]))
                bad_found.append(Problem(
                    "error", "non_numeric", f"{plural(int(sel.sum()), 'cell')} not a number: "
                    f"{examples(shown)}", number_fix(shown), file, cols[j],
                    tuple(ids[row[sel][:MAX_NAMES]])))
    for c in undecodable:
        check.add("error", "not_utf8", "cells are not valid UTF-8 text", "save the file with UTF-8 encoding",
                  file, c)
    check.add_folded(bad_found, "with cells that are not numbers")


def _levels(check: Check, m: Modality, df: pd.DataFrame, kind: dict, values: np.ndarray, unusable: np.ndarray,
            texts: dict[int, pd.Series], file: str) -> None:
    """Categorical columns into level codes in `values`; cells outside the schema's levels reported."""
    for j, c in enumerate(df.columns):
        if kind[c] is ColumnType.categorical:
            col = df[c]
            if col.dtype == object:
                block, bad_cols = decode_bytes(col.to_numpy(dtype=object)[:, None])
                col = pd.Series(block[:, 0], index=col.index, dtype=object)
                if bad_cols:
                    check.add("error", "not_utf8", "cells are not valid UTF-8 text",
                              "save the file with UTF-8 encoding", file, c)
            codes, bad = categorical_codes(col, m.levels[c])
            values[:, j] = codes
            if len(bad):
                unusable[j] = True
                texts[j] = col.reset_index(drop=True)
                levels = m.levels[c]
                shown = list(zip(bad.to_numpy(dtype=object)[:MAX_EXAMPLES], bad.index[:MAX_EXAMPLES]))
                near = {v: closest(str(v), levels) for v in pd.unique(bad.to_numpy(dtype=object))[:MAX_EXAMPLES]}
                means = ", ".join(f"{n!r} for {v!r}" for v, n in near.items() if n)
                check.add("error", "unknown_level", f"{plural(len(bad), 'cell')} not a level of the schema: "
                          f"{examples(shown)}", (f"did you mean {means}? " if means else "") +
                          f"use one of {names(levels, limit=12)}, leave unknown cells empty, or ask the "
                          "consortium to add the level to the schema", file, c, tuple(bad.index[:MAX_NAMES]))


def _ranges(check: Check, m: Modality, kind: dict, cols: list, values: np.ndarray, ids: pd.Index,
            file: str) -> None:
    """Numbers the model cannot take: beyond float32, not 0/1 in a binary column, outside log1p's domain."""
    finite_problems = {"infinite": [], "not_binary": [], "log1p_domain": [], "negative_counts": []}
    with np.errstate(invalid="ignore"):
        inf = np.abs(values) > FLOAT32_MAX  # the model reads float32: 1e300 would become infinite
        binary = np.array([kind[c] is ColumnType.binary for c in cols])
        not01 = np.isfinite(values) & (values != 0) & (values != 1) & binary
        counts_t = np.array([kind[c] is ColumnType.numeric for c in cols]) & (m.transform is Transform.log1p)
        low = np.isfinite(values) & (values <= -1) & counts_t
        # in (-1, 0): inside log1p's domain, so trainable, but no count: most likely values already transformed
        negative = np.isfinite(values) & (values < 0) & (values > -1) & counts_t
    for mask, code in ((inf, "infinite"), (not01, "not_binary"), (low, "log1p_domain"), (negative, "negative_counts")):
        for j in np.flatnonzero(mask.any(axis=0)):
            rows = np.flatnonzero(mask[:, j])
            shown = [(values[r, j], ids[r]) for r in rows[:MAX_EXAMPLES]]
            message, fix = {
                "infinite": (f"{plural(len(rows), 'cell')} infinite or beyond float32 (+-3.4e38): "
                             f"{examples(shown)}",
                             "infinities come from log(0) or a division by zero upstream: write the finite "
                             "value, or leave the cell empty (missing)"),
                "not_binary": (f"{plural(len(rows), 'cell')} neither 0 nor 1 in a binary column: "
                               f"{examples(shown)}",
                               "code it 1 = present, 0 = absent; leave unknown cells empty"),
                "log1p_domain": (f"the schema applies log1p to {m.name!r}, which needs values > -1; "
                                 f"{plural(len(rows), 'cell')} <= -1: {examples(shown)}",
                                 "give the untransformed values the schema expects (e.g. counts, not their "
                                 "logarithm); training would treat these cells as missing"),
                "negative_counts": (f"the schema applies log1p to {m.name!r}, whose values are counts (>= 0); "
                                    f"{plural(len(rows), 'cell')} negative: {examples(shown)}",
                                    "give the untransformed counts the schema expects: negative values look already "
                                    "transformed (a logarithm or a z-score), and are read as counts near 0"),
            }[code]
            finite_problems[code].append(Problem("warning" if code == "negative_counts" else "error", code, message,
                                                 fix, file, cols[j], tuple(ids[rows[:MAX_NAMES]])))
    for code, what in (("infinite", "with infinite cells"), ("not_binary", "with values other than 0 and 1"),
                       ("log1p_domain", "with values <= -1"), ("negative_counts", "with negative counts")):
        check.add_folded(finite_problems[code], what)


def check_columns(check: Check, m: Modality, present: list[str], values: np.ndarray, unusable: np.ndarray,
                  file: str) -> None:
    """Columns as a whole: one with no value is an error, one with a single value a warning."""
    observed = (~np.isnan(values)).sum(axis=0)
    all_missing = (observed == 0) & ~unusable
    if all_missing.any():
        found = [present[j] for j in np.flatnonzero(all_missing)]
        check.add("error", "all_missing", f"{plural(len(found), 'column')} with no value in any row: "
                  f"{names(found)}",
                  "fill them in, or delete these columns: a feature the site lacks must be absent, not empty "
                  "(it is then masked at training)", file, found[0] if len(found) == 1 else None)
    if len(values) == 0:
        return
    lo, hi = np.fmin.reduce(values, axis=0), np.fmax.reduce(values, axis=0)
    constant = (observed > 0) & (lo == hi) & ~unusable
    if constant.any():
        # A warning: a breast-cancer site is all female, a small site may see no case of a rare mutation.
        # The column is true and harmless (it standardises to 0); an export bug is what the warning catches.
        js = np.flatnonzero(constant)
        shown = [f"{present[j]} (always {value_text(m, present[j], lo[j])})" for j in js[:MAX_NAMES]]
        check.add("warning", "constant", f"{plural(len(js), 'feature')} with the same value in every patient: "
                  f"{names(shown, quote=False, total=len(js))}; no information at this site",
                  "nothing, if that is true of your patients; if not, check the export", file,
                  present[js[0]] if len(js) == 1 else None)


def decode_bytes(block: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Bytes cells (pyarrow's reading of text that is not UTF-8) as replacement-decoded text."""
    cols = []
    for k in range(block.shape[1]):
        if pd.api.types.infer_dtype(block[:, k], skipna=True) in ("bytes", "mixed"):
            is_bytes = np.array([isinstance(v, bytes) for v in block[:, k]])
            if is_bytes.any():
                block = block.copy() if not cols else block
                block[is_bytes, k] = [v.decode("utf-8", "replace") for v in block[is_bytes, k]]
                cols.append(k)
    return block, cols
