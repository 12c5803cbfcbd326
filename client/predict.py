"""Predictions of the global model at a site: one patient or many, any modality missing.

The active model of the site's store (client/model_store.py) is loaded with its schema and verified
(SHA-256 of the weights; with the consortium's signing key, the server's signature). Inputs are
normalised with the site's own statistics: `STATE_DIR/normalizer.json`, written when the site
trained, or fitted by `oncofed serve fit-normalizer` on a new hospital's unlabelled patients.

Explanations:
- per-modality contributions: the fusion's attention weights over the modalities present (sum 1);
- top features: integrated gradients of the predicted class's logit, from 0 in the model's input to the
  patient, over the numeric and binary features present: 0 is the site's mean for a standardised
  feature, "not mutated" for a binary one (which therefore never appears), the raw 0 for a numeric
  feature the schema leaves unscaled (categorical levels have no path between them and are not
  attributed). docs/hospital-guide.md says how to read them.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.calibration import counted_modalities
from client.model_store import NORMALIZER, VERSION_SCHEMA, WEIGHTS, ModelStore, ModelStoreError, NoModelInstalled
from shared_models.schema import FeatureSchema
from shared_models.site_data import Normalizer, TableError
from shared_models.weights import SchemaMismatchError, load_weights

IG_STEPS = 16
# integrated gradients over at most this many patients at a time: for the serve benchmark's 300 patients,
# 1.2 s of CPU against 1.8 s in one batch (the passes' activations stay in cache; identical attributions),
# 1.4 s at 32, 2.0 s at 16 (one thread, best of two; git log -p docs/results.md)
IG_CHUNK = 64


from client.prediction_input import PredictionInputError  # noqa: E402,F401 - re-exported: the contract's error
from client.prediction_input import feature_names, input_map, modality_bounds  # noqa: E402


def normalizer_of(version_dir: Path, site_normalizer: Path) -> Path:
    """The normalisation a version is served with: the one its run fitted at this site, kept in the version's
    directory when it was installed (since 2026-12-05), else the site's STATE_DIR/normalizer.json. A later run,
    even one the site refused, rewrites the latter, and a model scored with statistics it was not trained with
    answers confidently wrong (a review found a refused no-DP run shifting some features' means by several
    standard deviations)."""
    own = Path(version_dir) / NORMALIZER
    return own if own.is_file() else Path(site_normalizer)


@dataclass
class LoadedModel:
    version: str
    schema: FeatureSchema
    model: torch.nn.Module
    package: dict
    signature: str  # "verified", "unsigned", "not checked (no trust anchor)"
    normalizer: Normalizer
    inputs: dict  # modality -> {feature: (column, kind, levels)}, built once (input_map)
    feature_at: list = None  # column -> (modality, feature)
    temperature: float = 1.0  # fitted at the site on its labelled patients (client/calibration.py)
    calibration: dict | None = None

    _traced: object = None
    # (the calibration they belong to, measured_patterns(), {present row: pattern(row)}): derived once per calibration
    _patterns: tuple | None = None
    _consortium: dict | None = None  # the package's patterns, checked once (client.calibration.consortium_patterns)

    def __post_init__(self):
        self.feature_at = feature_names(self.schema)
        # for the input contract's per-request checks (client/prediction_input.py check_patients), once
        self.modality_starts, self.modality_sizes = modality_bounds(self.schema)

    def pattern(self, present_row) -> tuple[dict | None, bool]:
        """The measurement of this modality pattern (present_row: a bool per modality; measured_patterns: the site's
        calibration's, else the package's) and whether it is the pattern's own. A pattern measured by neither is
        judged by its best measured sub-pattern (more modalities are taken to make the model no worse: a lower
        bound); (None, False) when there is none."""
        key = tuple(bool(p) for p in present_row)  # a few patterns, many patients: cached per calibration
        found = self._by_calibration()[2]
        if key not in found:
            found[key] = self._find_pattern(key)
        return found[key]

    def _by_calibration(self) -> tuple:
        if self._patterns is None or self._patterns[0] is not self.calibration:
            merged = {**self.consortium_patterns(), **((self.calibration or {}).get("patterns") or {})}
            self._patterns = (self.calibration, merged, {})
        return self._patterns

    def consortium_patterns(self) -> dict:
        """The delivered package's measurement of each modality pattern on the sites' held-out parts ({} if none)."""
        if self._consortium is None:
            from client.calibration import consortium_patterns

            self._consortium = consortium_patterns(self.package, self.schema)
        return self._consortium

    def measured_patterns(self) -> dict:
        """What answers are judged by, per pattern: the site's own calibration's measurement where it has one, else
        the package's (on the consortium's held-out patients, `"measured_by": "consortium"`)."""
        return self._by_calibration()[1]

    def _find_pattern(self, present_row: tuple) -> tuple[dict | None, bool]:
        from client.calibration import pattern_key

        patterns = self.measured_patterns()
        names = [m.name for m, p in zip(self.schema.modalities, present_row) if p]
        own = patterns.get(pattern_key(names))
        if own is not None:
            return own, True
        have = set(names)
        subs = [e for e in patterns.values() if set(e["modalities"]) <= have]
        return (max(subs, key=lambda e: (e["accuracy"], e["n_heldout"])), False) if subs else (None, False)

    def temperatures(self, present: np.ndarray) -> np.ndarray:
        """(B,) the temperature each patient's logits are divided by: its own modality pattern's, where the site
        fitted one, else the site's overall one (1.0 uncalibrated)."""
        out = np.full(len(present), self.temperature, dtype=np.float32)
        if self.calibration and self.calibration.get("patterns") and len(present):
            rows, which = np.unique(np.asarray(present, dtype=bool), axis=0, return_inverse=True)
            for k, row in enumerate(rows):
                entry, own = self.pattern(row)
                if own and entry.get("temperature") is not None:
                    out[which.reshape(-1) == k] = entry["temperature"]
        return out

    def forward(self):
        """x (B, n_inputs), normalised -> (logits, modality weights or None, present): the model's
        `explain` as a TorchScript trace when one reproduces it exactly, else the module itself.

        Why: the eager forward is some 150 small ops, each dispatched from Python; the trace runs
        them in C++ without holding the GIL, so the event loop and request parsing no longer stretch
        a batch's forward pass (and it costs about half the CPU at batch 1-16)."""
        if self._traced is None:
            self._traced = _trace(self.model) or _eager(self.model)
        return self._traced


class _Explain(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        out = self.model.explain(x)
        return out["logits"], out["modality_weights"], out["present"]


def _eager(model: torch.nn.Module):
    return _Explain(model).eval()


def _trace(model: torch.nn.Module):
    """The traced `explain`, or None if tracing fails or the trace differs from the module on a probe
    batch (other batch size than the trace's, every modality missing in turn)."""
    import warnings

    eager = _Explain(model).eval()
    n = model.n_inputs
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(3, n, generator=gen)
    probe = torch.randn(2 + len(model.slices), n, generator=gen)
    for i, s in enumerate(model.slices):
        probe[i, s] = float("nan")  # patient i lacks modality i
    probe[-1, : n // 2] = float("nan")
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit's deprecation and constant-shape notices
            traced = torch.jit.trace(eager, example, check_trace=False)
            want, got = eager(probe), traced(probe)
        same = all((a is None and b is None) or (a is not None and b is not None and a.shape == b.shape and
                                                 torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-5))
                   for a, b in zip(want, got))
    except Exception:  # noqa: BLE001 - the eager module is always right
        return None
    return traced if same else None


class Predictor:
    """Thread-safe holder of the active model; `refresh()` picks up a newly activated version.

    When the active version fails verification, the newest older version that verifies is served
    instead (`degraded` says which and why; `on_fallback(entry)` is called once per change, e.g. to
    write the audit log); with none, `current` stays None and `failed` says why."""

    def __init__(self, model_dir: str | Path, normalizer_path: str | Path, signing_public_key: str | Path | None = None,
                 on_fallback=None, calibration_path: str | Path | None = None, load_active: bool = True,
                 unverifiable: str = ""):
        self.store = ModelStore(model_dir)
        # why no version can be verified here (SiteConfig.unverifiable: no trust anchor outside a simulation): then
        # every version is refused with it, never served as the consortium's
        self.unverifiable = unverifiable
        self.normalizer_path = Path(normalizer_path)
        self.calibration_path = Path(calibration_path) if calibration_path else self.normalizer_path.with_name(
            "calibration.json")
        self.signing_public_key = Path(signing_public_key) if signing_public_key else None
        self.on_fallback = on_fallback or (lambda entry: None)
        self._lock = threading.Lock()
        self.current: LoadedModel | None = None
        # (version, why, the files' stamps): not retried until ACTIVE or the site's normalisation file is rewritten
        self.failed: tuple[str, str, tuple] | None = None
        self.degraded: dict | None = None  # {"active", "serving", "reason"} while a fallback is served
        self._stamp: tuple | None = None  # the files' stamps (_files_stamp) when the current model read them
        self._refreshing = threading.Lock()  # one refresh at a time: the service's load thread or a caller's
        self._loader: threading.Thread | None = None  # refresh(wait=False)'s load, while it runs
        if load_active:
            self.refresh()

    @property
    def waiting(self) -> bool:
        """Nothing served and nothing refused: no model installed yet, or the first one loading."""
        return self.current is None and self.failed is None and not self.unverifiable

    @classmethod
    def for_site(cls, settings, **kwargs) -> Predictor:
        """The predictor of a site's model store, as its site.json (a SiteConfig) sets it up."""
        from shared_models.site_data import NORMALIZER_FILE

        return cls(settings.model_dir, Path(settings.state_dir) / NORMALIZER_FILE, settings.signing_public_key or None,
                   unverifiable=settings.unverifiable(), **kwargs)

    def _load(self, version: str) -> LoadedModel:
        if self.unverifiable:
            raise ModelStoreError(f"{version} is not served: {self.unverifiable}")  # (activate: a version named)
        key = None
        if self.signing_public_key is not None:
            from privacy.signing import load_public

            key = load_public(self.signing_public_key)
        package = self.store.verify(version, key)  # raises ModelStoreError on any mismatch
        signature = ("verified" if key is not None else
                     "not checked (no trust anchor)" if "signature" in package.get("delivery", {}) else "unsigned")
        root = self.store.root / version
        schema = FeatureSchema.load(root / VERSION_SCHEMA)
        model = load_weights(root / WEIGHTS, schema).eval()
        path = normalizer_of(root, self.normalizer_path)
        try:  # the run's own, kept with the version at install; else the site's (`serve fit-normalizer`)
            normalizer = Normalizer.load(path, schema)
        except TableError as e:
            raise ModelStoreError(f"{e}; a site that never trained fits one with `oncofed serve fit-normalizer`") from None
        except SchemaMismatchError:
            raise ModelStoreError(
                f"{path}: the normalisation file was fitted under another feature schema than model {version}'s; fit "
                "one for this model with `oncofed serve fit-normalizer`, or roll back to the model it was fitted "
                "for") from None
        lm = LoadedModel(version, schema, model, package, signature, normalizer, input_map(schema))
        self._calibrate(lm)
        lm.forward()  # traced here, before the version is served, not on a request
        return lm

    def _files_stamp(self, active_stamp: tuple | None = None) -> tuple:
        """(mtime, size, inode) of the files a served model reads besides its version: the calibration, the site's
        normalisation (`serve fit-normalizer`) and ACTIVE (`serve activate` in another process rewrites it; its stamp
        as `_observe` read it, if given)."""
        def stamp(path: Path):
            try:
                st = path.stat()
            except OSError:
                return None
            return st.st_mtime_ns, st.st_size, st.st_ino

        return (stamp(self.calibration_path), stamp(self.normalizer_path),
                active_stamp or stamp(self.store.root / "ACTIVE"))

    def _observe(self) -> tuple[str | None, tuple]:
        """The active version and the files' stamps, ACTIVE stat'ed once: `refresh` runs before every request."""
        active, active_stamp = self.store.active_stamped()
        return active, self._files_stamp(active_stamp)

    def _calibrate(self, lm: LoadedModel) -> None:
        """The site's calibration of this version, if it has one (client/calibration.py), and the files' stamps, so
        that `refresh` serves a calibration written while the service runs from the next request on."""
        from client.calibration import load_calibration

        self._stamp = self._files_stamp()
        lm.calibration = load_calibration(self.calibration_path, lm.version, lm.package, lm.schema)
        lm.temperature = 1.0 if lm.calibration is None else float(lm.calibration["temperature"])

    def activate(self, version: str, record=None, record_failed=None) -> None:
        """Make an installed version the active one, after loading it as it would be served: a package that does
        not verify (or load) raises and never becomes active; one that does is served from the next request on
        (a version that failed before and was repaired included). The site's own choice: a delivery of a model
        already installed does not undo it (ModelStore.install). `record()` (the audit entry) runs once the version
        verified and before the switch: if it raises, nothing changed (no switch the audit log does not hold). If the
        switch itself then fails (the ACTIVE file cannot be written), `record_failed(reason)` says so in the log, so
        that it holds no switch that did not happen either."""
        with self._refreshing:  # a load in the service's thread (refresh) never lands after this switch
            loaded = self._load(version)
            if record is not None:
                record()
            try:
                self.store.activate(version, chosen=True)
            except Exception as e:
                if record is not None and record_failed is not None:
                    try:
                        record_failed(str(e))
                    except Exception:  # noqa: BLE001 - the log cannot be written either: the caller reports it
                        pass
                raise
            self.failed, self.degraded = None, None
            self._stamp = self._files_stamp()
            with self._lock:
                self.current = loaded

    def refresh(self, wait: bool = True) -> bool:
        """Load the store's active version if it changed; True if the model changed.

        `wait=False` (the service's event loop): another version activated (or the first one installed) is loaded in
        a thread and the current model, if any, answers until it is ready (a load takes ~0.3 s of CPU: verify, read, trace,
        which held /health and every request while a model was installed), False meanwhile; nor does it wait for a
        load another thread is running. The cheap updates (a calibration rewritten) and a refitted normalisation of
        the version served (`serve fit-normalizer`: the service's own act) are taken at once.

        Raises ModelStoreError only when nothing can be served (no version verifies; NoModelInstalled: none is
        installed yet)."""
        if wait:
            with self._refreshing:
                return self._refresh()
        if self._loader is not None and self._loader.is_alive():
            return False
        if not self._refreshing.acquire(blocking=False):  # a load in a worker thread (serve activate's route)
            return False
        try:  # observed under the lock: a switch made meanwhile is not undone with what was read before it
            active, stamp = observed = self._observe()
            # (nothing served yet, e.g. the site's first model just installed: loaded in the thread as well)
            if active is not None and not self.unverifiable and (
                    self.current is None or active != self.current.version) and not (
                    self.failed is not None and self.failed[0] == active and self.failed[2] == stamp):
                self._loader = threading.Thread(target=self._refresh_quietly, name="model-load", daemon=True)
                self._loader.start()  # (it waits for the lock this call releases now)
                return False
            return self._refresh(observed)
        finally:
            self._refreshing.release()

    def _refresh_quietly(self) -> None:
        try:
            with self._refreshing:
                self._refresh()
        except Exception:  # noqa: BLE001 - kept in `failed` / `degraded`, which /health reports
            pass

    def _refresh(self, observed: tuple[str | None, tuple] | None = None) -> bool:
        if self.unverifiable:  # no version can be served: said once, not per version tried
            raise ModelStoreError(self.unverifiable)
        active, stamp = observed or self._observe()
        if active is None:
            if versions := self.store.versions():  # e.g. an install interrupted between its rename and ACTIVE
                raise ModelStoreError(f"{self.store.root}: {', '.join(versions)} installed but none is active (no "
                                      "ACTIVE file); activate one: oncofed serve activate --site-config site.json "
                                      f"--version {versions[-1]}")
            raise NoModelInstalled(f"{self.store.root}: no model installed yet (the global model arrives after a "
                                   "federated run)")
        if self.current is not None and self.current.version == active:
            self.failed, self.degraded = None, None  # e.g. rolled back to the version serving as the fallback
            if stamp == self._stamp:
                return False
            if stamp[1] != self._stamp[1] and normalizer_of(self.store.root / active, self.normalizer_path) == \
                    self.normalizer_path:  # served with the site's normalisation, refitted: the version loaded again
                try:
                    loaded = self._load(active)
                except Exception as e:  # noqa: BLE001 - the model served so far keeps serving; the reason is kept
                    self._stamp = stamp
                    self.degraded = {"active": active, "serving": active, "reason": f"{self.normalizer_path} was "
                                     f"rewritten and cannot serve {active} ({e}); the statistics read before serve on"}
                    return False
                with self._lock:
                    self.current = loaded
                return True
            recalibrated = dataclasses.replace(self.current, _patterns=None)  # the same model: its weights, its trace
            self._calibrate(recalibrated)
            with self._lock:
                self.current = recalibrated
            return True
        if self.failed is not None and self.failed[0] == active and self.failed[2] == stamp:
            if self.current is None:
                raise ModelStoreError(self.failed[1])
            return False  # the fallback keeps serving until ACTIVE or the site's normalisation changes
        try:
            loaded = self._load(active)
        except Exception as e:  # noqa: BLE001 - any failure: look for a version that verifies
            self.failed = (active, f"{active}: {e}", stamp)
            return self._fall_back(active, str(e))
        self.failed, self.degraded = None, None
        with self._lock:
            self.current = loaded
        return True

    def _fall_back(self, active: str, reason: str) -> bool:
        for version in reversed([v for v in self.store.versions() if v < active]):
            try:
                loaded = self._load(version)
            except Exception:  # noqa: BLE001 - older versions may be broken too
                continue
            self.degraded = {"active": active, "serving": version,
                             "reason": f"active version {active} refused: {reason}; serving {version}, the newest "
                                       "installed version that verifies"}
            with self._lock:
                self.current = loaded
            self.on_fallback(dict(self.degraded))
            return True
        with self._lock:
            self.current = None
        self.degraded = None
        why = (f"{active}: {reason}; no older installed version verifies either "
               f"({', '.join(v for v in self.store.versions() if v < active) or 'none installed'})")
        self.failed = (active, why, self._files_stamp())
        raise ModelStoreError(why)

    # --- inputs (client/prediction_input.py holds the contract) ----------------------------------
    def checked_tables(self, site_dir: Path, limits=None):
        """A site-layout directory, through the same input contract as the service's uploads."""
        from client.prediction_input import ServeSettings, checked_tables

        return checked_tables(self.current, Path(site_dir), limits or ServeSettings(max_patients=10**9,
                                                                                    max_decompressed_mb=1e9))

    # --- outputs -----------------------------------------------------------------------------------
    def predict(self, raw: np.ndarray, top_k: int = 0, lm: LoadedModel | None = None) -> tuple[LoadedModel, dict]:
        """Score raw inputs with `lm` (the model they were built for) or the current model."""
        if lm is None:
            with self._lock:
                lm = self.current
        x = torch.from_numpy(lm.normalizer.transform(raw))  # a new array: raw is not changed
        with torch.inference_mode():
            logits, weights, present = lm.forward()(x)
            counted = counted_modalities(lm, x)  # the answer's pattern: its temperature and its measured accuracy
            temperatures = torch.from_numpy(lm.temperatures(counted)).view(-1, 1)
            probs = torch.softmax(logits / temperatures, dim=1).numpy()
        result = {"probabilities": probs, "predicted": probs.argmax(1),
                  "modality_weights": None if weights is None else weights.numpy(),
                  "present": present.numpy(), "counted": counted}
        if top_k:
            result["attributions"] = integrated_gradients(lm, x, torch.from_numpy(result["predicted"]))
        return lm, result


def integrated_gradients(lm: LoadedModel, x: torch.Tensor, target: torch.Tensor, steps: int = IG_STEPS) -> np.ndarray:
    """(n, n_inputs) attribution of each present numeric feature to the target class's logit.

    The passes run through the model's trace when it has one: the eager forward's ~240 small ops each
    retake the GIL from the prediction path (event loop, parsing, model thread), the trace's run in C++.
    The trace records no grad mode (`explain`'s no_grad is Python's), so autograd follows it, and one
    trace serves both threads: its executor hands out one plan under a lock and each call runs it in
    its own interpreter state (tests/test_serve.py checks both against the module). Without a trace,
    the module itself (its `explain` runs without gradients)."""
    if len(x) > IG_CHUNK:  # the same attributions (each patient's are its own) for less CPU
        return np.concatenate([integrated_gradients(lm, x[i:i + IG_CHUNK], target[i:i + IG_CHUNK], steps)
                               for i in range(0, len(x), IG_CHUNK)])
    forward = lm.forward()
    logits_of = lm.model if isinstance(forward, _Explain) else lambda xi: forward(xi)[0]
    numeric = torch.zeros(x.shape[1], dtype=torch.bool)
    numeric[[col for feats in lm.inputs.values() for col, kind, _ in feats.values() if kind != "cat"]] = True
    mask = numeric & ~torch.isnan(x)
    base = torch.where(mask, torch.zeros_like(x), x)  # categorical / missing stay as they are
    delta = torch.where(mask, x, torch.zeros_like(x))  # from 0 (a standardised feature's site mean; binary: absent)
    total = torch.zeros_like(x)
    for a in (torch.arange(steps, dtype=torch.float32) + 0.5) / steps:  # midpoint rule
        xi = (base + a * delta).requires_grad_(True)
        logit = logits_of(xi).gather(1, target.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(logit, xi)
        total += torch.nan_to_num(grad)
    return (total * delta / steps).masked_fill(~mask, 0.0).numpy()


def format_predictions(lm: LoadedModel, ids: list[str], result: dict, top_k: int = 0) -> list[dict]:
    schema = lm.schema
    names = feature_names(schema) if top_k and "attributions" in result else None
    out = []
    for i, pid in enumerate(ids):
        probs = result["probabilities"][i]
        row = {"id": pid, "predicted": schema.classes[int(result["predicted"][i])],
               "probabilities": {c: round(float(p), 6) for c, p in zip(schema.classes, probs)},
               "model_version": lm.version,
               "modalities_present": [m.name for m, p in zip(schema.modalities, result["present"][i]) if p],
               "pattern": {"modalities": [m.name for m, c in zip(schema.modalities, result["counted"][i]) if c]}}
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


def answer_warnings(lm: LoadedModel, confidence: float, present_row, limits) -> tuple[list[dict], dict | None]:
    """What the answer itself says about its own trust (one home for the service, the page and `oncofed
    predict`; present_row: the modalities its pattern counts, client.calibration.counted_modalities): a most
    likely class below `low-confidence`; a modality pattern the site measured below
    `min-pattern-accuracy` (`weak_pattern`), or could not measure (`pattern_unmeasured`). Also the pattern's
    measurement for the answer (None when the site has none)."""
    warnings = []
    if confidence < limits.low_confidence:
        warnings.append({"code": "low_confidence", "msg": f"the most likely class has probability {confidence:.0%} "
                         f"(below {limits.low_confidence:.0%}): no confident answer"})
    measured, own = lm.pattern(present_row)
    names = [m.name for m, p in zip(lm.schema.modalities, present_row) if p]
    if measured is not None:
        if measured["accuracy"] < limits.min_pattern_accuracy:
            warnings.append({"code": "weak_pattern", "msg": _weak_pattern_msg(measured, own, limits)
                             + ": the modalities it relies on are missing; send them if the patient has them"})
        if measured.get("measured_by") == "consortium":  # not calibrated here: the package's measurement
            pattern = {"modalities": names, "consortium_accuracy": measured["accuracy"],
                       "consortium_patients": measured["n_heldout"], "measured_by": "consortium"}
        else:
            pattern = {"modalities": names, "site_accuracy": measured["accuracy"],
                       "site_patients": measured["n_heldout"]}
        if not own:
            pattern["measured_as"] = measured["modalities"]  # a sub-pattern: the site's accuracy is a lower bound
        return warnings, pattern
    if lm.measured_patterns():
        warnings.append({"code": "pattern_unmeasured", "msg": (
            f"neither this site's calibration nor the model package had enough labelled patients with "
            f"{', '.join(names)}, or any part of them, to measure the model on them" if names else
            NO_COUNTED_MODALITY) + ": how often it is right for this patient is not known"})
    return warnings, None


# a patient with no modality counted (none with half its features): less than any pattern the site measured
NO_COUNTED_MODALITY = ("no modality of this patient has at least half its features, the least a measured pattern "
                       "counts")


def _weak_pattern_msg(measured: dict, own: bool, limits) -> str:
    basis = ", ".join(measured["modalities"])
    consortium = measured.get("measured_by") == "consortium"
    who = "the consortium" if consortium else "the site"
    how = f"with only {basis}" if own else (f"with {basis} (the best {who} measured of this patient's "
                                            "modalities; it had too few patients with all of them)")
    whose = (f"held-out patients at {measured.get('sites')} sites of the consortium (this site's own `oncofed serve "
             "calibrate` has not measured it)" if consortium else "this site's labelled patients")
    return (f"{how} the model was right for {measured['accuracy']:.0%} of {measured['n_heldout']} {whose} "
            f"(below {limits.min_pattern_accuracy:.0%})")


def refuse_weak_patterns(lm: LoadedModel, checked, limits) -> None:
    """`serve.refuse-weak-pattern`: raise PredictionInputError (422, nothing scored) when a patient's modality pattern
    is one the site measured below `min-pattern-accuracy` (answer_warnings' `weak_pattern`, judged the same way: its
    own pattern or its best measured sub-pattern), one problem per such pattern naming its patients. Unmeasured
    patterns are answered (and flagged) as without the setting, and so is every pattern when neither the site's
    calibration nor the package measured any: there is no measurement to refuse on. Called before the model runs,
    by every path that scores (the service's routes, the explanation lane, `oncofed predict`)."""
    if not limits.refuse_weak_pattern or not len(checked.ids) or not lm.measured_patterns():
        return
    from client.prediction_input import capped

    by_pattern: dict[tuple, list] = {}
    for pid, row in zip(checked.ids, counted_modalities(lm, checked.raw)):
        by_pattern.setdefault(tuple(bool(c) for c in row), []).append(pid)
    problems = []
    for row, pids in by_pattern.items():
        if not any(row):  # less data than any measured pattern: sending fewer features must not escape a refusal
            problems.append({"loc": "patients with no modality counted", "code": "weak_pattern", "patients": pids,
                             "n_patients": len(pids), "msg": f"refused (serve.refuse-weak-pattern in site.json), "
                             f"{len(pids)} patient(s): {NO_COUNTED_MODALITY}, so the model's accuracy on them is "
                             "not known and at best that of the weakest pattern",
                             "fix": "send the patients' modalities in full (a modality counts with at least half its "
                                    "features); to be answered with a pattern_unmeasured flag instead, unset "
                                    "serve.refuse-weak-pattern"})
            continue
        measured, own = lm.pattern(row)
        if measured is None or measured["accuracy"] >= limits.min_pattern_accuracy:
            continue
        names = [m.name for m, c in zip(lm.schema.modalities, row) if c]
        problems.append({
            "loc": f"patients with {', '.join(names)}", "code": "weak_pattern", "patients": pids,
            "n_patients": len(pids),
            "msg": f"refused (serve.refuse-weak-pattern in site.json), {len(pids)} patient(s): "
                   f"{_weak_pattern_msg(measured, own, limits)}",
            "fix": "send the patients' other modalities (a modality counts with at least half its features); to be "
                   "answered with a weak_pattern flag instead, unset serve.refuse-weak-pattern"})
    if problems:
        raise PredictionInputError(capped(problems, limits.max_problems))


def add_notes(rows: list[dict], notes: list[dict], lm: LoadedModel, limits) -> list[dict]:
    """The input contract's notes on each patient (coverage, out-of-range values) and answer_warnings'."""
    for row, note in zip(rows, notes):
        row.update(note)
        counted = [m.name in row["pattern"]["modalities"] for m in lm.schema.modalities]
        more, pattern = answer_warnings(lm, row["probabilities"][row["predicted"]], counted, limits)
        row["warnings"] = row["warnings"] + more
        if pattern is not None:
            row["pattern"] = pattern
    return rows
