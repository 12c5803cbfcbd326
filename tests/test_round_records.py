"""A crash between a round's checkpoint and its records (metrics.jsonl, the run's audit log), or in the middle
of the metrics line, leaves the resumed run's records whole: each round once, every line readable."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from privacy.audit import AuditLog, verify
from privacy.run_config import load_run_config
from server.app import ROUND_RECORDS, _last_metrics, recover_round_records, start_or_resume
from server.checkpoint import save_checkpoint
from shared_models.files import cut_partial_line
from tests.factories import started_run


def _records(key: str, rnd: int) -> dict:
    return {"metrics": {"round": rnd, "seconds": 10.0 * rnd, "participants": [11, 12], "weights_sha256": f"w{rnd}"},
            "audit": {"run": key, "round": rnd, "participants": [11, 12], "weights_sha256": f"w{rnd}"}}


def _resumed(out, values, schema):
    resume = {**values, "resume": True}
    return start_or_resume(load_run_config(resume, source="run config"),
                           Context(run_id=2, node_id=0, node_config={}, state=RecordDict(), run_config=resume),
                           schema, out)


def _run(tmp_path, crash_after_checkpoint: str):
    """A run whose round 3 is checkpointed, then crashes: 'before-records' before its metrics line and audit
    entry, 'mid-line' with half its metrics line written and no audit entry."""
    out, values, schema, start = started_run(tmp_path)
    audit = AuditLog(out / "audit.jsonl")
    audit.append("run_start", run=start.run_key, first_round=1)
    metrics = out / "metrics.jsonl"
    for rnd in (1, 2, 3):
        rec = _records(start.run_key, rnd)
        save_checkpoint(out / "checkpoints", rnd, start.weights, {},
                        {"run_key": start.run_key, "schema_hash": schema.content_hash(), ROUND_RECORDS: rec})
        if rnd < 3:
            metrics.open("a").write(json.dumps(rec["metrics"]) + "\n")
            audit.append("round", **rec["audit"])
        elif crash_after_checkpoint == "mid-line":
            metrics.open("a").write(json.dumps(rec["metrics"])[:25])
    return out, _resumed(out, values, schema), AuditLog(out / "audit.jsonl")


def _check_whole(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert lines[-1]["recovered"] is True and lines[-1]["weights_sha256"] == "w3"
    assert _last_metrics(out / "metrics.jsonl")["round"] == 3  # what the final model's package describes
    entries = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    assert [e["round"] for e in entries if e["event"] == "round"] == [1, 2, 3]
    assert entries[-1]["recovered"] is True
    assert verify(out / "audit.jsonl").ok


def test_a_crash_mid_metrics_line_leaves_a_readable_file_with_the_round_once(tmp_path):
    out, start, audit = _run(tmp_path, "mid-line")
    assert start.first_round == 4 and start.round_records["metrics"]["round"] == 3
    recover_round_records(out, start, audit)
    _check_whole(out)


def test_a_crash_before_the_records_gets_them_from_the_checkpoint_once(tmp_path):
    out, start, audit = _run(tmp_path, "before-records")
    recover_round_records(out, start, audit)
    recover_round_records(out, start, AuditLog(out / "audit.jsonl"))  # a second resume adds nothing
    _check_whole(out)


def test_records_already_written_are_not_written_again(tmp_path):
    out, start, audit = _run(tmp_path, "before-records")
    (out / "metrics.jsonl").open("a").write(json.dumps(start.round_records["metrics"]) + "\n")
    audit.append("round", **start.round_records["audit"])
    before = ((out / "metrics.jsonl").read_bytes(), (out / "audit.jsonl").read_bytes())
    recover_round_records(out, start, audit)
    assert ((out / "metrics.jsonl").read_bytes(), (out / "audit.jsonl").read_bytes()) == before


def test_a_resume_from_an_older_checkpoint_writes_no_stale_round_after_newer_ones(tmp_path):
    """Resumed from round 2's checkpoint (round 3's moved aside, as its refusal advises), round 2 was appended again,
    'recovered', after round 3, in metrics.jsonl and in the hash-chained audit log."""
    from server.app import RunStart

    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"round": r, "status": "updated"}) + "\n" for r in (1, 2, 3)))
    audit = AuditLog(tmp_path / "audit.jsonl")
    for r in (1, 2, 3):
        audit.append("round", run="k", round=r)
    start = RunStart("k", [], 3, {}, {}, {}, round_records={"metrics": {"round": 2, "status": "updated"},
                                                            "audit": {"run": "k", "round": 2}})
    recover_round_records(tmp_path, start, audit)
    assert [json.loads(x)["round"] for x in m.read_text().splitlines()] == [1, 2, 3]
    assert [json.loads(x)["round"] for x in (tmp_path / "audit.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_cut_partial_line(tmp_path):
    f = tmp_path / "m.jsonl"
    assert cut_partial_line(f) == 0  # missing
    f.write_text('{"a": 1}\n{"b"')
    assert cut_partial_line(f) == 4 and f.read_text() == '{"a": 1}\n'
    assert cut_partial_line(f) == 0 and f.read_text() == '{"a": 1}\n'
    f.write_text('{"b"')
    assert cut_partial_line(f) == 4 and f.read_text() == ""


def test_every_reader_of_metrics_jsonl_skips_a_last_line_a_crash_cut_short(tmp_path):
    """Until a resume cuts it, a line a crash cut short (or one being appended now) ends metrics.jsonl: the sites that
    trained skipped it, but the other readers failed on it (`oncofed deliver` dating a final model, the outcome of the
    round told to the sites, the ETA of `oncofed runs`)."""
    from server.checkpoint import round_outcome
    from server.delivery import trained_sites
    from server.runs import _rounds_seconds

    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"round": r, "seconds": 10.0 * r, "status": "updated", "participants": [r]}) + "\n"
                         for r in (1, 2)) + json.dumps({"round": 3, "participants": [3]})[:20])
    assert [g.nodes for g in trained_sites(tmp_path)] == [[1], [2]]
    assert round_outcome(tmp_path, 2) == {"round": 2, "status": "updated"}
    assert _rounds_seconds(m) == [10.0]
    m.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')  # damage a crash does not leave: every reader fails on it
    for read in (lambda: trained_sites(tmp_path), lambda: round_outcome(tmp_path, 3)):
        with pytest.raises(ValueError):
            read()


@pytest.mark.parametrize("wrong", ["run", "shapes"])
def test_a_checkpoint_that_is_not_this_runs_is_refused_not_resumed(tmp_path, wrong):
    """Checkpoints copied from another run: resumed under that run's key, with its sites' spend, or with weights
    that do not fit the run config's model."""
    out, values, schema, start = started_run(tmp_path)
    key = "another-run-0000" if wrong == "run" else start.run_key
    weights = start.weights if wrong == "run" else [np.zeros(2, np.float32)]
    save_checkpoint(out / "checkpoints", 1, weights, {}, {"run_key": key, "schema_hash": schema.content_hash()})
    with pytest.raises(ValueError, match="checkpoint is of run another-run-0000" if wrong == "run"
                       else "weights do not fit the model of this run config"):
        _resumed(out, values, schema)


def test_two_sites_reporting_one_name_keep_their_own_epsilon_and_audit_head():
    """The per-site records (epsilon, audit head) are filed under the name each site reports; two nodes reporting the
    same name are kept apart by node id instead of one silently overwriting the other's."""
    from server.app import site_labels
    from shared_models.protocol import SITE

    owners = {}  # the run's: name -> the node that reported it first
    assert site_labels({"11": {SITE: "St Mary"}, "12": {SITE: "C1"}, "13": {}}, owners) == {"11": "St Mary", "12": "C1"}
    # a later round: another node claims the name; the first keeps it, the newcomer is filed apart
    assert site_labels({"11": {SITE: "St Mary"}, "33": {SITE: "St Mary"}}, owners) == {"11": "St Mary",
                                                                                      "33": "St Mary (node 33)"}
    fresh = {}  # two nodes with one name in the same first round: neither owns it
    assert site_labels({"11": {SITE: "C0"}, "12": {SITE: "C0"}}, fresh) == {"11": "C0 (node 11)", "12": "C0 (node 12)"}
    assert fresh == {}


def test_in_a_deployment_a_nodes_records_go_under_the_name_its_key_was_registered_with(tmp_path, caplog):
    """With the consortium's register (run config site-registry, set by `oncofed run`), a node's name is the one the
    operator registered its authentication key under, not the one it reports: a site cannot file its epsilon or
    audit head under another hospital's name, whichever reports first."""
    from privacy.pki import ProvisioningError
    from privacy.registry import registered_names
    from server.app import site_labels
    from shared_models.files import write_json_atomic
    from shared_models.protocol import SITE

    record = tmp_path / "consortium.json"
    write_json_atomic(record, {"name": "c", "sites": [
        {"name": "St Mary", "node_id": "11", "key_sha256": "a"}, {"name": "C1", "node_id": "12", "key_sha256": "b"},
        {"name": "Royal", "node_id": "13", "key_sha256": "c", "removed": "2026-12-01T00:00:00Z"}]})
    registered = registered_names(record)
    assert registered == {"11": "St Mary", "12": "C1", "13": "Royal"}
    owners = {}
    with caplog.at_level("WARNING"):
        labels = site_labels({"12": {SITE: "St Mary"}, "11": {SITE: "St Mary"}, "13": {}, "99": {SITE: "C1"}},
                             owners, registered)
    assert labels == {"11": "St Mary", "12": "C1", "13": "Royal", "99": "C1 (unregistered node 99)"}
    assert "registered as site 'C1', reports the site name 'St Mary'" in caplog.text
    assert owners == {}  # the register decides, not who reported first
    with pytest.raises(ProvisioningError, match="no readable nothing.json.*site-registry"):
        registered_names(tmp_path / "nothing.json")


class _Proxy:
    def __init__(self, node_id):
        self.node_id = node_id


def test_a_secagg_round_samples_no_more_sites_than_its_range_holds():
    """SecAgg+'s quantisation range is sized for the run's sites: more connected hospitals than that would make the
    sum wrap the modulus and the server step on a wrong aggregate, so a round samples at most that many."""
    import numpy as np

    from privacy.run_config import load_run_config
    from server.strategy import build_strategy

    sized = build_strategy(load_run_config({"schema": "s.json", "sites": 3, "min-sites": 2}), [np.zeros(4)], 3, {})
    assert sized.num_fit_clients(6) == (3, 2) and sized.num_fit_clients(3) == (3, 2)
    plain = build_strategy(load_run_config({"schema": "s.json", "sites": 3, "min-sites": 2, "secagg": False}),
                           [np.zeros(4)], 3, {})
    assert plain.num_fit_clients(6)[0] == 6  # no SecAgg+: no range to wrap


def test_a_round_with_fewer_contributions_than_min_sites_is_abandoned_even_without_secagg():
    import numpy as np
    from flwr.common import Code, Error, FitRes, Status, ndarrays_to_parameters

    from privacy.run_config import load_run_config
    from server.strategy import build_strategy

    strategy = build_strategy(load_run_config({"schema": "s.json", "min-sites": 3, "sites": 3, "secagg": False}),
                              [np.zeros(4, np.float32)], 3, {})
    strategy.sampled = {1, 2, 3}
    one = [(_Proxy(1), FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([np.full(4, 0.01)]), 100, {}))]
    refusals = [Exception(Error(0, "refused: site_2: budget")), Exception(Error(0, "refused: site_3: budget"))]
    params, _ = strategy.aggregate_fit(1, one, refusals)
    assert params is None and strategy.round_info["status"] == "abandoned" and "fewer than 3" in strategy.round_info[
        "reason"]
    assert not strategy.global_weights[0].any()  # the one site's update was not stepped on


def test_a_refusing_site_is_recorded_as_refused_not_also_as_dropped():
    """A refusal is an error reply: the node answered. Only sampled nodes that sent nothing are dropouts."""
    import numpy as np
    from flwr.common import Code, Error, FitRes, Status, ndarrays_to_parameters

    from privacy.run_config import load_run_config
    from server.strategy import build_strategy

    strategy = build_strategy(load_run_config({"schema": "s.json", "min-sites": 2, "sites": 4}),
                              [np.zeros(4, np.float32)], 4, {})
    strategy.sampled, strategy.errored = {1, 2, 3, 4}, {3: "site_3: budget"}  # node 3 refused, node 4 sent nothing
    two = [(_Proxy(n), FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([np.full(4, 0.01)]), 100, {}))
           for n in (1, 2)]
    strategy.aggregate_fit(1, two, [Exception(Error(0, "refused: site_3: budget"))])
    assert strategy.round_info["refused"] == [{"reason": "site_3: budget", "node": 3}]
    assert strategy.round_info["dropped"] == [4]

    # two sites refusing in the same words are two refusals (the texts alone collapsed them into one)
    strategy.sampled, strategy.errored = {1, 2, 3, 4}, {3: "the budget is spent", 4: "the budget is spent"}
    same = Exception(Error(0, "refused: the budget is spent"))
    strategy.aggregate_fit(2, two, [same, same])
    assert strategy.round_info["refused"] == [{"reason": "the budget is spent", "node": n} for n in (3, 4)]
    assert strategy.round_info["dropped"] == []


def test_a_long_refusal_is_one_refusal_not_also_a_failure():
    """A refusal of more than ~490 characters lost its prefix when cut to its last 500, and was recorded as refused
    (the workflow's record) and as failed (the text)."""
    import numpy as np
    from flwr.common import Error

    from server.strategy import build_strategy, refusal_reason

    text = "refused: C0: " + "the run's plan changes " * 40
    strategy = build_strategy(load_run_config({"schema": "s.json", "min-sites": 2, "sites": 4}),
                              [np.zeros(4, np.float32)], 4, {})
    strategy.sampled, strategy.errored = {1, 2}, {2: refusal_reason(text)}
    refused, failed, dropped = strategy.record_outcomes(1, [Exception(Error(0, text))], {1})
    assert len(refused) == 1 and failed == [] and dropped == [] and len(refused[0]["reason"]) <= 500


def test_the_polling_grid_keeps_each_refusing_nodes_reason_and_no_offline_nodes_error():
    """The workflow's record of a round's refusals: node -> reason, from the nodes' error replies to training
    messages; the SuperLink's own error reply for a node gone offline is no refusal (a dropout)."""
    from types import SimpleNamespace as NS

    from flwr.common import MessageType

    from server.workflow import PollingGrid

    def reply(node: int, reason: str):
        return NS(metadata=NS(src_node_id=node, reply_to_message_id=f"m{node}"), has_content=lambda: False,
                  has_error=lambda: True, error=NS(reason=reason))

    class Grid:
        def push_messages(self, messages):
            return [f"m{m.metadata.dst_node_id}" for m in messages]

        def pull_messages(self, ids):
            return [reply(3, "refused: the budget is spent"), reply(4, "refused: the budget is spent"),
                    reply(5, "node 5 is offline")]

    grid = PollingGrid(Grid(), timeout=1.0)
    asked = [NS(metadata=NS(message_type=MessageType.TRAIN, dst_node_id=n), has_content=lambda: False) for n in (3, 4, 5)]
    assert len(grid.send_and_receive(asked)) == 3
    assert grid.errored == {3: "the budget is spent", 4: "the budget is spent"}


def test_the_package_epsilon_is_never_below_what_a_site_that_trained_reports_from_its_ledger():
    """A crash after a site's spend, then its refusal to resend, left the delivered package at 6.58 for a site whose
    ledger said 7.93: the site's evaluation now reports its ledger, and the record takes the larger. A site that did
    not train in the run is not added (its spend is other runs')."""
    from server.app import keep_site_epsilons
    from shared_models.protocol import EPSILON, EPSILON_WORST_CASE, RUN_EPSILON

    eps, worst, run = {"C0": 6.58}, {"C0": 20.0}, {"C0": 5.0}
    records = {EPSILON: eps, EPSILON_WORST_CASE: worst, RUN_EPSILON: run}
    info = {"sites": {"7": {EPSILON: 6.58, EPSILON_WORST_CASE: 20.0, RUN_EPSILON: 5.0}},
            "site_eval": {"C0": {EPSILON: 7.93, EPSILON_WORST_CASE: 24.7, RUN_EPSILON: 6.1}, "C9": {EPSILON: 3.0}}}
    keep_site_epsilons(info, {"7": "C0"}, records)
    assert eps == {"C0": 7.93} and worst == {"C0": 24.7} and run == {"C0": 6.1}
    keep_site_epsilons({"site_eval": {"C0": {EPSILON: 7.0}}}, {}, records)  # never lowered
    assert eps == {"C0": 7.93}


def test_a_round_no_site_could_evaluate_has_no_global_evaluation_and_the_run_goes_on():
    """Sites too small to keep a held-out part (or refusing) answer the evaluation with 0 patients; when all do,
    Flower's weighted loss divided by zero and the ServerApp ended without a result."""
    import numpy as np
    from flwr.common import Code, EvaluateRes, Status

    from privacy.run_config import load_run_config
    from server.strategy import build_strategy

    strategy = build_strategy(load_run_config({"schema": "s.json", "min-sites": 2, "sites": 2}),
                              [np.zeros(4, np.float32)], 2, {})
    empty = [(_Proxy(n), EvaluateRes(Status(Code.OK, "ok"), 0.0, 0, {})) for n in (1, 2)]
    loss, metrics = strategy.aggregate_evaluate(1, empty, [])
    assert loss is None and metrics == {} and strategy.round_info["site_eval"] == {}


class _Sites:
    """Flower's client manager as configure_evaluate uses it: `n` connected sites, all sampled."""

    def __init__(self, n: int):
        self.n = n

    def num_available(self) -> int:
        return self.n

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        return [_Proxy(i) for i in range(1, num_clients + 1)]


def test_the_sites_never_score_the_untrained_initial_model_not_even_after_the_last_round():
    """A run whose rounds were all abandoned had every site score the untrained initial model after its last round
    (~15 s in a deployment, a fresh process per site reloading its data), for nothing. While no round of the run has
    updated the global model no site is asked; once one has, the last round is scored as always."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from server.strategy import build_strategy

    strategy = build_strategy(load_run_config({"schema": "s.json", "min-sites": 2, "sites": 2, "secagg": False,
                                               "num-rounds": 2}), [np.zeros(4, np.float32)], 2, {})
    params = ndarrays_to_parameters(strategy.global_weights)
    assert strategy.configure_evaluate(2, params, _Sites(2)) == []
    strategy.sampled = {1, 2}
    strategy.aggregate_fit(1, [(_Proxy(n), FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([np.full(4, 0.01)]),
                                                  100, {})) for n in (1, 2)], [])
    assert strategy.round_info["status"] == "updated"
    assert len(strategy.configure_evaluate(2, params, _Sites(2))) == 2


def test_a_resumed_run_counts_a_round_as_updating_the_model_by_that_rounds_newest_record():
    """Whether the model a resumed run starts from was ever updated: by each round's newest line of metrics.jsonl,
    for the rounds its checkpoint holds. A round run again after a resume from an older checkpoint is what it did
    the second time (an earlier attempt's update of it is gone with the checkpoint that held it)."""
    from server.checkpoint import model_updated

    lines = [{"round": 1, "status": "abandoned"}, {"round": 2, "status": "abandoned"},
             {"round": 3, "status": "updated"}, {"round": 3, "status": "abandoned"}]  # round 3 again, from round 2's
    assert not model_updated(lines) and not model_updated(lines, before=3)
    assert model_updated(lines[:3]) and not model_updated(lines[:3], before=3)
    assert not model_updated([])


def test_an_abandoned_rounds_reason_goes_with_the_next_message_every_site_gets():
    """The sites heard why a round was abandoned only with the next round's training request or the delivery, and
    not at all of a round no site contributed to. Now the round's own evaluation carries it (the first message after
    its training, when the sites score the model), and so do the next round's SecAgg+ setup and training request."""
    from flwr.common import Code, Error, FitRes, Status, ndarrays_to_parameters

    from server.strategy import build_strategy
    from shared_models.protocol import PREVIOUS_ROUND, RUN_KEY, SERVER_ROUND

    strategy = build_strategy(load_run_config({"schema": "s.json", "min-sites": 2, "sites": 2, "secagg": False,
                                               "num-rounds": 3}), [np.zeros(4, np.float32)], 2, {RUN_KEY: "r-1"})
    strategy.sampled = {1, 2}
    strategy.aggregate_fit(1, [(_Proxy(n), FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([np.full(4, 0.01)]),
                                                  100, {})) for n in (1, 2)], [])
    strategy.aggregate_fit(2, [], [Exception(Error(0, "refused: C1: budget")), Exception(Error(0, "refused: C2: budget"))])
    params = ndarrays_to_parameters(strategy.global_weights)

    def told(config) -> dict:
        return json.loads(config[PREVIOUS_ROUND])

    for _, ins in strategy.configure_evaluate(2, params, _Sites(2)):
        assert told(ins.config) == {"round": 2, "status": "abandoned", "reason": strategy.round_info["reason"]}
        assert "no site contributed" in told(ins.config)["reason"]
    terms = strategy.setup_terms(3)
    assert terms[RUN_KEY] == "r-1" and terms[SERVER_ROUND] == 3 and told(terms)["round"] == 2
    assert all(told(ins.config)["round"] == 2 for _, ins in strategy.configure_fit(3, params, _Sites(2)))
    assert PREVIOUS_ROUND not in strategy.setup_terms(1)  # nothing ended before the first round
