"""The empirical privacy audit: membership-inference maths (privacy/membership.py) against hand-computed
cases, the bound (eps, delta)-DP puts on any attack, and `oncofed site privacy-audit` on a real site
directory, where the planted bug of issue 18 (a model trained without noise but labelled DP) must be flagged
and honest models (DP-trained, untrained) at the same label must not."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from privacy.membership import (attack, auc, auc_interval, bound_test, clopper_pearson_lower,
                                clopper_pearson_upper, dp_auc_bound, dp_tpr_bound, lira_offline, logit_confidence, max_probability,
                                per_example_loss, roc, strongest_provable_epsilon, tpr_at_fpr,
                                wilson_upper)

LABELLED_EPSILON = 0.5  # what the planted model claims: a small epsilon, which its training does not deliver
DELTA = 1e-5


# --- ROC, AUC, TPR at a fixed FPR -------------------------------------------------------------------------------
def test_auc_is_the_share_of_member_non_member_pairs_the_attack_orders_correctly():
    # members 0.9, 0.8 beat both non-members (0.7, 0.2); member 0.3 beats only 0.2: 5 of 6 pairs
    assert auc([0.9, 0.8, 0.3], [0.7, 0.2]) == pytest.approx(5 / 6)


def test_a_tie_between_a_member_and_a_non_member_counts_half():
    # pairs: (1 vs 1) twice -> 0.5 each, (1 vs 0) twice -> 1 each: 3 of 4
    assert auc([1.0, 1.0], [1.0, 0.0]) == pytest.approx(0.75)


def _pairwise_delong(m, n, z):
    """DeLong's interval from its definition, pair by pair (O(m n)): the reference for the midrank form."""
    m, n = np.asarray(m, float), np.asarray(n, float)
    wins = (m[:, None] > n[None, :]) + 0.5 * (m[:, None] == n[None, :])  # member i against non-member j
    v10, v01 = wins.mean(1), wins.mean(0)
    se = math.sqrt(v10.var(ddof=1) / len(m) + v01.var(ddof=1) / len(n))
    return wins.mean() - z * se, wins.mean() + z * se


def test_auc_interval_is_delongs_pair_by_pair_ties_included():
    rng = np.random.default_rng(0)
    for m, n in ((rng.normal(0.3, 1, 57), rng.normal(0, 1, 31)),                  # no ties
                 (rng.integers(0, 4, 40).astype(float), rng.integers(0, 3, 25).astype(float))):  # many ties
        low, high = auc_interval(m, n, 0.9)
        ref = _pairwise_delong(m, n, 1.6448536269514722)
        assert (low, high) == pytest.approx(ref, abs=1e-12)
        assert low < auc(m, n) < high


def test_auc_interval_holds_the_true_auc_as_often_as_its_confidence_says():
    # 2,000 audits of a model whose loss attack has true AUC Phi(0.3 / sqrt 2) = 0.584, with 40 members and 30
    # non-members (a small site): the 95% interval must hold it in ~95% of them (binomial sd 0.5%)
    from scipy import stats

    rng = np.random.default_rng(1)
    true = stats.norm.cdf(0.3 / math.sqrt(2))
    held = [low <= true <= high for low, high in
            (auc_interval(rng.normal(0.3, 1, 40), rng.normal(0, 1, 30)) for _ in range(2000))]
    assert 0.93 <= np.mean(held) <= 0.97


def test_auc_interval_of_too_few_patients_is_everything():
    assert auc_interval([1.0], [0.0, 0.5]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="confidence"):
        auc_interval([1.0, 2.0], [0.0, 0.5], 1.0)


def test_roc_steps_once_per_distinct_score_from_nothing_accused_to_everyone():
    curve = roc([0.9, 0.8, 0.3], [0.8, 0.2])
    assert curve.tp.tolist() == [0, 1, 2, 3, 3]
    assert curve.fp.tolist() == [0, 0, 1, 1, 2]  # 0.8 is a tie: one step takes a member and a non-member
    assert curve.tpr.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1, 1])
    assert curve.fpr.tolist() == pytest.approx([0, 0, 0.5, 0.5, 1])


def test_tpr_at_fpr_is_the_best_operating_point_that_accuses_at_most_that_share_of_non_members():
    # 4 members (scores 10, 9, 8, 1), 10 non-members (7, 5, 5, ...): above 7 three members are caught with no
    # false positive; threshold 7 accuses one non-member of ten (FPR 0.1) and catches no one more; the fourth
    # member (1) is caught only once every non-member is accused
    curve = roc([10, 9, 8, 1], [7] + [5] * 9)
    assert tpr_at_fpr(curve, 0.01) == pytest.approx(0.75)
    assert tpr_at_fpr(curve, 0.1) == pytest.approx(0.75)
    assert tpr_at_fpr(curve, 1.0) == pytest.approx(1.0)


def test_scores_from_logits_loss_confidence_and_logit_scaled_confidence():
    p = 0.8
    logits = np.log([[p, 1 - p], [0.5, 0.5]])
    y = np.array([0, 1])
    assert per_example_loss(logits, y) == pytest.approx([-math.log(0.8), -math.log(0.5)])
    assert max_probability(logits) == pytest.approx([0.8, 0.5])
    assert logit_confidence(logits, y) == pytest.approx([math.log(0.8 / 0.2), 0.0])
    # a patient fitted so well that p rounds to 1.0 in float64 still gets a finite, exact phi
    assert logit_confidence(np.array([[50.0, 0.0, 0.0]]), np.array([0]))[0] == pytest.approx(50 - math.log(2))


def test_offline_lira_compares_each_patient_with_the_reference_models_that_did_not_train_on_it():
    # patient 0: out-models give phi 0, 2, 4 (mean 2, sd 2); the model that trained on it (phi 100) is left out
    reference = np.array([[0.0, 1.0], [2.0, 1.5], [4.0, 0.5], [100.0, 7.0]])
    trained_on = np.array([[False, False], [False, False], [False, False], [True, True]])
    z = lira_offline(np.array([6.0, 1.0]), reference, trained_on, min_models_for_own_variance=3)
    assert z[0] == pytest.approx((6 - 2) / 2)
    assert z[1] == pytest.approx(0.0)  # patient 1 scores its out-models' mean: no evidence either way


def test_offline_lira_scores_every_patient_against_as_many_out_models_and_one_sigma_rule():
    # patient 0 has 4 out-models, patient 1 only 2: patient 0 is compared with 2 of its 4, and with fewer
    # than 8 out-models both get the deviation pooled over both patients
    reference = np.array([[0.0, 10.0], [2.0, 12.0], [4.0, 50.0], [6.0, 50.0]])
    trained_on = np.array([[False, False], [False, False], [False, True], [False, True]])
    for seed in range(10):
        z = lira_offline(np.array([3.0, 11.0]), reference, trained_on, seed=seed)
        pairs = [(a, b) for a in (0.0, 2.0, 4.0, 6.0) for b in (0.0, 2.0, 4.0, 6.0) if a < b]
        candidates = [((3 - (a + b) / 2), ((a - b) ** 2 / 2 + 2.0) / 2) for a, b in pairs]
        assert any(z[0] == pytest.approx(d / np.sqrt(v)) and z[1] == pytest.approx(0.0) for d, v in candidates)


def test_offline_lira_has_no_advantage_without_membership_and_finds_it_when_there_is():
    # members are in no reference model, non-members in half of them (as the site's audit trains them), and
    # the attacked model is more confident than its references on everyone: with no membership signal the
    # AUC stays at chance (before the equal-count rule, members' own sigma against non-members' pooled one
    # gave 0.56 at offset 1 and 0.61 at offset 3 here)
    rng = np.random.default_rng(0)
    models, n_m, n_n = 8, 650, 160
    for offset in (1.0, 3.0):
        for signal, lo, hi in ((0.0, 0.45, 0.55), (1.0, 0.7, 1.0)):
            mu, spread = rng.normal(0, 2, n_m + n_n), rng.uniform(0.5, 2, n_m + n_n)
            ref = mu + spread * rng.normal(size=(models, n_m + n_n))
            trained_on = np.zeros((models, n_m + n_n), dtype=bool)
            for j in range(n_n):
                trained_on[rng.choice(models, models // 2, replace=False), n_m + j] = True
            ref = np.where(trained_on, ref + 2, ref)
            target = mu + offset + spread * rng.normal(size=n_m + n_n)
            target[:n_m] += signal * spread[:n_m]
            z = lira_offline(target, ref, trained_on)
            assert lo < auc(z[:n_m], z[n_m:]) < hi


def test_offline_lira_refuses_a_patient_that_every_reference_model_trained_on():
    with pytest.raises(ValueError, match="every reference model"):
        lira_offline(np.zeros(1), np.zeros((2, 1)), np.ones((2, 1), dtype=bool))


# --- the bound ----------------------------------------------------------------------------------------------------
def test_the_dp_bound_is_e_to_the_eps_times_fpr_plus_delta_and_its_mirror_image():
    eps = math.log(2)
    assert dp_tpr_bound(0.1, eps, 0.0) == pytest.approx(0.2)  # e^eps * FPR
    assert dp_tpr_bound(0.6, eps, 0.0) == pytest.approx(0.8)  # 1 - (1 - FPR) / e^eps: the swapped inequality
    assert dp_tpr_bound(0.1, eps, 0.01) == pytest.approx(0.21)
    assert dp_tpr_bound(np.array([0.0, 0.3, 1.0]), 0.0, 0.0) == pytest.approx([0.0, 0.3, 1.0])  # eps 0: chance


def test_the_dp_auc_bound_is_the_area_under_the_bound():
    grid = np.linspace(0, 1, 200_001)
    for eps, delta in ((0.0, 0.0), (0.5, DELTA), (2.0, 0.01), (8.0, DELTA)):
        assert dp_auc_bound(eps, delta) == pytest.approx(np.trapezoid(dp_tpr_bound(grid, eps, delta), grid), abs=1e-6)
    assert dp_auc_bound(0.0, 0.0) == pytest.approx(0.5)


def test_clopper_pearson_bounds_in_their_closed_forms():
    # all n successes: the lower bound is alpha^(1/n); none: the upper bound is 1 - alpha^(1/n)
    assert clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10))
    assert clopper_pearson_upper(0, 10, 0.05) == pytest.approx(1 - 0.05 ** (1 / 10))
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0 and clopper_pearson_upper(10, 10, 0.05) == 1.0


def test_wilson_upper_bound_in_its_closed_forms():
    # none right: z^2 / (n + z^2); all right: 1 (fit-normalizer's case-mix check holds a site's accuracy to it)
    assert wilson_upper(0, 10) == pytest.approx(1.96 ** 2 / (10 + 1.96 ** 2))
    assert wilson_upper(10, 10) == pytest.approx(1.0)
    assert wilson_upper(35, 200) == pytest.approx(0.2336, abs=1e-4)  # a one-type cohort's 17.5% (docs/results.md)


def test_a_perfect_attack_on_many_patients_beats_a_small_epsilon():
    test = bound_test(roc(np.ones(400), np.zeros(400)), LABELLED_EPSILON, DELTA)
    assert test.flagged and test.epsilon_lower > 3


def test_a_lucky_small_sample_is_no_false_alarm():
    # five members all above five non-members happens by chance once in 252 draws: proves nothing about eps 0.5
    test = bound_test(roc(np.ones(5), np.zeros(5)), LABELLED_EPSILON, DELTA)
    assert not test.flagged
    assert strongest_provable_epsilon(5, 5, DELTA) < LABELLED_EPSILON


def test_an_attack_on_an_exactly_eps_dp_mechanism_proves_close_to_eps_and_never_more():
    # randomised response is exactly eps-DP: a member answers 1 with probability e^eps / (1 + e^eps)
    eps, rng = 1.0, np.random.default_rng(0)
    p = math.exp(eps) / (1 + math.exp(eps))
    proven = []
    for _ in range(20):
        members, nonmembers = rng.random(5000) < p, rng.random(5000) < 1 - p
        test = bound_test(roc(members.astype(float), nonmembers.astype(float)), eps, 0.0)
        assert not test.flagged
        proven.append(test.epsilon_lower)
    assert 0.7 * eps < np.mean(proven) <= eps


def test_attack_reports_auc_tpr_and_the_bound_at_the_reported_fprs():
    r = attack("loss", [3.0, 2.0, 1.0], [0.0, -1.0], LABELLED_EPSILON, DELTA).to_dict()
    assert r["auc"] == 1.0 and r["tpr_at_fpr"] == {"0.001": 1.0, "0.01": 1.0}
    assert r["bound_at_fpr"]["0.01"] == pytest.approx(math.exp(0.5) * 0.01 + DELTA)
    assert r["auc_bound"] == pytest.approx(dp_auc_bound(LABELLED_EPSILON, DELTA))
    assert attack("loss", [1.0], [0.0], None, None).to_dict()["bound_test"] is None  # no DP claimed: no test


# --- the command on a site -----------------------------------------------------------------------------------------
N_PATIENTS = 300  # one site: ~240 training patients (members), ~60 held out (non-members)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """One synthetic hospital with few patients and many features (500 omics + 4 clinical) and a weak class
    signal: a model that fits its training patients without noise memorises them."""
    from simulations.synthetic import SyntheticConfig, generate_federation

    root = tmp_path_factory.mktemp("fed")
    generate_federation(root, SyntheticConfig(sites=1, classes=4, patients_per_site=N_PATIENTS, omics_widths=[500],
                                              tabular_columns=4, signal=1.0, seed=0))
    return root


def _prepared(federation, home):
    """The site's state as training leaves it: its split, normalisation and ledger (client/site.py)."""
    from client.site import SitePaths, prepare_site
    from privacy.site_config import SiteConfig
    from shared_models.schema import FeatureSchema

    schema = FeatureSchema.load(federation / "schema.json")
    paths = SitePaths(federation / "site_00", home / "state", home / "models")
    site = prepare_site(schema, paths, budget_epsilon=8.0, delta=DELTA, val_fraction=0.2, min_count=5, seed=0, dp=True)
    SiteConfig(site_name="site_00", data_path=str(paths.site_dir), state_dir=str(paths.state_dir),
               model_dir=str(paths.model_dir), min_count=5).write(home / "site.json")
    return schema, site


def _install(site, schema, model, info: dict) -> str:
    from client.model_store import ModelStore
    from shared_models.weights import state_arrays

    return ModelStore(site.paths.model_dir).install(schema, model.config, state_arrays(model),
                                                    {"run": "r1", "round": 1, "delta": DELTA, **info})


def _dp_label(epsilon: float = LABELLED_EPSILON) -> dict:
    return {"dp": True, "site_epsilon": {"site_00": epsilon}}


def _audit(home, *args):
    from typer.testing import CliRunner

    from oncofed.cli import app

    r = CliRunner().invoke(app, ["site", "privacy-audit", str(home), "--out", str(home / "audit"), *args])
    report = json.loads((home / "audit" / "privacy-audit.json").read_text()) if r.exit_code in (0, 1) else None
    return r, report


@pytest.fixture(scope="module")
def planted(federation, tmp_path_factory):
    """The planted bug: trained without any noise until it fits its training patients, then labelled
    (0.5, 1e-5)-DP (v0001); the same weights honestly labelled non-DP are v0002."""
    import torch

    from shared_models.training import TrainConfig, fit
    from shared_models.model import MultiModalTransformer
    from shared_models.run_config import ModelConfig

    home = tmp_path_factory.mktemp("planted")
    schema, site = _prepared(federation, home)
    torch.manual_seed(0)
    model = MultiModalTransformer(schema, ModelConfig(d_model=32))
    fit(model, *site.train.tensors(), TrainConfig(epochs=20, batch_size=32, lr=3e-3, weight_decay=0.0, patience=None))
    _install(site, schema, model, _dp_label())
    _install(site, schema, model, {"dp": False})
    return home, site


@pytest.mark.slow
def test_a_model_trained_without_noise_but_labelled_dp_is_flagged(planted):
    home, _ = planted
    r, report = _audit(home, "--version", "v0001")
    assert r.exit_code == 1, r.output
    assert report["flagged"] and "loss" in report["flagged_by"]
    assert "FLAGGED" in r.output and "above the model's epsilon 0.5" in r.output
    loss = next(a for a in report["attacks"] if a["attack"] == "loss")
    assert loss["bound_test"]["epsilon_lower"] > LABELLED_EPSILON
    assert loss["auc"] > report["claim"]["auc_bound"]
    low, high = loss["auc_interval"]
    assert 0.5 < low < loss["auc"] <= high <= 1  # the leak is beyond chance, and the report says how far
    assert f"{low:.3f}-{high:.3f}" in r.output and "95% interval" in r.output
    assert (home / "audit" / "privacy-audit-roc.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_audit_attacks_exactly_the_training_part_the_site_trains_on(planted):
    from client.site import normalisation_half

    home, site = planted
    r, report = _audit(home, "--version", "v0001")
    assert report["split"]["members"] == len(site.train.y) and 220 <= len(site.train.y) <= 260
    # a DP model's normalisation was fitted on half the held-out part: the other half are the non-members
    unseen = [site.val.ids[i] for i in range(len(site.val.y)) if not normalisation_half([site.val.ids[i]], 0)[0]]
    assert report["split"]["held_out"] == len(site.val.y) == N_PATIENTS - len(site.train.y)
    assert report["split"]["nonmembers"] == len(unseen) and 0 < len(unseen) < len(site.val.y)
    assert report["split"]["dataset_fingerprint"] == site.dataset_fingerprint
    assert (f"{len(site.train.y)} members (training part) vs {len(unseen)} non-members (held-out part: the "
            f"{len(unseen)} of {len(site.val.y)} the normalisation was not fitted on") in r.output
    assert "a small site gives a weak audit" in r.output


@pytest.mark.slow
def test_the_same_model_labelled_non_dp_is_reported_but_not_flagged(planted):
    home, _ = planted
    r, report = _audit(home)  # the active version: v0002, dp = false
    assert r.exit_code == 0, r.output
    assert not report["flagged"] and report["claim"]["dp"] is False
    assert report["attacks"][0]["auc"] > 0.8  # the leak is there; no DP was promised
    assert "no DP claimed" in r.output


@pytest.mark.slow
def test_offline_lira_with_reference_models_also_flags_the_planted_model(planted):
    home, _ = planted
    r, report = _audit(home, "--version", "v0001", "--lira-models", "4", "--lira-epochs", "15")
    assert r.exit_code == 1, r.output
    lira = next(a for a in report["attacks"] if a["attack"] == "offline LiRA")
    assert lira["auc"] > 0.75 and lira["bound_test"]["flagged"]
    assert report["lira_models"] == 4 and "offline LiRA" in r.output


@pytest.mark.slow
def test_a_genuinely_dp_trained_model_at_the_same_epsilon_is_not_flagged(federation, tmp_path):
    import torch

    from client.local_round import train_round
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.weights import load_arrays, state_arrays

    schema, site = _prepared(federation, tmp_path)
    cfg = load_run_config({"schema": str(federation / "schema.json"), "d-model": 32, "epsilon": LABELLED_EPSILON,
                           "delta": DELTA, "num-rounds": 3, "local-epochs": 2, "batch-size": 64})
    torch.manual_seed(0)
    model = MultiModalTransformer(schema, cfg.model)
    arrays = state_arrays(model)
    for rnd in (1, 2, 3):  # the site's own DP-SGD rounds (a federation of one), recorded in its ledger
        arrays = [a + d for a, d in zip(arrays, train_round(site, arrays, cfg, "r1", rnd).delta)]
    load_arrays(model, arrays)
    spent = site.ledger.spent(site.dataset_fingerprint)
    assert spent <= LABELLED_EPSILON + 1e-6
    _install(site, schema, model, _dp_label(spent))
    r, report = _audit(tmp_path)
    assert r.exit_code == 0, r.output
    assert not report["flagged"] and "within the bound" in r.output


def test_an_untrained_model_labelled_dp_is_not_flagged(federation, tmp_path):
    import torch

    from shared_models.model import MultiModalTransformer
    from shared_models.run_config import ModelConfig

    schema, site = _prepared(federation, tmp_path)
    torch.manual_seed(0)
    _install(site, schema, MultiModalTransformer(schema, ModelConfig(d_model=32)), _dp_label())
    r, report = _audit(tmp_path)
    assert r.exit_code == 0, r.output
    assert not report["flagged"]
    assert all(a["bound_test"]["epsilon_lower"] < LABELLED_EPSILON for a in report["attacks"])


def test_the_epsilon_comes_from_the_site_ledger_when_the_package_has_none_for_the_site(federation, tmp_path):
    """The accountant over the package's run's committed rounds alone: not the site's total after them (which holds
    an earlier run's spend), nor a pending round."""
    from client.privacy_audit import claimed_privacy
    from privacy import PADDING_TAIL
    from privacy.accounting import Overflow, epsilon

    def entry(run, status="committed", sigma=1.2):
        return {"dataset": "fp", "run_id": run, "status": status, "noise_multiplier": sigma, "sample_rate": 0.3,
                "steps": 6, "padding_tail": PADDING_TAIL, "epsilon_after": 99.0}

    ledger = {"delta": DELTA, "entries": [entry("other", sigma=0.8), entry("r1"), entry("r1"), entry("r1", "pending")]}
    claim = claimed_privacy({"dp": True, "run": "r1", "delta": DELTA, "site_epsilon": {}}, "site_00", ledger, "fp",
                            tmp_path / "package.json", tmp_path / "ledger.json")
    assert claim.epsilon == epsilon([(1.2, 0.3, 12), Overflow(12, PADDING_TAIL)], DELTA) and claim.delta == DELTA
    assert "ledger.json" in claim.source


def test_the_claim_is_the_runs_own_epsilon_not_the_sites_total_over_every_run(tmp_path):
    """A site's second run: its package carries the site's total (15.9, two runs) and the run's own (8.2); the model
    depends on the second run's rounds alone, so the audit tests the tighter claim, which an attack can beat."""
    from client.privacy_audit import claimed_privacy

    package = {"dp": True, "run": "r2", "delta": DELTA, "site_epsilon": {"site_00": 15.9},
               "site_run_epsilon": {"site_00": 8.2}}
    claim = claimed_privacy(package, "site_00", {"entries": []}, "fp", tmp_path / "package.json", tmp_path / "l.json")
    assert claim.epsilon == 8.2 and "site_run_epsilon" in claim.source
    older = {k: v for k, v in package.items() if k != "site_run_epsilon"}  # a package from before the field
    claim = claimed_privacy(older, "site_00", {"entries": []}, "fp", tmp_path / "package.json", tmp_path / "l.json")
    assert claim.epsilon == 15.9 and "total over every run" in claim.source


# --- what the command refuses, and says -----------------------------------------------------------------------------
def test_no_installed_model_is_named_with_the_fix(federation, tmp_path):
    _prepared(federation, tmp_path)
    r, _ = _audit(tmp_path)
    assert r.exit_code == 2
    assert str(tmp_path / "models") in r.output and "no model installed" in r.output and "oncofed deliver" in r.output


def test_a_run_without_a_held_out_part_cannot_be_audited(federation, tmp_path):
    import torch

    from shared_models.model import MultiModalTransformer
    from shared_models.run_config import ModelConfig

    schema, site = _prepared(federation, tmp_path)
    torch.manual_seed(0)
    _install(site, schema, MultiModalTransformer(schema, ModelConfig(d_model=32)), _dp_label())
    r, _ = _audit(tmp_path, "--val-fraction", "0")
    assert r.exit_code == 2 and "no held-out part" in r.output and "--val-fraction" in r.output
    r, _ = _audit(tmp_path, "--val-fraction", "0.01")  # 3 non-members: the held-out half the normalisation never saw
    assert r.exit_code == 2
    assert ("non-members (the held-out patients the normalisation was not fitted on); an audit needs at least 10"
            in r.output)


def test_a_split_the_site_never_trained_on_is_refused(federation, tmp_path):
    import torch

    from shared_models.model import MultiModalTransformer
    from shared_models.run_config import ModelConfig

    schema, site = _prepared(federation, tmp_path)
    torch.manual_seed(0)
    _install(site, schema, MultiModalTransformer(schema, ModelConfig(d_model=32)), _dp_label())
    r, _ = _audit(tmp_path, "--seed", "7")  # another held-out part than the run's: its "members" did not train
    assert r.exit_code == 2
    assert "privacy-ledger.json" in r.output and "not a set of patients this site trained on" in r.output
    assert "--seed" in r.output


# --- the research report ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_research_report_tables_the_audit_of_dp_and_non_dp_cells(planted, federation, tmp_path):
    from simulations.privacy_audit import AUDIT_FILE, audit_cell
    from simulations.report import build_report
    from shared_models.weights import load_weights
    from tests.test_report import make_results

    results = make_results(tmp_path / "results", datasets=(("mini3", 3, False),), strategies=("fedavg",),
                           privacies=("off", "8"))
    manifest = json.loads((federation / "manifest.json").read_text())
    planted_home, _ = planted
    for cell, label in (("mini3-fedavg-8-s0", _dp_label()), ("mini3-fedavg-off-s0", {"dp": False})):
        work = tmp_path / cell  # a federated cell as `oncofed experiment` leaves it: site states under state/
        schema, site = _prepared(federation, work / "state" / "site_00")
        _install(site, schema, load_weights(planted_home / "models" / "v0001" / "weights.pt", schema), label)
        audit_cell(work, federation, manifest, {"schema": str(federation / "schema.json"),
                                                "site-state-root": str(work / "state")})
        (results / "cells" / cell / AUDIT_FILE).write_bytes((work / AUDIT_FILE).read_bytes())
    md = build_report(results).read_text()
    assert "## Empirical privacy audit" in md
    dp_row = next(line for line in md.splitlines() if line.startswith("| `mini3-fedavg-8-s0`"))
    off_row = next(line for line in md.splitlines() if line.startswith("| `mini3-fedavg-off-s0`"))
    assert "**beats the bound** (1 site)" in dp_row and "| 0.50 |" in dp_row
    assert re.search(r"\| 0\.\d{3} \(0\.\d{3}–[01]\.\d{3}\) \|", dp_row)  # the worst site with its interval
    assert "`mini3-fedavg-8-s0` 1 of 1" in md  # the planted leak lies beyond chance
    assert "| no DP |" in off_row and "beats" not in off_row
    assert "even a perfect attack could prove at most" in md
    assert re.search(r"smallest audited site had \d+ non-members", md)


def test_a_results_directory_without_audits_has_no_audit_section(tmp_path):
    from simulations.privacy_audit import audit_section
    from simulations.report import load_results
    from tests.test_report import make_results

    res = load_results(make_results(tmp_path, datasets=(("mini3", 3, False),), strategies=("fedavg",)))
    assert audit_section(res) == []


def test_an_audit_refuses_a_normalisation_other_than_the_one_the_site_trained_with(planted, tmp_path):
    """A site whose saved normalisation is neither preparation's (a run before the held-out half, or refitted since)
    cannot say which patients it was fitted on: the audit refuses, naming the file."""
    import shutil

    home, site = planted
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    cfg = json.loads((copy / "site.json").read_text())
    cfg.update({"state-dir": str(copy / "state"), "model-dir": str(copy / "models")})
    (copy / "site.json").write_text(json.dumps(cfg))
    site.normalizer.__class__(site.schema, site.normalizer.mean + 0.5, site.normalizer.scale).save(
        copy / "state" / "normalizer.json")
    r, _ = _audit(copy, "--version", "v0001")
    assert r.exit_code == 2 and str(copy / "state" / "normalizer.json") in r.output
    assert "not the one this split fits" in r.output


def test_the_privacy_audit_commands_help_states_the_defaults_the_audit_takes():
    """The CLI leaves these unset (the audit's own defaults apply); its help says them, kept equal here."""
    import inspect

    import typer

    from client.privacy_audit import audit
    from oncofed.cli import app

    command = typer.main.get_command(app).commands["site"].commands["privacy-audit"]
    helps = {p.name: p.help for p in command.params}
    defaults = inspect.signature(audit).parameters
    assert f"(default: {defaults['lira_epochs'].default})" in helps["lira_epochs"]
    assert f"default: {defaults['confidence'].default:g})" in helps["confidence"]


def test_a_cell_whose_sites_could_not_be_audited_keeps_the_tables_columns_and_says_why(tmp_path):
    from simulations.privacy_audit import AUDIT_FILE, audit_section
    from simulations.report import load_results
    from tests.test_report import make_results

    root = make_results(tmp_path, datasets=(("mini3", 3, False),), strategies=("fedavg",))
    (root / "cells" / "mini3-fedavg-8-s0" / AUDIT_FILE).write_text(json.dumps({
        "format": "oncofed-cell-privacy-audit/1",
        "sites": [{"site": "C0", "error": "6 non-members; an audit needs at least 10"}]}))
    md = audit_section(load_results(root))
    lines = "\n".join(md).splitlines()
    header = next(line for line in lines if line.startswith("| cell |"))
    row = next(line for line in lines if line.startswith("| `mini3-fedavg-8-s0`"))
    assert row.count(" | ") == header.count(" | ")
    assert row.rstrip(" |").endswith(f"see cells/mini3-fedavg-8-s0/{AUDIT_FILE})")


def test_a_cell_with_sites_too_small_to_audit_says_how_many_of_its_sites_were_audited(tmp_path):
    """The table said "sites 1" when 2 of 3 sites were too small to audit, as if the cell had one site."""
    from simulations.privacy_audit import AUDIT_FILE, audit_section
    from simulations.report import load_results
    from tests.test_report import make_results

    root = make_results(tmp_path, datasets=(("mini3", 3, False),), strategies=("fedavg",))
    audited = {"site": "C2", "flagged": False, "claim": {"dp": False}, "split": {"members": 40, "nonmembers": 12},
               "attacks": [{"attack": "loss", "auc": 0.55, "auc_interval": [0.4, 0.7], "tpr_at_fpr": {"0.01": 0.0}}]}
    (root / "cells" / "mini3-fedavg-8-s0" / AUDIT_FILE).write_text(json.dumps({
        "format": "oncofed-cell-privacy-audit/1",
        "sites": [{"site": "C0", "error": "C0: 6 non-members; an audit needs at least 10 of each", "too_small": True},
                  {"site": "C1", "error": "C1: 9 non-members; an audit needs at least 10 of each"}, audited]}))
    row = next(line for line in audit_section(load_results(root)) if line.startswith("| cell |")).splitlines()
    row = next(line for line in row if line.startswith("| `mini3-fedavg-8-s0`"))
    assert row.split(" | ")[2] == "1 of 3 (2 too small)", row
