"""Reading an `oncofed experiment` results directory: results.json's rows into a tidy frame, the tables derived from
them once (the final numbers of each cell, each configuration over seeds), and the cell files read on demand.

Reads only what the runner writes (results.json rows, cells/<id>/final.json and predictions.npz; see the
results-directory contract), never a model, and never unpickles. A results directory the report cannot use is a
ReportError naming the file and the fix; a cell file that is missing or unreadable is (None, why), so the report
says why in place of the plot.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shared_models.protocol import SCORES
from simulations.report.labels import budget_key

METRICS = SCORES
REQUIRED = ("cell", "data", "method", "round", "site", *METRICS)
TEXT = ("experiment", "cell", "data", "partition", "sites", "strategy", "privacy", "seed", "method", "site")
NUMBER = ("round", "patients", "epsilon_spent", "epsilon_target", "seconds", *METRICS)
ARM = ["data", "method", "partition", "sites", "strategy", "privacy", "line"]  # a configuration: cells differ by seed
METHOD_ORDER = {"pooled": 0, "pooled-cv": 1, "logistic": 2, "local": 3, "local-logistic": 4, "federated": 5}
NOT_A_SITE = ("held-out", "global", "mean")
FIX = "re-run `oncofed experiment CONFIG.toml`"
NPZ_CORE = ("classes", "y", "proba", "split")


class ReportError(Exception):
    """A results directory the report cannot read; the message names the file and the fix."""


@dataclass
class Results:
    """The rows plus the tables derived once (final per cell, per configuration), and cell files read on demand."""

    dir: Path
    experiment: dict
    rows: pd.DataFrame
    final: pd.DataFrame = field(init=False)  # one row per cell: its final held-out metrics
    arms: pd.DataFrame = field(init=False)  # one row per configuration: mean/sd over seeds
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.final = final_table(self.rows)
        self.arms = arm_table(self.final)

    def cell_file(self, cell: str, name: str) -> Path:
        return self.dir / "cells" / cell / name

    def final_json(self, cell: str) -> tuple[dict | None, str]:
        key = ("final", cell)
        if key not in self._cache:
            self._cache[key] = _read_final(self.cell_file(cell, "final.json"))
        return self._cache[key]

    def predictions(self, cell: str) -> tuple[dict[str, np.ndarray] | None, str]:
        key = ("npz", cell)
        if key not in self._cache:
            self._cache[key] = _read_predictions(self.cell_file(cell, "predictions.npz"))
        return self._cache[key]


def load_results(results_dir: Path) -> Results:
    """Read results.json into a tidy frame; anything unusable is a ReportError naming the file and the fix."""
    d = Path(results_dir)
    if not d.is_dir():
        raise ReportError(f"{d} is not a directory: pass the directory `oncofed experiment CONFIG.toml` wrote")
    path = d / "results.json"
    if not path.is_file():
        raise ReportError(f"{path} not found: run `oncofed experiment CONFIG.toml` first "
                          "(or pass the directory it wrote)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path} is not readable JSON ({e}): {FIX}") from e
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ReportError(f'{path} has no "rows" list of objects: {FIX}')
    if not rows:
        raise ReportError(f"{path} has no rows yet (no cell has finished): wait for `oncofed experiment` or {FIX}")
    df = pd.DataFrame(rows)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ReportError(f"{path}: rows lack {', '.join(missing)} (another runner version?): {FIX}")
    for c in TEXT:
        df[c] = [_text(v) for v in df[c]] if c in df.columns else ""
    for c in NUMBER:
        df[c] = pd.to_numeric(df[c], errors="coerce") if c in df.columns else np.nan
    df["privacy"] = [_privacy(v) for v in df["privacy"]]
    df["eps"] = [budget_key(p) for p in df["privacy"]]
    df["line"] = _lines(df)
    experiment = doc.get("experiment") if isinstance(doc.get("experiment"), dict) else {}
    return Results(d, experiment, df)


def _text(v: object) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _privacy(v: str) -> str:
    """'off' or the per-site budget as text ('8', not '8.0'), so cells from JSON numbers and strings group together."""
    if v in ("", "off", "none", "None"):
        return "off"
    try:
        return f"{float(v):g}"
    except ValueError:
        return v


def _lines(df: pd.DataFrame) -> list[str]:
    """Legend label of a configuration: the strategy (or method), plus partition/sites if they vary in the data set."""
    varying = {}
    for data, g in df.groupby("data"):
        varying[data] = [c for c in ("partition", "sites") if g.loc[g.method == "federated", c].nunique() > 1]
    out = []
    for r in df.itertuples():
        base = (r.strategy or "federated") if r.method == "federated" else r.method
        extra = [r.partition if c == "partition" else f"{r.sites} sites" for c in varying[r.data]
                 if getattr(r, c)]
        out.append(" · ".join([base, *extra]))
    return out


def _read_final(path: Path) -> tuple[dict | None, str]:
    if not path.is_file():
        return None, f"{_rel(path)} not found (the cell has not finished, or the runner did not write it)"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{_rel(path)} is not readable JSON ({e}): {FIX}"
    if not isinstance(doc, dict):
        return None, f"{_rel(path)} is not a JSON object: {FIX}"
    return doc, ""


def _read_predictions(path: Path) -> tuple[dict[str, np.ndarray] | None, str]:
    """Load predictions.npz without unpickling anything (a results directory may come from elsewhere).

    Returns (arrays, note): arrays None when the file cannot serve any plot (the note says why), else the readable
    arrays and, if some were stored as pickled object arrays (e.g. a pandas 3 `.to_numpy()` of strings), a note
    naming them and the fix; the plots needing them then say they lack them."""
    if not path.is_file():
        return None, f"{_rel(path)} not found (only cells with a model have one)"
    arrays, pickled = {}, []
    try:
        with np.load(path, allow_pickle=False) as z:
            for k in z.files:
                try:
                    arrays[k] = z[k]
                except ValueError:  # "Object arrays cannot be loaded when allow_pickle=False"
                    pickled.append(k)
    except (OSError, ValueError, EOFError) as e:
        return None, f"{_rel(path)} is not readable ({str(e).splitlines()[0]}): {FIX}"
    note = (f"{_rel(path)} stores {', '.join(pickled)} as pickled object arrays, which the report does not load: "
            f"save them as unicode, e.g. np.asarray(x, dtype=str)" if pickled else "")
    missing = [k for k in NPZ_CORE if k not in arrays]
    if missing:
        return None, note or f"{_rel(path)} lacks {', '.join(missing)}: {FIX}"
    n, c = len(arrays["y"]), len(arrays["classes"])
    bad = [k for k, a in arrays.items() if k not in ("classes", "modalities") and (a.ndim == 0 or len(a) != n)]
    if bad or arrays["proba"].ndim != 2 or arrays["proba"].shape[1] != c:
        return None, (f"{_rel(path)}: arrays disagree in length ({', '.join(bad) or 'proba columns vs classes'}; "
                      f"y has {n} rows, {c} classes): {FIX}")
    arrays["y"] = arrays["y"].astype(np.int64)
    if n and (arrays["y"].min() < 0 or arrays["y"].max() >= c):
        return None, f"{_rel(path)}: y has labels outside 0..{c - 1} (one per entry of classes): {FIX}"
    if not np.isfinite(arrays["proba"]).all():
        return None, f"{_rel(path)}: proba has NaN or infinite values (a diverged model?): {FIX} with a smaller lr"
    arrays["split"] = arrays["split"].astype(str)
    return arrays, note


def _rel(path: Path) -> str:
    parts = path.parts
    return "/".join(parts[-3:]) if "cells" in parts else str(path)


def held_out(p: dict[str, np.ndarray]) -> np.ndarray:
    return p["split"] == "held-out"


# ----------------------------------------------------------------------------------------------- tables


def final_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per cell with its final numbers.

    federated: the held-out row of the last round; pooled/logistic: the held-out row; pooled-cv: the "mean" row
    (cross-validation inside the pool, not held-out); local/local-logistic: the mean over the sites' models, each
    trained alone and evaluated on the held-out patients (grouped by configuration and seed, so it does not matter
    whether the runner writes one local cell per seed or one per site).
    """
    local = rows.method.isin(["local", "local-logistic"])
    unit = rows.cell.where(~local, rows[[*ARM, "seed"]].astype(str).agg("|".join, axis=1))
    out = []
    for _, g in rows.groupby(unit, sort=False):
        method, cell = g.method.iloc[0], g.cell.iloc[0]
        if method == "federated":
            h = g[(g.site == "held-out") & g["round"].notna() & g.macro_f1.notna()]
            if h.empty:
                continue
            r = h.loc[h["round"].idxmax()]
            metrics, patients, last = r[list(METRICS)], r.patients, r["round"]
        elif method in ("local", "local-logistic"):
            metrics, patients, last = g[list(METRICS)].mean(), g.patients.max(), np.nan
        else:
            h = g[g.site == ("mean" if method == "pooled-cv" else "held-out")]
            r = (h if len(h) else g).iloc[-1]
            metrics, patients, last = r[list(METRICS)], r.patients, np.nan
        first = g.iloc[0]
        out.append({**{c: first[c] for c in ARM}, "cell": cell, "seed": first.seed, "eps": first.eps,
                    "round": last, "patients": patients, "epsilon_spent": g.epsilon_spent.max(),
                    **{m: float(metrics[m]) for m in METRICS}})
    return pd.DataFrame(out, columns=[*ARM, "cell", "seed", "eps", "round", "patients", "epsilon_spent", *METRICS])


def arm_table(final: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample sd (n-1) over seeds of each configuration's final numbers."""
    agg = {"seeds": ("seed", "nunique"), "cells": ("cell", "count"), "patients": ("patients", "mean"),
           "eps_spent": ("epsilon_spent", "max"), "eps": ("eps", "first")}
    for m in METRICS:
        agg[f"{m}_mean"], agg[f"{m}_sd"] = (m, "mean"), (m, "std")
    arms = final.groupby(ARM, sort=False).agg(**agg).reset_index()
    arms["order"] = arms.method.map(METHOD_ORDER).fillna(9)
    arms["data_order"] = arms.data.map({d: i for i, d in enumerate(dict.fromkeys(final.data))})
    arms["privacy_order"] = -arms.eps.replace(math.inf, 1e300).fillna(0)
    return (arms.sort_values(["data_order", "order", "line", "privacy_order"])
            .drop(columns=["data_order", "privacy_order"]).reset_index(drop=True))
