"""The empirical privacy audit in research reports: every site of a federated cell attacks the delivered model.

`oncofed experiment` calls `audit_cell` after each federated cell, while the sites' states and model stores are
on disk: each site runs the audit of `oncofed site privacy-audit` (client/privacy_audit.py: the loss and the
confidence attack on its own training part against its own held-out part, for DP the half the normalisation
never saw, with the run's val-fraction and seed) and the results go to `cells/<cell>/privacy_audit.json`. `oncofed report` reads only that file
(`audit_section`: no model, no torch), so a results directory from before the audit existed simply has no
audit section.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
AUDIT_FILE = "privacy_audit.json"
FORMAT = "oncofed-cell-privacy-audit/1"


def audit_cell(work: Path, fed: Path, manifest: dict, run_config: dict) -> Path:
    """Each site's audit of the cell's delivered model into work/privacy_audit.json (run_config: the cell's
    overrides of the project's run config). A site whose audit cannot run (it trained in no round, too few
    patients) is recorded with the reason; the cell, whose training is done by now, never fails on it."""
    from client.privacy_audit import PrivacyAuditError, TooFewPatients, audit
    from client.site import simulated_site_paths
    from privacy.run_config import load_run_config
    from shared_models.files import write_json_atomic
    from shared_models.run_config import app_defaults

    cfg = load_run_config({**app_defaults(ROOT), **run_config, "data-root": str(fed)})  # as the sites got it
    sites = []
    for s in manifest["sites"]:
        paths = simulated_site_paths(cfg, s)
        try:
            report = audit(paths.site_dir, paths.state_dir, paths.model_dir, s["name"], val_fraction=cfg.site.val_fraction,
                           seed=cfg.training.seed, min_count=cfg.site.min_count)
        except PrivacyAuditError as e:
            sites.append({"site": s["name"], "error": str(e), **({"too_small": True} if isinstance(e, TooFewPatients)
                                                                  else {})})
            continue
        except Exception as e:  # noqa: BLE001 - an audit bug must not throw away a finished cell's training
            sites.append({"site": s["name"], "error": f"the audit failed: {type(e).__name__}: {e}"})
            continue
        for a in report["attacks"]:
            a.pop("roc")  # the curve's points: per-patient detail the report does not draw
        sites.append(report)
    path = Path(work) / AUDIT_FILE
    write_json_atomic(path, {"format": FORMAT, "sites": sites})
    return path


def _read(path: Path) -> list[dict] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc.get("sites") if isinstance(doc, dict) and doc.get("format") == FORMAT else None


def _f(x, digits: int = 3) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _worst(c: dict) -> str:
    i = c.get("auc_max_interval")
    return _f(c["auc_max"]) + ("" if i is None else f" ({_f(i[0])}–{_f(i[1])})")


def cell_summary(sites: list[dict]) -> dict:
    """The cell's audit in one row: per site the strongest attack (largest AUC, TPR, proven epsilon), then the
    mean and the worst over the sites."""
    ok = [s for s in sites if "attacks" in s]
    # audits before the flag say it only in the message the client's TooFewPatients gives
    small = sum(bool(s.get("too_small")) or "an audit needs at least" in s.get("error", "") for s in sites)
    if not ok:
        return {"sites": 0, "errors": len(sites), "too_small": small}
    strongest = [max(s["attacks"], key=lambda a: a["auc"]) for s in ok]
    auc = [a["auc"] for a in strongest]
    intervals = [a.get("auc_interval") for a in strongest]  # DeLong's; audits before 2026-12-05 have none
    loss_intervals = [next((a.get("auc_interval") for a in s["attacks"] if a["attack"] == "loss"), None) for s in ok]
    tpr = [max(a["tpr_at_fpr"]["0.01"] for a in s["attacks"]) for s in ok]
    dp = [s for s in ok if s["claim"]["dp"]]
    eps = [s["claim"]["epsilon"] for s in dp]
    proven = [max(a["bound_test"]["epsilon_lower"] for a in s["attacks"]) for s in dp]
    loosest = max(dp, key=lambda s: s["claim"]["epsilon"]) if dp else None
    return {"sites": len(ok), "errors": len(sites) - len(ok), "too_small": small, "auc_mean": float(np.mean(auc)),
            "auc_max": max(auc), "auc_max_interval": intervals[int(np.argmax(auc))],
            # counted on one attack named in advance, the loss attack: the strongest of several would be a choice
            # made after seeing them, and its 95% interval would hold chance less often than 95%
            "above_chance": sum(i is not None and i[0] > 0.5 for i in loss_intervals),
            "with_interval": sum(i is not None for i in loss_intervals), "tpr_1pct_max": max(tpr),
            "members": (min(s["split"]["members"] for s in ok), max(s["split"]["members"] for s in ok)),
            "nonmembers": (min(s["split"]["nonmembers"] for s in ok), max(s["split"]["nonmembers"] for s in ok)),
            "epsilon": (min(eps), max(eps)) if dp else None,
            "auc_bound": loosest["claim"]["auc_bound"] if dp else None,
            "bound_1pct": loosest["attacks"][0]["bound_at_fpr"]["0.01"] if dp else None,
            "epsilon_proven_max": max(proven) if dp else None,
            "provable_min": min(s["claim"]["strongest_provable_epsilon"] for s in dp) if dp else None,
            "flagged": sum(bool(s["flagged"]) for s in ok)}


def _audited(c: dict) -> str:
    """"3", or "1 of 3 (2 too small)": a site left out is not a site that passed."""
    if not c["errors"]:
        return str(c["sites"])
    other = c["errors"] - c["too_small"]
    why = [f"{c['too_small']} too small"] * bool(c["too_small"]) + [f"{other} not audited"] * bool(other)
    return f"{c['sites']} of {c['sites'] + c['errors']} ({', '.join(why)})"


def audit_section(res) -> list[str]:
    """Markdown for the report (res: simulations.report.Results): one row per federated cell that has an audit,
    DP and non-DP alike; [] when no cell has one (results from before the audit)."""
    fed = res.final[res.final.method == "federated"]
    rows, held_out, provable, beyond = [], [], [], []
    for r in fed.itertuples():
        sites = _read(res.cell_file(r.cell, AUDIT_FILE))
        if sites is None:
            continue
        c = cell_summary(sites)
        if not c["sites"]:
            # the verdict column says why: 3 columns, 7 dashes and it make the header's 11 (a 12th cell would be
            # dropped by markdown renderers, and the reason with it)
            rows.append([f"`{r.cell}`", "no DP" if r.privacy == "off" else f"ε={r.privacy}", "0"] + ["—"] * 7
                        + [f"no site could be audited ({c['errors']} too small or failed: see "
                           f"cells/{r.cell}/{AUDIT_FILE})"])
            continue
        eps = "—" if c["epsilon"] is None else (_f(c["epsilon"][1], 2) if c["epsilon"][1] - c["epsilon"][0] < 0.005
                                               else f"{_f(c['epsilon'][0], 2)}–{_f(c['epsilon'][1], 2)}")
        verdict = "—" if c["epsilon"] is None else ("**beats the bound**" if c["flagged"] else "within")
        if c["flagged"]:
            verdict += f" ({c['flagged']} site{'s' if c['flagged'] > 1 else ''})"
        rows.append([f"`{r.cell}`", "no DP" if r.privacy == "off" else f"ε={r.privacy}", _audited(c), eps,
                     _f(c["auc_mean"]), _worst(c), _f(c["auc_bound"]), _f(c["tpr_1pct_max"]),
                     _f(c["bound_1pct"], 4), _f(c["epsilon_proven_max"], 2), verdict])
        held_out.append(c["nonmembers"][0])
        if c["with_interval"]:
            beyond.append(f"`{r.cell}` {c['above_chance']} of {c['with_interval']}")
        if c["provable_min"] is not None:
            provable.append(c["provable_min"])
    if not rows:
        return []
    header = ["cell", "privacy", "sites", "site ε", "AUC mean", "AUC worst site", "AUC bound", "TPR@1%FPR worst",
              "bound @1%FPR", "ε proven (max)", "verdict"]
    sep = ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---"]
    md = ["## Empirical privacy audit", "",
          ("Each site attacked the delivered global model with membership inference on its own patients: its "
           "training part (members) against its own held-out part (non-members; for a DP model the half its "
           "normalisation was not fitted on), loss and confidence attacks "
           "(`oncofed site privacy-audit`, docs/privacy.md). Per site the stronger attack counts; *AUC mean* is over "
           "the sites; the worst site's AUC is given with its 95% interval (DeLong's: where its true AUC lies, given "
           "how few patients a site can attack). *AUC bound* and *bound @1%FPR* are what the largest site ε allows (TPR ≤ e^ε·FPR + δ). "
           "*ε proven*: the largest ε any attack proves at 95% confidence (Clopper-Pearson); a DP cell whose attack "
           "proves more than its ε beats the bound: a bug."), "",
          "\n".join("| " + " | ".join(x) + " |" for x in [header, sep, *rows]), ""]
    if held_out:
        n = min(held_out)
        note = f"- The smallest audited site had {n} non-members"
        if n < 100:
            note += "; with fewer than 100, TPR at 1% FPR is the TPR at no false positive"
        if provable:
            note += (f"; at the least-powered DP site even a perfect attack could prove at most ε {min(provable):.2f}: "
                     "small sites catch only large leaks")
        md += [note + "."]
    if beyond:
        md += [f"- Sites whose loss-attack AUC interval lies wholly above 0.5 (a leak beyond what chance gives): "
               f"{'; '.join(beyond)}."]
    return md + [""]
