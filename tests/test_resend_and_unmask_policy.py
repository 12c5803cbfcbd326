"""A released distributed round is resent only under the plan and grid it was released under, and a site gives
SecAgg+ key shares only for a well-formed unmask request (review of 2026-12-04, faults of dp-mode "distributed")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, recorddict_to_fitres

from shared_models.protocol import RUN_KEY, SERVER_ROUND
from tests.factories import in_secagg, site_message, unmask_message


def _run(schema_path, **kw) -> dict:
    return {"schema": str(schema_path), "num-rounds": 3, "d-model": 32, "dp-mode": "distributed", "strategy": "fedavgm",
            "trusted-sites": 3, "sites": 3, "min-sites": 2, "sample-rate": 0.5, **kw}


def _context(tmp: Path, run: dict, node: dict | None = None, q: int = 2 ** 30) -> Context:
    node = {"data-path": str(tmp / "site"), "state-dir": str(tmp / "state"), "privacy-budget": 8.0,
            "max-trusted-sites": 3, **(node or {})}
    state = RecordDict()
    state.config_records[RECORD_KEY_STATE] = ConfigRecord({  # what Flower's setup stage leaves in the state
        "clipping_range": 1.0, "target_range": int(q), "mod_range": 2 ** 32, "max_weight": 2000.0,
        "public_keys_dict:K": [1, 2, 3]})
    return Context(run_id=1, node_id=1, node_config=node, state=state, run_config=run)


def _fit(weights, rnd: int = 1, secagg: bool = True) -> Message:
    """A training request as the train handler gets it inside SecAgg+ (`secagg`), or a plain one."""
    content = fitins_to_recorddict(FitIns(ndarrays_to_parameters(weights), {SERVER_ROUND: rnd, RUN_KEY: "run-X"}),
                                   keep_input=True)
    return site_message(in_secagg(content) if secagg else content)


@pytest.fixture()
def released(tmp_path):
    """A deployed site that trained and released round 1 of a distributed run planned for trusted-sites 3."""
    from client.app import train
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.weights import state_arrays
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema()
    schema_path = schema.save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    run = _run(schema_path)
    torch.manual_seed(0)
    weights = state_arrays(MultiModalTransformer(schema, load_run_config(run).model))
    first = train(_fit(weights), _context(tmp_path, run, {"require-secagg": False}))
    assert not first.has_error()
    return tmp_path, schema_path, weights, parameters_to_ndarrays(recorddict_to_fitres(first.content, True).parameters)


def test_a_resumed_request_with_the_same_terms_gets_the_same_bits(released):
    from client.app import train

    tmp, schema_path, weights, sent = released
    again = train(_fit(weights), _context(tmp, _run(schema_path)))
    assert all(np.array_equal(a, b) for a, b in zip(parameters_to_ndarrays(recorddict_to_fitres(again.content, True).parameters), sent))


@pytest.mark.parametrize("changed", [{"trusted-sites": 2}, {"dp-mode": "site", "batch-size": 32}])
def test_a_released_round_is_not_resent_under_other_trust_terms(released, changed):
    """Resent under trusted-sites 2 the share (noised for 3) would then be unmasked in a sum of 2 sites."""
    from client.app import SiteRefusal, train

    tmp, schema_path, weights, _ = released
    with pytest.raises(SiteRefusal, match="another privacy plan"):
        train(_fit(weights), _context(tmp, _run(schema_path, **changed)))


def test_a_distributed_share_is_never_resent_without_secagg(released):
    from client.app import site_policy_mod, train

    tmp, schema_path, weights, _ = released
    run = _run(schema_path, **{"dp-mode": "site", "secagg": False, "batch-size": 32})
    reply = site_policy_mod(_fit(weights, secagg=False), _context(tmp, run, {"require-secagg": False}), train)
    assert reply.has_error() and "another privacy plan" in reply.error.reason


def test_a_released_round_is_not_resent_into_another_grid(released):
    from client.app import SiteRefusal, train

    tmp, schema_path, weights, _ = released
    with pytest.raises(SiteRefusal, match="released on another SecAgg\\+ grid"):
        train(_fit(weights), _context(tmp, _run(schema_path), q=2 ** 28))


@pytest.mark.parametrize("active, dead", [([1, 2, 3, 3], [4]), ([1, 2, 3, 4], [4]), ([1, 1, 1, 1], [2, 3, 4]),
                                          ([2, 3, 4, 5], [6])])
def test_a_site_gives_no_key_shares_for_a_malformed_unmask_request(tmp_path, active, dead):
    """A node listed twice counts once; a node listed active and dead would have both its secrets handed over."""
    from client.app import site_policy_mod

    def never(msg, context):
        raise AssertionError("the site must refuse before Flower's SecAgg+ mod runs")

    run = {"schema": "s.json", "min-sites": 2, "dp-mode": "distributed", "strategy": "fedavgm", "trusted-sites": 4,
           "sites": 4}
    ctx = Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path / "site"), "state-dir": str(tmp_path / "s"),
                                                    "max-trusted-sites": 4}, state=RecordDict(), run_config=run)
    reply = site_policy_mod(unmask_message(active, dead), ctx, never)
    assert reply.has_error() and reply.error.reason.startswith("refused: ")


def test_a_site_whose_site_json_cannot_be_read_at_unmask_gives_no_key_shares(tmp_path):
    """Its floor (min-aggregate-sites) may have been raised in the edit it cannot read: no shares under the old one."""
    from client.app import SITE_JSON_UNREADABLE, site_policy_mod
    from privacy.site_config import SITE_CONFIG_KEY

    def never(msg, context):
        raise AssertionError("the site must refuse before Flower's SecAgg+ mod runs")

    (tmp_path / "site.json").write_text('{"min-aggregate-sites": 4,')  # an edit half saved
    run = {"schema": "s.json", "min-sites": 2, "sites": 4}
    ctx = Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path / "site"), "state-dir": str(tmp_path / "s"),
                                                    SITE_CONFIG_KEY: str(tmp_path / "site.json")},
                  state=RecordDict(), run_config=run)
    reply = site_policy_mod(unmask_message([1, 2, 3], [4]), ctx, never)
    assert reply.has_error() and SITE_JSON_UNREADABLE in reply.error.reason and str(tmp_path) not in reply.error.reason


def _setup(threshold: int, shares: int = 4) -> Message:
    return site_message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
        Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 4, Key.SHARE_NUMBER: shares, Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: 1.0, Key.TARGET_RANGE: 2 ** 22, Key.MOD_RANGE: 2 ** 32, Key.MAX_WEIGHT: 2000.0})}))


@pytest.mark.parametrize("threshold, refused", [(2, True), (3, False)])
def test_a_site_takes_no_part_when_secagg_could_unmask_below_its_own_floor(tmp_path, threshold, refused):
    """Withholding its key shares holds the site's min-aggregate-sites only if SecAgg+ needs at least that many
    sites' shares to unmask; otherwise the other sites unmask a smaller sum with this site's update in it."""
    from client.app import site_policy_mod

    run = _ready_site(tmp_path)
    ctx = _context(tmp_path, run, {"min-aggregate-sites": 3})
    ctx.state = RecordDict()
    reply = site_policy_mod(_setup(threshold, shares=3), ctx, lambda m, c: None)
    assert reply.has_error() is refused
    if refused:
        assert reply.error.reason.startswith("refused: ") and "min-aggregate-sites 3" in reply.error.reason
    else:  # Flower's setup ran: the site's public keys are in the reply
        assert Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS]


@pytest.mark.parametrize("threshold, shares, refused", [(2, 4, True), (3, 6, True), (3, 4, False), (4, 6, False)])
def test_a_site_takes_no_part_when_half_of_the_share_holders_or_fewer_could_unmask(tmp_path, threshold, shares, refused):
    """With a threshold of half the share holders or fewer, a server that sends different sites different unmask
    lists can have two disjoint groups each unmask, and take one site's update out exactly (secagg review,
    2026-12-06): the site does not take part, whatever its own floor."""
    from client.app import site_policy_mod

    run = _ready_site(tmp_path)
    ctx = _context(tmp_path, run, {})
    ctx.state = RecordDict()
    reply = site_policy_mod(_setup(threshold, shares), ctx, lambda m, c: None)
    assert reply.has_error() is refused
    if refused:
        assert reply.error.reason.startswith("refused: ") and "secagg-threshold above 0.5" in reply.error.reason


def _ready_site(tmp_path: Path) -> dict:
    """A site directory whose data passes validation, and a DP run config over its schema."""
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema_path = site_schema().save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    return {"schema": str(schema_path), "num-rounds": 3, "d-model": 32, "sites": 3, "min-sites": 2}


@pytest.mark.parametrize("cause", ["data", "small", "policy", "audit", "release"])
def test_a_site_that_would_refuse_to_train_says_so_at_secaggs_setup_before_any_site_spends(tmp_path, cause,
                                                                                            monkeypatch):
    """A site that will refuse the round (its data fails validation, its policy refuses the run, its audit log cannot be
    written) drops out at SecAgg+'s setup, before any site trains: the server then abandons a round that cannot be
    unmasked before anyone spends (dp-mode "distributed" with every site trusted: one refusing site at the training
    stage cost the seven others their whole budget in three abandoned rounds)."""
    from client.app import site_policy_mod

    run = {**_ready_site(tmp_path), **({"dp": False} if cause == "policy" else {}),
           **({"val-fraction": 0.001} if cause == "small" else {})}  # too few patients for a held-out part
    ctx = _context(tmp_path, run, {"require-dp": True} if cause == "policy" else {})
    ctx.state = RecordDict()
    if cause == "data":
        (tmp_path / "site" / "labels.csv").write_text("patient,cancer_type\n")
    if cause == "release":  # where the update's copy goes cannot be written: it would be spent, then withheld
        (tmp_path / "state").mkdir(exist_ok=True)
        (tmp_path / "state" / "released").write_text("a file where the directory belongs")
    if cause == "audit":  # a log with entries whose head is gone: its chain cannot be checked, so nothing is appended
        from privacy.audit import AuditLog

        log = AuditLog(tmp_path / "state" / "audit.jsonl")
        log.append("site_started")
        log.append("site_started")
        log.head.unlink()
        lines = log.path.read_text().splitlines()
        log.path.write_text(lines[0] + "\n")  # and an entry lost
    called = []
    reply = site_policy_mod(_setup(4), ctx, lambda m, c: called.append(m))
    assert reply.has_error() and reply.error.reason.startswith("refused: "), cause
    assert {"data": "failed validation", "policy": "require-dp", "audit": "audit log",
            "release": "cannot keep a copy of the update"}.get(cause, "") in reply.error.reason
    if cause in ("data", "small"):  # one message for both: "too small" would bound the site's patient count
        from client.app import DATA_REFUSAL

        assert reply.error.reason.endswith(DATA_REFUSAL)
    assert not called  # Flower's setup did not run: the site has no part in the round
    # the same synthetic patients at a site of another machine (on this one, the first site's ledger holds them)
    monkeypatch.setenv("ONCOFED_LEDGER_INDEX", str(tmp_path / "another-machine" / "ledger-index.json"))
    ready = _context(tmp_path / "ready", _ready_site(tmp_path / "ready"))
    ready.state = RecordDict()
    ok = site_policy_mod(_setup(4), ready, lambda m, c: site_message(RecordDict()))
    assert not ok.has_error()


def test_a_deployed_site_without_its_own_budget_spends_nothing(tmp_path):
    """Taken from the run's epsilon, the budget would be the operator's to raise run by run."""
    from client.app import SiteRefusal, train
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.weights import state_arrays
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema()
    schema_path = schema.save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    run = {"schema": str(schema_path), "num-rounds": 3, "d-model": 32, "sites": 3, "min-sites": 2, "epsilon": 50.0}
    weights = state_arrays(MultiModalTransformer(schema, load_run_config(run).model))
    ctx = _context(tmp_path, run, {"require-secagg": False})
    del ctx.node_config["privacy-budget"]
    with pytest.raises(SiteRefusal, match="sets no privacy-budget"):
        train(_fit(weights), ctx)
    assert not (tmp_path / "state" / "privacy-ledger.json").exists()


def test_a_released_round_is_unmasked_in_one_sum_only(released, monkeypatch):
    """A resumed round resends the same bits: unmasked again over other sites, the two sums' difference would
    reveal single updates. The same sum again reveals nothing new."""
    import client.app
    from client.app import site_policy_mod
    from client.releases import ReleaseStore
    from shared_models.protocol import RUN_KEY, SERVER_ROUND

    tmp, schema_path, _, _ = released
    store, handed = ReleaseStore(tmp / "state"), []

    def flowers_mod(msg, ctx, call_next):  # Flower's SecAgg+ mod: where the key shares would be handed over
        handed.append(store.unmasked_with("run-X", 1))
        return Message(RecordDict(), reply_to=msg)

    monkeypatch.setattr(client.app, "secaggplus_mod", flowers_mod)

    def unmask(active):
        ctx = _context(tmp, _run(schema_path))
        ctx.state.config_records["oncofed"] = ConfigRecord({RUN_KEY: "run-X", SERVER_ROUND: 1})
        return site_policy_mod(unmask_message(active, []), ctx, None)

    assert not unmask([1, 2, 3]).has_error() and handed == [[1, 2, 3]]  # the set kept before any share leaves
    assert not unmask([3, 2, 1]).has_error() and len(handed) == 2  # the same sum again
    reply = unmask([1, 2, 4])
    assert reply.has_error() and "unmasked before in a sum over other sites" in reply.error.reason
    assert len(handed) == 2 and store.unmasked_with("run-X", 1) == [1, 2, 3]


def test_a_site_whose_update_is_not_finite_sends_nothing(tmp_path):
    """NaN would pass SecAgg+'s range check and be quantised into garbage in the sum (or, without SecAgg+, make
    the global model NaN for every site): the site refuses, saying why."""
    import numpy as np

    from client.app import SiteRefusal, train
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.weights import state_arrays
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema()
    schema_path = schema.save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    run = {"schema": str(schema_path), "num-rounds": 3, "d-model": 32, "sites": 3, "min-sites": 2, "dp": False}
    weights = state_arrays(MultiModalTransformer(schema, load_run_config(run).model))
    weights[0] = np.full_like(weights[0], np.nan)
    with pytest.raises(SiteRefusal, match="its update is not finite \\(the global weights it received are not "
                                          "finite\\): nothing was sent"):
        train(_fit(weights), _context(tmp_path, run, {"require-secagg": False, "require-dp": False}))


def test_a_site_whose_update_exceeds_the_clipping_range_names_the_range_and_the_local_recipe(tmp_path):
    """SecAgg+ would clip the update silently, so the site sends nothing. A too small range is one cause, a local
    recipe that diverges the other (a review found max-grad-norm 1 with the DP recipe's lr 100 refused at every site
    with a message that named only the range)."""
    from flwr.common import FitIns, ndarrays_to_parameters

    from client.app import SiteRefusal, train
    from privacy import secagg_masks
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.protocol import SECAGG_CLIPPING_RANGE, SECAGG_MASKS, SECAGG_MAX_WEIGHT
    from shared_models.weights import state_arrays
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema()
    schema_path = schema.save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    run = {"schema": str(schema_path), "num-rounds": 3, "d-model": 32, "sites": 3, "min-sites": 2, "dp": False}
    weights = state_arrays(MultiModalTransformer(schema, load_run_config(run).model))
    config = {SERVER_ROUND: 1, RUN_KEY: "run-X", SECAGG_MAX_WEIGHT: 2000.0, SECAGG_CLIPPING_RANGE: 1e-9,
              SECAGG_MASKS: secagg_masks.VERSION}
    fit = site_message(in_secagg(fitins_to_recorddict(FitIns(ndarrays_to_parameters(weights), config), keep_input=True)))
    with pytest.raises(SiteRefusal, match=r"its update exceeds secagg-clipping-range 1e-09 and would be clipped "
                                          r"silently: nothing was sent; the operator should raise the range, or lower "
                                          r"the run's local recipe .*\(run config lr, max-grad-norm, weight-decay"):
        train(fit, _context(tmp_path, run, {"require-secagg": False, "require-dp": False}))


def test_without_dp_a_round_is_unmasked_in_one_sum_only_too(tmp_path, monkeypatch):
    """Without DP SecAgg+ is the only protection, and a resumed round retrains the same bits (seeded training): a
    second sum over other sites would reveal, by its difference with the first, one site's update. No release is
    kept without DP, but the set each round was unmasked over is, for the newest rounds."""
    import client.app
    from client.app import site_policy_mod
    from client.releases import KEEP, ReleaseStore
    from shared_models.protocol import RUN_KEY, SERVER_ROUND
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema_path = site_schema().save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    monkeypatch.setattr(client.app, "secaggplus_mod", lambda msg, ctx, call_next: Message(RecordDict(), reply_to=msg))
    run = {"schema": str(schema_path), "num-rounds": 5, "d-model": 32, "sites": 3, "min-sites": 2, "dp": False}

    def unmask(rnd, active):
        ctx = _context(tmp_path, run, {"require-dp": False})
        ctx.state.config_records["oncofed"] = ConfigRecord({RUN_KEY: "run-X", SERVER_ROUND: rnd})
        return site_policy_mod(unmask_message(active, []), ctx, None)

    store = ReleaseStore(tmp_path / "state")
    assert not unmask(1, [1, 2, 3]).has_error() and not store.has("run-X", 1)  # no release without DP
    reply = unmask(1, [1, 2])  # the server resumed round 1 and one site dropped
    assert reply.has_error() and "unmasked before in a sum over other sites" in reply.error.reason
    for rnd in range(2, 6):
        assert not unmask(rnd, [1, 2, 3]).has_error()
    kept = sorted(p.name for p in (tmp_path / "state" / "released" / "run-X").glob("*.unmask.json"))
    assert kept == [f"round-{r:04d}.unmask.json" for r in range(6 - KEEP, 6)]  # only the newest rounds


@pytest.mark.parametrize("mode", ["distributed", "site"])
def test_a_ledger_older_than_the_sites_releases_is_not_trained_on(tmp_path, mode):
    """A ledger restored from a backup taken before a round forgets that round's spend: asked for the round again
    (a resumed server), the site would train and send a second, fresh update of the same patients and count the
    round once. Its release copy shows the round left: the site refuses, trains nothing, and its ledger is left as
    restored until a newer backup replaces it."""
    import json

    from client.app import SiteRefusal, train
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.weights import state_arrays
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema()
    schema_path = schema.save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    run = _run(schema_path, **({"dp-mode": "site", "batch-size": 32} if mode == "site" else {}))
    torch.manual_seed(0)
    weights = state_arrays(MultiModalTransformer(schema, load_run_config(run).model))
    ledger = tmp_path / "state" / "privacy-ledger.json"
    backup = None
    for rnd in (1, 2):
        if rnd == 2:
            backup = ledger.read_text()  # taken after round 1, before round 2
        assert not train(_fit(weights, rnd), _context(tmp_path, run, {"require-secagg": False})).has_error()
    sent_before = (tmp_path / "state" / "released" / "run-X" / "round-0002.npz").read_bytes()
    ledger.write_text(backup)  # the operator restores it
    with pytest.raises(SiteRefusal, match=r"no record of 1 update\(s\) the site sent \(run-X/round-0002 .* Restore a "
                       "backup of the ledger newer than the last round"):
        train(_fit(weights, 2), _context(tmp_path, run, {"require-secagg": False}))
    assert json.loads(ledger.read_text()) == json.loads(backup), "nothing was trained or spent"
    assert (tmp_path / "state" / "released" / "run-X" / "round-0002.npz").read_bytes() == sent_before


def test_a_dp_update_withheld_after_its_spend_is_recorded_as_withheld_and_the_runs_later_rounds_refused(tmp_path):
    """A refusal after the round's spend is committed (here: the update is not finite) sends nothing, yet the spend
    counts. The ledger entry says "withheld" and why. A cause the run's settings make (a review found a too small
    secagg-clipping-range withholding every round, spending each) would recur in every later round: the site
    refuses them before spending."""
    import json

    import numpy as np

    from client.app import SiteRefusal, train
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.weights import state_arrays
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema()
    schema_path = schema.save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    run = _run(schema_path, **{"dp-mode": "site", "batch-size": 32})
    weights = state_arrays(MultiModalTransformer(schema, load_run_config(run).model))
    weights[0] = np.full_like(weights[0], np.nan)
    node = {"require-secagg": False}
    with pytest.raises(SiteRefusal, match="its update is not finite"):
        train(_fit(weights), _context(tmp_path, run, node))
    [entry] = json.loads((tmp_path / "state" / "privacy-ledger.json").read_text())["entries"]
    assert entry["status"] == "committed" and entry["outcome"]["status"] == "withheld"
    assert "not finite" in entry["outcome"]["reason"]
    assert not (tmp_path / "state" / "released" / "run-X").exists()
    assert entry["outcome"]["cause"] == "run-config"
    # the run's settings (here its global weights) would withhold every later round after spending: refused first
    ledger = (tmp_path / "state" / "privacy-ledger.json").read_text()
    with pytest.raises(SiteRefusal, match="round 1 of run run-X was withheld after its spend .* the site refuses them "
                                          "before spending"):
        train(_fit(weights, 2), _context(tmp_path, run, node))
    assert (tmp_path / "state" / "privacy-ledger.json").read_text() == ledger, "nothing spent"


def test_an_update_withheld_for_a_site_local_cause_is_told_as_withheld_when_asked_again(tmp_path, monkeypatch):
    """The audit log cannot be written after the spend (a full disk): nothing is sent, the spend counts, and the
    round asked again (a resumed server) is refused as withheld, not as sent with its copy gone. A cause of the
    site's own does not bar the run's later rounds."""
    import json

    from client.app import SiteRefusal, train
    from privacy.audit import AuditLog
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.weights import state_arrays
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema()
    schema_path = schema.save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    run = _run(schema_path, **{"dp-mode": "site", "batch-size": 32})
    weights = state_arrays(MultiModalTransformer(schema, load_run_config(run).model))
    node = {"require-secagg": False}
    append = AuditLog.append

    def full_disk(self, event, **fields):
        if event == "round_trained":
            raise OSError(28, "No space left on device")
        return append(self, event, **fields)

    monkeypatch.setattr(AuditLog, "append", full_disk)
    with pytest.raises(SiteRefusal, match="its audit log cannot be written"):
        train(_fit(weights), _context(tmp_path, run, node))
    monkeypatch.setattr(AuditLog, "append", append)
    [entry] = json.loads((tmp_path / "state" / "privacy-ledger.json").read_text())["entries"]
    assert entry["outcome"]["status"] == "withheld" and "cause" not in entry["outcome"]
    with pytest.raises(SiteRefusal, match=r"round 1 of run run-X was trained before and its update withheld \(.*audit "
                                          r"log cannot be written.*\); its spend counts"):
        train(_fit(weights), _context(tmp_path, run, node))
    assert not train(_fit(weights, 2), _context(tmp_path, run, node)).has_error()  # the run goes on


def _ledger_site(tmp_path):
    from types import SimpleNamespace

    from privacy.ledger import PrivacyLedger

    state = tmp_path / "state"
    state.mkdir()
    ledger = PrivacyLedger(state / "privacy-ledger.json", budget_epsilon=8.0, delta=1e-5)
    dataset = ledger.register_dataset([f"p{i}" for i in range(50)], "schema-hash")
    return (SimpleNamespace(ledger=ledger, dataset_fingerprint=dataset),
            SimpleNamespace(name="site-a", paths=SimpleNamespace(state_dir=state)), state)


def test_an_attempt_refused_because_another_committed_the_round_does_not_mark_that_round_withheld(tmp_path):
    """Two attempts at one round (a resumed server asked again): A commits and goes on to send its update; B's commit
    is refused (AlreadyReleased). B's refusal must not note A's round as withheld: A's update leaves."""
    from client.app import SiteRefusal, _refusal, _withheld_if_refused
    from client.releases import Release, ReleaseStore
    from privacy.ledger import AlreadyReleased

    site, settings, state = _ledger_site(tmp_path)
    ledger, dataset = site.ledger, site.dataset_fingerprint
    a = ledger.begin_round(dataset, "run-1", 1, 1.1, 0.1, 10, padding_tail=0.0)
    b = ledger.begin_round(dataset, "run-1", 1, 1.1, 0.1, 10, padding_tail=0.0)  # the same pending entry: one spend for both
    ledger.commit_round(a, 10)  # A commits, then evaluates and writes its audit entry before saving its copy
    with pytest.raises(SiteRefusal):
        with _withheld_if_refused(site, settings, "run-1", 1):
            try:
                ledger.commit_round(b, 10)
            except AlreadyReleased as e:  # as client.app's training paths turn it into a refusal
                raise _refusal(None, None, settings.name, str(e), another_attempt=isinstance(e, AlreadyReleased))
    ReleaseStore(state).save("run-1", 1, Release("sha", [np.zeros(3)], 10, {}))  # A's update saved and sent
    assert "outcome" not in ledger.released(dataset, "run-1", 1) and ledger.withheld("run-1") == []


def test_a_round_committed_and_saved_while_the_site_checks_its_ledger_is_not_taken_for_a_stale_ledger(tmp_path):
    """stale_ledger_refusal compares the release copies with the ledger's committed rounds: the copies are listed
    first, so a round another process of the site commits and saves between the two reads is in both."""
    from client.releases import Release, ReleaseStore

    site, _, state = _ledger_site(tmp_path)
    ledger, dataset = site.ledger, site.dataset_fingerprint
    releases = ReleaseStore(state)

    def committed_meanwhile():  # another process commits a round and saves its copy, then the ledger is read
        ticket = ledger.begin_round(dataset, "run-2", 1, 1.1, 0.1, 10, padding_tail=0.0)
        ledger.commit_round(ticket, 10)
        releases.save("run-2", 1, Release("sha", [np.zeros(2)], 1, {}))
        return ledger.committed_rounds()

    assert releases.unrecorded(committed_meanwhile) == []
    assert releases.unrecorded(ledger.committed_rounds) == []


def test_a_released_round_the_site_cannot_resend_is_refused_at_setup_before_others_spend(released):
    """Asked again for a released round whose copy is gone or damaged, the site refused only at training, after the
    other sites of a resumed distributed round had trained and spent on a sum it would never join."""
    from client.app import site_policy_mod
    from client.releases import ReleaseStore
    from shared_models.protocol import SETUP_TERMS

    tmp, schema_path, _, _ = released

    def setup():
        msg = _setup(3)
        msg.content.config_records[SETUP_TERMS] = ConfigRecord({RUN_KEY: "run-X", SERVER_ROUND: 1})
        ctx = _context(tmp, _run(schema_path))
        ctx.state = RecordDict()
        return site_policy_mod(msg, ctx, lambda m, c: site_message(RecordDict()))

    assert not setup().has_error()  # its copy is kept: it will resend the same bits
    copy = ReleaseStore(tmp / "state")._path("run-X", 1)
    copy.write_bytes(copy.read_bytes()[:50])
    damaged = setup()
    assert damaged.has_error() and "cannot be read" in damaged.error.reason
    copy.unlink()
    gone = setup()
    assert gone.has_error() and "no copy of its update is kept" in gone.error.reason


@pytest.mark.parametrize("mode", ["site", "distributed"])
def test_a_release_copy_that_cannot_be_written_refuses_the_round_without_a_path_and_keeps_the_spend(tmp_path, mode,
                                                                                                   monkeypatch):
    """A full disk while the released update's copy was written: the OSError (with the state directory's path)
    reached the server as the ClientApp's exception. The site now refuses in words; the ledger keeps the spend."""
    import errno
    import json

    from client.app import RELEASE_UNWRITABLE, SiteRefusal, train
    from client.releases import ReleaseStore
    from privacy.ledger import read_ledger
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.weights import state_arrays
    from tests.sitefixtures import site_schema, site_tables, write_site

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "state" / "released"))
    monkeypatch.setattr(ReleaseStore, "save", disk_full)
    schema = site_schema()
    schema_path = schema.save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    run = _run(schema_path, **({"dp-mode": "site", "strategy": "fedavg"} if mode == "site" else {}))
    weights = state_arrays(MultiModalTransformer(schema, load_run_config(run).model))
    with pytest.raises(SiteRefusal) as refused:
        train(_fit(weights), _context(tmp_path, run, {"require-secagg": False}))
    assert RELEASE_UNWRITABLE in str(refused.value) and str(tmp_path) not in str(refused.value)
    (entry,) = read_ledger(tmp_path / "state" / "privacy-ledger.json")["entries"]
    assert entry["status"] == "committed"  # the steps ran: the spend is counted, though nothing was sent
    events = [json.loads(line)["event"] for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert events[-2:] == ["round_trained", "round_refused"]  # the log says the update never left


def test_an_update_beyond_the_secagg_clipping_range_is_refused_without_its_value(tmp_path):
    """The refusal reaches the server outside SecAgg+: the update's largest value, a statistic of this one site's
    update that enters no sum, stays in the site's log (secagg review, 2026-12-06)."""
    import re

    from client.app import SiteRefusal, train
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from privacy.secagg_masks import VERSION
    from shared_models.protocol import SECAGG_CLIPPING_RANGE, SECAGG_MASKS, SECAGG_MAX_WEIGHT
    from shared_models.weights import state_arrays
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema()
    schema_path = schema.save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    run = _run(schema_path, **{"dp": False, "dp-mode": "site"})
    weights = state_arrays(MultiModalTransformer(schema, load_run_config(run).model))
    content = fitins_to_recorddict(FitIns(ndarrays_to_parameters(weights), {
        SERVER_ROUND: 1, RUN_KEY: "run-X", SECAGG_MAX_WEIGHT: 1e9, SECAGG_CLIPPING_RANGE: 1e-12,
        SECAGG_MASKS: VERSION}), keep_input=True)
    with pytest.raises(SiteRefusal, match="exceeds secagg-clipping-range") as e:
        train(site_message(in_secagg(content)), _context(tmp_path, run, {"require-dp": False}))
    assert not re.search(r"update \(", str(e.value)) and not re.search(r"\d\.\d+e-\d\d\)", str(e.value))


def _sites(tmp: Path, names: str, first_nid: int, **run):
    """Deployed sites, each with a fixed update (a released round resent, or a round without DP retrained to the
    same bits), in a run without DP whose sums need min-sites 3."""
    from tests.secagg_session import Site

    rng = np.random.default_rng(first_nid)
    run = {"schema": "s.json", "min-sites": 3, "sites": 7, "dp": False, **run}
    return {n: Site(n, first_nid + i, tmp, run, rng.uniform(-0.5, 0.5, size=6).round(3)) for i, n in enumerate(names)}


def _resumed(sites: dict) -> None:
    for s in sites.values():
        s.new_session()


SENT_BEFORE = "was sent before in a SecAgg+ exchange among other sites"


@pytest.mark.parametrize("first_unmask", ["ABCD", "BCD"], ids=["all-answered", "A-crashed-before-its-unmask-reply"])
def test_a_resent_update_goes_into_no_second_sum_among_other_sites(tmp_path, first_unmask):
    """The review's F1 (exp1), through Flower's own SecAgg+ mod: round 1 is unmasked over A, B, C, D (with or without
    A's key shares); the server crashes before its checkpoint and resumes with A, E, F, G online. A's own shares are
    not needed to unmask a sum holding its update (E, F, G hold enough), so A must not send it into this exchange:
    it refuses at the collect stage, in words, and the second sum holds E, F, G only."""
    from tests.secagg_session import session

    sites = _sites(tmp_path, "ABCDEFG", 11)
    first, refused, _ = session([sites[c] for c in "ABCD"], unmask_at=[sites[c] for c in first_unmask])
    assert not refused and np.allclose(first, np.mean([sites[c].x for c in "ABCD"], axis=0), atol=1e-6)
    _resumed(sites)
    second, refused, sent = session([sites[c] for c in "AEFG"])
    assert sites["A"] not in sent and list(refused) == ["A"] and SENT_BEFORE in refused["A"]
    assert "released" not in refused["A"] and "/" not in refused["A"].split(":", 1)[1], "no path leaves the site"
    assert np.allclose(second, np.mean([sites[c].x for c in "EFG"], axis=0), atol=1e-6), "A's update is in no second sum"
    events = [json.loads(x) for x in (tmp_path / "A" / "state" / "audit.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "round_refused" and SENT_BEFORE in events[-1]["reason"]


@pytest.mark.parametrize("first_unmask", ["ABCDE", "CDE"], ids=["all-answered", "only-t-answered"])
def test_a_resumed_round_a_site_left_is_never_unmasked(tmp_path, first_unmask):
    """The review's exp8, the case docs/privacy.md named: the resumed attempt is over 4 of the first 5 sites, whose
    difference from the first sum would be the fifth site's update. No such sum is unmasked: the neighbours differ,
    so every site refuses to send into it."""
    from tests.secagg_session import session

    sites = _sites(tmp_path, "ABCDE", 51, sites=5)
    first, _, _ = session(list(sites.values()), unmask_at=[sites[c] for c in first_unmask])
    assert first is not None
    for left in "ABCDE":
        _resumed(sites)
        second, refused, sent = session([s for n, s in sites.items() if n != left])
        assert second is None and not sent and all(SENT_BEFORE in r for r in refused.values()) and len(refused) == 4


def test_a_resent_update_goes_into_the_same_exchange_again(tmp_path):
    """A resume with every site of the first attempt (a deployment's SuperLink keeps their node ids): the same
    update into the same sum again reveals nothing new, and the round is aggregated."""
    from tests.secagg_session import session

    sites = _sites(tmp_path, "ABCD", 11)
    first, _, _ = session(list(sites.values()))
    _resumed(sites)
    second, refused, sent = session(list(sites.values()))
    assert not refused and len(sent) == 4
    assert np.allclose(second, first, atol=1e-6) and np.allclose(second, np.mean([s.x for s in sites.values()], axis=0), atol=1e-6)


def test_a_resend_needs_a_threshold_the_sites_that_gave_no_shares_cannot_reach(tmp_path):
    """secagg-threshold 0.5 (which the run config accepts): among the same 4 sites, the 2 that gave no key shares for
    the first sum would be enough to unmask a second one holding the resent update, so the sites send nothing."""
    from tests.secagg_session import session

    sites = _sites(tmp_path, "ABCD", 11, **{"min-sites": 2})
    assert session(list(sites.values()), unmask_at=[sites["A"], sites["B"]], threshold=0.5)[0] is not None
    _resumed(sites)
    second, refused, sent = session(list(sites.values()), threshold=0.5)
    assert second is None and not sent and all("or with a higher threshold" in r for r in refused.values())


def test_a_damaged_record_of_the_sum_a_round_was_unmasked_in_refuses_rather_than_reads_as_none(tmp_path, monkeypatch):
    """The review's F2 (exp6): a record that cannot be read (a bad sector, a truncated restore), read as "never
    unmasked", would let the site give key shares for another sum and overwrite the record. Only a missing record
    means that; a damaged one refuses, in words, and stays as it is."""
    import client.app
    from client.app import site_policy_mod

    handed = []
    monkeypatch.setattr(client.app, "secaggplus_mod", lambda m, c, n: (handed.append(m), Message(RecordDict(),
                                                                                                  reply_to=m))[1])
    (site := _sites(tmp_path, "A", 1)["A"]).context.state.config_records["oncofed"] = ConfigRecord(
        {RUN_KEY: "run-X", SERVER_ROUND: 1})
    assert not site_policy_mod(unmask_message([1, 2, 3], []), site.context, None).has_error() and len(handed) == 1
    path = tmp_path / "A" / "state" / "released" / "run-X" / "round-0001.unmask.json"
    path.write_text(damaged := path.read_text()[:-3])
    reply = site_policy_mod(unmask_message([1, 2, 4], []), site.context, None)
    assert reply.has_error() and "the record of the sum this round was unmasked in cannot be read" in reply.error.reason
    assert "released" not in reply.error.reason and len(handed) == 1 and path.read_text() == damaged


def test_a_damaged_record_of_the_exchange_a_round_was_sent_in_refuses_rather_than_reads_as_none(tmp_path):
    """The same for the record of the SecAgg+ neighbours a round's update was sent among: damaged, the site sends
    nothing in the round (read as "never sent", a resend among other sites would go into a second sum)."""
    from tests.secagg_session import session

    sites = _sites(tmp_path, "ABCD", 11)
    assert session(list(sites.values()))[0] is not None
    path = tmp_path / "A" / "state" / "released" / "run-X" / "round-0001.secagg.json"
    path.write_text(damaged := path.read_text()[:-3])
    _resumed(sites)
    _, refused, sent = session(list(sites.values()))
    assert "the record of the SecAgg+ exchange this round's update was sent in before cannot be read" in refused["A"]
    assert "released" not in refused["A"] and sites["A"] not in sent and path.read_text() == damaged


def test_the_one_exchange_record_is_kept_before_the_round_trains_and_dropped_if_nothing_left(tmp_path, monkeypatch):
    """The neighbours a round's update is sent among are kept before the round trains (under DP: spends), so a record
    that cannot be written refuses the round with nothing spent, not an update already paid for (review of
    2026-12-06); an attempt refused or failed at the site drops its record, which must not bind a later attempt to
    sites that never received anything."""
    import re

    from client.app import ONE_SUM_RECORD_UNWRITABLE, SiteRefusal, _into_one_exchange
    from client.releases import ReleaseStore
    from privacy.run_config import load_run_config

    run = {"schema": "s.json", "min-sites": 2, "sites": 3, "dp": False}
    cfg, trained = load_run_config(run), []

    def train(msg, context):
        trained.append(1)
        raise SiteRefusal("refused: the round's own checks")

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ReleaseStore, "record_sent", full)
    with pytest.raises(SiteRefusal, match=re.escape(ONE_SUM_RECORD_UNWRITABLE)):
        _into_one_exchange(cfg, train)(_fit([np.zeros(3)]), _context(tmp_path, run))
    assert trained == []  # refused before training: nothing trained, nothing spent
    monkeypatch.undo()
    with pytest.raises(SiteRefusal, match="the round's own checks"):
        _into_one_exchange(cfg, train)(_fit([np.zeros(3)]), _context(tmp_path, run))
    assert trained == [1] and ReleaseStore(tmp_path / "state").sent_among("run-X", 1) is None  # nothing left


def test_a_round_killed_before_its_update_left_is_retried_and_one_that_left_still_binds(tmp_path):
    """The review of 2026-12-06 (D4): the neighbours were kept before training and dropped only on a handled error, so
    a site killed mid-training refused every retry of the round ("sent before in a SecAgg+ exchange among other
    sites") though nothing had left it. A record whose process is gone and which was never marked as leaving binds
    nothing; one marked as leaving, or whose attempt may still be training, binds as before."""
    import os
    import subprocess
    import sys

    from client.app import SiteRefusal, _into_one_exchange
    from client.releases import ReleaseStore
    from privacy.run_config import load_run_config

    run = {"schema": "s.json", "min-sites": 2, "sites": 3, "dp": False}
    cfg, trained, store = load_run_config(run), [], ReleaseStore(tmp_path / "state")

    def train(msg, context):
        trained.append(1)
        return Message(RecordDict(), reply_to=msg)

    def among(neighbours):
        context = _context(tmp_path, run)
        context.state.config_records[RECORD_KEY_STATE]["public_keys_dict:K"] = neighbours
        context.state.config_records[RECORD_KEY_STATE]["threshold"] = 2
        return context

    killed = ("import os, sys; from client.releases import ReleaseStore; "  # kept before training, then SIGKILL
              "ReleaseStore(sys.argv[1]).record_sent('run-X', 1, [1, 2, 3], 2); os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", killed, str(tmp_path / "state")], cwd=Path(__file__).parents[1],
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}, check=False)
    assert (tmp_path / "state" / "released" / "run-X" / "round-0001.secagg.json").exists()
    assert not _into_one_exchange(cfg, train)(_fit([np.zeros(3)]), among([1, 2, 4])).has_error()
    assert trained == [1] and store.sent_among("run-X", 1) == ([1, 2, 4], 2)
    with pytest.raises(SiteRefusal, match="was sent before in a SecAgg\\+ exchange among other sites"):
        _into_one_exchange(cfg, train)(_fit([np.zeros(3)]), among([1, 2, 3]))  # it left: it binds
    store.record_sent("run-X", 2, [1, 2, 3], 2)  # an attempt still training (this process): it may yet send
    with pytest.raises(SiteRefusal, match="was sent before in a SecAgg\\+ exchange among other sites"):
        _into_one_exchange(cfg, train)(_fit([np.zeros(3)], rnd=2), among([1, 2, 4]))
    assert trained == [1]
