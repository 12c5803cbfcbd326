"""Label leakage: a feature whose value is fixed by the class (a recoding of the label) hands the model the answer."""

from __future__ import annotations

import numpy as np
import pandas as pd

from shared_models.schema import Modality
from shared_models.site_data import MISSING_TOKENS
from shared_models.validation.check import Check
from shared_models.validation.messages import names, value_text
from shared_models.validation.report import Problem


def check_leakage(check: Check, m: Modality, present: list[str], values: np.ndarray, texts: dict[int, pd.Series],
                  ids: pd.Index, file: str) -> None:
    """Report every column of the table whose values the labels determine."""
    labels = check.labels
    pos = ids.get_indexer(labels.ids)
    have = pos >= 0
    if have.sum() < 3:
        return
    x = values[pos[have]]
    levels_of = {}
    for j, series in texts.items():  # unreadable columns: compare their text instead of their numbers
        text = series.astype("string").str.strip()
        codes, levels_of[j] = pd.factorize(text.where(~(text.isna() | text.isin(MISSING_TOKENS))))
        x[:, j] = np.where(codes[pos[have]] < 0, np.nan, codes[pos[have]])
    leak, one_to_one, per_class, classes = label_determined(x, labels.codes[have], check.min_count)
    found = []
    for j in np.flatnonzero(leak):
        col = present[j]
        pairs = [f"{check.schema.classes[c]} -> "
                 + (repr(str(levels_of[j][int(v)])) if j in levels_of else value_text(m, col, v))
                 for c, v in zip(classes, per_class[:, j]) if not np.isnan(v)]
        kind = "a one-to-one recoding of" if one_to_one[j] else "determined by"
        found.append(Problem("error", "label_leak", f"the values are {kind} the label "
                             f"{check.schema.label_column!r} ({names(pairs[:6], quote=False, total=len(pairs))}): "
                             "the model would read the answer from this column",
                             "delete this column (if the schema lists it, ask the consortium to remove it); "
                             "a model input must not be derived from the label", file, col))
    check.add_folded(found, "derived from the label")


def label_determined(x: np.ndarray, y: np.ndarray, min_support: int = 5):
    """Columns of x whose value is constant within every class and differs between classes.

    Returns (leak, one_to_one, per-class value (k, p), class codes present). Needs two classes with at least
    two observed patients each, so a class of one patient cannot make every feature look derived; and,
    unless the column recodes three or more such classes one to one, two of its values each held by at
    least `min_support` patients: a rare binary feature present in all 3 patients of a small class and
    absent elsewhere (a CDH1 mutation in a site's few breast cancers) is chance or biology, not a recoding.
    """
    order = np.argsort(y, kind="stable")
    ys, xs = y[order], x[order]
    starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
    classes = ys[starts]
    observed = ~np.isnan(xs)
    count = np.add.reduceat(observed, starts, axis=0)  # (k, p)
    lo, hi = np.fmin.reduceat(xs, starts, axis=0), np.fmax.reduceat(xs, starts, axis=0)
    within = np.all((count == 0) | (lo == hi), axis=0)
    supported_classes = (count >= 2).sum(axis=0)
    per_class = np.where(count > 0, lo, np.nan)
    srt = np.sort(per_class, axis=0)  # NaN last
    n_obs = (count > 0).sum(axis=0)
    with np.errstate(invalid="ignore"):
        steps = (np.diff(srt, axis=0) != 0) & ~np.isnan(srt[1:]) & ~np.isnan(srt[:-1])
    distinct = (n_obs > 0).astype(int) + steps.sum(axis=0)
    leak = within & (supported_classes >= 2) & (distinct >= 2)
    one_to_one = leak & (distinct == n_obs)
    for j in np.flatnonzero(leak & ~(one_to_one & (supported_classes >= 3))):
        held = {}  # value -> patients with it
        for c in np.flatnonzero(count[:, j] > 0):
            held[per_class[c, j]] = held.get(per_class[c, j], 0) + int(count[c, j])
        leak[j] = sum(n >= min_support for n in held.values()) >= 2
    return leak, leak & one_to_one, per_class, classes
