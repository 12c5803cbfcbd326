"""What the report computes beyond the tables of load.py: which cells it shows in detail, and subgroup fairness
(per-group accuracy and macro-F1, demographic-parity and equalized-odds gaps) on their held-out patients."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from simulations.report.labels import privacy_label
from simulations.report.load import Results, held_out

AGE_BANDS = ("<40", "40-49", "50-59", "60-69", ">=70")
MIN_GROUP = 10  # smaller subgroups are listed but kept out of the fairness gaps: their rates are mostly noise


@dataclass
class Featured:
    """A cell shown in detail (ROC, confusion, 2-D map, modalities, subgroups)."""

    data: str
    kind: str  # "federated, no DP" | "federated, DP" | "pooled"
    cell: str
    title: str
    final: pd.Series


def select_featured(res: Results) -> dict[str, list[Featured]]:
    """Per data set: best federated cell without DP, best with DP, and the best pooled cell that has predictions.

    "Best" is the final held-out macro-F1 of a single cell (one seed), so the shown plots are real runs, not averages.
    """
    out: dict[str, list[Featured]] = {}
    for data, f in res.final.groupby("data", sort=False):
        chosen = []
        fed = f[f.method == "federated"].sort_values("macro_f1", ascending=False, kind="stable")
        for kind, part in (("federated, no DP", fed[fed.privacy == "off"]),
                           ("federated, DP", fed[fed.privacy != "off"])):
            if len(part):
                r = part.iloc[0]
                title = f"{data} · {r.line}, {privacy_label(r.privacy)}, seed {r.seed}"
                chosen.append(Featured(data, kind, r.cell, title, r))
        pooled = f[f.method == "pooled"].sort_values("macro_f1", ascending=False, kind="stable")
        for r in pooled.itertuples():
            if res.cell_file(r.cell, "predictions.npz").is_file():
                title = f"{data} · pooled, {privacy_label(r.privacy)}, seed {r.seed}"
                chosen.append(Featured(data, "pooled", r.cell, title, pooled.loc[r.Index]))
                break
        out[data] = chosen
    return out


# ----------------------------------------------------------------------------------------------- fairness


def age_band(age: np.ndarray) -> np.ndarray:
    """Age at diagnosis -> "<40", "40-49", "50-59", "60-69", ">=70", or "unknown" (NaN)."""
    age = np.asarray(age, dtype=float)
    idx = np.clip(np.floor((age - 30) / 10), 0, 4)  # NaN stays NaN and is masked below
    out = np.array(["unknown"] * len(age), dtype=object)
    ok = ~np.isnan(age)
    out[ok] = np.array(AGE_BANDS, dtype=object)[idx[ok].astype(int)]
    return out


def subgroup_table(y: Sequence, pred: Sequence, group: Sequence, min_patients: int = MIN_GROUP,
                   order: Sequence[str] | None = None) -> pd.DataFrame:
    """Per group: patients, accuracy, macro-F1 (over the classes in the group's y or pred), and whether it is large
    enough (>= min_patients) to enter the fairness gaps."""
    from sklearn.metrics import f1_score

    y, pred, group = np.asarray(y), np.asarray(pred), np.asarray(group, dtype=object)
    groups = [g for g in (order or []) if (group == g).any()] + [g for g in pd.unique(group) if g not in (order or [])]
    rows = []
    for g in groups:
        m = group == g
        rows.append({"group": g, "patients": int(m.sum()), "accuracy": float(np.mean(y[m] == pred[m])),
                     "macro_f1": float(f1_score(y[m], pred[m], average="macro", zero_division=0)),
                     "in_gaps": bool(m.sum() >= min_patients)})
    return pd.DataFrame(rows, columns=["group", "patients", "accuracy", "macro_f1", "in_gaps"])


def gap_terms(y: Sequence, pred: Sequence, group: Sequence, kind: str,
              min_patients: int = MIN_GROUP) -> list[tuple[float, object, str]] | None:
    """Every (spread across groups, class, rate) behind a gap, so the report can name the class driving it.

    kind "dp": rate P(pred=c | g); kind "eo": TPR P(pred=c | y=c, g) and FPR P(pred=c | y!=c, g), one-vs-rest. A
    rate counts only if it is defined in every group (TPR: each group has a patient of class c; FPR: each has a
    patient of another class), because a rate over zero patients is undefined, not 0. Only groups with at least
    min_patients take part; None when fewer than two do (no gap to measure). Classes: those in y or pred.
    """
    y, pred, group = np.asarray(y), np.asarray(pred), np.asarray(group, dtype=object)
    values, counts = np.unique(group, return_counts=True)
    groups = [g for g, n in zip(values, counts) if n >= min_patients]
    if len(groups) < 2:
        return None
    terms = []
    for c in np.union1d(y, pred):
        pairs = [(np.ones(len(y), bool), "share predicted")] if kind == "dp" else [(y == c, "TPR"), (y != c, "FPR")]
        for cond, rate in pairs:
            rates = [np.mean(pred[(group == g) & cond] == c) for g in groups if ((group == g) & cond).any()]
            if len(rates) == len(groups):
                terms.append((float(max(rates) - min(rates)), c, rate))
    return terms


def demographic_parity_gap(y: Sequence, pred: Sequence, group: Sequence, min_patients: int = MIN_GROUP) -> float:
    """max over classes c of (max_g P(pred=c | g) - min_g P(pred=c | g)), over groups with >= min_patients.

    y only fixes the class set. NaN with fewer than two such groups."""
    terms = gap_terms(y, pred, group, "dp", min_patients)
    return max(t[0] for t in terms) if terms else math.nan


def equalized_odds_gap(y: Sequence, pred: Sequence, group: Sequence, min_patients: int = MIN_GROUP) -> float:
    """max over classes c (one-vs-rest) of max(TPR gap, FPR gap) across groups with >= min_patients.

    A class contributes its TPR gap only if every group has a patient of that class (FPR: of another class).
    NaN with fewer than two such groups, or when no rate is defined in every group."""
    terms = gap_terms(y, pred, group, "eo", min_patients)
    return max(t[0] for t in terms) if terms else math.nan


def subgroups(p: dict[str, np.ndarray]) -> dict[str, tuple[pd.DataFrame, float, float, str, str]]:
    """Per grouping (age band, gender) present among the held-out rows: table, demographic-parity gap, EO gap, and
    which class and rate drive each gap. Unknown age/gender is listed as "unknown" but never enters the gaps."""
    ho = held_out(p)
    y, pred = p["y"][ho], p["proba"][ho].argmax(1)
    names = [str(c) for c in p["classes"]]
    groupings = []
    if "age" in p and np.isfinite(np.asarray(p["age"], dtype=float)[ho]).any():
        groupings.append(("age at diagnosis", age_band(p["age"][ho]), [*AGE_BANDS, "unknown"]))
    if "gender" in p and (np.char.strip(p["gender"][ho].astype(str)) != "").any():
        g = np.char.strip(p["gender"][ho].astype(str)).astype(object)
        g[g == ""] = "unknown"
        groupings.append(("gender", g, sorted(set(g) - {"unknown"}) + ["unknown"]))
    out = {}
    for name, group, order in groupings:
        table = subgroup_table(y, pred, group, order=order)
        table.loc[table.group == "unknown", "in_gaps"] = False
        known = group != "unknown"
        gaps, drivers = [], []
        for kind in ("dp", "eo"):
            terms = gap_terms(y[known], pred[known], group[known], kind)
            top = max(terms, key=lambda t: t[0]) if terms else None
            gaps.append(top[0] if top else math.nan)
            link = "as" if kind == "dp" else "of"
            drivers.append(f"{top[2]} {link} {names[int(top[1])]}" if top and top[0] > 0 else "")
        out[name] = (table, gaps[0], gaps[1], *drivers)
    return out

