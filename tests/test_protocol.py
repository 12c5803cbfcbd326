"""The contract between the server and the sites (shared_models/protocol.py): the model package keeps the
bytes earlier runs signed, each side uses the same names, and only allow-listed metrics leave a site or
enter the server's records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from shared_models.protocol import (ARRAYS_RECORD, AUDIT_HEAD, CONFIG_RECORD, EVALUATE_METRICS, FIT_METRICS,
                                    PACKAGE_INFO, REPLY, SAVE_MODEL, DeliveryReply, ModelPackage, allowed_metrics)
from tests.factories import site_message


def _old_package(distributed: bool) -> dict:
    """The package as server/app.py built it before ModelPackage (a dict literal), values of a real run."""
    return {"run": "demo-1a2b3c4d", "round": 3, "schema_hash": "ab" * 32, "arrays_sha256": "cd" * 32,
            "strategy": "fedadam", "secagg": True, "dp": True, "site_epsilon": {"site_00": 2.71, "site_01": 2.69},
            "delta": 1e-05,
            **({"dp_mode": "distributed", "trusted_sites": 2, "mechanism": "skellam",
                "site_epsilon_worst_case": {"site_00": 5.2, "site_01": 5.1}} if distributed else {}),
            "privacy": "dp-mode site: each site's update is DP on its own",
            "metrics": {"loss": 0.91, "accuracy": 0.7, "balanced_accuracy": None, "macro_f1": 0.66}}


@pytest.mark.parametrize("distributed", [False, True])
def test_the_typed_package_is_byte_identical_to_the_old_dict_and_old_signatures_verify(tmp_path, distributed):
    from privacy.signing import generate_signing_key, load_private, load_public, sign, verify

    old = _old_package(distributed)
    extra = {k: old[k] for k in ("dp_mode", "trusted_sites", "mechanism", "site_epsilon_worst_case") if k in old}
    built = ModelPackage(run=old["run"], round=old["round"], schema_hash=old["schema_hash"],
                         arrays_sha256=old["arrays_sha256"], strategy=old["strategy"], secagg=old["secagg"],
                         dp=old["dp"], site_epsilon=old["site_epsilon"], delta=old["delta"], **extra,
                         privacy=old["privacy"], metrics=old["metrics"]).description()
    assert json.dumps(built) == json.dumps(old), "the package-info a site receives is unchanged, key order included"
    generate_signing_key(tmp_path / "k", tmp_path / "k.pub")
    signed = sign(old, load_private(tmp_path / "k"))  # a package of an earlier run
    parsed = ModelPackage.parse(json.loads(json.dumps(signed)))
    assert parsed.schema_hash == old["schema_hash"] and parsed.round == 3 and parsed.signature == signed["signature"]
    verify(parsed.model_dump(exclude_unset=True), load_public(tmp_path / "k.pub"))  # nothing lost in the parse


def test_a_package_without_its_hashes_is_named_not_a_model_package():
    with pytest.raises(ValueError, match=r"not a model package: schema_hash: Field required; arrays_sha256: Field"):
        ModelPackage.parse({"run": "r", "round": 1})
    with pytest.raises(ValueError, match="not a model package: package: Input should be"):
        ModelPackage.parse(["not", "an", "object"])


def test_a_delivery_reply_keeps_its_json_and_the_server_reads_it_back():
    installed = DeliveryReply(site="s", installed=True, version="v0001", arrays_sha256="ab")
    installed.audit_head = "h"
    assert installed.to_json() == json.dumps({"site": "s", "installed": True, "version": "v0001",
                                              "arrays_sha256": "ab", "audit_head": "h"})
    refused = DeliveryReply(site="s", installed=False, error="bad", active="")
    assert refused.to_json() == json.dumps({"site": "s", "installed": False, "error": "bad", "active": ""})

    from server.delivery import _reply

    class Reply:
        def __init__(self, text):
            self.content = RecordDict({CONFIG_RECORD: ConfigRecord({REPLY: text})})

        def has_error(self):
            return False

    assert _reply(Reply(installed.to_json())) == json.loads(installed.to_json())
    garbled = _reply(Reply('{"installed": "perhaps"}'))
    assert garbled["installed"] is False and garbled["error"].startswith("the site's reply is not a delivery reply")


def test_only_allow_listed_metrics_leave_a_site_or_enter_the_servers_round_record():
    from client.app import sent_metrics
    from server.strategy import build_strategy
    from privacy.run_config import load_run_config

    kept, left_out = allowed_metrics({"epsilon": 1.0, "patient_id": "P001", "site": "s"}, FIT_METRICS)
    assert kept == {"epsilon": 1.0, "site": "s"} and left_out == ["patient_id"]
    assert sent_metrics({"loss": 0.5, "val_rows": 12.0}, EVALUATE_METRICS, "s") == {"loss": 0.5}

    cfg = load_run_config({"schema": "s.json", "dp": False})
    weights = [np.zeros(3, np.float32)]
    strategy = build_strategy(cfg, weights, 2, {})
    strategy.sampled = {1, 2}

    class Proxy:
        def __init__(self, node_id):
            self.node_id = node_id

    results = [(Proxy(i), FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([np.ones(3)]), 10,
                                 {"site": f"s{i}", AUDIT_HEAD: "h", "train_loss": 0.5, "leak": 3.0}))
               for i in (1, 2)]
    strategy.aggregate_fit(1, results, [])
    assert strategy.round_info["sites"]["1"] == {"site": "s1", AUDIT_HEAD: "h", "train_loss": 0.5}


def test_one_sites_text_where_a_number_belongs_is_left_out_naming_the_node_and_the_round_goes_on(caplog):
    """A site sent epsilon "garbage": the ServerApp stopped with a ValueError after SecAgg+ had unmasked the round's
    sum and every site had evaluated, before the checkpoint, and again at every resume (the site resends its saved
    release with the same metrics); the error named no node. Every metric is now checked for its kind where it
    enters: the value is left out, the node named, and the round, its training and evaluation means and the sites'
    epsilon records go on."""
    import logging

    from flwr.common import EvaluateRes

    from privacy.run_config import load_run_config
    from server.app import keep_site_epsilons
    from server.strategy import build_strategy

    assert allowed_metrics({"epsilon": "garbage", "site": 3, "train_loss": float("nan"), "resent": True},
                           FIT_METRICS) == ({}, ["epsilon (a str, not a number)", "resent (a bool, not a number)",
                                                 "site (a int, not text)", "train_loss (a float, not a number)"])
    # an epsilon may be +inf (no finite epsilon proven, e.g. a worst case): said as such, never dropped, which left
    # the server an earlier round's finite value (a review of this check, 2026-12-06); NaN and -inf are no epsilon
    inf = float("inf")
    assert allowed_metrics({"epsilon_worst_case": inf, "epsilon": inf, "run_epsilon": inf, "accuracy": inf},
                           EVALUATE_METRICS) == ({"epsilon_worst_case": inf, "epsilon": inf, "run_epsilon": inf},
                                                 ["accuracy (a float, not a number)"])
    assert allowed_metrics({"epsilon": -inf, "run_epsilon": float("nan")}, FIT_METRICS)[0] == {}
    records = {"epsilon_worst_case": {"s1": 61.2}}
    keep_site_epsilons({"sites": {"1": {"epsilon_worst_case": inf}}}, {"1": "s1"}, records)
    assert records == {"epsilon_worst_case": {"s1": inf}}
    cfg = load_run_config({"schema": "s.json", "dp": False})
    strategy = build_strategy(cfg, [np.zeros(3, np.float32)], 2, {})
    strategy.sampled = {1, 2}

    class Proxy:
        def __init__(self, node_id):
            self.node_id = node_id

    bad = {"site": "s2", "epsilon": "garbage", "run_epsilon": "x", "train_loss": "x"}
    results = [(Proxy(1), FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([np.ones(3)]), 10,
                                 {"site": "s1", "epsilon": 1.5, "run_epsilon": 1.5, "train_loss": 0.5})),
               (Proxy(2), FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([np.ones(3)]), 10, bad))]
    with caplog.at_level(logging.WARNING):
        params, fit_means = strategy.aggregate_fit(1, results, [])
    assert params is not None and fit_means == {"train_loss": 0.5}
    assert "node 2 sent metrics" in caplog.text and "epsilon (a str, not a number)" in caplog.text
    records = {"epsilon": {}, "run_epsilon": {}, "epsilon_worst_case": {}}
    keep_site_epsilons(strategy.round_info, {"1": "s1", "2": "s2"}, records)
    assert records["epsilon"] == {"s1": 1.5} and records["run_epsilon"] == {"s1": 1.5}
    evals = [(Proxy(1), EvaluateRes(Status(Code.OK, "ok"), 0.4, 10, {"site": "s1", "accuracy": 0.8})),
             (Proxy(2), EvaluateRes(Status(Code.OK, "ok"), 0.4, 10, {"site": "s2", "accuracy": "x"}))]
    _, eval_means = strategy.aggregate_evaluate(1, evals, [])
    assert eval_means["accuracy"] == 0.8


def _save_model_message(package: dict, arrays: list[np.ndarray]) -> Message:
    content = RecordDict({ARRAYS_RECORD: ArrayRecord(numpy_ndarrays=arrays),
                          CONFIG_RECORD: ConfigRecord({PACKAGE_INFO: json.dumps(package)})})
    return site_message(content, f"{MessageType.QUERY}.{SAVE_MODEL}")


def _signing_site(tmp_path):
    """A deployed site that trusts tmp_path/k.pub (its signing key tmp_path/k): (schema, run config, a model's
    arrays, the ClientApp's context)."""
    from privacy.run_config import load_run_config
    from privacy.signing import generate_signing_key
    from shared_models.model import MultiModalTransformer
    from shared_models.weights import state_arrays
    from tests.sitefixtures import site_schema

    schema = site_schema()
    schema_path = schema.save(tmp_path / "schema.json")
    generate_signing_key(tmp_path / "k", tmp_path / "k.pub")
    run = {"schema": str(schema_path), "min-sites": 2}
    arrays = state_arrays(MultiModalTransformer(schema, load_run_config(run).model))
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run,
                  node_config={"data-path": str(tmp_path / "site"), "state-dir": str(tmp_path / "state"),
                               "signing-public-key": str(tmp_path / "k.pub")})
    return schema, run, arrays, ctx


def test_a_site_installs_a_signed_package_and_refuses_one_that_is_not_a_package(tmp_path):
    from client.app import save_model
    from privacy.run_config import load_run_config
    from privacy.signing import load_private, sign
    from shared_models.weights import arrays_sha256

    schema, run, arrays, ctx = _signing_site(tmp_path)
    package = sign(ModelPackage(run="r-1", round=2, schema_hash=schema.content_hash(),
                                arrays_sha256=arrays_sha256(arrays)).description(), load_private(tmp_path / "k"))

    reply = json.loads(str(save_model(_save_model_message(package, arrays), ctx).content[CONFIG_RECORD][REPLY]))
    assert reply["installed"] and reply["version"] == "v0001" and reply["audit_head"]
    stored = json.loads((tmp_path / "state" / "models" / "v0001" / "package.json").read_text())
    assert stored["delivery"] == package, "the package is stored as signed: re-verifiable later"

    unsigned_fields = {k: v for k, v in package.items() if k != "schema_hash"}
    reply = json.loads(str(save_model(_save_model_message(unsigned_fields, arrays), ctx).content[CONFIG_RECORD][REPLY]))
    assert not reply["installed"] and reply["active"] == "v0001"
    assert reply["error"].startswith("not a model package: schema_hash: Field required")
    events = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["run"], e["round"]) for e in events] == [("model_installed", "r-1", 2),
                                                                    ("model_refused", None, None)]

    # the model is built from the architecture the server signed, not from whatever the site's config says
    from shared_models.weights import read_weights

    signed = {**load_run_config(run).model.model_dump(), "wide_gain": 2.5}
    package = sign(ModelPackage(run="r-2", round=2, schema_hash=schema.content_hash(), arrays_sha256=arrays_sha256(
        arrays), architecture=signed).description(), load_private(tmp_path / "k"))
    reply = json.loads(str(save_model(_save_model_message(package, arrays), ctx).content[CONFIG_RECORD][REPLY]))
    assert reply["installed"], reply
    assert read_weights(tmp_path / "state" / "models" / reply["version"] / "weights.pt")["config"]["wide_gain"] == 2.5


def test_a_sites_delivery_reply_names_no_path_of_its_machine_only_what_was_installed(tmp_path):
    """The reply to a delivery carried the installed version's directory on the site's machine (simulations read
    it): the server learnt the site's file layout for nothing. It carries what was installed (version, SHA-256) and
    whether; a path an earlier site still sends is not recorded by the server."""
    from client.app import save_model
    from privacy.signing import load_private, sign
    from server.delivery import _reply
    from shared_models.weights import arrays_sha256

    schema, _, arrays, ctx = _signing_site(tmp_path)
    package = sign(ModelPackage(run="r-1", round=2, schema_hash=schema.content_hash(),
                                arrays_sha256=arrays_sha256(arrays)).description(), load_private(tmp_path / "k"))
    text = str(save_model(_save_model_message(package, arrays), ctx).content[CONFIG_RECORD][REPLY])
    reply = json.loads(text)
    assert str(tmp_path) not in text and "path" not in reply
    assert reply["installed"] and reply["version"] == "v0001" and reply["arrays_sha256"] == package["arrays_sha256"]

    class Earlier:  # a site of an earlier version, which still names the path
        content = {CONFIG_RECORD: {REPLY: json.dumps({**reply, "path": str(tmp_path / "state" / "models" / "v0001")})}}

        def has_error(self):
            return False

    assert "path" not in _reply(Earlier()) and _reply(Earlier())["version"] == "v0001"


def test_a_simulation_finds_a_sites_model_store_where_the_simulated_site_keeps_it(tmp_path):
    """With no path in the delivery reply, `oncofed simulate` and `oncofed experiment` find the installed model
    where the simulated site's ClientApp put its model store (its settings from the same run config)."""
    from client.app import site_settings
    from privacy.run_config import load_run_config
    from shared_models.run_config import app_defaults
    from simulations.federation import ROOT, site_model_dir

    manifest = {"sites": [{"name": "C0", "dir": "c0"}, {"name": "C1", "dir": "c1"}]}
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "manifest.json").write_text(json.dumps(manifest))
    for run in ({"data-root": str(tmp_path / "sites"), "site-state-root": str(tmp_path / "state")},
                {"data-root": str(tmp_path / "sites")}):  # the default: data-root/state
        ctx = Context(run_id=1, node_id=2, state=RecordDict(), run_config=run, node_config={"partition-id": 1})
        as_flower_merges_it = load_run_config({**app_defaults(ROOT), **run})
        assert site_model_dir(run, manifest, "C1") == site_settings(ctx, as_flower_merges_it).paths.model_dir
    assert site_model_dir(run, manifest, "C1") == tmp_path / "sites" / "state" / "C1" / "models"


def test_a_site_whose_disk_is_full_refuses_the_model_in_its_reply_and_audit_log_keeping_the_active_one(tmp_path,
                                                                                                     monkeypatch):
    """A full disk (or a read-only model-dir) while a delivered model is written: the site answers the server that it
    did not install it, naming the directory and the fix, writes `model_refused`, leaves no half-written copy and
    keeps the active model; before, the OSError escaped the handler (no reply, no audit entry)."""
    import client.model_store as model_store
    from client.app import save_model
    from privacy.signing import load_private, sign
    from shared_models.weights import arrays_sha256

    schema, run, arrays, ctx = _signing_site(tmp_path)

    def package(run_key: str) -> dict:
        return sign(ModelPackage(run=run_key, round=2, schema_hash=schema.content_hash(),
                                 arrays_sha256=arrays_sha256(arrays)).description(), load_private(tmp_path / "k"))

    def deliver(run_key: str) -> dict:
        return json.loads(str(save_model(_save_model_message(package(run_key), arrays), ctx)
                              .content[CONFIG_RECORD][REPLY]))

    assert deliver("r-1")["version"] == "v0001"
    real_save = model_store.save_weights

    def disk_full(model, path, **kw):
        real_save(model, path, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_store, "save_weights", disk_full)
    reply = deliver("r-2")
    assert not reply["installed"] and reply["active"] == "v0001"
    assert "model-dir" in reply["error"] and "No space left on device" in reply["error"]
    assert str(tmp_path) not in reply["error"]  # the reply goes to the server: no path of the site's
    models = tmp_path / "state" / "models"
    assert sorted(p.name for p in models.iterdir() if p.is_dir()) == ["v0001"]
    events = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["run"]) for e in events][-1] == ("model_refused", "r-2")


def test_the_last_rounds_outcome_reaches_the_sites_ledger_with_the_model_or_without_one(tmp_path):
    """No next round carries the last round's outcome: the model delivery does (and `query.round_outcome` when no
    model is delivered). A DP site notes an abandoned last round on that round's ledger entry, found by run key and
    round without loading the site's data; its spend is unchanged; another run's note or "updated" touches nothing."""
    from client.app import round_outcome, save_model
    from privacy.accounting import noise_multiplier_for
    from privacy.ledger import PrivacyLedger
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.protocol import PREVIOUS_ROUND, ROUND_OUTCOME, RUN_KEY
    from shared_models.weights import arrays_sha256, state_arrays
    from tests.sitefixtures import site_schema

    schema = site_schema()
    run = {"schema": str(schema.save(tmp_path / "schema.json")), "min-sites": 2, "epsilon": 8.0}
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run,
                  node_config={"data-path": str(tmp_path / "site"), "state-dir": str(tmp_path / "state")})
    ledger = PrivacyLedger(tmp_path / "state" / "privacy-ledger.json", budget_epsilon=8.0, delta=1e-5)
    dataset = ledger.register_dataset([f"p{i}" for i in range(50)], schema.content_hash())
    sigma = noise_multiplier_for(8.0, 1e-5, 0.3, 60)
    for rnd in (1, 2):
        ledger.commit_round(ledger.begin_round(dataset, "r-1", rnd, sigma, 0.3, 3, padding_tail=0.0), 3)
    spent = ledger.spent(dataset)

    def outcome(rnd, status, run_key="r-1"):
        return {PREVIOUS_ROUND: json.dumps({"round": rnd, "status": status, "reason": "2 sites sent masked vectors"}),
                RUN_KEY: run_key}

    def entries():
        return {e["round"]: e for e in json.loads(ledger.path.read_text())["entries"]}

    arrays = state_arrays(MultiModalTransformer(schema, load_run_config(run).model))
    package = ModelPackage(run="r-1", round=2, schema_hash=schema.content_hash(), arrays_sha256=arrays_sha256(arrays))
    message = site_message(RecordDict({
        ARRAYS_RECORD: ArrayRecord(numpy_ndarrays=arrays),
        CONFIG_RECORD: ConfigRecord({PACKAGE_INFO: json.dumps(package.description()), **outcome(2, "abandoned")})}),
        f"{MessageType.QUERY}.{SAVE_MODEL}")
    reply = json.loads(str(save_model(message, ctx).content[CONFIG_RECORD][REPLY]))
    assert reply["installed"], reply
    assert entries()[2]["outcome"]["status"] == "abandoned" and "masked" in entries()[2]["outcome"]["reason"]
    assert "outcome" not in entries()[1] and ledger.spent(dataset) == spent

    for config in (outcome(1, "updated"), outcome(1, "abandoned", run_key="another-run")):
        round_outcome(site_message(RecordDict({CONFIG_RECORD: ConfigRecord(config)}),
                                   f"{MessageType.QUERY}.{ROUND_OUTCOME}"), ctx)
        assert "outcome" not in entries()[1]
    round_outcome(site_message(RecordDict({CONFIG_RECORD: ConfigRecord(outcome(1, "abandoned"))}),
                               f"{MessageType.QUERY}.{ROUND_OUTCOME}"), ctx)
    assert entries()[1]["outcome"]["status"] == "abandoned" and ledger.spent(dataset) == spent
    events = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    # every abandoned round the server tells of is in the audit log, `spent` when the site's update for it had left
    assert [(e["run"], e["round"], e["spent"]) for e in events if e["event"] == "round_abandoned"] == [
        ("r-1", 2, True), ("another-run", 1, False), ("r-1", 1, True)]


def test_the_model_is_kept_with_the_normalisation_its_run_trained_with_not_one_fitted_at_delivery(tmp_path):
    """A site whose tables were refreshed between its last round and the delivery (a SuperNode restarted, `oncofed
    deliver` days later) keeps with the version the statistics its patients were trained with in the run; a run the
    site trained no round of gets none (served with the site's state normalizer.json)."""
    import client.app as capp
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.protocol import RUN_KEY, SERVER_ROUND
    from shared_models.site_data import Normalizer
    from shared_models.weights import arrays_sha256, state_arrays
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema()
    run = {"schema": str(schema.save(tmp_path / "schema.json")), "min-sites": 2, "dp": False, "d-model": 32,
           "num-rounds": 1}
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run, node_config={
        "data-path": str(tmp_path / "site"), "state-dir": str(tmp_path / "state"), "require-dp": False,
        "require-secagg": False})
    arrays = state_arrays(MultiModalTransformer(schema, load_run_config(run).model))
    fit = site_message(fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), {SERVER_ROUND: 1, RUN_KEY: "r-1"}),
                                            True))
    assert not capp.train(fit, ctx).has_error()
    trained_with = Normalizer.load(tmp_path / "state" / "normalizer.json", schema)

    capp._PREPARED.clear()  # the SuperNode restarted; the hospital re-exported its expression table
    refreshed = site_tables(n_per_class=20)
    refreshed["expr"].iloc[:, 1:] = refreshed["expr"].iloc[:, 1:] * 2.0 + 1.5
    write_site(tmp_path / "site", refreshed)

    def deliver(run_key: str) -> dict:
        package = ModelPackage(run=run_key, round=1, schema_hash=schema.content_hash(),
                               arrays_sha256=arrays_sha256(arrays)).description()
        return json.loads(str(capp.save_model(_save_model_message(package, arrays), ctx)
                              .content[CONFIG_RECORD][REPLY]))

    reply = deliver("r-1")
    models = tmp_path / "state" / "models"
    kept = Normalizer.load(models / reply["version"] / "normalizer.json", schema)
    assert np.array_equal(kept.mean, trained_with.mean) and np.array_equal(kept.scale, trained_with.scale)
    reply = deliver("r-never-trained")
    assert reply["installed"] and not (models / reply["version"] / "normalizer.json").exists()


def test_a_site_that_requires_dp_neither_scores_nor_prepares_its_data_for_a_run_without_dp(tmp_path):
    """require-dp: a run with dp = false is refused for training, and its evaluation gets nothing either (held-out
    metrics computed on inputs normalised with the training patients' statistics, sent without any DP mechanism);
    the site's tables are not even read for such a run (its state normalizer.json is not rewritten)."""
    import client.app as capp
    from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import (evaluateins_to_recorddict, fitins_to_recorddict,
                                                       recorddict_to_evaluateres)
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.protocol import RUN_KEY, SERVER_ROUND
    from shared_models.weights import state_arrays
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema()
    run = {"schema": str(schema.save(tmp_path / "schema.json")), "min-sites": 2, "dp": False, "d-model": 32}
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run, node_config={
        "data-path": str(tmp_path / "site"), "state-dir": str(tmp_path / "state"), "require-secagg": False})
    parameters = ndarrays_to_parameters(state_arrays(MultiModalTransformer(schema, load_run_config(run).model)))
    with pytest.raises(capp.SiteRefusal, match="require-dp allows only DP-SGD"):
        capp.train(site_message(fitins_to_recorddict(FitIns(parameters, {SERVER_ROUND: 1, RUN_KEY: "r-1"}), True)),
                   ctx)
    reply = capp.evaluate(site_message(evaluateins_to_recorddict(EvaluateIns(parameters, {SERVER_ROUND: 1}), True),
                                       MessageType.EVALUATE), ctx)
    res = recorddict_to_evaluateres(reply.content)
    assert res.num_examples == 0 and res.metrics == {}
    assert not (tmp_path / "state" / "normalizer.json").exists()


def test_a_non_finite_evaluation_loss_is_sent_as_it_is_not_as_0(tmp_path):
    """The metric-kind check leaves a NaN loss out of the metrics; Flower's own loss field was then built from what
    was left, 0.0 with the site's full patient weight, and the run's global loss looked better for a diverged model
    (a review, 2026-12-06). The field carries the loss as computed."""
    import math

    import torch

    import client.app as capp
    from flwr.common import EvaluateIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import evaluateins_to_recorddict, recorddict_to_evaluateres
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.protocol import SERVER_ROUND
    from shared_models.weights import state_arrays
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema()
    run = {"schema": str(schema.save(tmp_path / "schema.json")), "min-sites": 2, "dp": False, "d-model": 32}
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run, node_config={
        "data-path": str(tmp_path / "site"), "state-dir": str(tmp_path / "state"), "require-secagg": False,
        "require-dp": False})
    model = MultiModalTransformer(schema, load_run_config(run).model)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))  # a diverged global model
    reply = capp.evaluate(site_message(evaluateins_to_recorddict(
        EvaluateIns(ndarrays_to_parameters(state_arrays(model)), {SERVER_ROUND: 1}), True), MessageType.EVALUATE), ctx)
    res = recorddict_to_evaluateres(reply.content)
    assert res.num_examples > 0 and math.isnan(res.loss), (res.num_examples, res.loss, res.metrics)
    assert "loss" not in res.metrics  # left out of the checked metrics, named in the site's log


def test_an_abandoned_round_is_never_said_unused_when_the_site_gave_key_shares_for_its_sum(tmp_path, caplog):
    """The review of 2026-12-06 (D2): a server whose checkpoint write failed after round 2's sum was unmasked and
    aggregated abandoned round 2 on resume, and every site wrote "the update this site sent for it was never used"
    in its log and ledger. A site cannot know that; it knows whether it gave its key shares for the round's sum,
    and says so (ledger outcome and audit log `shares_given`), never that the update was unused."""
    from client.app import round_outcome
    from client.releases import ReleaseStore
    from privacy.ledger import PrivacyLedger
    from shared_models.protocol import PREVIOUS_ROUND, ROUND_OUTCOME, RUN_KEY
    from tests.sitefixtures import site_schema

    run = {"schema": str(site_schema().save(tmp_path / "schema.json")), "min-sites": 2, "epsilon": 8.0}
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run,
                  node_config={"data-path": str(tmp_path / "site"), "state-dir": str(tmp_path / "state")})
    ledger = PrivacyLedger(tmp_path / "state" / "privacy-ledger.json", budget_epsilon=8.0, delta=1e-5)
    for rnd in (1, 2):
        ledger.commit_round(ledger.begin_round("dataset-a", "r-1", rnd, 1.5, 0.3, 3, padding_tail=0.0), 3)
    ReleaseStore(tmp_path / "state").record_unmask("r-1", 2, [1, 2, 3])  # its shares went to round 2's sum
    with caplog.at_level("WARNING"):
        for rnd in (1, 2):
            config = {PREVIOUS_ROUND: json.dumps({"round": rnd, "status": "abandoned", "reason": "resumed"}),
                      RUN_KEY: "r-1"}
            round_outcome(site_message(RecordDict({CONFIG_RECORD: ConfigRecord(config)}),
                                       f"{MessageType.QUERY}.{ROUND_OUTCOME}"), ctx)
    outcomes = {e["round"]: e["outcome"] for e in json.loads(ledger.path.read_text())["entries"]}
    assert (outcomes[1]["shares_given"], outcomes[2]["shares_given"]) == (False, True)
    events = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert [(e["round"], e["spent"], e["shares_given"]) for e in events if e["event"] == "round_abandoned"] == [
        (1, True, False), (2, True, True)]
    assert "never used" not in caplog.text and "gave its key shares for the round's sum" in caplog.text


def test_an_abandoned_round_is_said_once_though_the_message_it_was_noted_with_lost_its_state(tmp_path):
    """The review of 2026-12-06 (D5): the rounds already noted were kept only in the message's state, which Flower
    does not keep for a message that was refused; the next message said the same abandoned round again."""
    from flwr.common import EvaluateIns
    from flwr.compat.common.recorddict_compat import evaluateins_to_recorddict

    from client.app import evaluate
    from shared_models.protocol import PREVIOUS_ROUND, RUN_KEY, SERVER_ROUND
    from tests.sitefixtures import site_schema

    run = {"schema": str(site_schema().save(tmp_path / "schema.json")), "min-sites": 2, "dp": False}
    abandoned = json.dumps({"round": 1, "status": "abandoned", "reason": "SecAgg+ halted in round 1"})
    for _ in range(2):  # each with a state of its own: the first's was not kept
        ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run,
                      node_config={"data-path": str(tmp_path / "site"), "state-dir": str(tmp_path / "state")})
        config = {RUN_KEY: "r-1", SERVER_ROUND: 1, PREVIOUS_ROUND: abandoned}
        evaluate(site_message(evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters([np.zeros(2)]), config),
                                                        True), MessageType.EVALUATE), ctx)
    events = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert [(e["run"], e["round"]) for e in events if e["event"] == "round_abandoned"] == [("r-1", 1)]


def test_a_site_says_in_its_log_and_audit_log_that_a_round_was_abandoned_with_the_first_message_after_it(tmp_path,
                                                                                                        caplog):
    """A site that spent nothing on an abandoned round (it refused, the round ended before anyone trained, a run
    without DP) heard of it nowhere: only a DP site's ledger entry recorded an abandonment, at the next round. Now
    whichever message comes first (the round's evaluation, the next round's SecAgg+ setup) puts the server's reason
    in the site's log and audit log, once however many messages repeat it."""
    from flwr.common import EvaluateIns, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
    from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
    from flwr.compat.common.recorddict_compat import evaluateins_to_recorddict

    from client.app import evaluate, site_policy_mod
    from shared_models.protocol import PREVIOUS_ROUND, RUN_KEY, SERVER_ROUND, SETUP_TERMS
    from tests.sitefixtures import site_schema

    run = {"schema": str(site_schema().save(tmp_path / "schema.json")), "min-sites": 2, "dp": False}
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run,  # require-dp: it scores no run without DP
                  node_config={"data-path": str(tmp_path / "site"), "state-dir": str(tmp_path / "state")})

    def abandoned(rnd: int) -> str:
        return json.dumps({"round": rnd, "status": "abandoned", "reason": f"SecAgg+ halted in round {rnd}"})

    def evaluation(rnd: int):
        config = {RUN_KEY: "r-1", SERVER_ROUND: rnd, PREVIOUS_ROUND: abandoned(rnd)}
        return site_message(evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters([np.zeros(2)]), config),
                                                      True), MessageType.EVALUATE)

    def setup(rnd: int):
        msg = site_message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({SecAggKey.STAGE: Stage.SETUP,
                                                                         SecAggKey.THRESHOLD: 2})}))
        msg.content.config_records[SETUP_TERMS] = ConfigRecord({RUN_KEY: "r-1", SERVER_ROUND: rnd,
                                                                PREVIOUS_ROUND: abandoned(rnd - 1)})
        return msg

    def said() -> list[tuple]:
        events = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
        return [(e["run"], e["round"], e["reason"], e["spent"]) for e in events if e["event"] == "round_abandoned"]

    with caplog.at_level("WARNING"):
        evaluate(evaluation(1), ctx)
    assert said() == [("r-1", 1, "SecAgg+ halted in round 1", False)]
    assert "the server abandoned round 1 of run r-1: SecAgg+ halted in round 1" in caplog.text
    site_policy_mod(setup(2), ctx, lambda m, c: site_message(RecordDict()))  # round 1 again: said once
    site_policy_mod(setup(3), ctx, lambda m, c: site_message(RecordDict()))  # round 2, first told at round 3's setup
    assert [r for _, r, _, _ in said()] == [1, 2]
