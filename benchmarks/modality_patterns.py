"""What a patient's missing modalities do to the answers, and what per-pattern calibration makes of it.

For sites of an `oncofed simulate` output: `serve calibrate` on the site's own labelled patients (its
tables, as a site would), then the held-out hospitals' patients (who chose nothing) scored with each
modality pattern (the other modalities masked as missing, patients who have the pattern's modalities)
three ways: uncalibrated, with the site's overall temperature only (a calibration file of format /1), and
as served now (the pattern's temperature and the `weak_pattern` / `pattern_unmeasured` flags). The count
that matters is answers that are confident (top probability >= `serve.low-confidence`), carry no warning
about their trust, and are wrong.

    python benchmarks/modality_patterns.py RUN_DIR [--sites C0,C5]     # RUN_DIR: oncofed simulate --out RUN_DIR
    python benchmarks/modality_patterns.py RUN_DIR --consortium        # a site that has not calibrated

--consortium: no site calibrates; the held-out hospitals' patients are scored by the delivered model with the
package's per-pattern measurement (the sites' held-out parts at the run's last round, summed by the server) as the
only judge of the answers: each pattern's accuracy there against the held-out hospitals', and the confident,
unflagged, wrong answers with no measurement at all (a package from before) against with the consortium's flags.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np


def answers(lm, raw: np.ndarray, y: np.ndarray, keep: set[int] | None, limits, mode: str) -> dict:
    """Scores of the held-out patients with only the modalities `keep` (others masked; None: as they come): how
    many answers are confident, unflagged and wrong. mode: "uncalibrated", "overall" (one temperature) or
    "served"."""
    from client.calibration import _softmax, expected_calibration_error, counted_modalities, site_logits
    from client.predict import answer_warnings

    logits = site_logits(lm, raw, keep_modalities=keep)
    present = counted_modalities(lm, raw)
    if keep is not None:
        present[:, [j for j in range(present.shape[1]) if j not in keep]] = False
    if mode == "uncalibrated":
        temps = np.ones(len(raw))
    elif mode == "overall":
        temps = np.full(len(raw), lm.temperature)
    else:
        temps = lm.temperatures(present).astype(np.float64)
    probs = _softmax(logits / temps[:, None], 1.0)
    conf, pred = probs.max(1), probs.argmax(1)
    unflagged = np.array([not answer_warnings(lm, float(c), p, limits)[0] if mode == "served" else
                          c >= limits.low_confidence for c, p in zip(conf, present)])
    return {"n": len(y), "accuracy": float((pred == y).mean()), "ece": expected_calibration_error(probs, y),
            "confident_unflagged_wrong": int((unflagged & (pred != y)).sum()),
            "confident_unflagged": int(unflagged.sum()), "flagged_right": int((~unflagged & (pred == y)).sum())}


def held_out_patients(predictor, run: Path, limits) -> tuple[np.ndarray, np.ndarray]:
    """The held-out hospitals' labelled patients through the input contract: raw rows and class indices."""
    from shared_models.site_data import LABELS_STEM, find_table, read_table

    schema, held_dir = predictor.current.schema, run / "sites" / "holdout"
    checked = predictor.checked_tables(held_dir, limits)
    labels = read_table(find_table(held_dir, LABELS_STEM)[0], schema.id_column)[schema.label_column]
    lookup = {c: k for k, c in enumerate(schema.classes)}
    known = [i for i, pid in enumerate(checked.ids) if str(labels.get(pid)) in lookup]
    return checked.raw[known], np.array([lookup[str(labels[checked.ids[i]])] for i in known])


def consortium(run: Path, site: str, limits) -> list[dict]:
    """The --consortium comparison for one site's installed model (uncalibrated: its calibration is not read)."""
    from client.calibration import counted_modalities
    from client.predict import Predictor
    from privacy.site_config import SiteConfig

    cfg = SiteConfig.load(run / "state" / site / "site.json")
    predictor = Predictor(cfg.model_dir, Path(cfg.state_dir) / "normalizer.json", cfg.signing_public_key or None,
                          calibration_path=Path(cfg.state_dir) / "calibration.none")
    lm = predictor.current
    patterns = lm.consortium_patterns()
    if not patterns:
        raise SystemExit(f"{run}: the delivered package has no per-pattern measurement (a run from before "
                         "d1ec8be)")
    raw, y = held_out_patients(predictor, run, limits)
    names = [m.name for m in lm.schema.modalities]
    present = counted_modalities(lm, raw)
    print(f"\nthe package's {len(patterns)} patterns (measured on the sites' held-out parts) against the held-out "
          "hospitals' patients, each pattern's modalities kept, the others masked; no site calibration")
    print(f"  {'modalities present':<40} {'consortium n':>12} {'acc':>6} {'held-out n':>10} {'acc':>6}   "
          "confident, unflagged, wrong: no measurement / consortium flags")
    rows, totals = [], {w: [0, 0, 0] for w in ("weak", "other")}
    for key, e in sorted(patterns.items(), key=lambda kv: kv[1]["accuracy"]):
        pattern = {names.index(m) for m in e["modalities"]}
        has = present[:, sorted(pattern)].all(1)
        if has.sum() < 30:
            continue
        none = answers(lm, raw[has], y[has], pattern, limits, "uncalibrated")
        flagged = answers(lm, raw[has], y[has], pattern, limits, "served")
        t = totals["weak" if e["accuracy"] < limits.min_pattern_accuracy else "other"]
        t[0], t[1], t[2] = t[0] + none["confident_unflagged_wrong"], t[1] + flagged["confident_unflagged_wrong"], \
            t[2] + none["n"]
        rows.append({"pattern": key, "consortium_n": e["n_heldout"], "consortium_accuracy": e["accuracy"],
                     "n": none["n"], "accuracy": none["accuracy"],
                     "no_measurement_confident_unflagged_wrong": none["confident_unflagged_wrong"],
                     "consortium_confident_unflagged_wrong": flagged["confident_unflagged_wrong"]})
        print(f"  {key:<40} {e['n_heldout']:>12} {e['accuracy']:>6.3f} {none['n']:>10} {none['accuracy']:>6.3f}   "
              f"{none['confident_unflagged_wrong']:>4} / {flagged['confident_unflagged_wrong']:>4}")
    for w, what in (("weak", f"patterns the consortium measured below {limits.min_pattern_accuracy:.0%}"),
                    ("other", "the other patterns")):
        t = totals[w]
        print(f"  {what}: confident, unflagged, wrong answers {t[0]} of {t[2]} ({t[0] / max(t[2], 1):.1%}) with no "
              f"measurement, {t[1]} ({t[1] / max(t[2], 1):.1%}) with the consortium's flags")
    return rows


def main() -> None:
    from client.calibration import calibrate, counted_modalities
    from client.predict import Predictor
    from privacy.site_config import ServeSettings, SiteConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="an `oncofed simulate --out` directory")
    ap.add_argument("--sites", default="C0,C5")
    ap.add_argument("--consortium", action="store_true", help="no site calibration: the package's per-pattern "
                    "measurement against the held-out hospitals' patients (the first of --sites' models)")
    args = ap.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.2f}, run {args.run}")
    limits = ServeSettings(max_patients=10**9)
    if args.consortium:
        rows = consortium(args.run, args.sites.split(",")[0], limits)
        print(json.dumps({"benchmark": "modality_patterns", "consortium": True, "rows": rows}))
        return
    rows = []
    for site in args.sites.split(","):
        cfg = SiteConfig.load(args.run / "state" / site / "site.json")
        try:
            cal = calibrate(cfg, args.run / "sites" / site)
        except ValueError as e:  # e.g. too few patients outside the run's training part
            print(f"\nsite {site}: calibration refused: {e}")
            continue
        predictor = Predictor(cfg.model_dir, Path(cfg.state_dir) / "normalizer.json", cfg.signing_public_key or None)
        lm = predictor.current
        raw, y = held_out_patients(predictor, args.run, limits)
        names = [m.name for m in lm.schema.modalities]
        present = counted_modalities(lm, raw)
        print(f"\nsite {site}: calibrated on {cal['n_fit']} + {cal['n_heldout']} of its patients, "
              f"{len(cal['patterns'])} patterns measured; held-out hospitals' patients, each pattern's modalities "
              "kept, the others masked")
        print(f"  {'modalities present':<40} {'n':>5} {'site acc':>8} {'acc':>6}   ECE: uncal / overall T / served"
              "   confident, unflagged, wrong: uncal / overall T / served")
        modes = ("uncalibrated", "overall", "served")
        natural = {m: answers(lm, raw, y, None, limits, m) for m in modes}
        print("  as they come (each patient's own modalities): confident, unflagged, wrong answers " + " / ".join(
            f"{m} {r['confident_unflagged_wrong']} of {r['n']}" for m, r in natural.items())
            + "; right answers flagged (low confidence or weak pattern) " + " / ".join(
            f"{r['flagged_right']}" for r in natural.values()))
        totals = {w: {m: [0, 0] for m in modes} for w in ("weak", "other")}  # patterns the site measured as weak
        for k in range(1, len(names) + 1):
            for pattern in itertools.combinations(range(len(names)), k):
                has = present[:, list(pattern)].all(1)
                if has.sum() < 30:
                    continue
                key = "+".join(names[j] for j in pattern)
                r = {m: answers(lm, raw[has], y[has], set(pattern), limits, m) for m in modes}
                site_acc = cal["patterns"].get(key, {}).get("accuracy")
                group = totals["weak" if site_acc is not None and site_acc < limits.min_pattern_accuracy else "other"]
                for m in modes:
                    group[m][0] += r[m]["confident_unflagged_wrong"]
                    group[m][1] += r[m]["n"]
                rows.append({"site": site, "pattern": key, "site_accuracy": site_acc,
                             **{f"{m}_{f}": r[m][f] for m in r for f in ("ece", "confident_unflagged_wrong")},
                             "n": r["served"]["n"], "accuracy": r["served"]["accuracy"]})
                acc = "-" if site_acc is None else f"{site_acc:.3f}"
                print(f"  {key:<40} {r['served']['n']:>5} {acc:>8} {r['served']['accuracy']:>6.3f}   "
                      + " / ".join(f"{r[m]['ece']:.3f}" for m in r) + "   "
                      + " / ".join(f"{r[m]['confident_unflagged_wrong']:>4}" for m in r))
        for w, what in (("weak", f"patterns the site measured below {limits.min_pattern_accuracy:.0%}"),
                        ("other", "the other patterns")):
            print(f"  {what}: confident, unflagged, wrong answers " + " / ".join(
                f"{m} {t[0]} of {t[1]} ({t[0] / max(t[1], 1):.1%})" for m, t in totals[w].items()))
    print(json.dumps({"benchmark": "modality_patterns", "rows": rows}))


if __name__ == "__main__":
    main()
