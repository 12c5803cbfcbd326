"""The centralized baseline: the yardstick every federated result is compared with.

The whole cohort in one place, split by tissue-source site (`tss`): whole sites are held out as the
test set (patients from hospitals the model never saw), then whole sites of the remaining patients
as a validation set (early stopping, regularisation strength). Two models on the same features:

- the shared transformer (`MultiModalTransformer`, the federation's model) trained by
  `shared_models.training.fit`;
- multinomial logistic regression on the same normalised features (missing value -> 0, the
  training mean; categorical columns one-hot; one missing indicator per modality), with its
  inverse regularisation C chosen on the validation sites.

The test split is `simulations.partition.choose_holdout` with the same seed and fraction as
`oncofed partition --holdout-column tss --holdout-frac F --seed S`, so the baseline's test patients
are exactly the hold-out of the federation made with those flags.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared_models.schema import ColumnType, FeatureSchema
from shared_models.site_data import (LABELS_STEM, Normalizer, SiteDataset, encode_labels, find_table, make_dataset,
                                     raw_matrix, read_site)

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "simulations" / "schemas"
# The consortium's shared data folder (the BRCA cohort, the full pan-cancer tables): ../shared/data beside the
# checkout, or wherever ONCOFED_SHARED_DATA names.
SHARED_DATA_ENV = "ONCOFED_SHARED_DATA"
SHARED_DATA = Path(os.environ.get(SHARED_DATA_ENV) or ROOT.parent / "shared" / "data")
# Named cohorts: (data directory, schema). BRCA lives in the consortium's shared data folder.
COHORTS = {
    "pancan33": (ROOT / "simulations" / "data" / "tcga_pancan33", SCHEMAS / "tcga_pancan33.json"),
    "brca": (SHARED_DATA / "tcga_brca_pam50", SCHEMAS / "tcga_brca_pam50.json"),
}
LR_C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


class BaselineError(ValueError):
    """A baseline that cannot run; the message names the flag or file and the fix."""


# --- data ------------------------------------------------------------------------------------------
@dataclass
class Cohort:
    schema: FeatureSchema
    data_dir: Path
    ids: list[str]
    raw: np.ndarray  # (n, n_inputs) before normalisation, NaN = missing
    y: np.ndarray
    groups: np.ndarray  # the split column's value per patient (text)


def resolve_cohort(cohort: str, schema_path: str | Path | None) -> tuple[Path, FeatureSchema]:
    if cohort in COHORTS:
        data_dir, default_schema = COHORTS[cohort]
    else:
        data_dir, default_schema = Path(cohort), None
    path = Path(schema_path) if schema_path else default_schema
    if path is None:
        raise BaselineError(f"--cohort {cohort}: a cohort directory needs --schema (the cohort's schema JSON); "
                            f"or use a named cohort: {', '.join(COHORTS)}")
    if not data_dir.is_dir():
        raise BaselineError(f"--cohort {cohort}: data directory {data_dir} not found")
    return data_dir, FeatureSchema.load(path)


def load_cohort(data_dir: str | Path, schema: FeatureSchema, group_column: str = "tss") -> Cohort:
    from simulations.partition import read_text_table

    data_dir = Path(data_dir)
    tables = read_site(schema, data_dir)
    ids = list(tables.labels.index)
    if len(set(ids)) != len(ids):
        raise BaselineError(f"{tables.files[LABELS_STEM]}: a patient is listed more than once; keep one row each")
    y = encode_labels(schema, tables.labels)
    # Read the group column as text: "NA" is a real TCGA site code, "02" is not the number 2.
    labels_path = find_table(data_dir, LABELS_STEM)[0]
    text, text_ids = read_text_table(labels_path, schema.id_column)
    if group_column not in text.column_names:
        raise BaselineError(f"{labels_path}: no column {group_column!r} to hold out whole sites by; "
                            f"its columns are {text.column_names}")
    values = dict(zip(text_ids, (("" if v is None else str(v)).strip() for v in text.column(group_column).to_pylist())))
    groups = np.array([values[i] for i in ids], dtype=object).astype(str)
    if (groups == "").any():
        raise BaselineError(f"{labels_path}: {int((groups == '').sum())} patient(s) have no {group_column!r}; fill it in")
    return Cohort(schema, data_dir, ids, raw_matrix(schema, tables, ids), y, groups)


@dataclass
class Split:
    train: np.ndarray  # indices
    val: np.ndarray
    test: np.ndarray

    def summary(self, cohort: Cohort) -> dict:
        out = {}
        for name in ("train", "val", "test"):
            idx = getattr(self, name)
            out[name] = {"patients": int(len(idx)), "sites": int(len(set(cohort.groups[idx]))),
                         "classes": int(len(set(cohort.y[idx])))}
        return out


def split_by_group(y: np.ndarray, groups: np.ndarray, seed: int, test_frac: float = 0.2,
                   val_frac: float = 0.15) -> Split:
    """Whole groups to test (~test_frac of patients, each class capped at test_frac of its patients),
    then whole groups of the rest to validation the same way. Deterministic by seed."""
    from simulations.partition import choose_holdout

    rng = np.random.default_rng(seed)
    in_test = choose_holdout(groups, y, test_frac, rng)  # first draw: identical to `oncofed partition`
    rest = np.flatnonzero(~in_test)
    in_val = choose_holdout(groups[rest], y[rest], val_frac, rng)
    split = Split(train=rest[~in_val], val=rest[in_val], test=np.flatnonzero(in_test))
    if not len(split.test) or not len(split.val):
        raise BaselineError("no site is small enough to hold out; raise the test or validation fraction")
    return split


def make_datasets(cohort: Cohort, split: Split) -> tuple[SiteDataset, SiteDataset, SiteDataset]:
    """Normaliser fitted on the training rows only, applied to all three parts."""
    norm = Normalizer.fit(cohort.schema, cohort.raw[split.train])
    return tuple(make_dataset(cohort.schema, cohort.raw[idx], cohort.y[idx], [cohort.ids[i] for i in idx], norm)
                 for idx in (split.train, split.val, split.test))


# --- logistic regression -----------------------------------------------------------------------------
def lr_features(schema: FeatureSchema, ds: SiteDataset) -> np.ndarray:
    """Normalised numeric values (missing -> 0 = the training mean), one-hot categoricals, and one
    missing indicator per modality."""
    layout = schema.layout()
    parts = []
    for m, present in zip(schema.modalities, ds.modality_present.T):
        block = ds.x[:, layout.slices[m.name]]
        for j, f in enumerate(m.features):
            col = block[:, j]
            if m.column_type(f) is ColumnType.categorical:
                levels = np.arange(len(m.levels[f]))
                parts.append((col[:, None] == levels[None, :]).astype(np.float32))
            else:
                parts.append(np.nan_to_num(col, nan=0.0)[:, None])
        parts.append((~present).astype(np.float32)[:, None])
    return np.concatenate(parts, axis=1)


def fit_logistic(x_train, y_train, x_val, y_val, n_classes: int, c_grid=LR_C_GRID, monitor: str = "macro_f1",
                 seed: int = 0):
    """Multinomial logistic regression, C chosen on the validation split by `monitor`. Training patients of a
    single class (a site holding one type under label skew) get the constant classifier that predicts it, with
    C None: a logistic regression needs two classes, and one class is all such a site could learn alone."""
    import warnings

    from sklearn.dummy import DummyClassifier
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from shared_models.evaluation import classification_metrics

    if len(np.unique(y_train)) == 1:
        return DummyClassifier(strategy="most_frequent").fit(x_train, y_train), None, {}
    best = None
    scores = {}
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x_train, y_train)
        pred = clf.predict(x_val)
        score = classification_metrics(y_val, pred, n_classes)[monitor]
        scores[c] = score
        if best is None or score > best[0]:
            best = (score, c, clf)
    return best[2], best[1], scores


# --- the run ------------------------------------------------------------------------------------------
def run_baseline(cohort: Cohort, seed: int = 0, train_cfg=None, model_cfg=None, test_frac: float = 0.2,
                 val_frac: float = 0.15, models=("transformer", "logistic"), log=None) -> dict:
    import torch

    from shared_models.evaluation import classification_metrics, evaluate
    from shared_models.model import MultiModalTransformer
    from shared_models.run_config import CENTRALIZED_MODEL
    from shared_models.training import TrainConfig, fit

    torch.set_num_threads(1)
    schema = cohort.schema
    split = split_by_group(cohort.y, cohort.groups, seed, test_frac, val_frac)
    train, val, test = make_datasets(cohort, split)
    result = {
        "cohort": str(cohort.data_dir), "schema": schema.name, "schema_hash": schema.content_hash(),
        "seed": seed, "split": {"by": "tss", "test_frac": test_frac, "val_frac": val_frac, **split.summary(cohort)},
        "test_classes": [schema.classes[c] for c in sorted(set(test.y))],
    }
    if "transformer" in models:
        train_cfg = train_cfg or TrainConfig(seed=seed)
        model_cfg = model_cfg or CENTRALIZED_MODEL
        torch.manual_seed(train_cfg.seed)
        model = MultiModalTransformer(schema, model_cfg)
        xt, yt = train.tensors()
        xv, yv = val.tensors()
        fitted = fit(model, xt, yt, train_cfg, xv, yv, log=log)
        metrics = evaluate(model, *test.tensors())
        result["transformer"] = {
            "test": _named(metrics.to_dict(), schema), "val": fitted.best_val.to_dict() if fitted.best_val else None,
            "best_epoch": fitted.best_epoch, "epochs_run": fitted.epochs_run,
            "train_seconds": round(fitted.seconds, 1), "samples_per_s": round(fitted.samples_per_s, 1),
            "parameters": model.num_parameters(), "model_config": model_cfg.model_dump(),
            "train_config": train_cfg.model_dump(),
        }
    if "logistic" in models:
        t0 = time.perf_counter()
        ft, fv, fs = (lr_features(schema, d) for d in (train, val, test))
        clf, c, scores = fit_logistic(ft, train.y, fv, val.y, schema.n_classes, seed=seed)
        pred = clf.predict(fs)
        result["logistic"] = {
            "test": _named(classification_metrics(test.y, pred, schema.n_classes), schema), "C": c,
            "val_macro_f1_by_C": {str(k): round(v, 4) for k, v in scores.items()},
            "features": int(ft.shape[1]), "seconds": round(time.perf_counter() - t0, 1),
        }
    return result


def _named(metrics: dict, schema: FeatureSchema) -> dict:
    """per_class_f1 as {class: F1} over the classes in the labels or the predictions."""
    f1 = metrics["per_class_f1"]
    return {**metrics, "per_class_f1": {c: v for c, v in zip(schema.classes, f1) if v is not None}}


def format_result(result: dict) -> str:
    rows = []
    for key, name in (("transformer", "transformer"), ("logistic", "logistic regression")):
        if key in result:
            t = result[key]["test"]
            rows.append([name, f"{t['accuracy']:.3f}", f"{t['balanced_accuracy']:.3f}", f"{t['macro_f1']:.3f}"])
    head = ["model", "accuracy", "balanced acc.", "macro-F1"]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    s = result["split"]
    lines = [f"{result['schema']}: test = {s['test']['patients']} patients from {s['test']['sites']} held-out "
             f"sites ({s['test']['classes']} classes); train {s['train']['patients']}, validation "
             f"{s['val']['patients']} (seed {result['seed']})"]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
              for r in [head] + rows]
    if "transformer" in result:
        t = result["transformer"]
        lines.append(f"transformer: {t['parameters']:,} parameters, best epoch {t['best_epoch']} of {t['epochs_run']}, "
                     f"{t['train_seconds']} s, {t['samples_per_s']} samples/s")
    if "logistic" in result:
        lines.append(f"logistic regression: C = {result['logistic']['C']} (chosen on validation), "
                     f"{result['logistic']['features']} features")
    return "\n".join(lines)


def save_result(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
