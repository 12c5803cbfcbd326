"""A hospital site's data and privacy state, prepared once per process and reused every round.

Preparing a site: validate its tables against the consortium schema (a site with invalid data
refuses to train and says why), split a local held-out part (patient by patient, keyed by the run's
seed), fit the normalisation (under DP on one half of the held-out part, else on the training part; saved in
the site's state directory for prediction time), and register the training patients in the site's
privacy ledger.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from privacy.ledger import LEDGER_FILE, PrivacyLedger
from shared_models.limits import MIN_COUNT
from shared_models.protocol import ACCURACY, BALANCED_ACCURACY, LOSS, MACRO_F1, PATTERNS
from shared_models.schema import FeatureSchema
from shared_models.site_data import NORMALIZER_FILE, Normalizer, encode_labels, make_dataset, raw_matrix, read_site, SiteDataset
from shared_models.validation import validate_site

if TYPE_CHECKING:
    from shared_models.run_config import RunConfig


class SiteDataError(ValueError):
    """The site's data failed validation; the message lists every problem."""


class HeldOutError(SiteDataError):
    """The site's held-out part is too small for what the run needs of it; the message names val-fraction."""


@dataclass(frozen=True)
class SitePaths:
    site_dir: Path  # the hospital's tables
    state_dir: Path  # privacy ledger, normalisation, checkpoints of local state: never leaves the site
    model_dir: Path  # the site's model store (global models delivered by the server)


def simulated_site_paths(cfg: "RunConfig", site: dict) -> SitePaths:
    """A simulated hospital's directories (`site`: its entry in the run config's data-root manifest.json, written by
    `oncofed partition`): its tables under data-root, its state and model store under site-state-root (default
    data-root/state). A simulation finds a site's installed model here: the site's delivery reply names no path."""
    root = cfg.path(cfg.run.data_root)
    home = (cfg.path(cfg.run.site_state_root) if cfg.run.site_state_root else root / "state") / site["name"]
    return SitePaths(root / site["dir"], home / "state", home / "models")


@dataclass
class PreparedSite:
    schema: FeatureSchema
    paths: SitePaths
    train: SiteDataset
    val: SiteDataset
    normalizer: Normalizer
    ledger: PrivacyLedger
    dataset_fingerprint: str
    warnings: list[str]
    min_count: int = MIN_COUNT  # counts below this are never reported: the larger of the site's min-count and the run's


def held_out_split(ids: list[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): a patient is held out when a keyed hash of its id falls below val_fraction.

    Decided patient by patient: whether one patient is in the site's data changes no other patient's part. DP-SGD's
    guarantee for the training part needs that: a neighbouring dataset (one patient more or less) must give a
    neighbouring training part. A split stratified by class did not (one more patient of a class reshuffled that
    class and, through the shared generator, every later class). The run's seed keys the hash."""
    key = f"oncofed-split/{seed}/".encode()
    u = np.array([int.from_bytes(hashlib.sha256(key + i.encode()).digest()[:8], "big") for i in ids], dtype=np.float64)
    held = u < val_fraction * 2.0 ** 64
    return np.flatnonzero(~held), np.flatnonzero(held)


def normalisation_half(ids: list[str], seed: int) -> np.ndarray:
    """Which of these (held-out) patients a DP run fits the normalisation on: a keyed hash of each id, about half.

    The other half are non-members the model never depended on in any way, the ones a membership audit needs
    (`SiteParts.unseen`); patient by patient, as the split."""
    key = f"oncofed-normalise/{seed}/".encode()
    return np.array([hashlib.sha256(key + i.encode()).digest()[0] < 128 for i in ids], dtype=bool)


MIN_NORMALISATION_PATIENTS = 20  # below this a normalisation's statistics are noisy: the site is warned


@dataclass
class SiteParts:
    """A site's patients as the federation trains on them: the training part (members of every model the
    site trains) and the held-out part, with the normalisation fitted on the training part (no DP) or on
    one half of the held-out part (DP)."""

    train: SiteDataset
    val: SiteDataset
    normalizer: Normalizer
    warnings: list[str]
    unseen: np.ndarray  # rows of `val` the normalisation was not fitted on: clean non-members for an audit


def split_site(schema: FeatureSchema, site_dir: Path, *, val_fraction: float, min_count: int,
               seed: int, dp: bool, normalizer: Normalizer | None = None) -> SiteParts:
    """Validate, read, split and normalise a site's data; writes nothing. The one definition of which
    patients a site trains on: `prepare_site` trains on it, `oncofed site privacy-audit` attacks with it.

    `dp`: the normalisation is fitted on one half of the held-out part (`normalisation_half`). Statistics of the
    training part would make every training row depend on every other training patient, which DP-SGD's
    analysis does not cover; the held-out part is outside the DP guarantee anyway (its metrics are reported as
    aggregates, docs/privacy.md). Only half of it, so that the other half are non-members the model depends on
    in no way (a membership audit on patients the normalisation was fitted on overstates the attack,
    docs/results.md). Without DP it is fitted on the training part, the larger. `normalizer`: use this one
    instead (a finished run's saved normalisation, as the run's models saw their inputs)."""
    report = validate_site(schema, site_dir, min_count=min_count)
    if not report.ok:
        raise SiteDataError(report.format_report())
    tables = read_site(schema, site_dir)
    ids = [str(i) for i in tables.labels.index]
    y = encode_labels(schema, tables.labels)
    raw = raw_matrix(schema, tables, ids)
    tr, va = held_out_split(ids, val_fraction, seed)
    warnings = [p.message for p in report.warnings]
    if dp and len(va) == 0:
        raise HeldOutError(f"{site_dir}: no held-out part (the run's val-fraction {val_fraction:g} over {len(ids)} "
                            "patients), and a DP run fits the site's normalisation on it: the operator sets "
                            "val-fraction > 0 (0.2 by default)")
    seen = normalisation_half([ids[i] for i in va], seed) if dp else np.zeros(len(va), dtype=bool)
    if dp and not seen.any():
        raise HeldOutError(f"{site_dir}: the held-out part's {len(va)} patients (val-fraction {val_fraction:g}) leave "
                            "none to fit the normalisation on (a DP run fits it on about half of them): the operator "
                            "sets a larger val-fraction")
    if dp and seen.sum() < MIN_NORMALISATION_PATIENTS:
        warnings.append(f"the normalisation is fitted on {seen.sum()} held-out patients (fewer than "
                        f"{MIN_NORMALISATION_PATIENTS}); a larger val-fraction steadies it")
    if normalizer is None:
        normalizer = Normalizer.fit(schema, raw[va[seen]] if dp else raw[tr])
    train = make_dataset(schema, raw[tr], y[tr], [ids[i] for i in tr], normalizer)
    val = make_dataset(schema, raw[va], y[va], [ids[i] for i in va], normalizer)
    return SiteParts(train, val, normalizer, warnings, np.flatnonzero(~seen))


def ledger_path(paths: SitePaths) -> Path:
    return paths.state_dir / LEDGER_FILE


def prepare_site(schema: FeatureSchema, paths: SitePaths, *, budget_epsilon: float, delta: float,
                 val_fraction: float, min_count: int, seed: int, dp: bool) -> PreparedSite:
    parts = split_site(schema, paths.site_dir, val_fraction=val_fraction, min_count=min_count, seed=seed, dp=dp)
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    parts.normalizer.save(paths.state_dir / NORMALIZER_FILE)
    ledger = PrivacyLedger(ledger_path(paths), budget_epsilon=budget_epsilon, delta=delta)
    # DP-SGD touches only the training patients; the held-out part is used for local metrics.
    fingerprint = ledger.register_dataset(parts.train.ids, *schema.accepted_hashes())
    return PreparedSite(schema, paths, parts.train, parts.val, parts.normalizer, ledger, fingerprint, parts.warnings,
                        min_count)


def run_normalizer_path(state_dir: Path, run_key: str) -> Path:
    from client.releases import ReleaseStore

    return Path(state_dir) / "runs" / ReleaseStore.directory(run_key) / NORMALIZER_FILE


def keep_run_normalizer(state_dir: Path, run_key: str, normalizer: Normalizer) -> None:
    """The normalisation a run trains this site's patients with, kept at its first round for the model the run
    delivers (client.app.save_model): a run's data cannot change while it runs (the ledger refuses other patients)."""
    path = run_normalizer_path(state_dir, run_key)
    if not path.is_file():
        normalizer.save(path)


def min_count(site: PreparedSite, cfg: RunConfig) -> int:
    """The smallest count this site reports under this run: the site's own min-count (it was prepared with) or the
    run's, whichever is larger."""
    return max(site.min_count, cfg.site.min_count)


def evaluate_global(site: PreparedSite, arrays: list[np.ndarray], cfg: RunConfig,
                    patterns: bool = False) -> tuple[int, dict]:
    """Metrics of the global weights on the site's held-out part; counts below min_count are not sent. With
    `patterns` (the run's last round), also the outcomes per modality pattern (client.calibration.pattern_outcomes).
    Here rather than beside the training (client/local_round.py) so that evaluating does not import Opacus."""
    import torch

    from shared_models.evaluation import evaluate
    from shared_models.model import MultiModalTransformer
    from shared_models.weights import load_arrays

    model = MultiModalTransformer(site.schema, cfg.model)
    load_arrays(model, arrays)
    n, floor = len(site.val.y), min_count(site, cfg)
    if n < floor:
        return 0, {}
    m = evaluate(model, torch.from_numpy(site.val.x), torch.from_numpy(site.val.y))
    out = {LOSS: m.loss, ACCURACY: m.accuracy, BALANCED_ACCURACY: m.balanced_accuracy, MACRO_F1: m.macro_f1}
    if patterns:
        from client.calibration import pattern_outcomes

        out[PATTERNS] = json.dumps(pattern_outcomes(model, site.schema, site.val.x, site.val.y, floor))
    return n, out
