"""`oncofed report`: a research report (Markdown + HTML + PNG plots) from an `oncofed experiment` results directory.

Reads only what the runner writes (results.json rows, cells/<id>/final.json, predictions.npz and privacy_audit.json;
see the results-directory contract), never a model: the report can be rebuilt anywhere, without torch, as often as wanted.
Every plot function returns `Drawn(path, why)`: a PNG, or None and the reason, which the report prints in its place,
so a partial results directory (a run still going, a cell without predictions) still gives a report.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import matplotlib
import matplotlib.colors
import matplotlib.transforms

matplotlib.use("Agg")  # files only: no display on servers/CI, and no GUI backend probing on import

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, NullLocator

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
REQUIRED = ("cell", "data", "method", "round", "site", *METRICS)
TEXT = ("experiment", "cell", "data", "partition", "sites", "strategy", "privacy", "seed", "method", "site")
NUMBER = ("round", "patients", "epsilon_spent", "epsilon_target", "seconds", *METRICS)
ARM = ["data", "method", "partition", "sites", "strategy", "privacy", "line"]  # a configuration: cells differ by seed
METHOD_ORDER = {"pooled": 0, "pooled-cv": 1, "logistic": 2, "local": 3, "local-logistic": 4, "federated": 5}
NOT_A_SITE = ("held-out", "global", "mean")
AGE_BANDS = ("<40", "40-49", "50-59", "60-69", ">=70")
MIN_GROUP = 10  # smaller subgroups are listed but kept out of the fairness gaps: their rates are mostly noise
FIX = "re-run `oncofed experiment CONFIG.toml`"
BASELINE_STYLE = {"pooled": ("black", "pooled"), "logistic": ("0.45", "logistic regression"),
                  "local": ("#a0522d", "mean of local-only")}
DPI = 120
KIND_TEXT = {"federated, no DP": "federated cell without DP", "federated, DP": "federated cell with DP",
             "pooled": "pooled cell with predictions"}


class ReportError(Exception):
    """A results directory the report cannot read; the message names the file and the fix."""


class Drawn(NamedTuple):
    path: Path | None
    why: str = ""


@dataclass
class Featured:
    """A cell shown in detail (ROC, confusion, 2-D map, modalities, subgroups)."""

    data: str
    kind: str  # "federated, no DP" | "federated, DP" | "pooled"
    cell: str
    title: str
    final: pd.Series


@dataclass
class Results:
    """The rows plus the tables derived once (final per cell, per configuration), and cell files read on demand."""

    dir: Path
    experiment: dict
    rows: pd.DataFrame
    final: pd.DataFrame = field(init=False)  # one row per cell: its final held-out metrics
    arms: pd.DataFrame = field(init=False)  # one row per configuration: mean/sd over seeds
    colors: dict[str, str] = field(init=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.final = final_table(self.rows)
        self.arms = arm_table(self.final)
        lines = sorted(self.rows.loc[self.rows.method == "federated", "line"].unique())
        palette = plt.get_cmap("tab10").colors
        self.colors = {line: matplotlib.colors.to_hex(palette[i % 10]) for i, line in enumerate(lines)}

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


# ----------------------------------------------------------------------------------------------- loading


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
    df["eps"] = [_eps(p) for p in df["privacy"]]
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


def _eps(privacy: str) -> float:
    """Sort/plot key: the budget, inf for no DP (weakest privacy), NaN when the text is not a number."""
    if privacy == "off":
        return math.inf
    try:
        return float(privacy)
    except ValueError:
        return math.nan


def _plabel(privacy: str) -> str:
    return "no DP" if privacy == "off" else f"ε={privacy}"


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


NPZ_CORE = ("classes", "y", "proba", "split")


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
                title = f"{data} · {r.line}, {_plabel(r.privacy)}, seed {r.seed}"
                chosen.append(Featured(data, kind, r.cell, title, r))
        pooled = f[f.method == "pooled"].sort_values("macro_f1", ascending=False, kind="stable")
        for r in pooled.itertuples():
            if res.cell_file(r.cell, "predictions.npz").is_file():
                chosen.append(Featured(data, "pooled", r.cell, f"{data} · pooled, {_plabel(r.privacy)}, seed {r.seed}",
                                       pooled.loc[r.Index]))
                break
        out[data] = chosen
    return out


# ----------------------------------------------------------------------------------------------- fairness metrics


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


# ----------------------------------------------------------------------------------------------- plots


def _save(fig: plt.Figure, path: Path) -> Drawn:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Drawn(path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _privacies(values) -> list[str]:
    """'off' first, then budgets from the largest (weakest privacy) to the smallest."""
    return sorted(set(values), key=lambda p: (p != "off", -_eps(p) if not math.isnan(_eps(p)) else 0, p))


def plot_rounds(res: Results, fig_dir: Path) -> Drawn:
    """(a) Held-out macro-F1 of the global model per round: one line per strategy, one panel per (data, privacy)."""
    rows = res.rows
    fed = rows[(rows.method == "federated") & (rows.site == "held-out") & rows["round"].notna() & rows.macro_f1.notna()]
    if fed.empty:
        return Drawn(None, "results.json has no federated held-out rows (no federated cell has finished a round)")
    datas = list(dict.fromkeys(fed.data))
    panels = {d: _privacies(fed.loc[fed.data == d, "privacy"]) for d in datas}
    ncols = max(len(p) for p in panels.values())
    fig, axes = plt.subplots(len(datas), ncols, figsize=(4.0 * ncols + 0.6, 3.2 * len(datas) + 0.8), squeeze=False,
                             sharey=True, constrained_layout=True)
    handles: dict[str, Line2D] = {}
    for i, data in enumerate(datas):
        for j in range(ncols):
            ax = axes[i, j]
            if j >= len(panels[data]):
                ax.remove()
                continue
            privacy = panels[data][j]
            sub = fed[(fed.data == data) & (fed.privacy == privacy)]
            for line, g in sub.groupby("line"):
                s = g.groupby("round").macro_f1.agg(["mean", "std", "count"])
                (h,) = ax.plot(s.index, s["mean"], marker="o", ms=3, lw=1.5, color=res.colors[line], label=line)
                handles.setdefault(line, h)
                if (s["count"] > 1).any():
                    sd = s["std"].fillna(0)
                    ax.fill_between(s.index, s["mean"] - sd, s["mean"] + sd, color=res.colors[line], alpha=0.18, lw=0)
            ax.set_title(f"{data} · {_plabel(privacy)}", fontsize=10)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("held-out macro-F1")
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 5),
               frameon=False, fontsize=9)
    return _save(fig, fig_dir / "rounds.png")


def _baselines(res: Results, data: str) -> dict[str, float]:
    """Horizontal reference lines: pooled, logistic, mean of local-only (without DP), mean over seeds and sites."""
    f = res.final[(res.final.data == data) & (res.final.privacy == "off")]
    return {m: float(f.loc[f.method == m, "macro_f1"].mean()) for m in BASELINE_STYLE if (f.method == m).any()}


def plot_privacy_utility(res: Results, fig_dir: Path) -> Drawn:
    """(b) Final held-out macro-F1 vs per-site epsilon (log x; no DP as its own marker at the right), per data set."""
    arms = res.arms[res.arms.method == "federated"]
    if arms.empty:
        return Drawn(None, "no federated cell has a final held-out row")
    datas = list(dict.fromkeys(arms.data))
    fig, axes = plt.subplots(1, len(datas), figsize=(5.2 * len(datas) + 0.4, 4.6), squeeze=False, sharey=True,
                             constrained_layout=True)
    handles: dict[str, object] = {}
    for ax, data in zip(axes[0], datas):
        a = arms[arms.data == data]
        eps = sorted(e for e in a.eps.unique() if np.isfinite(e))
        nodp_x = max(eps) * 4 if eps else 1.0
        for line, g in a.groupby("line"):
            color = res.colors[line]
            dp = g[np.isfinite(g.eps)].sort_values("eps")
            if len(dp):
                h = ax.errorbar(dp.eps, dp.macro_f1_mean, yerr=dp.macro_f1_sd.fillna(0), marker="o", ms=5, lw=1.5,
                                capsize=3, color=color, label=line)
                handles.setdefault(line, h)
            nd = g[g.privacy == "off"]
            if len(nd):
                h = ax.errorbar([nodp_x] * len(nd), nd.macro_f1_mean, yerr=nd.macro_f1_sd.fillna(0), marker="D",
                                ms=7, capsize=3, color=color, ls="none", mfc="white", mew=1.8, label=line)
                handles.setdefault(line, h)
        for method, value in _baselines(res, data).items():
            color, name = BASELINE_STYLE[method]
            handles.setdefault(name, ax.axhline(value, ls="--", lw=1.2, color=color, label=name))
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks([*eps, nodp_x], [*(f"{e:g}" for e in eps), "no DP"])
        if eps:
            ax.axvline(math.sqrt(max(eps) * nodp_x), color="0.6", ls=":", lw=0.8)
        ax.set_xlim((min(eps) if eps else nodp_x) / 1.8, nodp_x * 1.8)
        ax.set_title(data, fontsize=10)
        ax.set_xlabel("per-site ε budget (log scale)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("final held-out macro-F1")
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 8),
               frameon=False, fontsize=9)
    return _save(fig, fig_dir / "privacy_utility.png")


def _site_scores(rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Each site's latest own-evaluation macro-F1 and its round in a federated cell (a site may have skipped the last
    round, or trained in it without an evaluation row)."""
    s = rows[~rows.site.isin(NOT_A_SITE) & ~rows.site.str.startswith("fold-") & rows["round"].notna()
             & rows.macro_f1.notna()]
    last = s.sort_values("round").groupby("site").last()
    return last.macro_f1, last["round"]


def _local_for(res: Results, ref: pd.Series) -> tuple[pd.Series, str]:
    """Local-only macro-F1 per site, from the local cells closest to `ref` (same partition, sites and seed if any)."""
    loc = res.rows[(res.rows.method == "local") & (res.rows.data == ref.data) & (res.rows.privacy == "off")]
    for keys in (("partition", "sites", "seed"), ("partition", "sites"), ()):
        m = loc
        for k in keys:
            m = m[m[k] == ref[k]]
        if len(m):
            seeds = sorted(m.seed.unique(), key=_natural)
            how = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {', '.join(seeds)}"
            return m.groupby("site").macro_f1.mean(), how
    return pd.Series(dtype=float), ""


def plot_sites(res: Results, data: str, featured: list[Featured], fig_dir: Path) -> tuple[Drawn, list[str]]:
    """(c) Per-site macro-F1: featured federated cells on each site's own evaluation part vs local-only models on the
    held-out patients. Returns notes (sites missing from the last round, where local numbers come from)."""
    fed = [f for f in featured if f.kind.startswith("federated")]
    if not fed:
        return Drawn(None, f"no federated cell for {data}"), []
    notes, series, styles, stale_sites = [], [], [], []
    for f in fed:
        s, late = _site_scores(res.rows[res.rows.cell == f.cell])
        stale = [f"{site} (round {int(r)})" for site, r in late.items() if r < f.final["round"]]
        stale_sites.append({site: int(r) for site, r in late.items() if r < f.final["round"]})
        if stale:
            notes.append(f"{_short(f)}: sites not evaluated in the final round ({int(f.final['round'])}), shown "
                         f"with their last evaluation (bar label rK): {', '.join(stale)}.")
        series.append(s)
        styles.append((f"federated {_short(f)}: each site's own evaluation part", res.colors[f.final.line],
                       "//" if f.kind.endswith(", DP") else None))
    local, how = _local_for(res, fed[0].final)
    if len(local):
        series.append(local)
        styles.append(("local-only (site's model alone): held-out patients", BASELINE_STYLE["local"][0], None))
        notes.append(f"Local-only models: {how}.")
    else:
        notes.append("No local-only baseline for this data set.")
    sites = sorted(set().union(*(s.index for s in series)), key=_natural)
    if not sites:
        return Drawn(None, f"the featured cells of {data} have no per-site rows"), notes
    x = np.arange(len(sites))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.5, 0.45 * len(sites) * len(series) + 2)), 5.0),
                           constrained_layout=True)
    handles = []
    for k, (s, (label, color, hatch)) in enumerate(zip(series, styles)):
        vals = s.reindex(sites).to_numpy(dtype=float)
        xk = x - 0.4 + width * (k + 0.5)
        handles.append(ax.bar(xk, np.nan_to_num(vals), width, color=color, hatch=hatch,
                              edgecolor="white" if hatch else None, alpha=0.9 if k < len(fed) else 0.75, label=label))
        for site, rnd in (stale_sites[k] if k < len(stale_sites) else {}).items():
            i = sites.index(site)
            ax.text(xk[i], np.nan_to_num(vals[i]) + 0.01, f"r{rnd}", ha="center", va="bottom", fontsize=7)
    for f in fed:
        handles.append(ax.axhline(f.final.macro_f1, color=res.colors[f.final.line], lw=1.2,
                                  ls="--" if f.kind.endswith("no DP") else ":",
                                  label=f"federated {_short(f)}: held-out patients"))
    ax.set_xticks(x, sites, rotation=45 if len(sites) > 8 else 0, ha="right" if len(sites) > 8 else "center")
    ax.set_ylabel("macro-F1")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{data}: per-site macro-F1", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(handles=handles, loc="outside lower center", ncol=1, frameon=False, fontsize=8)
    return _save(fig, fig_dir / f"sites_{_slug(data)}.png"), notes


def _short(f: Featured) -> str:
    """The title without the data set, for legends inside a per-data-set figure."""
    return f.title.removeprefix(f"{f.data} · ")


def _held_out(p: dict[str, np.ndarray]) -> np.ndarray:
    return p["split"] == "held-out"


def plot_roc(p: dict[str, np.ndarray], title: str, path: Path) -> tuple[Drawn, list[str]]:
    """(d) One-vs-rest ROC per class on held-out rows; macro-average bold, the 5 worst classes named.

    Returns the classes skipped (absent from held-out y, or every held-out patient in them)."""
    from sklearn.metrics import auc, roc_curve

    ho = _held_out(p)
    y, proba, names = p["y"][ho], p["proba"][ho], [str(c) for c in p["classes"]]
    if not ho.any():
        return Drawn(None, "predictions.npz has no held-out rows"), []
    curves, aucs, skipped = {}, {}, []
    for c, name in enumerate(names):
        pos = y == c
        if not pos.any() or pos.all():
            skipped.append(name)
            continue
        fpr, tpr, _ = roc_curve(pos, proba[:, c])
        curves[c], aucs[c] = (fpr, tpr), float(auc(fpr, tpr))
    if not curves:
        return Drawn(None, "fewer than two classes among the held-out patients: no ROC curve is defined"), skipped
    grid = np.linspace(0, 1, 201)
    mean_tpr = np.mean([np.interp(grid, *curves[c]) for c in curves], axis=0)
    mean_tpr[0] = 0.0
    worst = sorted(aucs, key=aucs.get)[:5]
    fig, ax = plt.subplots(figsize=(7, 6.2), constrained_layout=True)
    others = [c for c in curves if c not in worst]
    for c in others:
        ax.plot(*curves[c], color="0.72", lw=0.7)
    macro = float(np.mean(list(aucs.values())))
    handles = ax.plot(grid, mean_tpr, color="black", lw=2.6, label=f"macro-average (AUC {macro:.3f})")
    palette = plt.get_cmap("Set1").colors
    for i, c in enumerate(worst):
        handles += ax.plot(*curves[c], color=palette[i], lw=1.3, label=f"{names[c]}: AUC {aucs[c]:.3f}")
    if others:
        handles.append(Line2D([], [], color="0.72", lw=0.7, label=f"{len(others)} other classes"))
    ax.plot([0, 1], [0, 1], ls=":", color="0.5", lw=0.8)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           aspect="equal")
    ax.set_title(f"{title}\nheld-out patients (n={len(y)}), one-vs-rest", fontsize=10)
    ax.legend(handles=handles, loc="lower right", fontsize=8,
              title="classes by AUC" if not others else f"lowest {len(worst)} classes by AUC",
              title_fontsize=8, framealpha=0.95)
    ax.grid(alpha=0.3)
    return _save(fig, path), skipped


def plot_confusion(p: dict[str, np.ndarray], title: str, path: Path) -> Drawn:
    """(e) Row-normalised confusion matrix on held-out rows (rows: true class with its n; grey: no patients)."""
    from sklearn.metrics import confusion_matrix

    ho = _held_out(p)
    if not ho.any():
        return Drawn(None, "predictions.npz has no held-out rows")
    names = [str(c) for c in p["classes"]]
    k = len(names)
    cm = confusion_matrix(p["y"][ho], p["proba"][ho].argmax(1), labels=np.arange(k)).astype(float)
    n = cm.sum(1)
    norm = np.divide(cm, n[:, None], out=np.full_like(cm, np.nan), where=n[:, None] > 0)
    big = k > 12
    fig, ax = plt.subplots(figsize=(10, 9) if big else (6.4, 5.6), constrained_layout=True)
    cmap = plt.get_cmap("Blues").with_extremes(bad="0.88")
    # square-root colour scale: a 5% confusion is visible next to a 95% diagonal
    im = ax.imshow(np.ma.masked_invalid(norm), cmap=cmap, norm=matplotlib.colors.PowerNorm(0.5, vmin=0, vmax=1))
    fs = 6.5 if big else 9
    ax.set_xticks(np.arange(k), names, rotation=90, fontsize=fs)
    ax.set_yticks(np.arange(k), [f"{name} ({int(m)})" for name, m in zip(names, n)], fontsize=fs)
    if not big:
        for i in range(k):
            for j in range(k):
                if not np.isnan(norm[i, j]) and norm[i, j] > 0:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (held-out patients)")
    ax.set_title(f"{title}\nrow-normalised (square-root colour scale); grey rows: no held-out patient of that class",
                 fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class's patients",
                 ticks=[0, 0.05, 0.2, 0.4, 0.6, 0.8, 1])
    return _save(fig, path)


def _palette(k: int) -> list:
    """k distinguishable colours: tab10 up to 10, then tab20 + tab20b + tab20c (60)."""
    if k <= 10:
        return list(plt.get_cmap("tab10").colors)
    cols = [*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors, *plt.get_cmap("tab20c").colors]
    return [cols[i % len(cols)] for i in range(k)]


def plot_tsne(p: dict[str, np.ndarray], title: str, path: Path, max_rows: int = 3000, seed: int = 0) -> Drawn:
    """(f) t-SNE of the fused representation: left coloured by class, right by site (held-out rows: "held-out")."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    missing = [k for k in ("fused", "site") if k not in p]
    if missing:
        return Drawn(None, f"predictions.npz lacks {', '.join(missing)}")
    n = len(p["y"])
    idx = np.arange(n)
    if n > max_rows:
        idx = np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))
    if len(idx) < 5:
        return Drawn(None, f"only {len(idx)} rows in predictions.npz: too few for a 2-D map")
    fused = np.asarray(p["fused"][idx], dtype=np.float64).reshape(len(idx), -1)
    if not np.isfinite(fused).all():
        return Drawn(None, "fused has NaN or infinite values: no 2-D map")
    perplexity = min(30.0, (len(idx) - 1) / 3)
    # One thread: Barnes-Hut's OpenMP threads spin-wait, so on a machine busy with experiments they run ~20x slower.
    with threadpool_limits(limits=1, user_api="openmp"):
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                  random_state=seed).fit_transform(fused)
    names = np.array([str(c) for c in p["classes"]])
    cls = names[p["y"][idx]]
    site = np.where(p["split"][idx] == "held-out", "held-out", p["site"][idx].astype(str))
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.6), constrained_layout=True)
    for ax, labels, what in ((axes[0], cls, "class"), (axes[1], site, "site")):
        values = [v for v in names if v in set(labels)] if what == "class" else \
            sorted(set(labels) - {"held-out"}, key=_natural) + (["held-out"] if "held-out" in labels else [])
        colors = _palette(len(values))
        size = 14 if len(idx) <= 1000 else 7
        for v, color in zip(values, colors):
            m = labels == v
            held = v == "held-out" and what == "site"  # many rows: grey and underneath, so the sites stay visible
            ax.scatter(xy[m, 0], xy[m, 1], s=size, color="0.7" if held else color, alpha=0.6 if held else 0.85, lw=0,
                       label=f"{v} ({m.sum()})", zorder=1 if held else 2)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"coloured by {what}", fontsize=10)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, markerscale=2.2, frameon=False,
                  ncol=2 if len(values) > 18 else 1, handletextpad=0.2, columnspacing=0.8)
    sub = f"{len(idx)} of {n} rows" if n > max_rows else f"{n} rows"
    fig.suptitle(f"{title}: t-SNE of the fused representation ({sub}, perplexity {perplexity:g})", fontsize=10)
    return _save(fig, path)


def plot_modalities(final: dict | None, why: str, title: str, path: Path) -> Drawn:
    """(g) Per modality: mean CLS attention weight, and the held-out macro-F1 lost when the modality is removed."""
    if final is None:
        return Drawn(None, why)
    weights, ablation = final.get("modality_weight_mean") or {}, final.get("modality_ablation") or {}
    base = (final.get("held_out") or {}).get("macro_f1")
    mods = list(dict.fromkeys([*weights, *ablation]))
    if not mods:
        return Drawn(None, "final.json has neither modality_weight_mean nor modality_ablation")
    drop = [base - ablation[m] if base is not None and ablation.get(m) is not None else np.nan for m in mods]
    weight = [weights[m] if weights.get(m) is not None else np.nan for m in mods]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(mods) + 2.0), sharey=True, constrained_layout=True)
    y = np.arange(len(mods))
    for ax, vals, label, color in ((axes[0], weight, "mean attention weight (held-out patients with it)", "#4c72b0"),
                                   (axes[1], drop, "held-out macro-F1 drop when removed", "#dd8452")):
        v = np.array(vals, dtype=float)
        ax.barh(y, np.nan_to_num(v), color=color)
        for yi, vi in zip(y, v):
            neg = np.isfinite(vi) and vi < 0
            ax.text(vi if np.isfinite(vi) else 0, yi, "n/a" if not np.isfinite(vi) else f"{vi:.3f}",
                    va="center", ha="right" if neg else "left", fontsize=8,
                    transform=ax.transData + matplotlib.transforms.ScaledTranslation(-0.04 if neg else 0.04, 0,
                                                                                      ax.figure.dpi_scale_trans))
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_xlabel(label)
        lo, hi = np.nanmin(np.append(v, 0)), np.nanmax(np.append(v, 0))
        pad = 0.25 * (hi - lo or 1)
        ax.set_xlim(lo - (pad if lo < 0 else 0), hi + pad)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, mods)
    axes[0].invert_yaxis()
    fig.suptitle(f"{title}: modality importance", fontsize=10)
    return _save(fig, path)


def subgroups(p: dict[str, np.ndarray]) -> dict[str, tuple[pd.DataFrame, float, float, str, str]]:
    """Per grouping (age band, gender) present among the held-out rows: table, demographic-parity gap, EO gap, and
    which class and rate drive each gap. Unknown age/gender is listed as "unknown" but never enters the gaps."""
    ho = _held_out(p)
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


def plot_subgroups(groups: dict[str, tuple[pd.DataFrame, float, float, str, str]], title: str, path: Path) -> Drawn:
    """(h) Accuracy and macro-F1 per subgroup (hatched: < MIN_GROUP patients or unknown, outside the gaps)."""
    if not groups:
        return Drawn(None, "predictions.npz has no age or gender for the held-out patients of this cohort")
    bars = sum(len(t[0]) for t in groups.values())
    fig, axes = plt.subplots(1, len(groups), figsize=(max(5.0, 1.1 * bars + 2.5), 4.4),
                             squeeze=False, sharey=True, constrained_layout=True,
                             gridspec_kw={"width_ratios": [len(t[0]) + 1 for t in groups.values()]})
    for ax, (name, (table, dp, eo, *_)) in zip(axes[0], groups.items()):
        x = np.arange(len(table))
        for k, (metric, color) in enumerate((("accuracy", "#4c72b0"), ("macro_f1", "#55a868"))):
            for xi, r in zip(x, table.itertuples()):
                ax.bar(xi - 0.2 + 0.4 * k, getattr(r, metric), 0.4, color=color, alpha=1 if r.in_gaps else 0.45,
                       hatch=None if r.in_gaps else "//", edgecolor="white")
        ax.set_xticks(x, [f"{r.group}\nn={r.patients}" for r in table.itertuples()], fontsize=8)
        ax.set_title(f"{name}\nDP gap {_f(dp)} · EO gap {_f(eo)}", fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("score on held-out patients")
    handles = [Patch(color="#4c72b0", label="accuracy"), Patch(color="#55a868", label="macro-F1"),
               Patch(facecolor="0.8", hatch="//", edgecolor="white",
                     label=f"not in gaps (< {MIN_GROUP} patients or unknown)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False, fontsize=8)
    fig.suptitle(f"{title}: subgroups", fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- Markdown


def _f(x: float, digits: int = 3) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _msd(mean: float, sd: float) -> str:
    return _f(mean) if not np.isfinite(sd) else f"{_f(mean)} ± {_f(sd)}"


def _figure(drawn: Drawn, alt: str, out_dir: Path) -> str:
    if drawn.path is None:
        return f"*Plot not drawn: {drawn.why}.*"
    return f"![{alt}]({drawn.path.relative_to(out_dir).as_posix()})"


def _table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    sep = ["---:" if i in right else "---" for i in range(len(header))]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, sep, *rows])


def summary_section(res: Results) -> list[str]:
    """Per data set: the final-metrics table and the cost of federation / of privacy, computed from the numbers."""
    md = ["## Summary", "",
          ("Final metrics per configuration. *federated*: the global model after the last round on the patients of the "
          "held-out sites; *pooled* / *logistic*: one centralized model on the same held-out patients; *local*: the "
          "mean over the sites' models trained alone, each on the held-out patients; *pooled-cv*: cross-validation "
          "inside the pool (not held-out). Several seeds: mean ± sample sd (n−1) over seeds."), ""]
    for data, a in res.arms.groupby("data", sort=False):
        md += [f"### {data}", ""]
        rows = [[r.method, r.line if r.method == "federated" else (r.line.partition(" · ")[2] or "—"),
                 _plabel(r.privacy), str(r.seeds), _f(r.patients, 0),
                 *(_msd(getattr(r, f"{m}_mean"), getattr(r, f"{m}_sd")) for m in METRICS), _f(r.eps_spent, 2)]
                for r in a.itertuples()]
        md += [_table(["method", "configuration", "privacy", "seeds", "evaluated patients", "accuracy",
                       "balanced acc.", "macro-F1", "max ε spent"], rows, right={3, 4, 5, 6, 7, 8}), ""]
        md += [f"- {s}" for s in cost_sentences(a)] + [""]
    return md


def cost_sentences(arms: pd.DataFrame) -> list[str]:
    """'Cost of federation' (best federated no-DP minus pooled) and 'cost of privacy' per epsilon (best DP minus best
    no-DP), in held-out macro-F1 means over seeds."""
    fed = arms[arms.method == "federated"]
    nodp = fed[fed.privacy == "off"]
    pooled = arms[(arms.method == "pooled") & (arms.privacy == "off")]
    out = []

    def diff(a: float, b: float) -> str:
        d = a - b
        return f"{d:+.3f} ({abs(d):.3f} {'below' if d < 0 else 'above'})"

    best = nodp.loc[nodp.macro_f1_mean.idxmax()] if len(nodp) else None
    if best is not None and len(pooled):
        same = pooled[(pooled.partition == best.partition) & (pooled.sites == best.sites)]
        p = (same if len(same) else pooled).iloc[0]
        out.append(f"**Cost of federation**: best federated without DP ({best.line}, macro-F1 "
                   f"{_f(best.macro_f1_mean)}) minus pooled ({_f(p.macro_f1_mean)}): "
                   f"{diff(best.macro_f1_mean, p.macro_f1_mean)}.")
    else:
        out.append("**Cost of federation**: not computed: needs a federated configuration without DP and a pooled "
                   "baseline.")
    dp = fed[fed.privacy != "off"]
    for privacy in _privacies(dp.privacy):
        at = dp[dp.privacy == privacy]
        b = at.loc[at.macro_f1_mean.idxmax()]
        if best is None:
            out.append(f"**Cost of privacy, {_plabel(privacy)}**: not computed: no federated configuration without DP.")
            continue
        out.append(f"**Cost of privacy, {_plabel(privacy)}**: best with DP ({b.line}, {_f(b.macro_f1_mean)}) minus "
                   f"best without ({best.line}, {_f(best.macro_f1_mean)}): "
                   f"{diff(b.macro_f1_mean, best.macro_f1_mean)}.")
    return out


def featured_section(res: Results, f: Featured, fig_dir: Path, out_dir: Path) -> list[str]:
    """ROC, confusion, 2-D map, modality importance and subgroups of one featured cell."""
    slug = _slug(f.cell)
    r = f.final
    md = [f"### {f.title}", "",
          f"Best {KIND_TEXT[f.kind]}: cell `{f.cell}`. Final held-out ({_f(r.patients, 0)} patients): "
          f"accuracy {_f(r.accuracy)}, balanced "
          f"accuracy {_f(r.balanced_accuracy)}, macro-F1 {_f(r.macro_f1)}"
          + (f"; max per-site ε spent {_f(r.epsilon_spent, 2)}." if np.isfinite(r.epsilon_spent) else "."), ""]
    p, why = res.predictions(f.cell)
    if p is not None and why:
        md += [f"*Note: {why}.*", ""]
    if p is None:
        roc, cm, tsne, groups, skipped = Drawn(None, why), Drawn(None, why), Drawn(None, why), {}, []
    else:
        roc, skipped = plot_roc(p, f.title, fig_dir / f"roc_{slug}.png")
        cm = plot_confusion(p, f.title, fig_dir / f"confusion_{slug}.png")
        tsne = plot_tsne(p, f.title, fig_dir / f"tsne_{slug}.png")
        groups = subgroups(p)
    md += ["#### ROC curves (one-vs-rest, held-out patients)", "", _figure(roc, f"ROC {f.cell}", out_dir), ""]
    if skipped:
        md += [f"Classes without a curve (no held-out patient, or only them): {', '.join(skipped)}.", ""]
    md += ["#### Confusion matrix (held-out patients, row-normalised)", "",
           _figure(cm, f"confusion {f.cell}", out_dir), ""]
    md += ["#### 2-D map of the fused representation (t-SNE)", "",
           ("All rows of predictions.npz: a sample of the federation's own patients (coloured by their site) and the "
           "held-out patients (colour \"held-out\")."), "", _figure(tsne, f"t-SNE {f.cell}", out_dir), ""]
    final, fwhy = res.final_json(f.cell)
    md += ["#### Modality importance", "",
           ("Left: mean CLS attention weight over held-out patients who have the modality. Right: held-out macro-F1 "
           "minus macro-F1 with the modality removed for every patient (positive: the model relies on it)."), "",
           _figure(plot_modalities(final, fwhy, f.title, fig_dir / f"modalities_{slug}.png"), f"modalities {f.cell}",
                   out_dir), ""]
    md += ["#### Subgroups (held-out patients)", ""]
    if p is not None and groups:
        rows = [[name, str(t.group), str(t.patients), _f(t.accuracy), _f(t.macro_f1), "yes" if t.in_gaps else "no"]
                for name, (table, *_) in groups.items() for t in table.itertuples()]
        md += [_table(["grouping", "group", "patients", "accuracy", "macro-F1", "in gaps"], rows, right={2, 3, 4}), ""]
        for name, (_, dp, eo, dp_by, eo_by) in groups.items():
            if not np.isfinite(dp):
                md.append(f"- {name}: no gap (fewer than two groups with at least {MIN_GROUP} patients).")
                continue
            md.append(f"- {name}: demographic-parity gap {_f(dp)}" + (f" ({dp_by})" if dp_by else "")
                      + f", equalized-odds gap {_f(eo)}" + (f" ({eo_by})" if eo_by else "") + ".")
        md += ["", (f"Gaps are computed over groups with at least {MIN_GROUP} patients; smaller groups and unknown "
               "age/gender are listed but excluded. Demographic parity: max over classes of the spread of "
               "P(pred = c | group); equalized odds: max over classes of the larger spread of TPR and FPR "
               "(one-vs-rest; a class's TPR counts only if every group has a patient of it). With many classes and "
               "small groups, a gap is often driven by one rare class: the class and rate behind each gap are in "
               "brackets."), ""]
    drawn = plot_subgroups(groups, f.title, fig_dir / f"subgroups_{slug}.png") if p is not None else Drawn(None, why)
    md += [_figure(drawn, f"subgroups {f.cell}", out_dir), ""]
    return md


def _experiment_name(res: Results) -> str:
    """results.json's experiment name: top-level "name", or the config dump's [experiment] name, or the rows'."""
    e = res.experiment
    section = e.get("experiment") if isinstance(e.get("experiment"), dict) else {}
    names = [n for n in res.rows.experiment if n]
    return str(e.get("name") or section.get("name") or (names[0] if names else res.dir.name))


def build_markdown(res: Results, out_dir: Path) -> str:
    fig_dir = out_dir / "figures"
    rows = res.rows
    name = _experiment_name(res)
    fed = rows[rows.method == "federated"]
    md = [f"# OncoFed experiment report: {name}", "",
          (f"Results directory `{res.dir}`: {rows.cell.nunique()} cells, "
           f"data sets {', '.join(dict.fromkeys(rows.data))}; "
          f"strategies {', '.join(sorted(set(fed.strategy) - {''})) or '—'}; privacy "
          f"{', '.join(_plabel(p) for p in _privacies(fed.privacy)) or '—'}; seeds "
          f"{', '.join(sorted(set(rows.seed) - {''}, key=_natural)) or '—'}; "
          f"rounds {int(fed['round'].max()) if fed['round'].notna().any() else '—'}."), ""]
    md += summary_section(res)
    md += ["## Held-out macro-F1 per round", "",
           "The global model after each round on the patients of the held-out sites; band: ± sd over seeds.", "",
           _figure(plot_rounds(res, fig_dir), "held-out macro-F1 per round", out_dir), ""]
    md += ["## Privacy–utility", "",
           ("Final held-out macro-F1 against the per-site ε budget (error bars: sd over seeds); the open diamond at "
            "the "
           "right is the same strategy without DP. Dashed: baselines without DP."), "",
           _figure(plot_privacy_utility(res, fig_dir), "privacy-utility", out_dir), ""]
    from simulations.privacy_audit import audit_section  # its own module: this one is long enough

    md += audit_section(res)  # nothing for cells run before the audit existed
    featured = select_featured(res)
    md += ["## Per-site performance", "",
           ("Bars: federated featured cells on each site's own evaluation part (final round), next to the local-only "
           "model of each site (trained on that site alone) on the held-out patients. Lines: the federated model on "
           "the held-out patients, the number comparable with the local-only bars."), ""]
    for data in dict.fromkeys(rows.data):
        drawn, notes = plot_sites(res, data, featured.get(data, []), fig_dir)
        md += [f"### {data}", "", _figure(drawn, f"per-site {data}", out_dir), "", *(f"- {n}" for n in notes), ""]
    md += ["## Featured cells", "",
           ("Per data set: the federated cell (one seed) with the best final held-out macro-F1 without DP, the best "
            "with "
           "DP, and the best pooled cell with predictions. ROC, confusion matrix and subgroups use the held-out rows "
           "of predictions.npz."), ""]
    for data, cells in featured.items():
        if not cells:
            md += [f"*No featured cell for {data}: no federated or pooled cell finished.*", ""]
        for f in cells:
            md += featured_section(res, f, fig_dir, out_dir)
    return "\n".join(md).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------- HTML


def _inline(text: str) -> str:
    """Escape, then the inline constructs the report uses: `code`, **bold**, *emphasis*."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
        else:
            s = html.escape(part, quote=False)
            s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
            out.append(re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", s))
    return "".join(out)


def markdown_to_html(md: str, title: str) -> str:
    """The Markdown subset this module writes (headings, paragraphs, pipe tables, images, lists) as one HTML page."""
    body: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"(#{1,6}) (.*)", line):
            level = len(m.group(1))
            body.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif m := re.fullmatch(r"!\[(.*)\]\((.*)\)", line.strip()):
            body.append(f'<figure><img src="{html.escape(m.group(2))}" alt="{html.escape(m.group(1))}"></figure>')
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            right = [c.endswith(":") for c in block[1]] if len(block) > 1 else []
            head = "".join(f"<th>{_inline(c)}</th>" for c in block[0])
            rows = "".join("<tr>" + "".join(f'<td{" class=r" if k < len(right) and right[k] else ""}>{_inline(c)}</td>'
                                            for k, c in enumerate(r)) + "</tr>" for r in block[2:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"(#{1,6} |\||- |!\[)", lines[i]):
                para.append(lines[i])
                i += 1
            body.append(f"<p>{_inline(' '.join(para))}</p>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;"
             "line-height:1.45}table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;"
             "padding:.25em .6em}th{background:#f3f3f3}td.r{text-align:right;font-variant-numeric:tabular-nums}"
             "img{max-width:100%;height:auto}figure{margin:1em 0}code{background:#f3f3f3;padding:0 .2em}"
             "h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------------------------- entry point


def build_report(results_dir: Path, out_dir: Path | None = None) -> Path:
    """Write report.md, report.html and figures/*.png (default: RESULTS_DIR/report); return the report.md path."""
    res = load_results(Path(results_dir))
    out = Path(out_dir) if out_dir is not None else res.dir / "report"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    md = build_markdown(res, out)
    path = out / "report.md"
    path.write_text(md, encoding="utf-8")
    title = md.splitlines()[0].lstrip("# ")
    (out / "report.html").write_text(markdown_to_html(md, title), encoding="utf-8")
    return path
