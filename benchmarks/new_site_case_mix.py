"""A hospital that never trained fits the input normalisation on its own patients (`oncofed serve fit-normalizer`):
what the case mix of those patients does to the delivered model's answers.

Every training site z-scores each feature on its own patients, a mix of many cancer types, so the model reads
a feature as "above or below this hospital's mix". A cohort of one or a few types, normalised on itself, is
centred on those types: what tells them apart from the others is subtracted. The cohorts here are drawn from
the training hospitals' own held-out parts (the run's split; never the held-out hospitals' patients, so the
bound `fit-normalizer` enforces is not chosen on them): k types at random, all their held-out patients, or the
whole mix with one type made a larger share. Each cohort is normalised on itself and scored by the run's model;
beside it, the same patients normalised by a training site's own statistics.

    python benchmarks/new_site_case_mix.py RUN_DIR [--repeats 5] [--seed 0]     # RUN_DIR: oncofed simulate --out
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def pooled_held_out_parts(run: Path):
    """The training sites' held-out parts, pooled: raw rows (schema layout) and label indices."""
    from client.site import held_out_split
    from shared_models.schema import FeatureSchema
    from shared_models.site_data import encode_labels, raw_matrix, read_site

    schema = FeatureSchema.load(run / "sites" / "schema.json")
    split = json.loads(next((run / "state").glob("*/models/v*/split.json")).read_text())
    raws, ys = [], []
    for site in sorted(p for p in (run / "sites").iterdir() if p.is_dir() and p.name != "holdout"):
        tables = read_site(schema, site)
        ids = list(tables.labels.index)
        _, val = held_out_split(ids, split["val_fraction"], split["seed"])
        ids = [ids[i] for i in val]
        raws.append(raw_matrix(schema, tables, ids))
        ys.append(encode_labels(schema, tables.labels.loc[ids]))
    return schema, np.concatenate(raws), np.concatenate(ys)


def scores(model, normalizer, raw: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracy, and the share of patients answered wrongly with probability >= 0.9."""
    with torch.inference_mode():
        probs = torch.softmax(model(torch.from_numpy(normalizer.transform(raw))), 1).numpy()
    pred, conf = probs.argmax(1), probs.max(1)
    return float((pred == y).mean()), float(((pred != y) & (conf >= 0.9)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from shared_models.site_data import Normalizer
    from shared_models.weights import load_weights

    schema, raw, y = pooled_held_out_parts(args.run)
    version = sorted((args.run / "state").glob("C0/models/v*"))[-1]
    model = load_weights(version / "weights.pt", schema).eval()
    trained = Normalizer.load(version / "normalizer.json", schema)  # a training site's own (C0's)
    rng = np.random.default_rng(args.seed)
    counts = np.bincount(y, minlength=len(schema.classes))
    usable = np.flatnonzero(counts >= 10)
    print(f"{args.run}: {len(y)} held-out patients of the training sites, {len(usable)} types with >= 10; model "
          f"{version.name}, {args.repeats} draws a row")
    print("| cohort | patients | types | largest type's share | accuracy, normalised on itself | confident (>= 0.9) "
          "and wrong | accuracy with a training site's normalisation |")
    print("|---|---|---|---|---|---|---|")

    def row(name: str, cohorts: list[np.ndarray]) -> None:
        own = [scores(model, Normalizer.fit(schema, raw[c]), raw[c], y[c]) for c in cohorts]
        ref = [scores(model, trained, raw[c], y[c])[0] for c in cohorts]
        share = np.mean([np.bincount(y[c]).max() / len(c) for c in cohorts])
        types = np.mean([len(np.unique(y[c])) for c in cohorts])
        print(f"| {name} | {np.mean([len(c) for c in cohorts]):.0f} | {types:.0f} | {share:.2f} | "
              f"{np.mean([o[0] for o in own]):.3f} | {np.mean([o[1] for o in own]):.3f} | {np.mean(ref):.3f} |")

    for k in (1, 2, 3, 5, 8, 12, 16, 24):
        row(f"{k} types", [np.flatnonzero(np.isin(y, rng.choice(usable, k, replace=False)))
                           for _ in range(args.repeats)])
    everyone = np.arange(len(y))
    row("every type", [everyone])
    for share in (0.3, 0.5, 0.7):  # the whole mix with one type's patients repeated to this share
        cohorts = []
        for _ in range(args.repeats):
            t = rng.choice(usable)
            mine, rest = np.flatnonzero(y == t), np.flatnonzero(y != t)
            extra = int(share * len(rest) / (1 - share)) - len(mine)
            cohorts.append(np.concatenate([rest, mine, rng.choice(mine, max(extra, 0))]))
        row(f"every type, one at {share:.0%}", cohorts)


if __name__ == "__main__":
    main()
