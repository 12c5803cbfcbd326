"""Predictions of the global model at a site: one patient or many, any modality missing.

The active model of the site's store (client/model_store.py) is loaded with its schema and verified
(SHA-256 of the weights; with the consortium's signing key, the server's signature). Inputs are
normalised with the site's own statistics: `STATE_DIR/normalizer.json`, written when the site
trained, or fitted by `oncofed serve fit-normalizer` on a new hospital's unlabelled patients.

Explanations:
- per-modality contributions: the fusion's attention weights over the modalities present (sum 1);
- top features: integrated gradients of the predicted class's logit, from the site mean (0 after
  normalisation) to the patient, over the numeric features present (categorical levels have no
  path between them and are not attributed).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from client.model_store import ModelStore, ModelStoreError
from shared_models.schema import ColumnType, FeatureSchema
from shared_models.site_data import Normalizer, TableError, raw_matrix, read_table
from shared_models.weights import load_weights

IG_STEPS = 16
FLOAT32_MAX = float(np.finfo(np.float32).max)


class PredictionInputError(ValueError):
    """A payload or table the model cannot score: names the modality, feature and problem."""

    def __init__(self, problems: list[dict]):
        self.problems = problems
        super().__init__("; ".join(f"{p['loc']}: {p['msg']}" for p in problems[:10]))


@dataclass
class LoadedModel:
    version: str
    schema: FeatureSchema
    model: torch.nn.Module
    package: dict
    signature: str  # "verified", "unsigned", "not checked (no trust anchor)"
    normalizer: Normalizer
    inputs: dict  # modality -> {feature: (column, kind, levels)}, built once (input_map)


def input_map(schema: FeatureSchema) -> dict:
    """Where each feature of a JSON payload goes: column, and kind "cat" (level -> code), "log" (log1p), "num"."""
    from shared_models.schema import Transform

    layout, out = schema.layout(), {}
    for m in schema.modalities:
        start, feats = layout.slices[m.name].start, {}
        for j, f in enumerate(m.features):
            t = m.column_type(f)
            if t is ColumnType.categorical:
                feats[f] = (start + j, "cat", {lvl: k for k, lvl in enumerate(m.levels[f])})
            elif m.transform is Transform.log1p and t is ColumnType.numeric:
                feats[f] = (start + j, "log", None)
            else:
                feats[f] = (start + j, "num", None)
        out[m.name] = feats
    return out


class Predictor:
    """Thread-safe holder of the active model; `refresh()` picks up a newly activated version."""

    def __init__(self, model_dir: str | Path, normalizer_path: str | Path, signing_public_key: str | Path | None = None):
        self.store = ModelStore(model_dir)
        self.normalizer_path = Path(normalizer_path)
        self.signing_public_key = Path(signing_public_key) if signing_public_key else None
        self._lock = threading.Lock()
        self.current: LoadedModel | None = None
        self.failed: tuple[str, str] | None = None  # (version, why): not retried until ACTIVE changes
        self.refresh()

    def _load(self, version: str) -> LoadedModel:
        key = None
        if self.signing_public_key is not None:
            from privacy.signing import load_public

            key = load_public(self.signing_public_key)
        package = self.store.verify(version, key)  # raises ModelStoreError on any mismatch
        signature = ("verified" if key is not None else
                     "not checked (no trust anchor)" if "signature" in package.get("delivery", {}) else "unsigned")
        root = self.store.root / version
        schema = FeatureSchema.load(root / "schema.json")
        model = load_weights(root / "weights.pt", schema).eval()
        try:
            normalizer = Normalizer.load(self.normalizer_path, schema)
        except TableError as e:
            raise ModelStoreError(f"{e}; a site that never trained fits one with `oncofed serve fit-normalizer`") from None
        return LoadedModel(version, schema, model, package, signature, normalizer, input_map(schema))

    def refresh(self) -> bool:
        """Load the store's active version if it changed; True if the model changed."""
        active = self.store.active()
        if active is None:
            raise ModelStoreError(f"{self.store.root}: no model installed yet (the global model arrives after a "
                                  "federated run)")
        if self.current is not None and self.current.version == active:
            return False
        if self.failed is not None and self.failed[0] == active:
            raise ModelStoreError(self.failed[1])
        try:
            loaded = self._load(active)
        except Exception as e:
            self.failed = (active, f"{active}: {e}")
            raise
        self.failed = None
        with self._lock:
            self.current = loaded
        return True

    # --- inputs ------------------------------------------------------------------------------------
    def raw_from_json(self, patients: list[dict], lm: LoadedModel | None = None) -> tuple[list[str], np.ndarray]:
        """[{"id": ..., "modalities": {name: {feature: value}}}] -> ids and the raw (n, n_inputs) matrix
        for `lm` (default: the current model; score it with the same `lm`).

        null (or an absent feature / modality) is missing; every problem is reported, each naming the
        patient, modality and feature."""
        lm = lm or self.current
        inputs = lm.inputs
        raw = np.full((len(patients), lm.schema.layout().n_inputs), np.nan, dtype=np.float32)
        problems, ids = [], []

        def bad(loc: str, msg: str) -> None:
            problems.append({"loc": loc, "msg": msg})

        for i, p in enumerate(patients):
            if not isinstance(p, dict):
                bad(f"patients[{i}]", "must be an object with 'id' and 'modalities'")
                ids.append(str(i))
                continue
            ids.append(str(p.get("id", i)))
            mods = p.get("modalities") or {}
            if not isinstance(mods, dict):
                bad(f"patients[{i}].modalities", "must be an object: modality -> features")
                continue
            for mname, feats in mods.items():
                fmap = inputs.get(mname)
                if fmap is None:
                    bad(f"patients[{i}].modalities.{mname}", f"unknown modality; the schema has {', '.join(inputs)}")
                    continue
                if feats is None:
                    continue  # the modality is missing for this patient
                if not isinstance(feats, dict):
                    bad(f"patients[{i}].modalities.{mname}", "must be an object of feature: value")
                    continue
                row = raw[i]
                for f, v in feats.items():
                    spec = fmap.get(f)
                    loc = f"patients[{i}].modalities.{mname}.{f}"
                    if spec is None:
                        bad(loc, f"unknown feature of modality {mname!r}")
                        continue
                    if v is None:
                        continue  # missing value
                    col, kind, levels = spec
                    if kind == "cat":
                        code = levels.get(str(v).strip())
                        if code is None:
                            bad(loc, f"level {v!r} not in {list(levels)}")
                        else:
                            row[col] = code
                        continue
                    if isinstance(v, bool) or not isinstance(v, (int, float)):
                        bad(loc, f"expected a number, got {type(v).__name__} {v!r}")
                    elif v != v or not -FLOAT32_MAX < v < FLOAT32_MAX:
                        bad(loc, "NaN, infinite or beyond float32: send null for a missing value")
                    elif kind == "log":
                        if v <= -1:
                            bad(loc, f"{v} is <= -1: modality {mname!r} is log1p-transformed, so values must be "
                                "> -1 (raw counts/levels, not logs)")
                        else:
                            row[col] = np.log1p(v)
                    else:
                        row[col] = v
        if problems:
            raise PredictionInputError(problems)
        return ids, raw

    def raw_from_tables(self, site_dir: Path) -> tuple[list[str], np.ndarray]:
        return tables_to_raw(self.current.schema, site_dir)

    # --- outputs -----------------------------------------------------------------------------------
    def predict(self, raw: np.ndarray, top_k: int = 0, lm: LoadedModel | None = None) -> tuple[LoadedModel, dict]:
        """Score raw inputs with `lm` (the model they were built for) or the current model."""
        if lm is None:
            with self._lock:
                lm = self.current
        x = torch.from_numpy(lm.normalizer.transform(raw.copy()))
        with torch.no_grad():
            out = lm.model.explain(x)
        probs = torch.softmax(out["logits"], dim=1).numpy()
        weights = out["modality_weights"]
        result = {"probabilities": probs, "predicted": probs.argmax(1),
                  "modality_weights": None if weights is None else weights.numpy(),
                  "present": out["present"].numpy()}
        if top_k:
            result["attributions"] = integrated_gradients(lm, x, torch.from_numpy(result["predicted"]))
        return lm, result


def tables_to_raw(schema: FeatureSchema, site_dir: Path) -> tuple[list[str], np.ndarray]:
    """A site-layout directory (one table per modality; labels not needed) -> ids and raw matrix."""
    from shared_models.site_data import SiteTables, find_table

    modalities, seen = {}, {}
    for m in schema.modalities:
        found = find_table(site_dir, m.name)
        if found:
            modalities[m.name] = read_table(found[0], schema.id_column)
            seen.update(dict.fromkeys(str(i) for i in modalities[m.name].index))
    if not modalities:
        raise PredictionInputError([{"loc": str(site_dir), "msg": "no modality table: name each file after its "
                                     f"modality ({', '.join(m.name for m in schema.modalities)})"}])
    ids = list(seen)
    tables = SiteTables(site_dir, pd.Series(index=ids, dtype="string"), modalities)
    return ids, raw_matrix(schema, tables, ids)


def integrated_gradients(lm: LoadedModel, x: torch.Tensor, target: torch.Tensor, steps: int = IG_STEPS) -> np.ndarray:
    """(n, n_inputs) attribution of each present numeric feature to the target class's logit."""
    numeric = torch.zeros(x.shape[1], dtype=torch.bool)
    numeric[[col for feats in lm.inputs.values() for col, kind, _ in feats.values() if kind != "cat"]] = True
    mask = numeric & ~torch.isnan(x)
    base = torch.where(mask, torch.zeros_like(x), x)  # categorical / missing stay as they are
    delta = torch.where(mask, x, torch.zeros_like(x))  # from 0 (the site mean) to the patient
    total = torch.zeros_like(x)
    for a in (torch.arange(steps, dtype=torch.float32) + 0.5) / steps:  # midpoint rule
        xi = (base + a * delta).requires_grad_(True)
        logit = lm.model(xi).gather(1, target.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(logit, xi)
        total += torch.nan_to_num(grad)
    return (total * delta / steps).masked_fill(~mask, 0.0).numpy()


def feature_names(schema: FeatureSchema) -> list[tuple[str, str]]:
    return [(m.name, f) for m in schema.modalities for f in m.features]


def format_predictions(lm: LoadedModel, ids: list[str], result: dict, top_k: int = 0) -> list[dict]:
    schema = lm.schema
    names = feature_names(schema) if top_k and "attributions" in result else None
    out = []
    for i, pid in enumerate(ids):
        probs = result["probabilities"][i]
        row = {"id": pid, "predicted": schema.classes[int(result["predicted"][i])],
               "probabilities": {c: round(float(p), 6) for c, p in zip(schema.classes, probs)},
               "model_version": lm.version,
               "modalities_present": [m.name for m, p in zip(schema.modalities, result["present"][i]) if p]}
        if result["modality_weights"] is not None:
            row["modality_contributions"] = {m.name: round(float(w), 6) for m, w, p in zip(
                schema.modalities, result["modality_weights"][i], result["present"][i]) if p}
        if names is not None:
            a = result["attributions"][i]
            order = np.argsort(-np.abs(a))[:top_k]
            row["top_features"] = [{"modality": names[j][0], "feature": names[j][1], "attribution": round(float(a[j]), 6)}
                                   for j in order if a[j] != 0]
        out.append(row)
    return out
