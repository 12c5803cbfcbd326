"""The report's text: the Markdown sections (summary with the cost of federation and of privacy, curves, per-site,
featured cells with their subgroups) around the figures of plots.py, and the same text as one HTML page."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
from markdown_it import MarkdownIt

from simulations.privacy_audit import audit_section
from simulations.report.analyse import MIN_GROUP, Featured, select_featured, subgroups
from simulations.report.labels import fmt, natural_key, privacy_label, privacy_order, slug
from simulations.report.load import METRICS, Results
from simulations.report.plots import (
    Drawn,
    plot_confusion,
    plot_modalities,
    plot_privacy_utility,
    plot_roc,
    plot_rounds,
    plot_sites,
    plot_subgroups,
    plot_tsne,
)

KIND_TEXT = {"federated, no DP": "federated cell without DP", "federated, DP": "federated cell with DP",
             "pooled": "pooled cell with predictions"}


def _msd(mean: float, sd: float) -> str:
    return fmt(mean) if not np.isfinite(sd) else f"{fmt(mean)} ± {fmt(sd)}"


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
                 privacy_label(r.privacy), str(r.seeds), fmt(r.patients, 0),
                 *(_msd(getattr(r, f"{m}_mean"), getattr(r, f"{m}_sd")) for m in METRICS), fmt(r.eps_spent, 2)]
                for r in a.itertuples()]
        md += [_table(["method", "configuration", "privacy", "seeds", "evaluated patients", "accuracy",
                       "balanced acc.", "macro-F1", "max ε spent"], rows, right={3, 4, 5, 6, 7, 8}), ""]
        md += [f"- {s}" for s in cost_sentences(a)] + [""]
    return md


def cost_sentences(arms: pd.DataFrame) -> list[str]:
    """'Cost of federation' (best federated no-DP minus pooled, of the same partition and sites when there is one)
    and 'cost of privacy' per partition and site count and per epsilon (best DP minus best no-DP of that partition
    and site count: the best over all of them took one partition's no-DP arm against another's DP arm), in held-out
    macro-F1 means over seeds."""
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
                   f"{fmt(best.macro_f1_mean)}) minus pooled ({fmt(p.macro_f1_mean)}): "
                   f"{diff(best.macro_f1_mean, p.macro_f1_mean)}.")
    else:
        out.append("**Cost of federation**: not computed: needs a federated configuration without DP and a pooled "
                   "baseline.")
    dp = fed[fed.privacy != "off"]
    for (partition, sites), at_part in dp.groupby(["partition", "sites"], sort=False):
        where = f"partition {partition}, {sites} sites"
        base = nodp[(nodp.partition == partition) & (nodp.sites == sites)]
        for privacy in privacy_order(at_part.privacy):
            head = f"**Cost of privacy, {privacy_label(privacy)}** ({where})"
            if not len(base):
                out.append(f"{head}: not computed: no federated configuration without DP on this partition and "
                           "sites.")
                continue
            at, without = at_part[at_part.privacy == privacy], base.loc[base.macro_f1_mean.idxmax()]
            b = at.loc[at.macro_f1_mean.idxmax()]
            out.append(f"{head}: best with DP ({b.line}, {fmt(b.macro_f1_mean)}) minus best without on the same "
                       f"partition and sites ({without.line}, {fmt(without.macro_f1_mean)}): "
                       f"{diff(b.macro_f1_mean, without.macro_f1_mean)}.")
    return out


def featured_section(res: Results, f: Featured, fig_dir: Path, out_dir: Path) -> list[str]:
    """ROC, confusion, 2-D map, modality importance and subgroups of one featured cell."""
    stem = slug(f.cell)
    r = f.final
    md = [f"### {f.title}", "",
          f"Best {KIND_TEXT[f.kind]}: cell `{f.cell}`. Final held-out ({fmt(r.patients, 0)} patients): "
          f"accuracy {fmt(r.accuracy)}, balanced "
          f"accuracy {fmt(r.balanced_accuracy)}, macro-F1 {fmt(r.macro_f1)}"
          + (f"; max per-site ε spent {fmt(r.epsilon_spent, 2)}." if np.isfinite(r.epsilon_spent) else "."), ""]
    p, why = res.predictions(f.cell)
    if p is not None and why:
        md += [f"*Note: {why}.*", ""]
    if p is None:
        roc, cm, tsne, groups, skipped = Drawn(None, why), Drawn(None, why), Drawn(None, why), {}, []
    else:
        roc, skipped = plot_roc(p, f.title, fig_dir / f"roc_{stem}.png")
        cm = plot_confusion(p, f.title, fig_dir / f"confusion_{stem}.png")
        tsne = plot_tsne(p, f.title, fig_dir / f"tsne_{stem}.png")
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
           _figure(plot_modalities(final, fwhy, f.title, fig_dir / f"modalities_{stem}.png"), f"modalities {f.cell}",
                   out_dir), ""]
    if patterns := (final or {}).get("modality_patterns"):
        rows = [[k.replace("+", " + "), str(e["patients"]), fmt(e["accuracy"])]
                for k, e in sorted(patterns.items(), key=lambda kv: (kv[1]["accuracy"], kv[0]))]
        md += ["#### Modality patterns (held-out patients, the other modalities masked)", "",
               ("Accuracy of the final model on the held-out patients who have a pattern's modalities, shown only "
                "those (patterns with at least 30 such patients), weakest first: what a patient who has only these "
                "modalities gets. The delivered package carries the same measurement on the sites' own held-out "
                "parts, which sites flag answers by."), "",
               _table(["modalities", "patients", "accuracy"], rows, right={1, 2}), ""]
    md += ["#### Subgroups (held-out patients)", ""]
    if p is not None and groups:
        rows = [[name, str(t.group), str(t.patients), fmt(t.accuracy), fmt(t.macro_f1), "yes" if t.in_gaps else "no"]
                for name, (table, *_) in groups.items() for t in table.itertuples()]
        md += [_table(["grouping", "group", "patients", "accuracy", "macro-F1", "in gaps"], rows, right={2, 3, 4}), ""]
        for name, (_, dp, eo, dp_by, eo_by) in groups.items():
            if not np.isfinite(dp):
                md.append(f"- {name}: no gap (fewer than two groups with at least {MIN_GROUP} patients).")
                continue
            md.append(f"- {name}: demographic-parity gap {fmt(dp)}" + (f" ({dp_by})" if dp_by else "")
                      + f", equalized-odds gap {fmt(eo)}" + (f" ({eo_by})" if eo_by else "") + ".")
        md += ["", (f"Gaps are computed over groups with at least {MIN_GROUP} patients; smaller groups and unknown "
               "age/gender are listed but excluded. Demographic parity: max over classes of the spread of "
               "P(pred = c | group); equalized odds: max over classes of the larger spread of TPR and FPR "
               "(one-vs-rest; a class's TPR counts only if every group has a patient of it). With many classes and "
               "small groups, a gap is often driven by one rare class: the class and rate behind each gap are in "
               "brackets."), ""]
    drawn = plot_subgroups(groups, f.title, fig_dir / f"subgroups_{stem}.png") if p is not None else Drawn(None, why)
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
          f"{', '.join(privacy_label(p) for p in privacy_order(fed.privacy)) or '—'}; seeds "
          f"{', '.join(sorted(set(rows.seed) - {''}, key=natural_key)) or '—'}; "
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

# CommonMark plus pipe tables. html=False: raw HTML in the text (a run, cell or strategy name such as
# "<script>...") is shown as text, escaped, never passed through; links and images keep markdown-it's URL check.
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")
STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;"
         "line-height:1.45}table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;"
         "padding:.25em .6em}th{background:#f3f3f3}td[style*=right]{font-variant-numeric:tabular-nums}"
         "img{max-width:100%;height:auto}code{background:#f3f3f3;padding:0 .2em}"
         "h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}")


def markdown_to_html(md: str, title: str) -> str:
    """The report's Markdown as one HTML page; the figures stay figures/*.png next to it, as in report.md."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
            + _MARKDOWN.render(md) + "</body></html>\n")
