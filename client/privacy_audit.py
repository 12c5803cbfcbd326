"""`oncofed site privacy-audit`: a site attacks the global model it received, on its own patients.

Members are the site's training part, non-members its held-out part: the split `client.site.split_site`
makes for every run (patient by patient, by the run's `val-fraction` and `seed`). For a DP model, only the half
of the held-out part its normalisation was not fitted on: patients the model depends on in no way. The site's privacy
ledger confirms it: the training part's fingerprint must be a dataset the ledger registered (and, for a DP
model, the one its run trained on), so an audit never attacks patients the model did not train on.

Attacks (privacy/membership.py holds the maths): the loss and the confidence attack by default; with
`lira_models` N >= 2, offline LiRA with N reference models trained by shared_models/training.py's `fit` on random
halves of all the site's patients, members and non-members alike (each patient in N // 2 of them), so that
every patient is compared with the N - N // 2 reference models that did not train on it, and the references
are trained on as many patients as the site gave the federation, not on a few dozen.

The claim tested is the model's (epsilon, delta) for this site: the delivered package's `site_run_epsilon` (the
epsilon of the run's rounds alone; packages before 2026-12-06: `site_epsilon`, the site's total, looser) and `delta`,
else the site's ledger (the accountant over its committed rounds of the package's run). An attack that proves a
larger epsilon at the audit's confidence flags the model (`flagged`; the command exits 1).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privacy.ledger import run_epsilon
from privacy.membership import (REPORTED_FPRS, AttackResult, attack, clopper_pearson_upper, dp_auc_bound,
                                dp_tpr_bound, logit_confidence, lira_offline, max_probability, per_example_loss,
                                random_per_column, strongest_provable_epsilon)
from shared_models.limits import MIN_COUNT

AUDIT_FORMAT = "oncofed-privacy-audit/1"
REPORT_FILE, PLOT_FILE = "privacy-audit.json", "privacy-audit-roc.png"
MIN_PATIENTS = 10  # members and non-members each: fewer cannot prove anything
WEAK_AUDIT = 200  # below this many non-members (or members) the report says the audit is weak


class PrivacyAuditError(ValueError):
    """An audit that cannot run; the message names the file or setting and the fix."""


class TooFewPatients(PrivacyAuditError):
    """A site with too few members or non-members to tell an attack from chance (a report counts these apart)."""


@dataclass(frozen=True)
class Claim:
    """What the model claims about this site's patients."""

    dp: bool
    epsilon: float | None
    delta: float | None
    source: str  # where the numbers come from (file and key)


def _ledger_state(state_dir: Path) -> dict:
    from privacy.accounting import BudgetError
    from privacy.ledger import read_ledger

    from client.site import LEDGER_FILE

    path = state_dir / LEDGER_FILE
    if not path.is_file():
        raise PrivacyAuditError(f"{path}: no privacy ledger; the audit needs the site's ledger to know which patients "
                                "trained (state-dir must be the one the site trained with)")
    try:
        return read_ledger(path)
    except BudgetError as e:
        raise PrivacyAuditError(str(e)) from None


def enough_patients(parts, site_dir: Path) -> None:
    # under DP the normalisation is fitted on half the held-out part: the non-members are the other half
    nonmembers = ("non-members (held-out part)" if len(parts.unseen) == len(parts.val.y) else
                  "non-members (the held-out patients the normalisation was not fitted on)")
    for what, n in (("members (training part)", len(parts.train.y)), (nonmembers, len(parts.unseen))):
        if n < MIN_PATIENTS:
            raise TooFewPatients(f"{site_dir}: {n} {what}; an audit needs at least {MIN_PATIENTS} of each "
                                    "(too few patients to tell anything from chance)")


def _split(schema, site_dir: Path, split: dict, dp: bool):
    from client.site import HeldOutError, SiteDataError, split_site
    from shared_models.site_data import TableError

    try:
        return split_site(schema, site_dir, dp=dp, **split)
    except HeldOutError as e:
        raise PrivacyAuditError(str(e)) from None
    except (SiteDataError, TableError) as e:
        raise PrivacyAuditError(f"{site_dir}: the site's data cannot be read as the model's schema:\n{e}") from None


def as_trained(parts, schema, site_dir: Path, saved_path: Path, split: dict, dp: bool):
    """The split with the normalisation the site trained with (its saved normalizer.json): the DP preparation's
    (fitted on half the held-out part, whose other half are then the non-members) or the plain one's (fitted on
    the training part), whichever it is, the model's `dp` tried first. Any other normalisation feeds the model
    inputs it never saw and may have been fitted on the audit's non-members: refused."""
    from shared_models.site_data import Normalizer

    if not saved_path.is_file():
        raise PrivacyAuditError(f"{saved_path}: no saved normalisation; the audit needs the one the site trained with "
                                "(state-dir must be the one the site trained with)")
    try:
        saved = Normalizer.load(saved_path, schema)
    except (OSError, ValueError) as e:
        raise PrivacyAuditError(f"{saved_path}: cannot be read: {e}") from None

    def same(fitted) -> bool:
        kept, now = saved.arrays(), fitted.arrays()
        keys = ["mean", "scale"]
        if not np.isnan(kept["unscaled_mean"]).all():  # a file from before has no unscaled columns' statistics
            keys += ["unscaled_mean", "unscaled_scale"]
        return all(np.allclose(kept[k], now[k], rtol=1e-5, atol=1e-6, equal_nan=True) for k in keys)

    if same(parts.normalizer):
        return parts
    try:
        other = _split(schema, site_dir, split, not dp)
    except PrivacyAuditError:
        other = None
    if other is not None and same(other.normalizer):
        return other
    raise PrivacyAuditError(f"{saved_path}: the site's saved normalisation is not the one this split fits (a run "
                            "prepared before the normalisation was fitted on half the held-out part, another "
                            "--val-fraction or --seed than the run's, or `oncofed serve fit-normalizer` since): "
                            "the audit cannot tell which patients it was fitted on; audit a model of a run made "
                            "with the current preparation, with the run's --val-fraction and --seed")


def check_membership(ledger: dict, fingerprint: str, run: str | None, dp: bool, ledger_path: Path,
                     val_fraction: float, seed: int) -> None:
    """The training part must be what the site trained on: a dataset of its ledger, the run's for DP."""
    fix = (f"pass the run's --val-fraction and --seed (its run config; now {val_fraction:g} and {seed}), and the "
           "site's own data-path and state-dir")
    if fingerprint not in ledger.get("datasets", {}):
        raise PrivacyAuditError(f"{ledger_path}: the training part of val-fraction {val_fraction:g}, seed {seed} is "
                                f"not a set of patients this site trained on; {fix}")
    if dp and run:
        runs = {k.split(":", 1)[1]: k.split(":", 1)[0] for k in ledger.get("runs", {})}
        if run in runs and runs[run] != fingerprint:
            raise PrivacyAuditError(f"{ledger_path}: run {run} trained on another training part of this site than "
                                    f"val-fraction {val_fraction:g}, seed {seed} gives; {fix}")


def claimed_privacy(package: dict, site: str, ledger: dict, fingerprint: str, package_path: Path,
                    ledger_path: Path) -> Claim:
    if not package.get("dp"):
        return Claim(False, None, None, f"{package_path}: dp = false")
    delta = package.get("delta")
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise PrivacyAuditError(f"{package_path}: a DP model without a delta in (0, 1) (got {delta!r}); the package "
                                "was not written by OncoFed's server: ask the operator to deliver it again")
    # this run's rounds alone: the model's own guarantee (each run trains from fresh weights). The site's total over
    # every run (site_epsilon, all that packages before 2026-12-06 carry) also holds, but looser: an attack could
    # never beat it where it beats the model's own
    for key, what in (("site_run_epsilon", "this run's rounds alone"),
                      ("site_epsilon", "the site's total over every run, looser than this model's own")):
        eps = (package.get(key) or {}).get(site)
        if isinstance(eps, (int, float)) and eps > 0:
            return Claim(True, float(eps), float(delta), f"{package_path}: {key}[{site!r}] ({what}), delta")
    run = package.get("run")
    if any(e.get("dataset") == fingerprint and e.get("run_id") == run and e.get("status") == "committed"
           for e in ledger.get("entries", [])):
        eps = run_epsilon(ledger, run, float(ledger.get("delta") or delta))
        return Claim(True, eps, float(delta), f"{ledger_path}: committed rounds of run {run}")
    raise PrivacyAuditError(f"{package_path}: the model is DP but records no epsilon for site {site!r}, and "
                            f"{ledger_path} has no committed round of run {run}: this site did not train the model, "
                            "so its patients are not members; audit it at a site that trained it")


@dataclass
class AuditData:
    """The model's logits on the site's members and non-members."""

    member_logits: np.ndarray
    member_y: np.ndarray
    nonmember_logits: np.ndarray
    nonmember_y: np.ndarray


def _logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    from shared_models.evaluation import predict_logits

    return predict_logits(model, torch.from_numpy(x)).numpy().astype(np.float64)


def reference_logit_confidence(schema, model_config, parts, n_models: int, epochs: int,
                               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """phi of every member and non-member (in that order) under `n_models` reference models, and which
    reference model trained on which of them. Each reference model trains on a random half of all the site's
    patients; each patient is in exactly n_models // 2 of them, so every patient has as many that never saw it."""
    import torch

    from shared_models.model import MultiModalTransformer
    from shared_models.training import TrainConfig, fit

    n = len(parts.train.y) + len(parts.val.y)
    trained_on = random_per_column(np.ones((n_models, n), dtype=bool), n_models // 2, np.random.default_rng(seed))
    x_all = np.concatenate([parts.train.x, parts.val.x])
    y_all = np.concatenate([parts.train.y, parts.val.y])
    phi = np.zeros((n_models, n))
    for k in range(n_models):
        rows = np.flatnonzero(trained_on[k])
        torch.manual_seed(seed * 1009 + k)
        model = MultiModalTransformer(schema, model_config)
        cfg = TrainConfig(epochs=epochs, batch_size=min(64, len(rows)), patience=None, seed=seed * 1009 + k)
        fit(model, torch.from_numpy(x_all[rows]), torch.from_numpy(y_all[rows]), cfg)
        phi[k] = logit_confidence(_logits(model, x_all), y_all)
    return phi, trained_on


def run_attacks(data: AuditData, claim: Claim, confidence: float,
                lira: tuple[np.ndarray, np.ndarray] | None = None) -> list[AttackResult]:
    """The loss and confidence attacks (and LiRA, given reference phi and training masks) with the
    audit's error level shared equally among them (a union bound: flagging needs one to beat the bound)."""
    n_m = len(data.member_y)
    scores = {"loss": (-per_example_loss(data.member_logits, data.member_y),
                       -per_example_loss(data.nonmember_logits, data.nonmember_y)),
              "confidence": (max_probability(data.member_logits), max_probability(data.nonmember_logits))}
    if lira is not None:
        phi = np.concatenate([logit_confidence(data.member_logits, data.member_y),
                              logit_confidence(data.nonmember_logits, data.nonmember_y)])
        z = lira_offline(phi, *lira)
        scores["offline LiRA"] = (z[:n_m], z[n_m:])
    alpha = (1 - confidence) / len(scores)
    return [attack(name, m, n, claim.epsilon, claim.delta, alpha, confidence) for name, (m, n) in scores.items()]


def audit(site_dir: Path, state_dir: Path, model_dir: Path, site: str, *, val_fraction: float, seed: int,
          min_count: int = MIN_COUNT, lira_models: int = 0, lira_epochs: int = 30, confidence: float = 0.95,
          version: str | None = None, signing_public_key: str | None = None) -> dict:
    """The audit report (JSON-ready) of the site's installed model (the active one, or `version`)."""
    from client.model_store import PACKAGE, VERSION_SCHEMA, WEIGHTS, ModelStore, ModelStoreError
    from privacy.ledger import known_fingerprint
    from shared_models.schema import FeatureSchema
    from shared_models.weights import load_weights

    site_dir, state_dir, model_dir = Path(site_dir), Path(state_dir), Path(model_dir)
    if not 0 < confidence < 1:
        raise PrivacyAuditError(f"--confidence {confidence}: give a level in (0, 1), e.g. 0.95")
    if lira_models == 1 or lira_models < 0:
        raise PrivacyAuditError(f"--lira-models {lira_models}: offline LiRA needs at least 2 reference models "
                                "(each patient must be left out of one); 0 skips it")
    store = ModelStore(model_dir) if model_dir.is_dir() else None
    version = version or (store.active() if store else None)
    if store is None or version is None:
        raise PrivacyAuditError(f"{model_dir}: no model installed; a run must deliver its global model to this site "
                                "(the operator's `oncofed deliver`) before it can be audited")
    try:
        from privacy.signing import load_public

        package = store.verify(version, load_public(signing_public_key) if signing_public_key else None)
        schema = FeatureSchema.load(model_dir / version / VERSION_SCHEMA)
        model = load_weights(model_dir / version / WEIGHTS, schema).eval()
    except (ModelStoreError, OSError, ValueError) as e:
        raise PrivacyAuditError(f"{model_dir / version}: the model cannot be audited: {e}") from None
    if not 0 <= val_fraction < 1:
        raise PrivacyAuditError(f"--val-fraction {val_fraction}: give the run's val-fraction in [0, 1)")
    no_held_out = val_fraction == 0
    if not no_held_out:
        split = dict(val_fraction=val_fraction, min_count=min_count, seed=seed)
        parts = _split(schema, site_dir, split, bool(package.get("dp")))
        no_held_out = len(parts.val.y) == 0
    if no_held_out:
        raise PrivacyAuditError(f"{site_dir}: no held-out part (val-fraction {val_fraction:g} leaves every patient "
                                "in training), so there are no non-members to compare with; pass the run's "
                                "--val-fraction (a run with val-fraction 0 cannot be audited on the site's data)")
    enough_patients(parts, site_dir)
    from client.site import LEDGER_FILE

    ledger_path = state_dir / LEDGER_FILE
    ledger = _ledger_state(state_dir)
    fingerprint = known_fingerprint(ledger.get("datasets", {}), parts.train.ids, *schema.accepted_hashes())[0]
    package_path = model_dir / version / PACKAGE
    check_membership(ledger, fingerprint, package.get("run"), bool(package.get("dp")), ledger_path, val_fraction,
                     seed)
    from client.predict import normalizer_of
    from shared_models.site_data import NORMALIZER_FILE

    parts = as_trained(parts, schema, site_dir, normalizer_of(model_dir / version, state_dir / NORMALIZER_FILE),
                       split, bool(package.get("dp")))
    enough_patients(parts, site_dir)
    unseen = parts.unseen
    claim = claimed_privacy(package, site, ledger, fingerprint, package_path, ledger_path)

    t0 = time.perf_counter()
    data = AuditData(_logits(model, parts.train.x), parts.train.y, _logits(model, parts.val.x[unseen]),
                     parts.val.y[unseen])
    lira = None
    if lira_models:
        phi, trained_on = reference_logit_confidence(schema, model.config, parts, lira_models, lira_epochs, seed)
        audited = np.r_[np.arange(len(parts.train.y)), len(parts.train.y) + unseen]  # columns: train, then val
        lira = phi[:, audited], trained_on[:, audited]
    results = run_attacks(data, claim, confidence, lira)
    n_m, n_n = len(data.member_y), len(data.nonmember_y)
    strongest = (strongest_provable_epsilon(n_m, n_n, claim.delta, (1 - confidence) / len(results))
                 if claim.dp else None)
    flagged = [r.name for r in results if r.test is not None and r.test.flagged]
    return {
        "format": AUDIT_FORMAT, "site": site, "model_version": version, "run": package.get("run"),
        "arrays_sha256": package.get("arrays_sha256"), "audited": time.time(),
        "seconds": round(time.perf_counter() - t0, 2),
        "split": {"site_dir": str(site_dir), "val_fraction": val_fraction, "seed": seed, "members": n_m,
                  "nonmembers": n_n, "held_out": len(parts.val.y), "dataset_fingerprint": fingerprint},
        "claim": {"dp": claim.dp, "epsilon": claim.epsilon, "delta": claim.delta, "source": claim.source,
                  "auc_bound": dp_auc_bound(claim.epsilon, claim.delta) if claim.dp else None,
                  "strongest_provable_epsilon": strongest},
        "confidence": confidence, "lira_models": lira_models,
        "attacks": [r.to_dict() for r in results],
        "flagged": bool(flagged), "flagged_by": flagged,
        "notes": notes(n_m, n_n, claim, strongest, confidence),
    }


def notes(n_m: int, n_n: int, claim: Claim, strongest: float | None, confidence: float) -> list[str]:
    out = []
    if n_n < 1 / min(REPORTED_FPRS[-1], 1):
        out.append(f"with {n_n} non-members the smallest false-positive rate measured is 1/{n_n} = {1 / n_n:.1%}: "
                   "TPR at 0.1% and 1% FPR are the TPR at no false positive, whose true FPR may be up to "
                   f"{clopper_pearson_upper(0, n_n, 1 - confidence):.1%} ({confidence:.0%}); a TPR above the bound "
                   "there is not yet a leak: 'eps proven' is the test")
    if min(n_m, n_n) < WEAK_AUDIT:
        out.append(f"a small site gives a weak audit: {n_m} members and {n_n} non-members can prove only large leaks")
    if strongest is not None:
        caught = "can" if strongest > claim.epsilon else "cannot"
        out.append(f"even a perfect attack proves at most epsilon {strongest:.2f} at {confidence:.0%} confidence with "
                   f"these patients: a model that leaks beyond its epsilon {claim.epsilon:.2f} {caught} be caught here")
    if not claim.dp:
        out.append("the model claims no differential privacy: the attacks are reported, there is no bound to check")
    return out


# --- output ------------------------------------------------------------------------------------------------------
def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def format_report(report: dict) -> str:
    s, c = report["split"], report["claim"]
    lines = [f"privacy audit of model {report['model_version']} (run {report['run']}) at site {report['site']}: "
             f"{s['members']} members (training part) vs {s['nonmembers']} non-members (held-out part"
             + (f": the {s['nonmembers']} of {s['held_out']} the normalisation was not fitted on"
                if s.get("held_out", s["nonmembers"]) != s["nonmembers"] else "")
             + f"; val-fraction {s['val_fraction']:g}, seed {s['seed']})"]
    if c["dp"]:
        lines.append(f"claim: ({c['epsilon']:.3g}, {c['delta']:.3g})-DP ({c['source']}); it allows AUC <= "
                     f"{c['auc_bound']:.3f} and TPR <= e^{c['epsilon']:.3g} x FPR + {c['delta']:.3g}")
    else:
        lines.append(f"claim: no differential privacy ({c['source']})")
    level = f"{report['confidence']:.0%}"
    head = f"{'attack':<14}{'AUC':>7}{level + ' interval':>16}" + "".join(
        f"{'TPR@' + f'{f:.1%}'.replace('.0%', '%') + 'FPR':>14}{'bound':>8}" for f in REPORTED_FPRS)
    if c["dp"]:
        head += f"  {'eps proven':>10}"
    lines += ["", head]
    for a in report["attacks"]:
        low, high = a.get("auc_interval") or (None, None)  # reports before 2026-12-05 have none
        row = f"{a['attack']:<14}{a['auc']:>7.3f}{(f'{low:.3f}-{high:.3f}' if low is not None else '—'):>16}"
        for f in REPORTED_FPRS:
            bound = a["bound_at_fpr"][f"{f:g}"] if a["bound_at_fpr"] else None
            row += f"{a['tpr_at_fpr'][f'{f:g}']:>14.3f}{_num(bound, 4):>8}"
        if a["bound_test"]:
            t = a["bound_test"]
            row += f"  {t['epsilon_lower']:>10.2f}" + ("  BEATS THE BOUND" if t["flagged"] else "")
        lines.append(row)
    lines.append(f"(interval: DeLong's, where the model's true AUC lies at {level} confidence given how few patients "
                 "were attacked; an interval holding 0.5 is a score chance alone could give)")
    if c["dp"]:
        lines.append(f"(eps proven: the largest epsilon the attack proves at {level} confidence, "
                     "Clopper-Pearson on both rates; 0 = nothing beyond chance)")
    lines += [""] + [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def verdict(report: dict) -> str:
    c = report["claim"]
    if not report["flagged"]:
        if not c["dp"]:
            return "no DP claimed: nothing to flag (the numbers above are what an attacker gets)"
        return (f"within the bound: no attack proves more than epsilon {c['epsilon']:.3g} at "
                f"{report['confidence']:.0%} confidence")
    worst = max((a for a in report["attacks"] if a["bound_test"]), key=lambda a: a["bound_test"]["epsilon_lower"])
    return (f"FLAGGED: the {worst['attack']} attack proves epsilon >= {worst['bound_test']['epsilon_lower']:.2f} at "
            f"{report['confidence']:.0%} confidence on this site's patients, above the model's epsilon "
            f"{c['epsilon']:.3g}. The model leaks more than its DP label allows: a bug in its DP training or "
            "accounting. Do not rely on its epsilon; tell the consortium's operator this line (model, run, attack "
            "and the epsilon it proves). The report file stays at the site: its patient counts and attack numbers are "
            "computed on the site's patients without any DP noise")


def plot_roc(report: dict, path: Path) -> Path:
    """ROC curves on log-log axes with the bound the claimed epsilon allows (and chance) drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_n = report["split"]["nonmembers"]
    lo = min(1e-3, 0.5 / n_n)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    grid = np.logspace(math.log10(lo), 0, 200)
    ax.plot(grid, grid, color="0.6", lw=1, ls=":", label="chance")
    ax.axvspan(lo, 1 / n_n, color="0.92", lw=0, label=f"FPR below 1/{n_n}: not measurable here")
    c = report["claim"]
    if c["dp"]:
        ax.plot(grid, dp_tpr_bound(grid, c["epsilon"], c["delta"]), color="crimson", lw=1.6, ls="--",
                label=f"bound of ε = {c['epsilon']:.3g}, δ = {c['delta']:.0e}")
    for a in report["attacks"]:
        fpr, tpr = np.asarray(a["roc"]["fpr"]), np.asarray(a["roc"]["tpr"])
        # a step curve; FPR 0 (off a log axis) is drawn at the axis' left edge
        ax.step(np.maximum(fpr, lo), np.maximum(tpr, lo), where="post", lw=1.4,
                label=f"{a['attack']} (AUC {a['auc']:.3f})")
    ax.set(xscale="log", yscale="log", xlim=(lo, 1), ylim=(lo, 1.05), xlabel="false-positive rate (non-members)",
           ylabel="true-positive rate (members)",
           title=f"{report['site']}: {report['split']['members']} members, {n_n} non-members")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(report: dict, out_dir: Path) -> tuple[Path, Path]:
    from shared_models.files import write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_roc(report, out_dir / PLOT_FILE)
    report["plot"] = str(plot)
    write_json_atomic(out_dir / REPORT_FILE, report)
    return out_dir / REPORT_FILE, plot
