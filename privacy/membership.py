"""Membership inference against a released model, and what differential privacy allows it to achieve.

An attack gives every patient a score, higher meaning "more likely a training patient" (a member).
Sweeping a threshold over the scores of known members and known non-members gives the attack's ROC
curve: its true-positive rate (members caught) against its false-positive rate (non-members accused).

What (epsilon, delta)-DP promises (Kairouz, Oh & Viswanath 2015; Nasr et al. 2021): for every test that
tries to tell whether one patient was in the training data, at every false-positive rate FPR,

    TPR <= e^eps * FPR + delta   and   1 - FPR <= e^eps * (1 - TPR) + delta

(the second is the first with "member" and "non-member" swapped). `dp_tpr_bound` is the smaller of the
two; `dp_auc_bound` its area. An attack that beats the bound by more than chance allows is evidence
that the model is not as private as its epsilon says: `bound_test` turns the attack's counts into the
smallest epsilon they prove with a given confidence (Clopper-Pearson intervals on both rates, so that
a lucky small sample is no false alarm, and a union bound over the operating points it looks at;
Jagielski, Ullman & Oprea 2020). Counting many patients of one model as independent trials is sound
when members and non-members were assigned at random (Steinke, Nasr & Jagielski 2023), as a site's
seeded stratified split does.

Scores (per patient, from the model's logits and the true class y):
- loss attack: minus the cross-entropy loss (members are fitted, so their loss is lower);
- confidence attack: the largest predicted probability;
- offline LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles"): the
  logit-scaled confidence of the true class, phi = log(p_y / (1 - p_y)), compared with a Gaussian fitted,
  per patient, to phi under reference models that did not train on that patient.

numpy and scipy only: no model is needed here, only scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

REPORTED_FPRS = (0.001, 0.01)  # the operating points an audit reports (0.1% and 1% FPR)


# --- per-patient scores from logits --------------------------------------------------------------------------
def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def per_example_loss(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross-entropy of each row's true class (natural log)."""
    return -_log_softmax(logits)[np.arange(len(y)), np.asarray(y, dtype=np.int64)]


def max_probability(logits: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(logits).max(axis=1))


def logit_confidence(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """phi = log(p_y / (1 - p_y)) of the true class, computed without forming p_y (which rounds to 1.0 for a
    well-fitted patient): log p_y - log(sum of the other classes' probabilities)."""
    logp = _log_softmax(logits)
    y = np.asarray(y, dtype=np.int64)
    rows = np.arange(len(y))
    others = logp.copy()
    others[rows, y] = -np.inf
    m = others.max(axis=1, keepdims=True)
    log_rest = (m + np.log(np.exp(others - m).sum(axis=1, keepdims=True)))[:, 0]
    return logp[rows, y] - log_rest


def random_per_column(eligible: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of eligible's shape choosing, in each column, k of its eligible rows uniformly at random
    (every column must have at least k)."""
    keys = np.where(eligible, rng.random(eligible.shape), np.inf)
    return np.argsort(np.argsort(keys, axis=0, kind="stable"), axis=0) < k


def lira_offline(target_phi: np.ndarray, reference_phi: np.ndarray, reference_trained_on: np.ndarray,
                 min_models_for_own_variance: int = 8, seed: int = 0) -> np.ndarray:
    """Offline LiRA score per patient: z = (phi - mu_out) / sigma_out, higher = more likely a member.

    target_phi: (n,) phi under the attacked model; reference_phi: (models, n) phi under each reference model;
    reference_trained_on: (models, n) True where a reference model trained on that patient (those are left
    out: offline LiRA fits only the "out" distribution). mu_out is each patient's own mean; sigma_out its own
    standard deviation when every patient has at least `min_models_for_own_variance` out-models, else the
    deviation pooled over all patients (Carlini et al.: with few reference models a global variance is more
    stable). The paper's one-sided test, 1 - P[Z > phi] with Z ~ N(mu_out, sigma_out^2), is Phi(z): the
    same order.

    Every patient is scored the same way: against exactly as many out-models as the patient with the fewest
    has (a random choice of its own, from `seed`), and with the same sigma rule. Otherwise the statistic's
    distribution differs between groups with different out-model counts (members are in no reference
    model, non-members in half of them): a member's own deviation from 8 models against a non-member's
    pooled one from 4 turns any offset between the attacked model and the references (a model trained on
    thousands of patients is more confident than references trained on dozens) into a spurious AUC above
    0.5 with no membership signal at all (0.56-0.61 in tests/test_membership_audit.py's null).
    """
    target_phi = np.asarray(target_phi, dtype=np.float64)
    ref = np.asarray(reference_phi, dtype=np.float64)
    out = ~np.asarray(reference_trained_on, dtype=bool)
    if ref.shape != out.shape or ref.ndim != 2 or ref.shape[1] != len(target_phi):
        raise ValueError(f"reference_phi {ref.shape} and reference_trained_on {out.shape} must both be "
                         f"(models, {len(target_phi)})")
    counts = out.sum(axis=0)
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} patient(s) are in every reference model's training data: "
                         "offline LiRA needs at least one reference model that did not train on each patient")
    k = int(counts.min())
    use = random_per_column(out, k, np.random.default_rng(seed))  # k random out-models per patient
    mu = np.where(use, ref, 0.0).sum(axis=0) / k
    sq = np.where(use, (ref - mu) ** 2, 0.0).sum(axis=0)
    if k >= max(min_models_for_own_variance, 2):
        sigma = np.sqrt(sq / (k - 1))
    else:
        dof = len(counts) * (k - 1)
        sigma = np.full(len(counts), math.sqrt(sq.sum() / dof) if dof > 0 else 1.0)
    return (target_phi - mu) / np.maximum(sigma, 1e-6)


# --- ROC, AUC, TPR at a fixed FPR ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Roc:
    """Operating points of a threshold sweep, from (0, 0) to (1, 1); tied scores form one step."""

    tp: np.ndarray  # members scored >= the threshold, per point
    fp: np.ndarray  # non-members scored >= the threshold
    thresholds: np.ndarray  # the point's threshold (+inf for the first)
    members: int
    nonmembers: int

    @property
    def tpr(self) -> np.ndarray:
        return self.tp / self.members

    @property
    def fpr(self) -> np.ndarray:
        return self.fp / self.nonmembers


def _scores(name: str, values) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"no {name} scores: an audit needs members and non-members")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} scores contain NaN or infinite values")
    return a


def roc(member_scores, nonmember_scores) -> Roc:
    m, n = _scores("member", member_scores), _scores("non-member", nonmember_scores)
    scores = np.concatenate([m, n])
    is_member = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]  # a step only where the score changes
    tp = np.r_[0, np.cumsum(is_member)[last_of_tie]].astype(np.int64)
    fp = np.r_[0, np.cumsum(1 - is_member)[last_of_tie]].astype(np.int64)
    return Roc(tp=tp, fp=fp, thresholds=np.r_[np.inf, scores[last_of_tie]], members=len(m), nonmembers=len(n))


def auc(member_scores, nonmember_scores) -> float:
    """P(a member outscores a non-member) + P(tie) / 2 (the area under the ROC curve, Mann-Whitney)."""
    m, n = _scores("member", member_scores), _scores("non-member", nonmember_scores)
    ranks = stats.rankdata(np.concatenate([m, n]))  # ties get their mean rank
    u = ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2
    return float(u / (len(m) * len(n)))


def auc_interval(member_scores, nonmember_scores, confidence: float = 0.95) -> tuple[float, float]:
    """DeLong's two-sided interval for the AUC (DeLong, DeLong & Clarke-Pearson 1988; the midrank form of
    Sun & Xu 2014, exact with ties): AUC +- z sqrt(var(V10) / m + var(V01) / n), where V10_i is the share of
    non-members member i outscores (ties half) and V01_j the share of members that outscore non-member j;
    clipped to [0, 1]. It says how far an audit's AUC may be from the model's true one with these patients:
    with 30 non-members it is about +-0.1. Where every member outscores every non-member (or all scores tie) the
    estimated variance is 0 and so is the width: the normal approximation says nothing there."""
    m, n = _scores("member", member_scores), _scores("non-member", nonmember_scores)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence}: give a level in (0, 1)")
    if len(m) < 2 or len(n) < 2:  # no variance to estimate: chance allows any AUC
        return 0.0, 1.0
    within_m, within_n = stats.rankdata(m), stats.rankdata(n)
    pooled = stats.rankdata(np.concatenate([m, n]))
    v10 = (pooled[: len(m)] - within_m) / len(n)        # per member: non-members it outscores, ties half
    v01 = 1.0 - (pooled[len(m):] - within_n) / len(m)    # per non-member: members that outscore it, ties half
    a = float(v10.mean())
    se = math.sqrt(v10.var(ddof=1) / len(m) + v01.var(ddof=1) / len(n))
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    return max(0.0, a - z * se), min(1.0, a + z * se)


def tpr_at_fpr(curve: Roc, fpr: float) -> float:
    """The largest TPR among the operating points whose FPR is at most `fpr` (no interpolation: a point
    between two thresholds is not an attack anyone can run without randomising)."""
    ok = curve.fp <= fpr * curve.nonmembers + 1e-9
    return float(curve.tpr[ok].max())


# --- what DP allows ------------------------------------------------------------------------------------------
def dp_tpr_bound(fpr, epsilon: float, delta: float):
    """The largest TPR an (epsilon, delta)-DP model allows at false-positive rate `fpr` (array or scalar)."""
    x = np.asarray(fpr, dtype=np.float64)
    e = math.exp(epsilon)
    b = np.minimum(np.minimum(1.0, e * x + delta), 1.0 - (1.0 - delta - x) / e)
    return float(b) if b.ndim == 0 else b


def dp_auc_bound(epsilon: float, delta: float) -> float:
    """The area under `dp_tpr_bound`: the largest AUC an (epsilon, delta)-DP model allows.

    The bound is e^eps x + delta up to x1 = (1 - delta) / (e^eps + 1), then 1 - e^-eps (1 - delta - x)
    up to x = 1 - delta, then 1."""
    e = math.exp(epsilon)
    x1 = (1 - delta) / (e + 1)
    rest = 1 - delta - x1
    return float(e * x1 ** 2 / 2 + delta * x1 + rest - rest ** 2 / (2 * e) + delta)


def clopper_pearson_lower(k, n: int, alpha: float):
    """One-sided lower confidence bound (level 1 - alpha) on a binomial rate after k successes in n trials."""
    k = np.asarray(k, dtype=np.float64)
    b = np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1e-12), n - k + 1), 0.0)
    return float(b) if b.ndim == 0 else b


def clopper_pearson_upper(k, n: int, alpha: float):
    """One-sided upper confidence bound (level 1 - alpha) on a binomial rate after k successes in n trials."""
    k = np.asarray(k, dtype=np.float64)
    b = np.where(k < n, stats.beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1e-12)), 1.0)
    return float(b) if b.ndim == 0 else b


def wilson_upper(k: int, n: int, z: float = 1.96) -> float:
    """The upper end of Wilson's score interval (two-sided, 95% at z = 1.96) on a binomial rate after k successes in
    n trials: what fit-normalizer's case-mix check (client/serve.py) holds a site's accuracy to."""
    p = k / n
    return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)


def _count_steps(n: int) -> list[int]:
    """0, 1, 2, 4, ... up to n // 2: the numbers of wrongly accused patients at which the bound is tested
    (fixed before looking at the scores; the DP bound bites at few errors, and a short list keeps the union
    bound over the tests cheap)."""
    steps, k = [0], 1
    while k <= n // 2:
        steps.append(k)
        k *= 2
    return steps


@dataclass(frozen=True)
class BoundTest:
    """Does the attack beat the (epsilon, delta)-DP bound by more than chance allows?

    `epsilon_lower` is the largest epsilon the attack proves at the test's confidence (0 if none): every
    (epsilon, delta)-DP model with a smaller epsilon would, with probability at least 1 - alpha, have let the
    attack do worse than it did. `flagged` = epsilon_lower > the claimed epsilon."""

    epsilon_claimed: float
    delta: float
    alpha: float  # the test's overall error level (its share of the audit's, after the union over attacks)
    tests: int  # operating points tested (each with a Clopper-Pearson bound on both of its rates)
    epsilon_lower: float
    flagged: bool
    witness: dict = field(default_factory=dict)  # the operating point that proves epsilon_lower

    def to_dict(self) -> dict:
        return {"epsilon_claimed": self.epsilon_claimed, "delta": self.delta, "alpha": self.alpha,
                "tests": self.tests, "epsilon_lower": self.epsilon_lower, "flagged": self.flagged,
                "witness": self.witness}


def bound_test(curve: Roc, epsilon: float, delta: float, alpha: float = 0.05) -> BoundTest:
    """Test the attack's ROC against the (epsilon, delta)-DP bound with overall error level `alpha`.

    At a few operating points chosen by their number of errors (0, 1, 2, 4, ... false positives; and as
    many false negatives for the swapped inequality) it takes a Clopper-Pearson lower bound on the rate the
    attack got right and an upper bound on the rate it got wrong (each at level alpha / (2 x tests)), and
    asks which epsilon they prove: e^eps >= (TPR_low - delta) / FPR_high, or (TNR_low - delta) / FNR_high.
    """
    fp_steps, fn_steps = _count_steps(curve.nonmembers), _count_steps(curve.members)
    tests = len(fp_steps) + len(fn_steps)
    a = alpha / (2 * tests)
    best, witness = 0.0, {}
    fn = curve.members - curve.tp
    tn = curve.nonmembers - curve.fp
    points = [("low FPR", k, int(np.flatnonzero(curve.fp <= k)[-1])) for k in fp_steps]  # most members caught
    points += [("high TPR", k, int(np.flatnonzero(fn <= k)[0])) for k in fn_steps]  # fewest non-members accused
    for side, _, i in points:
        if side == "low FPR":
            right = clopper_pearson_lower(curve.tp[i], curve.members, a)
            wrong = clopper_pearson_upper(curve.fp[i], curve.nonmembers, a)
        else:
            right = clopper_pearson_lower(tn[i], curve.nonmembers, a)
            wrong = clopper_pearson_upper(fn[i], curve.members, a)
        if right > delta:
            proven = math.log((right - delta) / wrong)
            if proven > best:
                best = proven
                witness = {"side": side, "threshold": float(curve.thresholds[i]), "tp": int(curve.tp[i]),
                           "fp": int(curve.fp[i]), "members": curve.members, "nonmembers": curve.nonmembers,
                           "rate_right_lower": float(right), "rate_wrong_upper": float(wrong)}
    return BoundTest(epsilon_claimed=float(epsilon), delta=float(delta), alpha=float(alpha), tests=tests,
                     epsilon_lower=float(best), flagged=best > epsilon, witness=witness)


def strongest_provable_epsilon(members: int, nonmembers: int, delta: float, alpha: float = 0.05) -> float:
    """The epsilon a perfect attack (every member above every non-member) would prove with these counts:
    an audit of this size cannot catch a model whose claimed epsilon is larger."""
    return bound_test(roc(np.ones(members), np.zeros(nonmembers)), 0.0, delta, alpha).epsilon_lower


# --- one attack, summarised ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackResult:
    name: str
    members: int
    nonmembers: int
    auc: float
    auc_interval: tuple[float, float]  # DeLong's, at the audit's confidence: how far chance moves the AUC
    tpr_at: dict[float, float]  # REPORTED_FPRS -> TPR
    curve: Roc
    test: BoundTest | None  # None: the model claims no DP (nothing to test against)

    def to_dict(self) -> dict:
        eps = None if self.test is None else (self.test.epsilon_claimed, self.test.delta)
        return {"attack": self.name, "members": self.members, "nonmembers": self.nonmembers, "auc": self.auc,
                "auc_interval": list(self.auc_interval),
                "tpr_at_fpr": {f"{f:g}": t for f, t in self.tpr_at.items()},
                "bound_at_fpr": {f"{f:g}": dp_tpr_bound(f, *eps) for f in self.tpr_at} if eps else None,
                "auc_bound": dp_auc_bound(*eps) if eps else None,
                "bound_test": None if self.test is None else self.test.to_dict(),
                "roc": {"fpr": self.curve.fpr.tolist(), "tpr": self.curve.tpr.tolist()}}


def attack(name: str, member_scores, nonmember_scores, epsilon: float | None, delta: float | None,
           alpha: float = 0.05, confidence: float = 0.95) -> AttackResult:
    """AUC with its interval at `confidence`, TPR at REPORTED_FPRS and (for a model that claims
    (epsilon, delta)-DP) the bound test at error level `alpha`."""
    curve = roc(member_scores, nonmember_scores)
    test = None if epsilon is None else bound_test(curve, epsilon, delta or 0.0, alpha)
    return AttackResult(name=name, members=curve.members, nonmembers=curve.nonmembers,
                        auc=auc(member_scores, nonmember_scores),
                        auc_interval=auc_interval(member_scores, nonmember_scores, confidence),
                        tpr_at={f: tpr_at_fpr(curve, f) for f in REPORTED_FPRS}, curve=curve, test=test)
