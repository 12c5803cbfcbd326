"""Site privacy accounting: exact epsilon, spend carried across runs, refusal, crash safety."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from opacus.accountants import PRVAccountant

from privacy.accounting import MAX_BUDGET, BudgetError, compact, epsilon, noise_multiplier_for, public_schedule
from privacy.ledger import AlreadyReleased, PrivacyLedger, RunPlan

DELTA = 1e-5
IDS = [f"P{i:03d}" for i in range(200)]


def closed_form(history, delta=DELTA):
    acc = PRVAccountant()
    acc.history = history
    return acc.get_epsilon(delta=delta)


def test_epsilon_of_a_known_schedule_matches_the_reference_value():
    # shared/notes/opacus.md: sigma 0.812, q 1/32, 640 steps -> epsilon 7.99 at delta 1e-5
    assert epsilon([(0.812, 1 / 32, 640)], DELTA) == pytest.approx(7.99, rel=0.01)


def test_the_numpy_series_of_the_sampled_gaussian_equals_opacus_own():
    """privacy.accounting sums Opacus' fractional-order series with numpy (log_a_fractional) in Opacus' place."""
    from privacy.accounting import _opacus_accountants, log_a_fractional

    _opacus_accountants()
    orders = [a for a in (1 + x / 10 for x in range(1, 100)) if not a.is_integer()]
    for q in (0.01, 0.05, 0.25, 1 / 3, 0.5, 0.9):
        for sigma in (0.5, 0.8, 1.24, 3.0, 10.0):
            for alpha in orders[::7]:
                ours, opacus = log_a_fractional(q, sigma, alpha), log_a_fractional.opacus(q, sigma, alpha)
                assert ours == pytest.approx(opacus, rel=1e-9, abs=1e-12), (q, sigma, alpha)


def test_rounds_compose_to_the_closed_form_of_all_executed_steps():
    rounds = [(0.9, 0.05, 40)] * 10
    assert compact(rounds) == [(0.9, 0.05, 400)]
    assert epsilon(rounds, DELTA) == pytest.approx(closed_form([(0.9, 0.05, 400)]), rel=0.01)


def test_noise_is_chosen_once_so_the_whole_schedule_lands_on_the_budget():
    q, steps = public_schedule(sample_rate=0.1, local_epochs=1, rounds=10)
    assert (q, steps) == (0.1, 100)
    assert public_schedule(0.3, 2, 10) == (0.3, 60)  # round(1 / 0.3) = 3 steps per local epoch
    sigma = noise_multiplier_for(8.0, DELTA, q, steps)
    total = closed_form([(sigma, q, steps)])
    assert 7.8 <= total <= 8.0


def _ledger(tmp_path, budget=8.0):
    return PrivacyLedger(tmp_path / "ledger.json", budget_epsilon=budget, delta=DELTA)


def _run_rounds(ledger, ds, run_id, sigma, q, steps_per_round, rounds, first=1):
    spent = 0.0
    for r in range(first, first + rounds):
        ticket = ledger.begin_round(ds, run_id, r, sigma, q, steps_per_round, padding_tail=0.0)
        spent = ledger.commit_round(ticket, steps_per_round)
    return spent


def test_reported_epsilon_equals_the_closed_form_of_the_executed_steps(tmp_path):
    ledger = _ledger(tmp_path)
    ds = ledger.register_dataset(IDS, "schema-hash")
    spent = _run_rounds(ledger, ds, "run-1", 1.1, 0.1, 10, rounds=5)
    assert spent == pytest.approx(closed_form([(1.1, 0.1, 50)]), rel=0.01)


def test_a_second_run_on_the_same_data_starts_from_what_the_first_spent(tmp_path):
    first = _ledger(tmp_path)
    ds = first.register_dataset(IDS, "schema-hash")
    spent_first = _run_rounds(first, ds, "run-1", 1.1, 0.1, 10, rounds=5)
    second = _ledger(tmp_path)  # a new process, same site state directory
    ds_again = second.register_dataset(list(reversed(IDS)), "schema-hash")
    assert ds_again == ds
    assert second.spent(ds) == pytest.approx(spent_first, rel=1e-9)
    # the second run's noise is chosen for what is left of the budget
    sigma = noise_multiplier_for(8.0, DELTA, 0.1, 50, spent=second.history(ds))
    total = _run_rounds(second, ds, "run-2", sigma, 0.1, 10, rounds=5)
    assert total == pytest.approx(closed_form([(1.1, 0.1, 50), (sigma, 0.1, 50)]), rel=0.01)
    assert total <= 8.0


def test_every_dataset_of_a_site_shares_one_spend(tmp_path):
    ledger = _ledger(tmp_path)
    old = ledger.register_dataset(IDS, "h")
    spent = _run_rounds(ledger, old, "run-1", 1.1, 0.1, 10, rounds=3)
    grown = ledger.register_dataset(IDS + ["P999"], "h")  # one new patient
    assert grown != old and ledger.spent(grown) == pytest.approx(spent)
    assert ledger.spent(ledger.register_dataset(["Q1", "Q2"], "h")) == pytest.approx(spent)  # other patients too
    v2 = ledger.register_dataset(IDS, "schema-v2")  # another schema (a class added): another hash
    _run_rounds(ledger, v2, "run-2", 1.1, 0.1, 10, rounds=3)
    both = closed_form([(1.1, 0.1, 30), (1.1, 0.1, 30)])
    assert ledger.spent(old) == pytest.approx(both, rel=0.01) and ledger.spent(v2) == pytest.approx(both, rel=0.01)


def test_a_runs_spend_does_not_tell_whether_a_patient_was_in_an_earlier_dataset(tmp_path):
    """The spend sets the run's noise multiplier and the epsilon it reports to the server: counting only datasets
    that share a patient with the current one made both depend on whether patient X had been in the earlier one."""
    spends = []
    for with_x in (True, False):
        ledger = _ledger(tmp_path / str(with_x))
        earlier = ledger.register_dataset(["X"] * with_x + [f"E{i}" for i in range(50)], "h")
        _run_rounds(ledger, earlier, "run-1", 1.1, 0.1, 10, rounds=3)
        spends.append(ledger.spent(ledger.register_dataset(["X"] + [f"N{i}" for i in range(50)], "h")))
    assert spends[0] == spends[1] > 0


@pytest.mark.parametrize("evidence", ["lock", "released", "audit"])
def test_a_lost_ledger_refuses_training_instead_of_starting_from_zero(tmp_path, evidence):
    ledger = _ledger(tmp_path)
    _run_rounds(ledger, ledger.register_dataset(IDS, "h"), "run-1", 1.1, 0.1, 10, rounds=2)
    (tmp_path / "ledger.json").unlink()
    if evidence == "released":  # the lock file gone too: the site's released updates still tell
        (tmp_path / "ledger.json.lock").unlink()
        (tmp_path / "released" / "run-1").mkdir(parents=True)
        (tmp_path / "released" / "run-1" / "round-0002.npz").write_bytes(b"")
    if evidence == "audit":  # the lock file and released/ gone too (the old refusal's own advice): the audit log tells
        from privacy.audit import AuditLog

        (tmp_path / "ledger.json.lock").unlink()
        AuditLog(tmp_path / "audit.jsonl").append("round_trained", run="run-1", round=2, epsilon=1.2)
    with pytest.raises(BudgetError, match="the privacy ledger is missing.*restore the ledger from a backup") as e:
        _ledger(tmp_path)
    assert "delete" not in str(e.value)  # no advice that would let a site start its spend from zero
    (tmp_path / "ledger.json.lock").unlink(missing_ok=True)
    if evidence == "lock":
        assert _ledger(tmp_path).spent(_ledger(tmp_path).register_dataset(IDS, "h")) == 0.0  # a new site: a new ledger


@pytest.mark.parametrize("damage", [{"datasets": None}, {"entries": {}}, {"entries": [1]}, {"runs": []}])
def test_a_ledger_of_the_wrong_shape_is_refused_naming_the_file_not_a_keyerror(tmp_path, damage):
    import json

    ledger = _ledger(tmp_path)
    _run_rounds(ledger, ledger.register_dataset(IDS, "h"), "run-1", 1.1, 0.1, 10, rounds=1)
    state = json.loads((tmp_path / "ledger.json").read_text())
    state.update(damage)
    if damage == {"datasets": None}:
        del state["datasets"]
    (tmp_path / "ledger.json").write_text(json.dumps(state))
    with pytest.raises(BudgetError, match="ledger.json: privacy ledger damaged.*restore it from a backup"):
        _ledger(tmp_path).register_dataset(IDS, "h")


def test_an_exhausted_budget_refuses_the_round_and_writes_nothing(tmp_path):
    ledger = _ledger(tmp_path, budget=2.0)
    ds = ledger.register_dataset(IDS, "h")
    before = (tmp_path / "ledger.json").read_text()
    with pytest.raises(BudgetError, match=r"round 1 refused: .* budget 2 .* Nothing was trained or sent"):
        ledger.begin_round(ds, "run-1", 1, 0.5, 0.5, 100, padding_tail=0.0)
    assert (tmp_path / "ledger.json").read_text() == before
    with pytest.raises(BudgetError, match="even noise multiplier 1024"):
        noise_multiplier_for(2.0, DELTA, 0.5, 100, spent=[(0.3, 1.0, 10_000)])


def test_a_budget_above_what_the_accounting_verifies_is_refused_up_front(tmp_path):
    """Above MAX_BUDGET the ledger's bound (RDP) and Opacus' PRV figure part ways, so every round would be
    refused after training (a measured run at budget 1000 refused all 10): the site says so at start instead."""
    with pytest.raises(BudgetError, match=r"budget epsilon 1000 is above 100.*at most 100, or train without DP"):
        _ledger(tmp_path, budget=1000.0)
    # at the ceiling the ledger and Opacus' own accountant still agree, and the spend stays within it
    q, steps = public_schedule(0.5, 2, 10)
    sigma = noise_multiplier_for(MAX_BUDGET, DELTA, q, steps)
    acc = PRVAccountant()
    acc.history = [(sigma, q, steps)]
    assert epsilon([(sigma, q, steps)], DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=0.01)
    assert epsilon([(sigma, q, steps)], DELTA) <= MAX_BUDGET


def test_a_runs_own_epsilon_counts_its_committed_rounds_alone(tmp_path):
    """What a run's model costs the patients by itself: the accountant over that run's committed rounds, not the
    site's total (the model of a second run, trained from fresh weights, depends on no round of the first), and not a
    round that crashed before its update left."""
    ledger = _ledger(tmp_path, budget=20.0)
    ds = ledger.register_dataset(IDS, "h")
    _run_rounds(ledger, ds, "run-1", 1.1, 0.1, 10, rounds=5)
    _run_rounds(ledger, ds, "run-2", 1.5, 0.1, 10, rounds=3)
    ledger.begin_round(ds, "run-2", 4, 1.5, 0.1, 10, padding_tail=0.0)  # pending: counts in the site's spend, not in the model
    assert ledger.run_spent("run-1") == pytest.approx(closed_form([(1.1, 0.1, 50)]), rel=0.01)
    assert ledger.run_spent("run-2") == pytest.approx(closed_form([(1.5, 0.1, 30)]), rel=0.01)
    assert ledger.spent(ds) == pytest.approx(closed_form([(1.1, 0.1, 50), (1.5, 0.1, 40)]), rel=0.01)
    assert ledger.spent(ds) - ledger.run_spent("run-1") < ledger.run_spent("run-2") < ledger.spent(ds)  # subadditive
    assert ledger.run_spent("never-ran") == 0.0


def _crash_after_begin(tmp_path, rnd):
    """A real process that passes the budget check, starts the round and dies before committing."""
    code = textwrap.dedent(f"""
        import os
        from privacy.ledger import AlreadyReleased, PrivacyLedger, RunPlan
        ledger = PrivacyLedger({str(tmp_path / 'ledger.json')!r}, budget_epsilon=8.0, delta={DELTA})
        ds = ledger.register_dataset({IDS!r}, "h")
        ledger.begin_round(ds, "run-1", {rnd}, 1.1, 0.1, 10, padding_tail=0.0)
        os._exit(9)  # killed mid-round: no commit
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr


def test_a_crash_mid_round_never_loses_spend(tmp_path):
    ledger = _ledger(tmp_path)
    ds = ledger.register_dataset(IDS, "h")
    _run_rounds(ledger, ds, "run-1", 1.1, 0.1, 10, rounds=2)
    _crash_after_begin(tmp_path, rnd=3)
    assert ledger.spent(ds) == pytest.approx(closed_form([(1.1, 0.1, 30)]), rel=0.01)


def test_retrying_a_crashed_round_does_not_count_it_twice(tmp_path):
    ledger = _ledger(tmp_path)
    ds = ledger.register_dataset(IDS, "h")
    _run_rounds(ledger, ds, "run-1", 1.1, 0.1, 10, rounds=2)
    _crash_after_begin(tmp_path, rnd=3)
    spent = _run_rounds(ledger, ds, "run-1", 1.1, 0.1, 10, rounds=1, first=3)  # the retry
    assert spent == pytest.approx(closed_form([(1.1, 0.1, 30)]), rel=0.01)


def test_a_committed_round_is_never_trained_again(tmp_path):
    # A server resumed from an older checkpoint asks for round 2 again: its update already left the site, so
    # the ledger refuses a second training (the site resends what it released; client/releases.py).
    ledger = _ledger(tmp_path)
    ds = ledger.register_dataset(IDS, "h")
    _run_rounds(ledger, ds, "run-1", 1.1, 0.1, 10, rounds=2)
    with pytest.raises(AlreadyReleased, match="round 2 of run run-1 was trained and its update sent before"):
        ledger.begin_round(ds, "run-1", 2, 1.1, 0.1, 10, padding_tail=0.0)
    assert ledger.released(ds, "run-1", 2)["steps"] == 10 and ledger.released(ds, "run-1", 3) is None
    assert ledger.spent(ds) == pytest.approx(closed_form([(1.1, 0.1, 20)]), rel=0.01)


def _plan(sigma=1.1, q=0.1, rounds=3, steps=10, cap=8.0):
    return RunPlan(epsilon=cap, epsilon_cap=cap, num_rounds=rounds, steps_per_round=steps, noise_multiplier=sigma,
                   sample_rate=q, terms={"num-rounds": rounds, "epsilon": cap})


def test_a_run_plan_is_fixed_at_its_first_round(tmp_path):
    ledger = _ledger(tmp_path)
    ds = ledger.register_dataset(IDS, "h")
    first = ledger.start_run(ds, "run-1", _plan())
    assert ledger.start_run(ds, "run-1", _plan(rounds=10)) == first, "a restarted run keeps the plan it started with"
    assert first.changes({"num-rounds": 10, "epsilon": 8.0}) == ["num-rounds: 3 -> 10"]


def test_a_round_beyond_the_runs_plan_is_refused_and_writes_nothing(tmp_path):
    ledger = _ledger(tmp_path)
    ds = ledger.register_dataset(IDS, "h")
    ledger.start_run(ds, "run-1", _plan(rounds=3))
    _run_rounds(ledger, ds, "run-1", 1.1, 0.1, 10, rounds=2)
    before = (tmp_path / "ledger.json").read_text()
    with pytest.raises(BudgetError, match="run run-1 was planned with 3 rounds"):
        ledger.begin_round(ds, "run-1", 4, 1.1, 0.1, 10, padding_tail=0.0)
    with pytest.raises(BudgetError, match="planned with noise multiplier 1.1000"):
        ledger.begin_round(ds, "run-1", 3, 0.9, 0.1, 10, padding_tail=0.0)
    assert (tmp_path / "ledger.json").read_text() == before


def test_more_steps_than_the_run_planned_are_refused(tmp_path):
    ledger = _ledger(tmp_path)
    ds = ledger.register_dataset(IDS, "h")
    ledger.start_run(ds, "run-1", _plan(rounds=3, steps=10))
    _run_rounds(ledger, ds, "run-1", 1.1, 0.1, 10, rounds=2)
    with pytest.raises(BudgetError, match="has run 20 of its 30 planned steps"):
        ledger.begin_round(ds, "run-1", 3, 1.1, 0.1, 11, padding_tail=0.0)


def test_a_run_cannot_spend_beyond_its_own_epsilon_even_within_the_sites_budget(tmp_path):
    ledger = _ledger(tmp_path, budget=30.0)
    ds = ledger.register_dataset(IDS, "h")
    cap = closed_form([(1.1, 0.1, 20)])  # the run agreed to what 2 rounds spend
    ledger.start_run(ds, "run-1", _plan(rounds=3, cap=cap))
    _run_rounds(ledger, ds, "run-1", 1.1, 0.1, 10, rounds=2)
    with pytest.raises(BudgetError, match="run run-1 may bring this site's spend to epsilon"):
        ledger.begin_round(ds, "run-1", 3, 1.1, 0.1, 10, padding_tail=0.0)


def test_a_corrupt_ledger_refuses_training_instead_of_starting_from_zero(tmp_path):
    (tmp_path / "ledger.json").write_text("{truncated")
    with pytest.raises(BudgetError, match="privacy ledger unreadable .* restore it from backup"):
        _ledger(tmp_path).register_dataset(IDS, "h")


def test_the_ledger_accounts_at_the_smallest_delta_it_was_ever_opened_with(tmp_path):
    # A later run asking for a larger delta must not re-price the spend downwards (at delta 0.1 the same steps
    # cost a fraction of their epsilon at 1e-5), and one asking for a smaller delta re-prices it upwards for good.
    ledger = _ledger(tmp_path)
    ds = ledger.register_dataset(IDS, "h")
    spent = _run_rounds(ledger, ds, "run-1", 1.1, 0.1, 10, rounds=3)
    looser = PrivacyLedger(tmp_path / "ledger.json", budget_epsilon=8.0, delta=0.1)
    assert looser.delta == DELTA and looser.spent(ds) == pytest.approx(spent)
    stricter = PrivacyLedger(tmp_path / "ledger.json", budget_epsilon=8.0, delta=1e-7)
    assert stricter.spent(ds) == pytest.approx(closed_form([(1.1, 0.1, 30)], delta=1e-7), rel=0.01)
    assert stricter.spent(ds) > spent
    stricter.register_dataset(IDS[:10], "h")  # any write pins it
    assert PrivacyLedger(tmp_path / "ledger.json", budget_epsilon=8.0, delta=DELTA).delta == 1e-7


def test_a_run_whose_training_set_changed_is_refused_not_trained_under_a_fresh_plan(tmp_path):
    # Patients added to the site's tables (or another split) during a run give another dataset fingerprint: its
    # released rounds and its plan are still found, so no round is trained twice and no fresh cap is set.
    ledger = _ledger(tmp_path, budget=30.0)
    before = ledger.register_dataset(IDS, "h")
    ledger.start_run(before, "run-1", _plan(rounds=3, steps=10))
    _run_rounds(ledger, before, "run-1", 1.1, 0.1, 10, rounds=1)
    after = ledger.register_dataset(IDS + ["P900", "P901", "P902"], "h")
    with pytest.raises(AlreadyReleased):
        ledger.begin_round(after, "run-1", 1, 1.1, 0.1, 10, padding_tail=0.0)
    assert ledger.released(after, "run-1", 1)["dataset"] == before
    with pytest.raises(BudgetError, match="run run-1 started at this site on another training set: ") as refused:
        ledger.begin_round(after, "run-1", 2, 1.1, 0.1, 10, padding_tail=0.0)
    assert "200" not in str(refused.value) and "203" not in str(refused.value)  # the reason goes to the server
    with pytest.raises(BudgetError, match="another training set"):
        ledger.start_run(after, "run-1", _plan(rounds=3, steps=10))
    assert ledger.spent(after) == pytest.approx(closed_form([(1.1, 0.1, 10)]), rel=0.01)


def test_a_round_trained_twice_at_once_releases_one_update(tmp_path):
    # A resumed server asks for a round while the first attempt still trains in another process: both train,
    # only the first to commit may send; the other's commit is refused (its update is withheld).
    path, go = tmp_path / "ledger.json", tmp_path / "go"
    ledger = _ledger(tmp_path)
    ds = ledger.register_dataset(IDS, "h")
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from privacy.ledger import PrivacyLedger
        ledger = PrivacyLedger({str(path)!r}, budget_epsilon=8.0, delta={DELTA})
        ticket = ledger.begin_round({ds!r}, "run-1", 1, 1.1, 0.1, 10, padding_tail=0.0)
        Path({str(go)!r} + ".started").touch()
        while not Path({str(go)!r}).exists():  # training while the second request arrives
            time.sleep(0.02)
        ledger.commit_round(ticket, 10)  # the first attempt's update leaves
    """)])
    try:
        for _ in range(1500):
            if (tmp_path / "go.started").exists() or first.poll() is not None:
                break
            time.sleep(0.02)
        second = ledger.begin_round(ds, "run-1", 1, 1.1, 0.1, 10, padding_tail=0.0)  # a second ClientApp process, the same round
        go.touch()
        assert first.wait(60) == 0
    finally:
        first.kill()
    with pytest.raises(AlreadyReleased, match="trained by another attempt at the same time"):
        ledger.commit_round(second, 10)
    assert ledger.spent(ds) == pytest.approx(closed_form([(1.1, 0.1, 10)]), rel=0.01)


def test_a_ledger_from_before_the_pinned_delta_takes_the_smallest_delta_its_runs_were_planned_at(tmp_path):
    import json

    ledger = _ledger(tmp_path)
    ds = ledger.register_dataset(IDS, "h")
    ledger.start_run(ds, "run-1", RunPlan(epsilon=8.0, epsilon_cap=8.0, num_rounds=3, steps_per_round=10,
                                          noise_multiplier=1.1, sample_rate=0.1, terms={"delta": DELTA}))
    spent = _run_rounds(ledger, ds, "run-1", 1.1, 0.1, 10, rounds=3)
    state = json.loads((tmp_path / "ledger.json").read_text())
    del state["delta"]  # as written before the delta was pinned
    (tmp_path / "ledger.json").write_text(json.dumps(state))
    looser = PrivacyLedger(tmp_path / "ledger.json", budget_epsilon=8.0, delta=0.1)
    assert looser.delta == DELTA and looser.spent(ds) == pytest.approx(spent)


def test_a_round_the_site_withheld_keeps_that_outcome_whatever_the_server_says_of_it(tmp_path):
    """A withheld round sent nothing, so the server may abandon it and say so with the next message (or the model
    delivery). That word must not replace "withheld": the site's later requests for the run are refused on it."""
    ledger = PrivacyLedger(tmp_path / "ledger.json", budget_epsilon=8.0, delta=DELTA)
    dataset = ledger.register_dataset([f"p{i}" for i in range(40)], "schema")
    ledger.commit_round(ledger.begin_round(dataset, "run-A", 1, 1.5, 0.3, 3, padding_tail=0.0), 3)
    assert ledger.note_outcome(dataset, "run-A", 1, status="withheld", reason="not finite", cause="run-config")
    assert not ledger.note_outcome(None, "run-A", 1, status="abandoned", reason="2 sites sent masked vectors")
    [(rnd, outcome)] = ledger.withheld("run-A")
    assert rnd == 1 and outcome["status"] == "withheld" and outcome["cause"] == "run-config"


def test_a_budget_too_small_for_the_default_run_is_explained_with_what_it_could_pay_for():
    """The numbers `oncofed site init` and the site's preflight warn with are the ones its rounds refuse by: below
    MIN_RUN_SHARE of the default run's epsilon a site joins no default run; below the default schedule's epsilon at
    the largest noise multiplier no run of that schedule trains at all, and just above it one can."""
    from privacy import MIN_RUN_SHARE
    from privacy.accounting import MAX_NOISE_MULTIPLIER, low_budget_warning
    from shared_models.run_config import RunConfig

    run = RunConfig.model_validate({"schema": "s.json"})
    needed = MIN_RUN_SHARE * run.privacy.epsilon
    assert low_budget_warning(needed) == "" and low_budget_warning(run.privacy.epsilon) == ""
    q, steps = public_schedule(run.privacy.sample_rate, run.training.local_epochs, run.federation.num_rounds)
    floor = epsilon([(MAX_NOISE_MULTIPLIER, q, steps)], run.privacy.delta)
    tiny = low_budget_warning(0.001)
    assert f"below {needed:g}" in tiny and "refuse every such run" in tiny and "can train within it at all" in tiny
    assert f"costs epsilon {floor:.3g}" in tiny and f"{steps} DP-SGD steps" in tiny
    with pytest.raises(BudgetError):
        noise_multiplier_for(floor * 0.99, run.privacy.delta, q, steps)
    noise_multiplier_for(floor * 1.01, run.privacy.delta, q, steps)
    small = low_budget_warning(1.0)
    sigma = noise_multiplier_for(1.0, run.privacy.delta, q, steps)
    assert "joins only runs asking for epsilon at most 2" in small and f"noise multiplier {sigma:.3g}" in small


def test_a_padded_batchs_overflow_is_paid_in_delta_at_the_epsilon_claimed():
    """A padded step outgrows its rows with probability at most the padding's tail P, and then its time shows the
    sample's size (privacy/sampling.py): the claim (eps, delta) holds only if the mechanisms are eps-DP at
    delta - (1 + e^eps) x (steps x P). A DP review (2026-12-06) found the ledger left this out: at the old tail
    2^-40 it is 1.6e-7 (1.6% of delta 1e-5) over the main job's 60 steps at epsilon 8, and more than delta at epsilon
    ~18."""
    import math

    from privacy.accounting import Overflow, bad_event_delta
    from privacy import LEGACY_PADDING_TAIL, PADDING_TAIL

    steps = [(1.625, 0.3, 60)]  # the main job's run at a site: epsilon 7.97
    bare = epsilon(steps, DELTA)
    old = epsilon(steps + [Overflow(60, LEGACY_PADDING_TAIL)], DELTA)
    price = bad_event_delta([Overflow(60, LEGACY_PADDING_TAIL)], old)
    assert 1e-7 < price < 2e-7 and bare + 0.005 < old < bare + 0.01
    assert closed_form(steps, DELTA - price) <= old  # the claim pays its own price
    # at today's tail the price is below a millionth of delta: the epsilon moves by less than 1e-6
    assert epsilon(steps + [Overflow(60, PADDING_TAIL)], DELTA) == pytest.approx(bare, rel=1e-6)
    # four such runs (epsilon ~18 at full delta): at 2^-40 the price is above delta at every epsilon they could
    # claim, so nothing finite is proven; at today's tail it is still negligible
    long = [(1.625, 0.3, 240)]
    assert math.isinf(epsilon(long + [Overflow(240, LEGACY_PADDING_TAIL)], DELTA))
    assert epsilon(long + [Overflow(240, PADDING_TAIL)], DELTA) == pytest.approx(epsilon(long, DELTA), rel=1e-6)
    # the overflows of one tail merge; a tail of 0 (unpadded steps: their timing is outside the claim) costs nothing
    assert compact([Overflow(2, 0.5), Overflow(3, 0.5), Overflow(4, 0.0)]) == [Overflow(5, 0.5)]


def test_the_ledger_records_each_rounds_padding_and_prices_an_older_entry_at_the_tail_it_had(tmp_path):
    import json

    from privacy.accounting import Overflow
    from privacy import LEGACY_PADDING_TAIL, PADDING_TAIL

    ledger = _ledger(tmp_path, budget=30.0)
    ds = ledger.register_dataset(IDS, "h")
    ticket = ledger.begin_round(ds, "run-1", 1, 0.9, 0.3, 60, padding_tail=PADDING_TAIL)
    spent = ledger.commit_round(ticket, 60)
    state = json.loads((tmp_path / "ledger.json").read_text())
    assert state["entries"][0]["padding_tail"] == PADDING_TAIL
    assert spent == epsilon([(0.9, 0.3, 60), Overflow(60, PADDING_TAIL)], DELTA)
    # an entry written before the ledger recorded the tail: every padded step then had 2^-40
    del state["entries"][0]["padding_tail"]
    (tmp_path / "ledger.json").write_text(json.dumps(state))
    older = ledger.spent(ds)
    assert older == epsilon([(0.9, 0.3, 60), Overflow(60, LEGACY_PADDING_TAIL)], DELTA) > spent
    # and what a person is shown (site status, the SuperNode's preflight) is that price, not the figure recorded then
    from privacy.ledger import read_ledger, recorded_spend
    assert recorded_spend(read_ledger(tmp_path / "ledger.json"))[0] == older
    with pytest.raises(ValueError, match="padding_tail"):
        ledger.begin_round(ds, "run-1", 2, 0.9, 0.3, 60, padding_tail=1.0)
    with pytest.raises(TypeError, match="padding_tail"):  # no default: a caller cannot leave the price out
        ledger.begin_round(ds, "run-1", 2, 0.9, 0.3, 60)
    state["entries"][0]["padding_tail"] = None  # a damaged entry is refused by name, not a TypeError
    (tmp_path / "ledger.json").write_text(json.dumps(state))
    with pytest.raises(BudgetError, match=r"ledger.json: privacy ledger damaged: an entry of run 'run-1' round 1 has "
                                          r"padding_tail None"):
        ledger.spent(ds)


def test_a_round_whose_claim_its_bad_events_make_infinite_is_refused_saying_why(tmp_path):
    from privacy import LEGACY_PADDING_TAIL

    ledger = _ledger(tmp_path, budget=MAX_BUDGET)
    ds = ledger.register_dataset(IDS, "h")
    spent = ledger.commit_round(ledger.begin_round(ds, "run-1", 1, 1.625, 0.3, 180, padding_tail=0.0), 180)
    assert 14 < spent < 16
    with pytest.raises(BudgetError, match=r"would bring it to inf, no finite epsilon \(the history's bad events, "
                                          r"a padded batch outgrown"):
        ledger.begin_round(ds, "run-1", 2, 1.625, 0.3, 60, padding_tail=LEGACY_PADDING_TAIL)


def test_the_claim_that_pays_its_bad_events_is_the_least_there_is_and_rises_with_the_curve():
    """`priced` against a brute-force scan for the least claim c with epsilon_at(delta - (1 + e^c) P) <= c, on curves
    shaped as a Gaussian mechanism's (a + b sqrt(2 ln(1.25 / d))), near the tangency where such a claim stops existing:
    a review found the search returned the first claim it met, up to 0.2 above the least, and a smaller figure for a
    curve higher everywhere."""
    import math

    import numpy as np

    from privacy.accounting import Overflow, priced

    delta, history = 1e-5, [Overflow(60, 2.0 ** -40)]
    p = 60 * 2.0 ** -40
    last = 0.0
    for a in np.linspace(9.0, 10.6, 9):  # rising curves: the claim rises with them
        def at(d, a=a):
            return a + 0.25 * math.sqrt(2 * math.log(1.25 / d))
        eps, charged = priced(at, delta, history)
        grid = np.arange(at(delta), math.log(delta / p - 1), 1e-4)
        least = next((c for c in grid if at(delta - (1 + math.exp(c)) * p) <= c), math.inf)
        if math.isinf(least):
            assert math.isinf(eps)
            continue
        assert at(charged) == eps and charged <= delta - (1 + math.exp(eps)) * p  # pays its own price
        assert eps <= least + 1e-3 and eps >= last
        last = eps
    assert last > 0  # some curves had a claim
