"""Honest probabilities at a site: temperature scaling of the global model, fitted on the site's own
labelled patients (Guo et al. 2017), checked on patients it was not fitted on.

`oncofed serve calibrate --site-config site.json --data DIR` splits the site's labelled patients in
two (stratified by class, seeded), fits one temperature T on the first half by minimising the
negative log-likelihood of softmax(logits / T), and reports the expected calibration error (ECE,
15 equal-width confidence bins) and the log-loss before and after on the second half. The result is
`STATE_DIR/calibration.json`, tied to the model's weights (SHA-256): a newly delivered model is served
uncalibrated (and says so) until the site calibrates it again. The predicted class never changes
(dividing the logits by T > 0 keeps their order); only how sure the model says it is.

A model is only as good as the modalities a patient has. The pan-cancer models lean on miRNA: patients
without it are classified right 7-32% of the time by the DP model, with it 81-94% (docs/results.md, "Modality
patterns"), and one temperature answers them surer than that. So the command also measures every modality
pattern (each non-empty set of modalities present) on the site's own patients: those who have the pattern's
modalities, the others masked as missing. For each pattern with enough patients in both halves it fits a
temperature on the first half and records the accuracy on the second. The service then divides a patient's
logits by the temperature of the patient's own pattern, flags an answer whose pattern the site measured below
`serve.min-pattern-accuracy` (`weak_pattern`), and one whose pattern it could not measure
(`pattern_unmeasured`). A masked patient stands in for one who lacks the modality: that is an estimate, as
patients who lack a modality in practice may differ in other ways.
"""

from __future__ import annotations

import itertools
import json
import time
import types
from pathlib import Path

import numpy as np

from privacy.site_config import SiteConfig
from shared_models.files import write_text_atomic
from shared_models.protocol import is_number, is_schema_pattern, pattern_key

FORMAT = "oncofed-calibration/2"  # /2: with the modality patterns' temperatures and accuracies
FORMATS = ("oncofed-calibration/1", FORMAT)  # a /1 file (one temperature) is still served
PATTERN_COVERAGE = 0.5  # the share of a modality's features a patient needs for the modality to count in its pattern
PATTERN_MIN_HALF = 30  # patients with a pattern in each half before it is measured (accuracy's SE <= 0.09)
MAX_PATTERN_MODALITIES = 10  # all 2^M - 1 patterns up to this many modalities; beyond, the patterns the site has
ECE_BINS = 15


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by the bin's patients."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def _softmax(logits: np.ndarray, t: float) -> np.ndarray:
    z = logits / t
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def log_loss(logits: np.ndarray, y: np.ndarray, t: float = 1.0) -> float:
    p = _softmax(logits, t)[np.arange(len(y)), y]
    return float(-np.log(np.clip(p, 1e-12, 1)).mean())


TEMPERATURES = (0.05, 20.0)  # what the fit searches, and so all a calibration file can hold


def min_calibration_patients(n_classes: int) -> int:
    return max(100, 3 * n_classes)


def fit_problem(t: float, loss_before: float, loss_after: float, n_fit: int) -> tuple[str, str] | None:
    """Why a fitted temperature is not to be served, or None: ("edge", ...) for one the search ran to its sharp
    end for (the labelled patients do not pin it down: on a few patients all answered right, the fit sharpens
    every answer towards certainty); ("no_gain", ...) for one that does not lower the held-out half's log-loss.
    The flat end is no such risk: a pattern the model is at chance on fits T ~20, which answers it as unsure as
    it is (refusing it served the sharper overall temperature: answers at 0.6 for 0.35 right)."""
    lo, hi = np.log(TEMPERATURES)
    if not lo + 0.05 * (hi - lo) < np.log(t):
        return "edge", (f"the fitted temperature {t:.3g} is at the sharp end of what the fit searches "
                        f"({TEMPERATURES[0]:g}-{TEMPERATURES[1]:g}): the {n_fit} fitting patients do not pin it down; "
                        "calibrate on more labelled patients, including ones the model gets wrong")
    if not loss_after < loss_before:
        return "no_gain", (f"the fitted temperature {t:.3g} does not lower the held-out half's log-loss "
                           f"({loss_before:.4f} -> {loss_after:.4f}): it would not make the probabilities more honest")
    return None


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """T in TEMPERATURES minimising the log-loss: a coarse grid over log T, then golden-section refinement."""
    grid = np.exp(np.linspace(np.log(TEMPERATURES[0]), np.log(TEMPERATURES[1]), 61))
    losses = [log_loss(logits, y, t) for t in grid]
    k = int(np.argmin(losses))
    lo, hi = np.log(grid[max(k - 1, 0)]), np.log(grid[min(k + 1, len(grid) - 1)])
    g = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if log_loss(logits, y, np.exp(a)) < log_loss(logits, y, np.exp(b)):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


def split_halves(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held-out): every class split in two, so that rare classes appear in both where possible."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        half = (len(idx) + 1) // 2
        fit += idx[:half].tolist()
        held += idx[half:].tolist()
    return np.array(sorted(fit)), np.array(sorted(held))


def site_logits(lm, raw: np.ndarray, batch: int = 512, keep_modalities=None) -> np.ndarray:
    """The model's logits for raw rows; with `keep_modalities` (indices), every other modality masked as missing."""
    import torch

    out = []
    for start in range(0, len(raw), batch):
        x = torch.from_numpy(lm.normalizer.transform(raw[start:start + batch].copy()))
        with torch.no_grad():
            out.append(lm.model(masked(x, lm.model.slices, keep_modalities)).numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, lm.schema.n_classes))


def masked(x, slices, keep_modalities=None):
    """x (a tensor, changed in place) with every modality not in `keep_modalities` (indices; None: all kept) missing."""
    if keep_modalities is not None:
        for j, s in enumerate(slices):
            if j not in keep_modalities:
                x[:, s] = float("nan")
    return x


def pattern_outcomes(model, schema, x: np.ndarray, y: np.ndarray, min_count: int,
                     reportable: bool = True) -> dict[str, list[int]]:
    """The model per modality pattern on labelled, normalised rows (a site's held-out part, at the run's last
    round): for each pattern with at least `min_count` patients who have its modalities (counted as
    counted_modalities counts them), [patients, right] with the other modalities masked, as `serve calibrate`
    measures them. The server sums the sites' into the delivered package (protocol.PATTERNS). `reportable`: only the
    counts a site may send (_reportable); False for a research evaluation that stays with whoever ran it."""
    import torch

    from client.prediction_input import modality_bounds
    from shared_models.evaluation import predict_logits

    starts, sizes = modality_bounds(schema)
    present = counted_modalities(types.SimpleNamespace(modality_starts=starts, modality_sizes=sizes), x)
    names = [m.name for m in schema.modalities]
    has = {p: present[:, list(p)].all(1) for p in _candidate_patterns(present)}  # each pattern's patients
    counts = {p: int(h.sum()) for p, h in has.items()}
    out = {}
    for pattern in (_reportable(counts, len(x), min_count) if reportable else
                    [p for p, n in counts.items() if n >= min_count]):
        rows = masked(torch.from_numpy(x[has[pattern]].copy()), model.slices, set(pattern))
        right = int((predict_logits(model, rows).argmax(1).numpy() == y[has[pattern]]).sum())
        out[pattern_key(names[j] for j in pattern)] = [counts[pattern], right]
    return out


def _reportable(counts: dict[tuple, int], total: int, min_count: int) -> list[tuple]:
    """The patterns whose patient counts may be sent: at least `min_count` patients, and no difference between 1 and
    min_count - 1 to the count of a sent pattern within it, or to `total` (the patients evaluated, which the site
    also sends): n(expr) = 50 beside n(expr+prot) = 49 would say that one patient has expr without prot. The
    larger pattern of such a pair is left out, the smallest patterns first. (Sums and differences of more than two
    patterns can still tell a small group apart: held-out statistics are not DP, docs/privacy.md.)"""
    kept: list[tuple] = []
    for p in sorted((p for p, n in counts.items() if n >= min_count), key=len):
        if all(not 0 < n - counts[p] < min_count for n in
               [total] + [counts[q] for q in kept if set(q) < set(p)]):
            kept.append(p)
    return kept


def could_have_trained(version_dir: Path, ids: list[str]) -> np.ndarray | None:
    """Which of these patients fall in the training part of the run that made the installed version, at this site
    (the run's split key, kept with the version since 2026-12-05: client.model_store.SPLIT), or None when the
    version does not say. A patient the model trained on makes it look more accurate and surer than it is; the
    no-DP main job's model gives its own training patients a log-loss of 0.05, which no temperature fitted on
    them can turn into honest probabilities for other patients."""
    from client.model_store import SPLIT
    from client.site import held_out_split

    try:
        split = json.loads((Path(version_dir) / SPLIT).read_text())
        seed, fraction = int(split["seed"]), float(split["val_fraction"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    train, _ = held_out_split(list(ids), fraction, seed)
    out = np.zeros(len(ids), dtype=bool)
    out[train] = True
    return out


def counted_modalities(lm, x) -> np.ndarray:
    """(patients, modalities) bool: the modalities an answer's pattern counts, those with at least PATTERN_COVERAGE
    of their features present (raw or normalised rows, a numpy array or a tensor). The model takes a modality with
    one value as present; a patient sending 1 of 30 decisive features was answered as if it had them all (0.34
    right against the pattern's 0.81, a review's test). Real tables have a modality whole or not at all (every
    pan-cancer patient with a modality has all its features)."""
    from client.prediction_input import features_present  # the input contract's per-modality count: one formula

    x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    return features_present(lm, ~np.isnan(x)) / lm.modality_sizes >= PATTERN_COVERAGE


def _candidate_patterns(present: np.ndarray) -> list[tuple[int, ...]]:
    m = present.shape[1]
    if m <= MAX_PATTERN_MODALITIES:
        return [s for k in range(1, m + 1) for s in itertools.combinations(range(m), k)]
    return sorted({tuple(np.flatnonzero(row)) for row in present if row.any()})


def fit_patterns(lm, raw: np.ndarray, y: np.ndarray, fit: np.ndarray, held: np.ndarray) -> dict:
    """Every modality pattern with PATTERN_MIN_HALF patients in each half: its temperature, fitted on the fit
    half's patients who have the pattern's modalities (the others masked), and its accuracy, ECE and log-loss
    on the held-out half's. A temperature fit_problem objects to is not kept (`temperature` None, `refused`
    says why): such a pattern is served with the site's overall temperature, its accuracy still measured."""
    names = [m.name for m in lm.schema.modalities]
    present = counted_modalities(lm, raw)
    out = {}
    for pattern in _candidate_patterns(present):
        has = present[:, list(pattern)].all(1)
        f, h = fit[has[fit]], held[has[held]]
        if len(f) < PATTERN_MIN_HALF or len(h) < PATTERN_MIN_HALF:
            continue
        logits = site_logits(lm, raw[np.concatenate([f, h])], keep_modalities=set(pattern))
        lf, lh, yf, yh = logits[:len(f)], logits[len(f):], y[f], y[h]
        t: float | None = fit_temperature(lf, yf)
        problem = fit_problem(t, log_loss(lh, yh), log_loss(lh, yh, t), len(f))
        refused = None if problem is None else problem[1]
        if problem:
            t = None
        served = _softmax(lh, t or 1.0)
        entry = {"modalities": [names[j] for j in pattern], "n_fit": int(len(f)), "n_heldout": int(len(h)),
                 "temperature": None if t is None else round(t, 6),
                 "accuracy": round(float((served.argmax(1) == yh).mean()), 4),
                 "ece_before": round(expected_calibration_error(_softmax(lh, 1.0), yh), 4),
                 "ece_after": None if t is None else round(expected_calibration_error(served, yh), 4)}
        if refused:
            entry["refused"] = refused
        out[pattern_key(entry["modalities"])] = entry
    return out


def type_recall(lm, logits: np.ndarray, y: np.ndarray) -> dict:
    """Per type the site has labelled patients of (outside the training part): how many, and the share the model
    names right. A type no site trained on is never predicted, and the package cannot say which ones those are
    without a count that DP would have to pay for; a site sees it here for the types it has (recall 0)."""
    predicted = logits.argmax(1)
    return {lm.schema.classes[c]: {"n": int((y == c).sum()), "recall": round(float((predicted[y == c] == c).mean()), 4)}
            for c in np.unique(y)}


def read_labels(schema, data_dir: Path):
    """A site directory's labels, as `serve calibrate` and `serve fit-normalizer` read them: (labels by patient id,
    as text; the labels that are none of the schema's classes, left out), or None without a labels table. A label
    column missing, a patient twice, or labels that are misspelt classes (or mostly foreign) raise ValueError
    naming the file and the fix."""
    from shared_models.site_data import LABELS_STEM, MISSING_TOKENS, find_table, read_table

    found = find_table(Path(data_dir), LABELS_STEM)
    if not found:
        return None
    table = read_table(found[0], schema.id_column, text_columns=(schema.label_column,))
    if schema.label_column not in table.columns:
        raise ValueError(f"{found[0]}: no column {schema.label_column!r}, the schema's label column (the table has "
                         f"{', '.join(map(repr, list(table.columns)[:8]))}); name the label column "
                         f"{schema.label_column!r}")
    labels = table[schema.label_column].astype(str).str.strip()
    if (twice := labels.index[labels.index.duplicated()].unique()).size:  # which label is the patient's? (validate refuses)
        raise ValueError(f"{found[0]}: {twice.size} patient id(s) appear more than once "
                         f"({', '.join(map(repr, list(twice[:5])))}{' ...' if twice.size > 5 else ''}): keep one row per "
                         "patient (`oncofed validate` lists them)")
    classes = list(schema.classes)
    foreign = labels[~labels.isin(classes) & ~labels.isin([*MISSING_TOKENS, "nan"])]  # a missing label: left out
    folded = {c.casefold(): c for c in classes}
    if misspelt := sorted({f for f in foreign if f.casefold() in folded}) or (
            len(foreign) > len(labels) / 2 and sorted(set(foreign))):
        raise ValueError(f"{found[0]}: {len(foreign)} of {len(labels)} labels are none of the schema's classes ("
                         + ", ".join(f"{f!r}" + (f" for {folded[f.casefold()]!r}" if f.casefold() in folded else "")
                                     for f in misspelt[:6]) + f"{' ...' if len(misspelt) > 6 else ''}; the classes: "
                         f"{', '.join(classes[:8])}{' ...' if len(classes) > 8 else ''}): write "
                         "each label as the schema names its class (a label left empty leaves its patient out)")
    return labels, foreign


def labelled_rows(schema, labels, ids: list[str]) -> tuple[list[int], np.ndarray]:
    """Which of `ids` have a label of the schema's classes (read_labels' `labels`), and those labels' class
    indices."""
    lookup = {c: k for k, c in enumerate(schema.classes)}
    rows = [k for k, pid in enumerate(ids) if labels.get(pid) in lookup]
    return rows, np.array([lookup[labels[ids[k]]] for k in rows], dtype=np.int64)


def calibrate(settings: SiteConfig, data_dir: Path, seed: int = 0) -> dict:
    """Fit the active model's temperature on half of the site's labelled patients; report on the other half."""
    from client.predict import Predictor
    from shared_models.site_data import LABELS_STEM

    state = Path(settings.state_dir)
    predictor = Predictor.for_site(settings, calibration_path=state / "calibration.none")  # fitted on the uncalibrated model
    lm = predictor.current
    data_dir = Path(data_dir)
    if (read := read_labels(lm.schema, data_dir)) is None:
        raise ValueError(f"{data_dir}: no labels table; calibration needs the site's labelled patients "
                         f"({LABELS_STEM}.csv with {lm.schema.id_column!r} and {lm.schema.label_column!r})")
    labels, foreign = read
    checked = predictor.checked_tables(data_dir)
    keep, y = labelled_rows(lm.schema, labels, checked.ids)
    left_out_labels = {str(k): int(v) for k, v in foreign.value_counts().items()}  # types the model does not know
    trained = could_have_trained(Path(settings.model_dir) / lm.version, [checked.ids[k] for k in keep])
    if trained is not None:
        keep, y = [k for k, was in zip(keep, trained) if not was], y[~trained]
    need = min_calibration_patients(len(lm.schema.classes))
    if len(keep) < need:
        left_out = "" if trained is None else (f" ({int(trained.sum())} more are in the training part of the run that "
                                               "made the model, and are left out: the model has seen them)")
        raise ValueError(f"{data_dir}: {len(keep)} patients with a label of the schema's classes{left_out}; "
                         f"calibration needs at least {need} (max(100, 3 x the {len(lm.schema.classes)} classes): half "
                         "to fit, half to check; on a few patients, all answered right, the fit makes every answer "
                         "near-certain)")
    logits = site_logits(lm, checked.raw[keep])
    fit, held = split_halves(y, seed)
    t = fit_temperature(logits[fit], y[fit])
    problem = fit_problem(t, log_loss(logits[held], y[held]), log_loss(logits[held], y[held], t), len(fit))
    if problem and problem[0] == "edge":
        raise ValueError(problem[1] + ". Nothing was written")
    kept_own = problem[1] if problem else None  # no gain: the model's own probabilities (T 1); the patterns still count
    if kept_own:
        t = 1.0
    before, after = _softmax(logits[held], 1.0), _softmax(logits[held], t)
    result = {"format": FORMAT, "model_version": lm.version, "weights_sha256": lm.package.get("weights_sha256"),
              "temperature": round(t, 6), "fitted": time.time(), "seed": seed, "n_fit": int(len(fit)),
              "left_out_trained": None if trained is None else int(trained.sum()), "overall_not_fitted": kept_own,
              "left_out_labels": left_out_labels,
              "n_heldout": int(len(held)), "ece_bins": ECE_BINS,
              "heldout": {"ece_before": round(expected_calibration_error(before, y[held]), 4),
                          "ece_after": round(expected_calibration_error(after, y[held]), 4),
                          "log_loss_before": round(log_loss(logits[held], y[held]), 4),
                          "log_loss_after": round(log_loss(logits[held], y[held], t), 4),
                          "accuracy": round(float((before.argmax(1) == y[held]).mean()), 4)},
              "patterns": fit_patterns(lm, checked.raw[keep], y, fit, held),
              "types": type_recall(lm, logits, y)}
    path = state / "calibration.json"
    write_text_atomic(path, json.dumps(result, indent=1))
    result["path"] = str(path)
    result["consortium"] = lm.consortium_patterns()  # the package's, for comparison (not saved: it has its home)
    return result


def load_calibration(path: Path, version: str, package: dict, schema=None) -> dict | None:
    """The site's calibration if it was fitted on these very weights, else None (served uncalibrated)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") not in FORMATS or \
            data.get("weights_sha256") != package.get("weights_sha256"):
        return None
    t = data.get("temperature")
    if not is_number(t) or not TEMPERATURES[0] <= t <= TEMPERATURES[1]:
        return None  # no fit gives it (a file edited by hand, or damaged): served uncalibrated, as /v1/model says
    patterns = data.get("patterns", {})
    names = [m.name for m in schema.modalities] if schema is not None else None
    if not isinstance(patterns, dict) or not all(_pattern_ok(k, e, names) for k, e in patterns.items()):
        return None  # an entry no fit writes (edited by hand, damaged): served uncalibrated, not a 500 per request
    return data


def consortium_patterns(package: dict, schema) -> dict:
    """The delivered package's `patterns` (the final model on the sites' held-out parts, summed by the server), each
    marked `"measured_by": "consortium"`; an entry no server writes is left out alone ({} when there are none)."""
    patterns = package.get("patterns")
    names = [m.name for m in schema.modalities]
    if not isinstance(patterns, dict):
        return {}
    return {k: {**e, "measured_by": "consortium"} for k, e in patterns.items()
            if _pattern_ok(k, e, names, counts=("n_heldout", "sites"))}


def _pattern_ok(key, entry, names: list[str] | None, counts=("n_fit", "n_heldout")) -> bool:
    """A pattern entry a fit could have written: its key the pattern of its modalities (names of the schema's, in
    its order), an accuracy in [0, 1], patient counts, and no temperature or one in TEMPERATURES."""
    if not isinstance(entry, dict):
        return False
    mods, t, acc = entry.get("modalities"), entry.get("temperature"), entry.get("accuracy")
    if not (isinstance(mods, list) and mods and all(isinstance(m, str) for m in mods) and key == pattern_key(mods)):
        return False
    if names is not None and not is_schema_pattern(mods, names):
        return False
    counts = all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool) and entry.get(k) >= 0
                 for k in counts)
    return counts and is_number(acc) and 0 <= acc <= 1 and (
        t is None or (is_number(t) and TEMPERATURES[0] <= t <= TEMPERATURES[1]))
