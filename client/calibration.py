"""Honest probabilities at a site: temperature scaling of the global model, fitted on the site's own
labelled patients (Guo et al. 2017), checked on patients it was not fitted on.

`oncofed serve calibrate --site-config site.json --data DIR` splits the site's labelled patients in
two (stratified by class, seeded), fits one temperature T on the first half by minimising the
negative log-likelihood of softmax(logits / T), and reports the expected calibration error (ECE,
15 equal-width confidence bins) and the log-loss before and after on the second half. The result is
`STATE_DIR/calibration.json`, tied to the model's weights (SHA-256): a newly delivered model is served
uncalibrated (and says so) until the site calibrates it again. The predicted class never changes
(dividing the logits by T > 0 keeps their order); only how sure the model says it is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from privacy.site_config import SiteConfig
from shared_models.files import write_text_atomic

FORMAT = "oncofed-calibration/1"
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


def refuse_fit(t: float, loss_before: float, loss_after: float, n_fit: int) -> None:
    """A temperature not to serve, with why (ValueError; nothing is written): one the search ran to the edge for
    (the labelled patients do not pin it down: on a few patients all answered right, the fit sharpens every
    answer towards certainty), or one that does not lower the held-out half's log-loss."""
    lo, hi = np.log(TEMPERATURES)
    if not lo + 0.05 * (hi - lo) < np.log(t) < hi - 0.05 * (hi - lo):
        raise ValueError(f"the fitted temperature {t:.3g} is at the edge of what the fit searches ({TEMPERATURES[0]:g}-"
                         f"{TEMPERATURES[1]:g}): the {n_fit} fitting patients do not pin it down; calibrate on more "
                         "labelled patients, including ones the model gets wrong. Nothing was written")
    if not loss_after < loss_before:
        raise ValueError(f"the fitted temperature {t:.3g} does not lower the held-out half's log-loss ({loss_before:.4f} "
                         f"-> {loss_after:.4f}): it would not make the probabilities more honest. Nothing was written")


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


def site_logits(lm, raw: np.ndarray, batch: int = 512) -> np.ndarray:
    import torch

    out = []
    for start in range(0, len(raw), batch):
        x = torch.from_numpy(lm.normalizer.transform(raw[start:start + batch].copy()))
        with torch.no_grad():
            out.append(lm.model(x).numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, lm.schema.n_classes))


def calibrate(settings: SiteConfig, data_dir: Path, seed: int = 0) -> dict:
    """Fit the active model's temperature on half of the site's labelled patients; report on the other half."""
    from client.predict import Predictor
    from shared_models.site_data import LABELS_STEM, find_table, read_table

    state = Path(settings.state_dir)
    predictor = Predictor(settings.model_dir, state / "normalizer.json", settings.signing_public_key or None,
                          calibration_path=state / "calibration.none")  # fitted on the uncalibrated model
    lm = predictor.current
    data_dir = Path(data_dir)
    found = find_table(data_dir, LABELS_STEM)
    if not found:
        raise ValueError(f"{data_dir}: no labels table; calibration needs the site's labelled patients "
                         f"({LABELS_STEM}.csv with {lm.schema.id_column!r} and {lm.schema.label_column!r})")
    labels = read_table(found[0], lm.schema.id_column)[lm.schema.label_column].astype(str).str.strip()
    labels = labels[~labels.index.duplicated(keep=False)]
    checked = predictor.checked_tables(data_dir)
    lookup = {c: k for k, c in enumerate(lm.schema.classes)}
    keep = [k for k, pid in enumerate(checked.ids) if labels.get(pid) in lookup]
    need = min_calibration_patients(len(lm.schema.classes))
    if len(keep) < need:
        raise ValueError(f"{data_dir}: {len(keep)} patients with a label of the schema's classes; calibration needs "
                         f"at least {need} (max(100, 3 x the {len(lm.schema.classes)} classes): half to fit, half to "
                         "check; on a few patients, all answered right, the fit makes every answer near-certain)")
    y = np.array([lookup[labels[checked.ids[k]]] for k in keep])
    logits = site_logits(lm, checked.raw[keep])
    fit, held = split_halves(y, seed)
    t = fit_temperature(logits[fit], y[fit])
    refuse_fit(t, log_loss(logits[held], y[held]), log_loss(logits[held], y[held], t), len(fit))
    before, after = _softmax(logits[held], 1.0), _softmax(logits[held], t)
    result = {"format": FORMAT, "model_version": lm.version, "weights_sha256": lm.package.get("weights_sha256"),
              "temperature": round(t, 6), "fitted": time.time(), "seed": seed, "n_fit": int(len(fit)),
              "n_heldout": int(len(held)), "ece_bins": ECE_BINS,
              "heldout": {"ece_before": round(expected_calibration_error(before, y[held]), 4),
                          "ece_after": round(expected_calibration_error(after, y[held]), 4),
                          "log_loss_before": round(log_loss(logits[held], y[held]), 4),
                          "log_loss_after": round(log_loss(logits[held], y[held], t), 4),
                          "accuracy": round(float((before.argmax(1) == y[held]).mean()), 4)}}
    path = state / "calibration.json"
    write_text_atomic(path, json.dumps(result, indent=1))
    result["path"] = str(path)
    return result


def load_calibration(path: Path, version: str, package: dict) -> dict | None:
    """The site's calibration if it was fitted on these very weights, else None (served uncalibrated)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if data.get("format") != FORMAT or data.get("weights_sha256") != package.get("weights_sha256"):
        return None
    t = data.get("temperature")
    if not isinstance(t, (int, float)) or not TEMPERATURES[0] <= t <= TEMPERATURES[1]:
        return None  # no fit gives it (a file edited by hand, or damaged): served uncalibrated, as /v1/model says
    return data
