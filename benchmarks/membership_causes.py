"""What raises the loss attack's AUC on a finished run's models: the one-off analyses of docs/results.md
("Membership inference", "Distributed DP"), on stored `oncofed simulate --out` runs.

    python benchmarks/membership_causes.py MODE SPLIT NORM RUN_DIR ...

MODE: `auc` (the loss attack's AUC per site, and over all sites' patients pooled against the one global model
with its 95% interval, DeLong's as the audit reports it: a site's own AUC rests on 29-132 non-members), `auc-by-type` (the same within each type, then averaged),
`halves` (the normalisation refitted on one half of each held-out part), `both-held-out` (pooled macro-F1 of
the final model on the patients that both splits hold out: none trained on by a run of either split),
`unseen` (the same attack with the same members and non-members at each site, against a logistic regression
trained on the other 7 sites' training parts only: a model that never saw the site, so whatever AUC it gives
is the split's, not membership's).

SPLIT is how the run split its sites: `hash` (client.site.held_out_split, since ab86b15) or `strat` (the
class-stratified split before it, re-created here); NORM is what its normalisation was fitted on: `half` (half
the held-out part, DP runs since 131929d; the non-members are then the other half), `val` (the held-out part,
DP runs from ab86b15 to 131929d) or `train` (runs without DP; DP runs before ab86b15). A run needs the SPLIT and
NORM it was made with; `oncofed site privacy-audit` refuses a normalisation it cannot place. `halves`:
each held-out part cut in two by a hash of the patient id, the normalisation refitted on one half, the AUC
against the half it saw and the half it did not (both ways round). The members are the training part.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from client.site import held_out_split, normalisation_half
from privacy import membership
from privacy.membership import per_example_loss
from shared_models.evaluation import classification_metrics, predict_logits
from shared_models.site_data import Normalizer, encode_labels, make_dataset, raw_matrix, read_site
from simulations.federation import load_installed


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The class-stratified split before ab86b15 (git show ab86b15 -- client/site.py)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = min(int(round(val_fraction * len(idx))), len(idx) - 1)
        val.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))


def val_fraction(run_dir: Path) -> float:
    """The run's val-fraction (its held-out parts: the non-members), as `oncofed simulate` recorded its config."""
    from shared_models.run_config import SiteSection

    config = json.loads((run_dir / "summary.json").read_text())["config"]
    return float(config.get("val-fraction", SiteSection.model_fields["val_fraction"].default))


def sites(run_dir: Path):
    """(site, model, schema, ids, y, raw, seed) of each site of a run, with the model it installed."""
    seed = json.loads((run_dir / "summary.json").read_text())["config"]["seed"]
    for d in sorted((run_dir / "sites").glob("C*")):
        model, schema, _ = load_installed(run_dir / "state" / d.name / "models")
        tables = read_site(schema, d)
        ids = [str(i) for i in tables.labels.index]
        yield d.name, model, schema, ids, encode_labels(schema, tables.labels), raw_matrix(schema, tables, ids), seed


def losses(model, schema, raw, y, ids, rows, normalizer) -> np.ndarray:
    ds = make_dataset(schema, raw[rows], y[rows], [ids[i] for i in rows], normalizer)
    # in float64 from the logits, as the audit does: float32 rounds many members' losses to exactly 0 (ties)
    return per_example_loss(predict_logits(model, torch.from_numpy(ds.x)).numpy().astype(np.float64), ds.y)


def auc(member: np.ndarray, nonmember: np.ndarray) -> float:
    """The loss attack on losses: a lower loss says member."""
    return membership.auc(-member, -nonmember)


def auc_by_type(member, nonmember, y_member, y_nonmember) -> float:
    """Within each type with members and non-members, weighted by its number of pairs: no class-mix effect."""
    num = den = 0.0
    for c in np.intersect1d(y_member, y_nonmember):
        a, b = member[y_member == c], nonmember[y_nonmember == c]
        num, den = num + len(a) * len(b) * auc(a, b), den + len(a) * len(b)
    return num / den


def fit_on(norm: str, tr: np.ndarray, va: np.ndarray, ids: list[str], seed: int) -> np.ndarray:
    """The rows a run's normalisation was fitted on, by NORM."""
    if norm == "half":
        return va[normalisation_half([ids[i] for i in va], seed)]
    return {"val": va, "train": tr}[norm]


def against_unseen(run: Path, split: str, norm: str) -> None:
    """Mode `unseen`: each site's loss attack against the run's model and against a model that never saw it."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from simulations.baseline import lr_features

    parts = []
    vf = val_fraction(run)
    for name, model, schema, ids, y, raw, seed in sites(run):
        tr, va = stratified_split(y, vf, seed) if split == "strat" else held_out_split(ids, vf, seed)
        seen = fit_on(norm, tr, va, ids, seed)
        non = np.setdiff1d(va, seen) if norm == "half" else va
        nz = Normalizer.fit(schema, raw[seen])
        run_auc = auc(losses(model, schema, raw, y, ids, tr, nz), losses(model, schema, raw, y, ids, non, nz))
        parts.append((name, schema, ids, y, raw, tr, non, run_auc))
    print(f"{run.name}: loss-attack AUC per site, the run's model / a logistic regression trained without the site")
    for name, schema, ids, y, raw, tr, non, run_auc in parts:
        others = [p for p in parts if p[0] != name]
        nz = Normalizer.fit(schema, np.concatenate([p[4][p[5]] for p in others]))
        feats = lambda p, rows: lr_features(schema, make_dataset(schema, p[4][rows], p[3][rows],  # noqa: E731
                                                                 [p[2][i] for i in rows], nz))
        x = np.concatenate([feats(p, p[5]) for p in others])
        yy = np.concatenate([p[3][p[5]] for p in others])
        clf = LogisticRegression(C=0.1, max_iter=500)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x, yy)
        site = (name, schema, ids, y, raw)
        def ref_loss(rows):
            proba = np.full((len(rows), len(schema.classes)), 1e-12)
            proba[:, clf.classes_] = np.maximum(clf.predict_proba(feats(site, rows)), 1e-12)
            return -np.log(proba[np.arange(len(rows)), y[rows]])
        m, n = ref_loss(tr), ref_loss(non)
        lo, hi = membership.auc_interval(-m, -n)
        print(f"  {name}: {run_auc:.3f} / {auc(m, n):.3f} ({lo:.3f}-{hi:.3f}), by type {auc_by_type(m, n, y[tr], y[non]):.3f}; "
              f"{len(m)} members, {len(n)} non-members")


def main() -> None:
    mode, split, norm, runs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    for run in map(Path, runs):
        if mode == "unseen":
            against_unseen(run, split, norm)
            continue
        out, inside, outside, ys, ps, intervals = [], [], [], [], [], []
        vf = val_fraction(run)
        for _, model, schema, ids, y, raw, seed in sites(run):
            tr, va = stratified_split(y, vf, seed) if split == "strat" else held_out_split(ids, vf, seed)
            if mode == "both-held-out":
                common = np.intersect1d(stratified_split(y, vf, seed)[1], held_out_split(ids, vf, seed)[1])
                nz = Normalizer.fit(schema, raw[fit_on(norm, tr, va, ids, seed)])
                ys.append(y[common])
                ps.append(predict_logits(model, torch.from_numpy(make_dataset(
                    schema, raw[common], y[common], [ids[i] for i in common], nz).x)).argmax(1).numpy())
                continue
            if mode == "halves":
                half = np.array([hashlib.sha256(b"half" + ids[i].encode()).digest()[0] % 2 for i in va])
                parts = [va[half == 0], va[half == 1]]
                for seen, unseen in ((0, 1), (1, 0)):
                    nz = Normalizer.fit(schema, raw[parts[seen]])
                    m = losses(model, schema, raw, y, ids, tr, nz)
                    inside.append(auc(m, losses(model, schema, raw, y, ids, parts[seen], nz)))
                    outside.append(auc(m, losses(model, schema, raw, y, ids, parts[unseen], nz)))
                continue
            seen = fit_on(norm, tr, va, ids, seed)
            nz, non = Normalizer.fit(schema, raw[seen]), (np.setdiff1d(va, seen) if norm == "half" else va)
            m, n = losses(model, schema, raw, y, ids, tr, nz), losses(model, schema, raw, y, ids, non, nz)
            out.append(auc_by_type(m, n, y[tr], y[non]) if mode == "auc-by-type" else auc(m, n))
            if mode == "auc":
                intervals.append(membership.auc_interval(-m, -n))
            inside.append(m)
            outside.append(n)
        if mode == "both-held-out":
            f = classification_metrics(np.concatenate(ys), np.concatenate(ps), len(schema.classes))
            print(f"{run.name}: {sum(map(len, ys))} patients, pooled macro-F1 {f['macro_f1']:.3f}, "
                  f"accuracy {f['accuracy']:.3f}")
        elif mode == "halves":
            print(f"{run.name}: the half the normalisation saw {np.mean(inside):.3f}, the other half "
                  f"{np.mean(outside):.3f} (mean AUC over sites and both ways round)")
        else:
            m, n = np.concatenate(inside), np.concatenate(outside)
            lo, hi = membership.auc_interval(-m, -n)
            print(f"{run.name} ({split} split, normalisation on {norm}): {' '.join(f'{a:.3f}' for a in out)}; "
                  f"max {max(out):.3f}, mean {np.mean(out):.3f}, all sites' patients pooled {auc(m, n):.3f} "
                  f"(95% interval {lo:.3f}-{hi:.3f}; {len(m)} members, {len(n)} non-members)")
            if intervals:
                print("  per site, 95% intervals: " + " ".join(f"{a:.3f}-{b:.3f}" for a, b in intervals)
                      + f"; wholly above 0.5 at {sum(a > 0.5 for a, _ in intervals)}, above 0.55 at "
                      f"{sum(a > 0.55 for a, _ in intervals)} of {len(intervals)} sites")


if __name__ == "__main__":
    main()
