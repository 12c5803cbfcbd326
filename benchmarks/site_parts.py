"""Finished runs' final models on the sites' held-out parts, two ways: the round log's number (each site's
macro-F1 over its own held-out part, averaged weighted by patients) and the same patients pooled (one
macro-F1 over every site's held-out patients, as the held-out tss patients are scored).

    python benchmarks/site_parts.py RUN_DIR [RUN_DIR ...] [--common]

RUN_DIR is an `oncofed simulate --out` directory. Each run's sites are split and normalised as the run did
(`simulations.federation.finished_run_sites`). `--common`: only the patients that every listed run held out,
so that runs whose held-out parts differ (another seed's split, another `val-fraction`) are compared on the
same patients, none of which any of them trained on. These parts chose the DP recipe (docs/results.md); the
held-out tss patients are scored by `oncofed simulate` itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from shared_models.evaluation import classification_metrics, predict_logits
from simulations.federation import finished_run_sites, load_installed


def score(run_dir: Path, parts: dict, keep: dict[str, set[str]] | None) -> dict:
    model, schema, _ = load_installed(run_dir / "state" / next(iter(parts)) / "models")
    ys, ps, per = [], [], []
    for site, p in parts.items():
        rows = np.array([keep is None or i in keep[site] for i in p.val.ids], dtype=bool)
        y = p.val.y[rows]
        pred = predict_logits(model, torch.from_numpy(p.val.x[rows])).argmax(1).numpy()
        ys.append(y), ps.append(pred)
        per.append((classification_metrics(y, pred, len(schema.classes))["macro_f1"], len(y)))
    y, pred = np.concatenate(ys), np.concatenate(ps)
    pooled = classification_metrics(y, pred, len(schema.classes))
    return {"patients": len(y), "per_site": sum(f * n for f, n in per) / len(y), "pooled": pooled["macro_f1"],
            "accuracy": pooled["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--common", action="store_true", help="only the patients every listed run held out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    parts = {r: finished_run_sites(r)[2] for r in args.runs}
    keep = None
    if args.common:
        sites = set.intersection(*(set(p) for p in parts.values()))
        keep = {s: set.intersection(*(set(p[s].val.ids) for p in parts.values())) for s in sites}
        parts = {r: {s: p[s] for s in sorted(sites)} for r, p in parts.items()}
    print(f"{'run':<40} {'patients':>8} {'per-site macro-F1':>17} {'pooled macro-F1':>15} {'accuracy':>8}")
    for r, p in parts.items():
        m = score(r, p, keep)
        print(f"{str(r):<40} {m['patients']:>8} {m['per_site']:>17.3f} {m['pooled']:>15.3f} {m['accuracy']:>8.3f}")


if __name__ == "__main__":
    main()
