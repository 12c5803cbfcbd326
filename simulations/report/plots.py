"""The report's figures, one PNG each: held-out macro-F1 per round, privacy-utility, per-site macro-F1, and for a
featured cell ROC curves, confusion matrix, t-SNE map, modality importance and subgroups.

Long because each figure is one function of 30-60 lines of matplotlib; they share only `_save` and the colours, and
reading one figure top to bottom is easier than following it across modules.
Every plot function returns `Drawn(path, why)`: a PNG, or None and the reason, which the report prints in its place,
so a partial results directory (a run still going, a cell without predictions) still gives a report.
"""

from __future__ import annotations

import math
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

from simulations.report.analyse import MIN_GROUP, Featured
from simulations.report.labels import fmt, natural_key, privacy_label, privacy_order, slug
from simulations.report.load import NOT_A_SITE, Results, held_out

BASELINE_STYLE = {"pooled": ("black", "pooled"), "logistic": ("0.45", "logistic regression"),
                  "local": ("#a0522d", "mean of local-only")}
DPI = 120


class Drawn(NamedTuple):
    path: Path | None
    why: str = ""


def _save(fig: plt.Figure, path: Path) -> Drawn:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Drawn(path)


def line_colors(rows: pd.DataFrame) -> dict[str, str]:
    """One colour per federated configuration (legend label), the same in every figure."""
    lines = sorted(rows.loc[rows.method == "federated", "line"].unique())
    palette = plt.get_cmap("tab10").colors
    return {line: matplotlib.colors.to_hex(palette[i % 10]) for i, line in enumerate(lines)}


def plot_rounds(res: Results, fig_dir: Path) -> Drawn:
    """(a) Held-out macro-F1 of the global model per round: one line per strategy, one panel per (data, privacy)."""
    rows, colors = res.rows, line_colors(res.rows)
    fed = rows[(rows.method == "federated") & (rows.site == "held-out") & rows["round"].notna() & rows.macro_f1.notna()]
    if fed.empty:
        return Drawn(None, "results.json has no federated held-out rows (no federated cell has finished a round)")
    datas = list(dict.fromkeys(fed.data))
    panels = {d: privacy_order(fed.loc[fed.data == d, "privacy"]) for d in datas}
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
                (h,) = ax.plot(s.index, s["mean"], marker="o", ms=3, lw=1.5, color=colors[line], label=line)
                handles.setdefault(line, h)
                if (s["count"] > 1).any():
                    sd = s["std"].fillna(0)
                    ax.fill_between(s.index, s["mean"] - sd, s["mean"] + sd, color=colors[line], alpha=0.18, lw=0)
            ax.set_title(f"{data} · {privacy_label(privacy)}", fontsize=10)
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
    datas, colors = list(dict.fromkeys(arms.data)), line_colors(res.rows)
    fig, axes = plt.subplots(1, len(datas), figsize=(5.2 * len(datas) + 0.4, 4.6), squeeze=False, sharey=True,
                             constrained_layout=True)
    handles: dict[str, object] = {}
    for ax, data in zip(axes[0], datas):
        a = arms[arms.data == data]
        eps = sorted(e for e in a.eps.unique() if np.isfinite(e))
        nodp_x = max(eps) * 4 if eps else 1.0
        for line, g in a.groupby("line"):
            color = colors[line]
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


def _local_for(res: Results, ref: pd.Series, method: str = "local") -> tuple[pd.Series, str]:
    """Local-only macro-F1 per site, from the `method` cells closest to `ref` (same partition, sites and seed if
    any)."""
    loc = res.rows[(res.rows.method == method) & (res.rows.data == ref.data) & (res.rows.privacy == "off")]
    for keys in (("partition", "sites", "seed"), ("partition", "sites"), ()):
        m = loc
        for k in keys:
            m = m[m[k] == ref[k]]
        if len(m):
            seeds = sorted(m.seed.unique(), key=natural_key)
            how = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {', '.join(seeds)}"
            return m.groupby("site").macro_f1.mean(), how
    return pd.Series(dtype=float), ""


def plot_sites(res: Results, data: str, featured: list[Featured], fig_dir: Path) -> tuple[Drawn, list[str]]:
    """(c) Per-site macro-F1: featured federated cells on each site's own evaluation part vs local-only models on the
    held-out patients. Returns notes (sites missing from the last round, where local numbers come from)."""
    fed = [f for f in featured if f.kind.startswith("federated")]
    if not fed:
        return Drawn(None, f"no federated cell for {data}"), []
    colors = line_colors(res.rows)
    notes, series, styles, stale_sites = [], [], [], []
    for f in fed:
        s, late = _site_scores(res.rows[res.rows.cell == f.cell])
        stale = [f"{site} (round {int(r)})" for site, r in late.items() if r < f.final["round"]]
        stale_sites.append({site: int(r) for site, r in late.items() if r < f.final["round"]})
        if stale:
            notes.append(f"{_short(f)}: sites not evaluated in the final round ({int(f.final['round'])}), shown "
                         f"with their last evaluation (bar label rK): {', '.join(stale)}.")
        series.append(s)
        styles.append((f"federated {_short(f)}: each site's own evaluation part", colors[f.final.line],
                       "//" if f.kind.endswith(", DP") else None))
    # the transformer alone at each site, else the logistic regression alone (a grid may run only local-logistic,
    # which the figure left out while saying there was no local-only baseline)
    for method, what in (("local", "model"), ("local-logistic", "logistic regression")):
        local, how = _local_for(res, fed[0].final, method)
        if len(local):
            series.append(local)
            styles.append((f"local-only (site's {what} alone): held-out patients", BASELINE_STYLE["local"][0], None))
            notes.append(f"Local-only {what}s ({method}): {how}.")
            break
    else:
        notes.append("No local-only baseline (local or local-logistic) for this data set.")
    sites = sorted(set().union(*(s.index for s in series)), key=natural_key)
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
        handles.append(ax.axhline(f.final.macro_f1, color=colors[f.final.line], lw=1.2,
                                  ls="--" if f.kind.endswith("no DP") else ":",
                                  label=f"federated {_short(f)}: held-out patients"))
    ax.set_xticks(x, sites, rotation=45 if len(sites) > 8 else 0, ha="right" if len(sites) > 8 else "center")
    ax.set_ylabel("macro-F1")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{data}: per-site macro-F1", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(handles=handles, loc="outside lower center", ncol=1, frameon=False, fontsize=8)
    return _save(fig, fig_dir / f"sites_{slug(data)}.png"), notes


def _short(f: Featured) -> str:
    """The title without the data set, for legends inside a per-data-set figure."""
    return f.title.removeprefix(f"{f.data} · ")


def plot_roc(p: dict[str, np.ndarray], title: str, path: Path) -> tuple[Drawn, list[str]]:
    """(d) One-vs-rest ROC per class on held-out rows; macro-average bold, the 5 worst classes named.

    Returns the classes skipped (absent from held-out y, or every held-out patient in them)."""
    from sklearn.metrics import auc, roc_curve

    ho = held_out(p)
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

    ho = held_out(p)
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
            sorted(set(labels) - {"held-out"}, key=natural_key) + (["held-out"] if "held-out" in labels else [])
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
        ax.set_title(f"{name}\nDP gap {fmt(dp)} · EO gap {fmt(eo)}", fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("score on held-out patients")
    handles = [Patch(color="#4c72b0", label="accuracy"), Patch(color="#55a868", label="macro-F1"),
               Patch(facecolor="0.8", hatch="//", edgecolor="white",
                     label=f"not in gaps (< {MIN_GROUP} patients or unknown)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False, fontsize=8)
    fig.suptitle(f"{title}: subgroups", fontsize=10)
    return _save(fig, path)

