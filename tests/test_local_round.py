"""A site's federated round: DP-SGD with exact accounting, the budget is authoritative, the update is a delta."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant

from client.local_round import padding_tail, state_arrays, train_round
from client.site import evaluate_global
from client.site import SiteDataError, SitePaths, prepare_site
from privacy.accounting import BudgetError
from privacy.ledger import read_ledger
from privacy import PADDING_TAIL
from privacy.sampling import PaddedPoissonLoader, padded_batch
from privacy.run_config import load_run_config
from shared_models.model import MultiModalTransformer
from shared_models.run_config import RunConfigError
from tests.factories import dropout_seeds
from tests.sitefixtures import site_schema, site_tables, write_site


def _setup(tmp_path, budget=8.0, rounds=3, **cfg):
    schema = site_schema()
    schema_path = schema.save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    run = load_run_config({"schema": str(schema_path), "num-rounds": rounds, "batch-size": 16,
                           "epsilon": budget, "d-model": 64, **cfg})
    site = prepare_site(schema, SitePaths(tmp_path / "site", tmp_path / "state", tmp_path / "models"),
                        budget_epsilon=budget, delta=1e-5, val_fraction=0.2, min_count=5, seed=0, dp=True)
    torch.manual_seed(0)
    weights = state_arrays(MultiModalTransformer(schema, run.model))
    return schema, run, site, weights


def _closed_form(history, delta=1e-5):
    acc = PRVAccountant()
    acc.history = history
    return acc.get_epsilon(delta=delta)


def test_reported_epsilon_is_the_closed_form_of_the_executed_steps(tmp_path):
    _, run, site, w = _setup(tmp_path)
    r1 = train_round(site, w, run, "run-A", 1)
    r2 = train_round(site, w, run, "run-A", 2)
    sigma, q = r1.metrics["noise_multiplier"], r1.metrics["sample_rate"]
    steps = r1.metrics["local_steps"] + r2.metrics["local_steps"]
    assert r2.metrics["epsilon"] == pytest.approx(_closed_form([(sigma, q, steps)]), rel=0.01)
    # nothing computed from the DP-protected rows without noise leaves the site
    assert "train_loss" not in r1.metrics and "train_loss" not in r2.metrics


@pytest.mark.parametrize("clipping", ["ghost", "opacus"])
@pytest.mark.parametrize("pad", [True, False, 500])
def test_every_dp_path_runs_the_planned_steps_and_accounts_them(tmp_path, clipping, pad):
    """Both clippers, with padded batches (the default; 500: to a public bound of 500 patients, above the site's)
    and Opacus' own: the round runs its planned steps, the update is finite, and the reported epsilon is the
    closed form of them."""
    _, run, site, w = _setup(tmp_path, **{"dp-clipping": clipping, "dp-pad-batches": bool(pad), "sample-rate": 0.25,
                                          "dp-pad-to": 0 if isinstance(pad, bool) else pad})
    r = train_round(site, w, run, "run-A", 1)
    q = 0.25
    assert r.metrics["sample_rate"] == pytest.approx(q)
    assert r.metrics["local_steps"] == round(run.training.local_epochs / q)
    assert all(np.isfinite(d).all() for d in r.delta)
    assert r.metrics["epsilon"] == pytest.approx(
        _closed_form([(r.metrics["noise_multiplier"], q, r.metrics["local_steps"])]), rel=0.01)
    # the ledger prices what the padding leaves to chance: a padded step's overflow at the tail its rows were set for
    (entry,) = read_ledger(site.ledger.path)["entries"]
    assert entry["padding_tail"] == (PADDING_TAIL if pad else 0.0)
    if pad is True:  # a loader at the recorded tail computes the rows that tail sets (train_round passes padding_tail(cfg))
        assert PaddedPoissonLoader(torch.utils.data.TensorDataset(torch.zeros(len(site.train.y))), 4, None, q,
                                   tail=padding_tail(run)).rows == padded_batch(len(site.train.y), q,
                                                                                tail=entry["padding_tail"])


def test_the_whole_planned_schedule_fits_the_budget_and_one_more_round_is_refused(tmp_path):
    _, run, site, w = _setup(tmp_path, budget=3.0, rounds=2)
    last = None
    for rnd in (1, 2):
        last = train_round(site, w, run, "run-A", rnd)
    assert 2.8 <= last.metrics["epsilon"] <= 3.0  # noise chosen once, for both rounds
    ledger_before = (tmp_path / "state" / "privacy-ledger.json").read_text()
    with pytest.raises(BudgetError, match=r"round 3 refused: run run-A was planned with 2 rounds.*Nothing was"):
        train_round(site, w, run, "run-A", 3)
    assert (tmp_path / "state" / "privacy-ledger.json").read_text() == ledger_before


def test_a_run_resumed_with_another_plan_is_refused_by_the_site(tmp_path):
    """The issue's fault: a 2-round epsilon-2 run, resumed by a server that lost its --set values (10 rounds,
    epsilon 8), would have kept the saved noise and spent beyond 2. The site refuses the changed run."""
    schema, run, site, w = _setup(tmp_path, budget=8.0, rounds=2, epsilon=2.0)
    first = train_round(site, w, run, "run-A", 1).metrics["epsilon"]
    changed = load_run_config({**run.flat(), "num-rounds": 10, "epsilon": 8.0})
    ledger_before = (tmp_path / "state" / "privacy-ledger.json").read_text()
    with pytest.raises(BudgetError, match=r"changes epsilon: 2.0 -> 8.0; num-rounds: 2 -> 10.*nothing was trained"):
        train_round(site, w, changed, "run-A", 2)
    assert (tmp_path / "state" / "privacy-ledger.json").read_text() == ledger_before
    last = train_round(site, w, run, "run-A", 2).metrics["epsilon"]  # the run as agreed goes on
    assert first < last <= 2.0


def test_dp_sgd_with_the_sgd_optimizer_accounts_like_adamw(tmp_path):
    # the optimizer changes how a noisy clipped gradient is applied, never the noise or the accounting
    _, run, site, w = _setup(tmp_path, **{"local-optimizer": "sgd", "lr": 1.0, "max-grad-norm": 1.0})
    r1 = train_round(site, w, run, "run-A", 1)
    sigma, q = r1.metrics["noise_multiplier"], r1.metrics["sample_rate"]
    assert r1.metrics["epsilon"] == pytest.approx(_closed_form([(sigma, q, r1.metrics["local_steps"])]), rel=0.01)
    assert max(float(np.abs(d).max()) for d in r1.delta) > 0


def test_a_dp_sgd_rounds_update_scales_with_lr_times_the_clipping_bound(tmp_path):
    """Why the run config takes lr and max-grad-norm together under DP-SGD: the recipe's bound clips every patient's
    gradient, so a round's update follows lr x max-grad-norm (1 in the recipe), not either alone."""
    def update_norm(name, **cfg):
        _, run, site, w = _setup(tmp_path / name, **cfg)
        delta = train_round(site, w, run, "run-A", 1).delta
        return float(np.sqrt(sum((d.astype(np.float64) ** 2).sum() for d in delta)))

    recipe = update_norm("recipe")  # lr 100, max-grad-norm 0.01
    assert update_norm("tenth", lr=10.0, **{"max-grad-norm": 0.1}) == pytest.approx(recipe, rel=0.2)
    assert update_norm("hundredfold", lr=100.0, **{"max-grad-norm": 1.0}) > 30 * recipe  # what C 1 alone trained


def test_a_second_run_on_the_same_data_continues_the_spend(tmp_path):
    schema, run, site, w = _setup(tmp_path, budget=20.0, rounds=2, epsilon=8.0)  # room for a second run of 8
    first = train_round(site, w, run, "run-A", 1).metrics["epsilon"]
    # a new process prepares the same site again: the ledger carries the spend
    again = prepare_site(schema, site.paths, budget_epsilon=20.0, delta=1e-5, val_fraction=0.2, min_count=5, seed=0,
                         dp=True)
    assert again.dataset_fingerprint == site.dataset_fingerprint
    assert again.ledger.spent(again.dataset_fingerprint) == pytest.approx(first, rel=1e-9)
    second = train_round(again, w, run, "run-B", 1).metrics
    assert second["noise_multiplier"] > 0
    assert second["epsilon"] > first
    ledger = json.loads((tmp_path / "state" / "privacy-ledger.json").read_text())
    assert {e["run_id"] for e in ledger["entries"]} == {"run-A", "run-B"}


def test_every_runs_model_alone_costs_at_most_the_runs_epsilon(tmp_path):
    """Noise chosen only so that the site's total rises by the run's epsilon falls with every run (composition is
    subadditive): a second run of epsilon 8 after one of 7.97 trained with noise multiplier 1.17, its model epsilon
    13.0 on its own. Each run's noise now also holds its model alone to the run's epsilon, which each round reports
    (run_epsilon) beside the site's total; the total then rises by less than the run's epsilon."""
    from privacy.accounting import epsilon

    schema, run, site, w = _setup(tmp_path, budget=30.0, rounds=2, epsilon=8.0)
    first = train_round(site, w, run, "run-A", 1).metrics
    first = train_round(site, w, run, "run-A", 2).metrics
    assert first["run_epsilon"] == pytest.approx(first["epsilon"], rel=1e-9)  # the first run: both the same
    second = train_round(site, w, run, "run-B", 1).metrics
    second = train_round(site, w, run, "run-B", 2).metrics
    assert second["noise_multiplier"] == pytest.approx(first["noise_multiplier"], rel=1e-9)  # the same plan as A's
    alone = epsilon([(second["noise_multiplier"], second["sample_rate"], 2 * second["local_steps"])], 1e-5)
    assert second["run_epsilon"] == pytest.approx(alone, rel=1e-6) and second["run_epsilon"] <= 8.0 + 0.05
    assert second["epsilon"] - first["epsilon"] < second["run_epsilon"]  # the total rose by less
    assert second["epsilon"] == pytest.approx(site.ledger.spent(site.dataset_fingerprint), rel=1e-9)


def test_a_site_with_less_than_half_the_runs_epsilon_left_does_not_join_it(tmp_path):
    """A site with 0.08 of its budget 8 left trained a new run with noise multiplier 3.2 (an operator's trial: the
    consortium's model fell to macro-F1 0.12 and was installed over the better one); now it refuses, before any spend."""
    from client.local_round import MIN_RUN_SHARE

    schema, run, site, w = _setup(tmp_path, budget=8.0, rounds=1)
    spent = train_round(site, w, run, "run-A", 1).metrics["epsilon"]
    assert 8.0 - spent < MIN_RUN_SHARE * run.privacy.epsilon
    with pytest.raises(BudgetError, match="asks for epsilon 8 and this site has .* left of its budget 8"):
        train_round(site, w, run, "run-B", 1)
    assert site.ledger.spent(site.dataset_fingerprint) == pytest.approx(spent)  # nothing spent
    assert site.ledger.run_plan(site.dataset_fingerprint, "run-B") is None  # nor the run recorded


def test_another_runs_round_beginning_meanwhile_does_not_withhold_this_one(tmp_path, monkeypatch):
    """Two runs train at one site at once: run B's round begins while run A's trains. A's check of the ledger against
    Opacus' accountant compares the two over the history A began with; against the live total (B's round included)
    it withheld A's update after committing its spend. The epsilon A reports is the live total."""
    import client.local_round as lr

    schema, run, site, w = _setup(tmp_path, budget=12.0, rounds=3, **{"epsilon": 4.0, "sample-rate": 0.5})
    sigma_b, q_b, steps_b = lr.run_noise(site, "run-B", run)
    training = lr.train_epochs

    def while_run_b_begins(*args, **kwargs):
        out = training(*args, **kwargs)
        site.ledger.begin_round(site.dataset_fingerprint, "run-B", 1, sigma_b, q_b, steps_b, padding_tail=0.0)  # another process
        return out

    monkeypatch.setattr(lr, "train_epochs", while_run_b_begins)
    sent = train_round(site, w, run, "run-A", 1).metrics
    assert sent["epsilon"] == pytest.approx(site.ledger.spent(site.dataset_fingerprint), rel=1e-9)  # B's included
    assert sent["epsilon"] > _closed_form([(sent["noise_multiplier"], sent["sample_rate"], sent["local_steps"])])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_update_is_a_delta_from_the_global_weights(tmp_path, optimizer):
    schema, run, site, w = _setup(tmp_path, dp=False, **{"local-optimizer": optimizer, "lr": 0.2 if optimizer == "sgd"
                                                        else 0.002})
    res = train_round(site, w, run, "run-A", 1)
    assert all(np.isfinite(d).all() for d in res.delta)
    assert [d.shape for d in res.delta] == [a.shape for a in w]
    assert max(float(np.abs(d).max()) for d in res.delta) > 0
    assert "epsilon" not in res.metrics  # DP off: nothing is claimed
    assert not (tmp_path / "state" / "privacy-ledger.json").exists() or \
        json.loads((tmp_path / "state" / "privacy-ledger.json").read_text())["entries"] == []


def test_a_fedprox_round_whose_lr_times_mu_exceeds_1_trains_toward_the_global_weights(tmp_path):
    # the proximal step was p - lr mu (p - g): at lr x mu = 1 it set the weights back to the global ones and beyond
    # it diverged (the DP recipe's lr 100 with the default mu 0.01 is 1); its proximal operator holds at any lr x mu
    schema, run, site, w = _setup(tmp_path, dp=False, lr=0.2)
    plain = train_round(site, w, run, "run-A", 1)
    prox = train_round(site, w, load_run_config({**run.flat(), "strategy": "fedprox", "proximal-mu": 50.0}),
                       "run-B", 1)  # lr x mu = 10 at the peak
    size = lambda res: float(np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in res.delta)))
    assert all(np.isfinite(d).all() for d in prox.delta)
    assert 0 < size(prox) < size(plain)


def test_metrics_of_a_held_out_part_below_the_minimum_count_are_not_sent(tmp_path):
    _, run, site, w = _setup(tmp_path)
    n, metrics = evaluate_global(site, w, run.model_copy(update={"site": run.site.model_copy(update={"min_count": 100})}))
    assert (n, metrics) == (0, {})


def test_a_site_with_invalid_data_refuses_with_every_problem(tmp_path):
    schema = site_schema()
    tables = site_tables()
    tables["labels"].loc[0, "subtype"] = "Z"
    write_site(tmp_path / "site", tables)
    with pytest.raises(SiteDataError, match=r"labels\.csv.*'Z'"):
        prepare_site(schema, SitePaths(tmp_path / "site", tmp_path / "state", tmp_path / "m"), budget_epsilon=8,
                     delta=1e-5, val_fraction=0.2, min_count=5, seed=0, dp=True)


def test_under_dp_the_loss_does_not_depend_on_the_sites_label_counts():
    # class weights from the site's counts would tie every sample's gradient to other patients' labels
    assert load_run_config({"schema": "s.json", "dp": True}).train_config().class_weighting is False
    assert load_run_config({"schema": "s.json", "dp": False}).train_config().class_weighting is True
    # nor on the set of classes the site holds: a softmax over the site's own classes is refused with DP
    site_softmax = {"schema": "s.json", "local-softmax": "site"}
    assert load_run_config({**site_softmax, "dp": False}).train_config().softmax_over == "present"
    with pytest.raises(RunConfigError, match="local-softmax 'site'.*dp false"):
        load_run_config({**site_softmax, "dp": True})


def test_under_dp_dropout_masks_come_from_a_secret_seed_not_the_runs(tmp_path, monkeypatch):
    # a record's mask depends on its batch position, i.e. on which other records were sampled: from the run's
    # public seed the server could compute them, and one patient's removal would move the others' gradients
    _, run, site, w = _setup(tmp_path, dropout=0.1)
    public = {run.training.seed * 1_000_003 + 0 * 1009 + rnd for rnd in (1, 2)}
    seen = dropout_seeds(monkeypatch)
    train_round(site, w, run, "run-A", 1)
    train_round(site, w, run, "run-A", 2)
    assert seen and not public & set(seen) and len(set(seen)) == 2  # one secret seed per round
    # without DP the run's seed stays: non-DP runs repeat
    _, run_nodp, site2, w2 = _setup(tmp_path / "nodp", dp=False, dropout=0.1)
    seen.clear()
    train_round(site2, w2, run_nodp, "run-B", 1)
    assert set(seen) == {run_nodp.training.seed * 1_000_003 + 1}


def test_a_later_run_with_a_larger_delta_cannot_spend_the_budget_again(tmp_path):
    # The ledger accounts at the smallest delta it was opened with: at delta 1e-4 (the largest a run may ask) the first run's steps would cost
    # a fraction of their epsilon at 1e-5, and a second run could spend the budget again.
    schema, run, site, w = _setup(tmp_path, budget=3.0, rounds=1)
    assert train_round(site, w, run, "run-A", 1).metrics["epsilon"] == pytest.approx(3.0, abs=0.05)
    looser = prepare_site(schema, SitePaths(tmp_path / "site", tmp_path / "state", tmp_path / "models"),
                          budget_epsilon=3.0, delta=1e-4, val_fraction=0.2, min_count=5, seed=0, dp=True)
    run_b = load_run_config({"schema": str(tmp_path / "schema.json"), "num-rounds": 1, "batch-size": 16,
                             "epsilon": 3.0, "delta": 1e-4, "d-model": 64})
    assert looser.ledger.delta == 1e-5
    try:  # refused, or trained with the noise that what is left of the budget at 1e-5 allows
        train_round(looser, w, run_b, "run-B", 1)
    except BudgetError:
        pass
    assert site.ledger.spent(site.dataset_fingerprint) <= 3.0 + 1e-6


def test_a_run_whose_patients_changed_is_refused(tmp_path):
    schema, run, site, w = _setup(tmp_path, budget=30.0, rounds=2)
    train_round(site, w, run, "run-A", 1)
    write_site(tmp_path / "site", site_tables(n_per_class=21))  # patients added to the site's tables mid-run
    grown = prepare_site(schema, SitePaths(tmp_path / "site", tmp_path / "state", tmp_path / "models"),
                         budget_epsilon=30.0, delta=1e-5, val_fraction=0.2, min_count=5, seed=0, dp=True)
    assert grown.dataset_fingerprint != site.dataset_fingerprint
    with pytest.raises(BudgetError, match="another training set"):
        train_round(grown, w, run, "run-A", 2)


def test_a_dp_round_divides_by_the_runs_batch_size_not_by_the_sites_expected_batch(tmp_path, monkeypatch):
    """The noisy sum of clipped gradients is divided by the run's batch-size, a public number: the site's own
    expected batch (sample rate x its patients) would publish its count through the update's scale."""
    import client.local_round as local_round

    seen = {}
    real = local_round.make_private

    def spy(engine, model, optimizer, loader, **kw):
        seen.update(kw, sample_rate=loader.sample_rate, patients=len(loader.dataset))
        return real(engine, model, optimizer, loader, **kw)

    monkeypatch.setattr(local_round, "make_private", spy)
    _, run, site, w = _setup(tmp_path, **{"sample-rate": 0.25, "batch-size": 7})
    train_round(site, w, run, "run-A", 1)
    assert seen["expected_batch_size"] == 7 and seen["sample_rate"] == 0.25 and not seen["poisson_sampling"]
    assert seen["patients"] * 0.25 != 7  # not the site's expected batch


def test_a_sites_own_min_count_holds_whatever_the_run_asks(tmp_path):
    """site.json's min-count reaches the deployed ClientApp through the node config: a run asking for a smaller one
    reports no count below the site's (the held-out part's metrics are withheld below it)."""
    from flwr.app import Context, RecordDict

    from client.app import prepared, site_settings

    schema = site_schema()
    schema_path = schema.save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    cfg = load_run_config({"schema": str(schema_path), "num-rounds": 2, "d-model": 32, "min-count": 2})

    def site(node: dict):
        ctx = Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path / "site"),
                                                        "state-dir": str(tmp_path / "state"),
                                                        "model-dir": str(tmp_path / "models"),
                                                        "privacy-budget": 8.0, **node},
                      state=RecordDict(), run_config={})
        return prepared(site_settings(ctx, cfg), cfg, schema_path)

    weights = state_arrays(MultiModalTransformer(schema, cfg.model))
    assert site({}).min_count == 5  # site.json's default, above the run's 2
    strict = site({"min-count": 10_000})
    assert strict.min_count == 10_000 and evaluate_global(strict, weights, cfg) == (0, {})
    assert evaluate_global(site({"min-count": 3}), weights, cfg)[0] > 0


def test_a_site_with_older_rounds_padded_at_the_old_tail_trains_and_sends_its_rounds(tmp_path):
    """The ledger prices the padding's overflow out of delta (privacy/accounting.py `priced`); Opacus' accountant,
    which checks the ledger's figure after every round, knows no such event. Compared at the site's delta they parted
    by over 1% once the price was a noticeable share of delta (rounds padded at the 2^-40 of before 2026-12-07), and
    every such round was committed, then withheld (a DP review). Compared at the delta the ledger charged the steps,
    they agree."""
    from opacus.accountants import PRVAccountant

    from privacy import LEGACY_PADDING_TAIL
    from privacy.accounting import epsilon

    _, run, site, w = _setup(tmp_path, budget=30.0, rounds=3, epsilon=8.0)
    older = site.ledger.begin_round(site.dataset_fingerprint, "older", 1, 1.625, 0.3, 60,
                                    padding_tail=LEGACY_PADDING_TAIL)
    site.ledger.commit_round(older, 60)
    for rnd in (1, 2, 3):
        r = train_round(site, w, run, "run-B", rnd)  # raised "disagree" and withheld the update before
    history = site.ledger.history(site.dataset_fingerprint)
    unpriced = PRVAccountant()
    unpriced.history = [m for m in history if isinstance(m, tuple)]
    ours = epsilon(history, 1e-5)
    assert r.metrics["epsilon"] == ours > 1.01 * unpriced.get_epsilon(delta=1e-5)  # the case the check met


def test_a_site_whose_history_leaves_little_provable_epsilon_does_not_join_a_run_with_many_times_its_noise(tmp_path):
    """A site joins a new run only with MIN_RUN_SHARE of its epsilon left. Its budget's rest is not all it has: the
    history's bad events, priced at the epsilon claimed, make a total above ~11.5 unprovable for a site with one run
    padded at the old tail 2^-40, whatever its budget. Judged by the budget's rest (30 - 11.5), a third run was joined
    with noise multiplier 12.2, 7.5 times the run's own, for an epsilon of 0.71 (a DP review)."""
    from client.local_round import new_run_noise
    from privacy import LEGACY_PADDING_TAIL, PADDING_TAIL

    _, run, site, _ = _setup(tmp_path, budget=30.0, rounds=10, epsilon=8.0)
    for name, sigma, tail in (("first", 1.625, LEGACY_PADDING_TAIL), ("second", 1.78125, PADDING_TAIL)):
        site.ledger.commit_round(site.ledger.begin_round(site.dataset_fingerprint, name, 1, sigma, 0.3, 60,
                                                         padding_tail=tail), 60)
    assert site.ledger.spent(site.dataset_fingerprint) < 12
    with pytest.raises(BudgetError, match=r"run third refused: this site's spend can grow by epsilon 0\.7\d* only.*"
                                          r"bad events.*7\.\d times the run's noise"):
        new_run_noise(site, "third", run)
    with pytest.raises(BudgetError, match="can grow by epsilon"):  # as a round is asked, at its setup stage
        train_round(site, state_arrays(MultiModalTransformer(site.schema, run.model)), run, "third", 1)


def _counting_searches(monkeypatch) -> list:
    """Each call of the accountant's noise search (privacy.accounting.noise_multiplier_for) from a site's round."""
    import client.local_round as lr

    calls, search = [], lr.noise_multiplier_for
    monkeypatch.setattr(lr, "noise_multiplier_for", lambda *a, **kw: calls.append(a) or search(*a, **kw))
    return calls


def test_a_new_runs_first_round_searches_its_noise_once_for_the_setup_stage_and_the_training(tmp_path, monkeypatch):
    """SecAgg+'s setup stage asks whether the site joins the new run (round_precheck), computing the run's noise,
    and training computed it again (~0.5 s more per site): the ledger, the run and its config are the same, so the
    training takes the precheck's answer."""
    from client.local_round import round_precheck

    _, run, site, w = _setup(tmp_path)
    calls = _counting_searches(monkeypatch)
    round_precheck(site, run, "run-A", 1)
    searched = len(calls)
    assert searched > 0
    sent = train_round(site, w, run, "run-A", 1).metrics
    assert len(calls) == searched
    plan = site.ledger.run_plan(site.dataset_fingerprint, "run-A")
    assert sent["noise_multiplier"] == plan.noise_multiplier


def test_a_ledger_change_between_the_setup_stage_and_the_training_searches_the_noise_again(tmp_path, monkeypatch):
    """Two rounds of another run committed between run A's precheck and its training: A's plan is computed again from
    the ledger as it is then (the epsilon it may bring the site to is the budget, 6, no longer 0 + its epsilon 4),
    not taken from the precheck."""
    import client.local_round as lr

    _, run, site, w = _setup(tmp_path, budget=6.0, rounds=3, epsilon=4.0)
    calls = _counting_searches(monkeypatch)
    lr.round_precheck(site, run, "run-A", 1)
    searched = len(calls)
    assert lr.new_run_noise(site, "run-A", run)[3] == 4.0 and len(calls) == searched  # unchanged: no search
    for rnd in (1, 2):  # another process trains run B (its noise as run A's: written here, asked of no cache)
        site.ledger.commit_round(site.ledger.begin_round(site.dataset_fingerprint, "run-B", rnd, 1.71875, 0.3, 6,
                                                         padding_tail=PADDING_TAIL), 6)
    searched = len(calls)
    train_round(site, w, run, "run-A", 1)
    assert len(calls) > searched
    assert site.ledger.run_plan(site.dataset_fingerprint, "run-A").epsilon_cap == 6.0
