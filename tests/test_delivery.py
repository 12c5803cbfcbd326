"""Delivery as a step of its own: the signing key checked against the sites' trust anchor before any
training, who installed the final model against who trained it, the saved model sent again as it was.
(The real-process scenario, `oncofed run` exiting 3 and `oncofed deliver` completing the delivery, is
in tests/test_deployment.py.)"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from privacy.pki import init_consortium
from privacy.preflight import check_signing_key
from privacy.signing import generate_signing_key
from server.delivery import DELIVERY_SHORT_EXIT, delivery_status, delivery_verdict, load_final, save_package
from shared_models.weights import arrays_sha256


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    root = tmp_path_factory.mktemp("delivery") / "op"
    init_consortium(root, "c", "fl.example.org:443")
    return root


def test_the_consortium_signing_key_matches_what_the_sites_trust(consortium):
    check = check_signing_key(consortium / "signing" / "signing.key", consortium / "public" / "signing.pub")
    assert check.ok, check.detail


def test_a_signing_key_the_sites_do_not_trust_fails_preflight(consortium, tmp_path):
    generate_signing_key(tmp_path / "other.key", tmp_path / "other.pub")
    check = check_signing_key(tmp_path / "other.key", consortium / "public" / "signing.pub")
    assert not check.ok and "is not the key the sites trust" in check.detail and "drop --set signing-key" in check.detail


def test_oncofed_run_preflight_refuses_a_wrong_signing_key_before_submitting(consortium, tmp_path):
    """The same checks `oncofed run` prints and stops on (exit 2) before anything reaches a site."""
    from privacy.preflight import PreflightError, report
    from privacy.run_config import load_run_config
    from server.deploy import Consortium
    from server.submit import run_checks, run_values

    generate_signing_key(tmp_path / "other.key", tmp_path / "other.pub")
    c = Consortium.load(consortium)
    values = run_values(c, c.path("runs", "r"), {"signing-key": str(tmp_path / "other.key")}, False, 3)
    checks = run_checks(c, load_run_config(values), c.path("runs", "r"), False, [{"status": "online"}] * 3, "")
    failed = [ch for ch in checks if not ch.ok and "model-signing key" in ch.name]
    assert failed and "not the key the sites trust" in failed[0].detail
    with pytest.raises(PreflightError, match="is not the key the sites trust"):
        report("run 'r'", checks)


def test_resume_of_a_finished_run_is_refused_at_preflight_naming_oncofed_deliver(consortium):
    """Resumed, a finished run would send its model again and record the sites' refusal of a rollback over their
    earlier installs: `oncofed deliver` is what sends a finished run's model again."""
    from privacy.preflight import PreflightError, report
    from privacy.run_config import load_run_config
    from server.deploy import Consortium
    from server.submit import run_checks, run_values

    c = Consortium.load(consortium)
    run = c.path("runs", "done")
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "result.json").write_text(json.dumps({"deliveries": [{"node": 1, "installed": True}]}))
    values = run_values(c, run, {}, True, 3)
    checks = run_checks(c, load_run_config(values), run, True, [{"status": "online"}] * 3, "")
    with pytest.raises(PreflightError, match=f"finished .*`oncofed deliver {consortium} done`"):
        report("run 'done'", checks)


def _run_dir(tmp_path, installed: list[int], trained: list[list[int]]):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": i + 1, "participants": p}) + "\n"
                                               for i, p in enumerate(trained)))
    deliveries = [{"node": n, "site": f"C{n}", "installed": n in installed,
                   **({} if n in installed else {"error": "no reply within 90 s"})} for n in (1, 2, 3)]
    (run / "result.json").write_text(json.dumps({"deliveries": deliveries}))
    (run / "status.json").write_text(json.dumps({"run": "r1-key", "finished": 1, **delivery_status(run, deliveries)}))
    return run


def test_a_site_that_trained_but_did_not_install_makes_the_delivery_short(tmp_path):
    run = _run_dir(tmp_path, installed=[1, 2], trained=[[1, 2, 3], [1, 2]])  # C3 trained round 1, then vanished
    status = json.loads((run / "status.json").read_text())
    assert status["trained"] == 3 and status["delivered"] == 2 and status["delivery_ok"] == 0
    ok, message = delivery_verdict(run)
    assert not ok and "not at C3" in message and "oncofed deliver" in message and "no reply" in message
    assert DELIVERY_SHORT_EXIT not in (0, 1, 2)


def test_a_site_that_trained_but_never_answered_is_named_from_the_operators_register(tmp_path):
    run = _run_dir(tmp_path, installed=[1, 2], trained=[[1, 2, 3]])
    result = json.loads((run / "result.json").read_text())
    result["deliveries"] = result["deliveries"][:2]  # node 3 was offline: no reply, so no name from it
    (run / "result.json").write_text(json.dumps(result))
    (tmp_path / "consortium.json").write_text(json.dumps({"sites": [{"name": "St Mary", "node_id": "3"}]}))
    ok, message = delivery_verdict(run)
    assert not ok and "not at St Mary (not connected when the final model was sent)." in message


def test_each_site_that_did_not_install_is_named_with_its_own_reason(tmp_path):
    run = _run_dir(tmp_path, installed=[1], trained=[[1, 2, 3]])
    result = json.loads((run / "result.json").read_text())
    result["deliveries"][1]["error"] = "refused: the package's signature does not verify; active model: none"
    (run / "result.json").write_text(json.dumps(result))
    ok, message = delivery_verdict(run)
    assert not ok and "installed at 1 of the 3 sites that trained; not at C2 (refused: the package's signature " \
        "does not verify; active model: none); C3 (no reply within 90 s)." in message


def test_a_site_that_trained_but_was_not_connected_is_recorded_with_that_reason_and_counted_as_the_verdict_counts(
        tmp_path, monkeypatch):
    """The ServerApp logged "delivered to 1/1" (the sites sent the model) and the run's verdict "1 of 2" (the sites that
    trained), and the site that was offline at the end had no entry in the delivery record, so no reason."""
    import server.delivery
    from server.delivery import NOT_CONNECTED, deliver, delivery_summary
    from shared_models.protocol import CONFIG_RECORD, REPLY, DeliveryReply

    def answered(grid, action, content, nodes, timeout):
        return [types.SimpleNamespace(metadata=types.SimpleNamespace(src_node_id=n), has_error=lambda: False,
                                      content={CONFIG_RECORD: {REPLY: DeliveryReply(site=f"C{n}", installed=True)
                                                               .to_json()}}) for n in nodes]

    monkeypatch.setattr(server.delivery, "_query", answered)
    grid = types.SimpleNamespace(get_node_ids=lambda: [1])  # node 2 trained, then went offline
    deliveries = deliver(grid, [np.ones(2, dtype=np.float32)], {"run": "k"}, 5.0, registered={"2": "St Mary"},
                         expected={1, 2})
    assert {"node": 2, "site": "St Mary", "installed": False, "error": NOT_CONNECTED} in deliveries
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "participants": [1, 2]}) + "\n")
    status = delivery_status(run, deliveries)
    summary = delivery_summary(status, deliveries)[1]  # what the ServerApp logs
    assert summary == f"final model installed at 1 of the 2 sites that trained; not at St Mary ({NOT_CONNECTED})"
    (run / "result.json").write_text(json.dumps({"deliveries": deliveries}))
    (run / "status.json").write_text(json.dumps(status))
    assert delivery_verdict(run)[1].startswith(summary + ".")


def test_a_site_back_under_another_node_id_is_one_site_that_installed_not_one_that_did_not(tmp_path, monkeypatch):
    """A resumed simulation's SuperNodes get new node ids: the sites that trained before the kill were counted a second
    time under their old ids, as not connected, so a run every site got read as short. In a simulation (no register)
    nodes of one reported name that never trained in the same round are one site; two nodes of one name in the same
    round stay two, and a deployment's nodes (which keep their ids) are never merged by a name they report."""
    import server.delivery
    from server.delivery import deliver, trained_sites
    from shared_models.protocol import CONFIG_RECORD, REPLY, DeliveryReply

    def answered(grid, action, content, nodes, timeout):
        return [types.SimpleNamespace(metadata=types.SimpleNamespace(src_node_id=n), has_error=lambda: False,
                                      content={CONFIG_RECORD: {REPLY: DeliveryReply(site=f"S{n % 10}", installed=True)
                                                               .to_json()}}) for n in nodes]

    def send(sites, connected):
        return deliver(types.SimpleNamespace(get_node_ids=lambda: connected), [np.ones(2, dtype=np.float32)],
                       {"run": "k"}, 5.0, expected=sites)

    def metrics(*rounds):
        (run / "metrics.jsonl").write_text("".join(json.dumps(
            {"round": i + 1, "participants": sorted(r), "sites": {str(n): {"site": s} for n, s in r.items()}}) + "\n"
            for i, r in enumerate(rounds)))

    monkeypatch.setattr(server.delivery, "_query", answered)
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    metrics({11: "S1", 12: "S2"}, {21: "S1", 22: "S2"})
    sites = trained_sites(run, by_name=True)
    assert [(g.name, g.nodes) for g in sites] == [("S1", [11, 21]), ("S2", [12, 22])]
    deliveries = send(sites, [21, 22])
    assert [d["node"] for d in deliveries] == [21, 22] and all(d["installed"] for d in deliveries)
    assert delivery_status(run, deliveries, by_name=True) | {"undelivered": []} == {
        "delivered": 2, "trained": 2, "delivery_ok": 1, "undelivered": []}
    gone = send(sites, [21])  # S2 not back: named once, under the last node id it had
    assert [(d["node"], d.get("site"), d["installed"]) for d in gone] == [(21, "S1", True), (22, "S2", False)]
    assert delivery_status(run, gone, by_name=True)["undelivered"] == [22]
    assert delivery_status(run, deliveries)["trained"] == 4  # a deployment: one site per node
    # resumed after its last round: the sites come back under ids that trained in no round (a simulation)
    metrics({11: "S1", 12: "S2"})
    sites = trained_sites(run, by_name=True)
    after = deliver(types.SimpleNamespace(get_node_ids=lambda: [21, 22]), [np.ones(2, dtype=np.float32)],
                    {"run": "k"}, 5.0, expected=sites, by_name=True)
    assert [d["node"] for d in after] == [21, 22] and delivery_status(run, after, by_name=True)["delivery_ok"] == 1
    assert delivery_status(run, after)["undelivered"] == [11, 12]  # a deployment: nodes 11 and 12 did not get it
    metrics({11: "S1", 12: "S1"})  # two nodes that say they are S1 in one round are two sites
    assert [g.nodes for g in trained_sites(run, by_name=True)] == [[11], [12]]
    assert delivery_status(run, send(trained_sites(run, by_name=True), [11]), by_name=True)["undelivered"] == [12]


def test_a_site_that_never_trained_does_not_make_the_delivery_short(tmp_path):
    run = _run_dir(tmp_path, installed=[1, 2], trained=[[1, 2], [1, 2]])
    assert delivery_verdict(run)[0] and json.loads((run / "status.json").read_text())["delivery_ok"] == 1


def test_the_metrics_show_a_short_delivery(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from server.metrics import ConsortiumCollector

    _run_dir(tmp_path, installed=[1], trained=[[1, 2, 3]])
    reg = CollectorRegistry()
    reg.register(ConsortiumCollector(tmp_path / "runs"))
    text = generate_latest(reg).decode()
    assert 'oncofed_run_delivery_ok{run="r1",run_key="r1-key"} 0.0' in text
    assert 'oncofed_sites_trained{run="r1",run_key="r1-key"} 3.0' in text
    assert 'oncofed_sites_delivered{run="r1",run_key="r1-key"} 1.0' in text
    assert 'oncofed_run_finished{run="r1",run_key="r1-key"} 1.0' in text


def _scrape(runs, live=()) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    from server.metrics import ConsortiumCollector

    reg = CollectorRegistry()
    reg.register(ConsortiumCollector(runs, live_runs=lambda superlink: set(live)))
    return generate_latest(reg).decode()


def _started(run, t: float) -> None:
    import os

    (run / "run.json").write_text("{}")
    os.utime(run / "run.json", (t, t))


def test_an_undelivered_runs_alert_outlasts_the_start_of_the_next_run_until_it_is_delivered(tmp_path):
    """The alert (finished == 1 and delivery_ok == 0) cleared as soon as another run started: /metrics served the
    latest run only, labelled with its key, which `oncofed deliver` does not take."""
    short = _run_dir(tmp_path, installed=[1], trained=[[1, 2]])
    _started(short, 1000)
    nxt = tmp_path / "runs" / "r2"
    nxt.mkdir()
    (nxt / "status.json").write_text(json.dumps({"run": "r2-key", "num_rounds": 3, "round": 1}))
    _started(nxt, 2000)
    text = _scrape(tmp_path / "runs")
    assert 'oncofed_run_delivery_ok{run="r1",run_key="r1-key"} 0.0' in text  # `oncofed deliver CONSORTIUM r1`
    assert 'oncofed_run_finished{run="r1",run_key="r1-key"} 1.0' in text
    assert 'oncofed_rounds_completed{run="r2",run_key="r2-key"} 1.0' in text
    # delivered: the older run drops out, the one started last stays
    (short / "status.json").write_text(json.dumps({"run": "r1-key", "finished": 1, "trained": 2, "delivered": 2,
                                                   "delivery_ok": 1}))
    text = _scrape(tmp_path / "runs")
    assert 'run="r1"' not in text and 'oncofed_rounds_completed{run="r2",run_key="r2-key"} 1.0' in text


def test_a_run_the_superlink_still_runs_keeps_its_gauges_after_a_later_one_starts(tmp_path):
    for i, name in enumerate(("a", "b")):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "status.json").write_text(json.dumps({"run": f"{name}-key", "round": i + 1}))
        _started(run, 1000 + i)
    assert 'run="a"' not in _scrape(tmp_path / "runs")
    assert 'oncofed_rounds_completed{run="a",run_key="a-key"} 1.0' in _scrape(tmp_path / "runs", live={"a"})


def test_the_saved_final_model_is_sent_again_only_as_it_was_signed(tmp_path):
    final = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]
    np.savez(tmp_path / "final_weights.npz", *final)
    save_package(tmp_path, {"run": "r1", "arrays_sha256": arrays_sha256(final), "signature": "by the wrong key"})
    from privacy.audit import AuditLog

    AuditLog(tmp_path / "audit.jsonl").append("round", run="r1", round=3, weights_sha256=arrays_sha256(final))
    weights, package = load_final(tmp_path)
    assert arrays_sha256(weights) == package["arrays_sha256"] and "signature" not in package  # re-signed on sending
    final[1][0] = 7.0
    np.savez(tmp_path / "final_weights.npz", *final)
    with pytest.raises(ValueError, match="the saved final model was altered"):
        load_final(tmp_path)
    # the weights and package.json replaced together: not the model the run's audit log recorded
    save_package(tmp_path, {"run": "r1", "arrays_sha256": arrays_sha256(final)})
    with pytest.raises(ValueError, match="is not the global model the audit log recorded after run r1's last round"):
        load_final(tmp_path)


@pytest.mark.parametrize("first_delivery_ended", [True, False])
def test_oncofed_deliver_ends_a_run_whose_own_delivery_a_crash_cut_short(tmp_path, monkeypatch, first_delivery_ended):
    """A server crash while a run delivered its model left no run_end in the audit log and status finished 0, so the
    alert on a finished run's delivery never fired: `oncofed deliver` ends it then, and is a redelivery otherwise."""
    import os

    import server.delivery
    from privacy.audit import AuditLog
    from privacy.run_config import load_run_config
    from server.delivery import redeliver

    out = tmp_path / "runs" / "x"
    out.mkdir(parents=True)
    final = [np.ones(3, dtype=np.float32)]
    np.savez(out / "final_weights.npz", *final)
    os.utime(out / "final_weights.npz", (1000.0, 1000.0))  # written when the run first delivered it
    save_package(out, {"run": "r1", "round": 2, "arrays_sha256": arrays_sha256(final)})
    audit = AuditLog(out / "audit.jsonl")
    audit.append("round", run="r1", round=2, weights_sha256=arrays_sha256(final))
    if first_delivery_ended:
        audit.append("run_end", run="r1", round=2, arrays_sha256=arrays_sha256(final), deliveries=[])
    (out / "metrics.jsonl").write_text(json.dumps({"round": 2, "participants": [1, 2]}) + "\n")
    (out / "status.json").write_text(json.dumps({"run": "r1", "finished": int(first_delivery_ended)}))
    generate_signing_key(tmp_path / "signing.key", tmp_path / "signing.pub")
    sent = {}

    def deliver(grid, final, package, timeout, node_ids, anchor, previous, registered=None, **unreached):
        sent.update(package=package, previous=previous)
        return [{"node": n, "site": f"C{n}", "installed": True} for n in node_ids]

    monkeypatch.setattr(server.delivery, "deliver", deliver)
    grid = types.SimpleNamespace(get_node_ids=lambda: [1, 2])
    cfg = load_run_config({"schema": "s.json", "output-dir": str(out), "signing-key": str(tmp_path / "signing.key"),
                           "round-timeout": 5.0, "base-dir": str(tmp_path)})
    redeliver(grid, cfg)
    events = [json.loads(x)["event"] for x in (out / "audit.jsonl").read_text().splitlines()]
    status = json.loads((out / "status.json").read_text())
    assert events[-1] == ("redelivery" if first_delivery_ended else "run_end")
    assert events.count("run_end") == 1 and status["finished"] == 1 and status["delivery_ok"] == 1
    # a package saved before the architecture was signed is sent with the run's, signed
    assert sent["package"]["architecture"] == cfg.model.model_dump() and "signature" in sent["package"]
    assert sent["previous"] is None  # metrics.jsonl's last round has no status (a line of before 2026-12-05)
    # an undated package (before 2026-12-05) is dated when it ended, never "now": a site would take it for the newest
    # model and replace a later run's with it (its metrics lines have no "ended": the weights' file time)
    assert sent["package"]["finished"] == 1000.0


def test_the_current_run_in_the_metrics_is_the_one_started_last_not_the_one_delivered_again(tmp_path):
    import os

    from server.metrics import latest_status

    for i, name in enumerate(("old", "new")):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "run.json").write_text("{}")
        (run / "status.json").write_text(json.dumps({"run": name}))
        os.utime(run / "run.json", (1000 + i, 1000 + i))  # "new" started after "old"
    (tmp_path / "runs" / "old" / "status.json").write_text(json.dumps({"run": "old", "redelivered": True}))
    assert latest_status(tmp_path / "runs")["run"] == "new"  # `oncofed deliver old` rewrote old's status


def test_a_final_model_is_dated_by_its_last_round_so_a_late_resume_does_not_make_it_the_newest(tmp_path):
    """A run resumed only to deliver (its checkpoint holds every round), after another run finished and was
    installed, must not carry a later `finished` than that run: the sites' model stores order re-deliveries by it
    and would roll back to the older model."""
    import time

    from server.delivery import finished_at

    final = [np.ones(3, dtype=np.float32)]
    assert finished_at(tmp_path, {"round": 10, "ended": 1000.5}, final) == 1000.5
    (tmp_path / "package.json").write_text(json.dumps({"arrays_sha256": arrays_sha256(final), "finished": 900.25}))
    assert finished_at(tmp_path, {"round": 10}, final) == 900.25  # a last round recorded before rounds were dated
    assert finished_at(tmp_path, {"round": 10}, [np.zeros(3, dtype=np.float32)]) >= time.time() - 60  # other weights


def test_oncofed_delivers_preflight_asks_the_server_processes_health_as_oncofed_run_does(tmp_path):
    """With the SuperExec down the delivery run would stay pending forever: the preflight names it first."""
    from privacy.pki import init_consortium
    from privacy.run_config import load_run_config
    from server.delivery import delivery_checks
    from server.deploy import Consortium

    init_consortium(tmp_path / "op", "c", "127.0.0.1:29443", internal_port=29444)
    c = Consortium.load(tmp_path / "op")
    cfg = load_run_config({"schema": "s.json", "signing-key": str(c.path("signing", "signing.key"))})
    checks = {check.name: check for check in delivery_checks(c, tmp_path / "op" / "runs" / "x", cfg)}
    health = next(check for what, check in checks.items() if "server processes" in what)
    assert not health.ok


def test_a_run_no_round_updated_ends_saying_why_round_by_round_delivers_nothing_and_fails(tmp_path):
    """Every round abandoned: the untrained initial model is neither signed nor sent, and the run's result says why
    for each round (the server's reason, the sites' refusals; the same reasons once for rounds in a row), which
    `oncofed run` prints as it exits 1. It said only that metrics.jsonl held the reasons."""
    from privacy.audit import AuditLog
    from privacy.run_config import load_run_config
    from server.app import deliver_final
    from server.runs import finished_verdict

    out = tmp_path / "runs" / "r"
    out.mkdir(parents=True)
    setup = "1 sites completed SecAgg+'s setup, fewer than 2 (min-sites): abandoned before any site trains"
    rounds = [{"round": 1, "status": "abandoned", "reason": setup, "refused": [{"reason": "C2: budget spent"}]},
              *({"round": r, "status": "abandoned", "reason": "SecAgg+ halted", "dropped": [12]} for r in (2, 3))]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))

    class Grid:  # no site connected at the end: the last round's outcome reaches no one
        def get_node_ids(self):
            return []

        def push_messages(self, messages):
            return []

    recorder = types.SimpleNamespace(metrics_file=out / "metrics.jsonl", run_key="r-1", audit=AuditLog(
        out / "audit.jsonl"), status={"run": "r-1"}, t0=0.0, registered_now=lambda: None)
    cfg = load_run_config({"schema": "s.json", "num-rounds": 3})
    deliver_final(Grid(), cfg, None, out, recorder, [np.zeros(2, np.float32)], None, 1)
    result = json.loads((out / "result.json").read_text())
    assert result["deliveries"] == [] and not (out / "final_weights.npz").exists()
    why = result["not_delivered"]
    assert why.startswith("no round updated the global model")
    assert f"round 1: {setup} (refused: C2: budget spent)" in why
    assert "rounds 2-3: SecAgg+ halted (no reply from nodes 12)" in why
    code, message = finished_verdict(out, "r")
    assert code == 1 and "round 1: " in message and "rounds 2-3: " in message


def test_a_finished_run_delivered_again_keeps_the_sites_earlier_installs(tmp_path):
    """A finished run's model sent again is refused by the sites that hold it (a rollback): their earlier install
    stays the record, so the run stays delivered."""
    from server.app import kept_installs

    run = _run_dir(tmp_path, installed=[1, 2, 3], trained=[[1, 2, 3]])
    before = json.loads((run / "result.json").read_text())["deliveries"]
    again = [{"node": n, "site": f"C{n}", "installed": False, "error": "finished training before the active v0005"}
             for n in (1, 2, 3)]
    merged = kept_installs(before, again)
    assert sorted(d["node"] for d in merged) == [1, 2, 3] and all(d["installed"] for d in merged)
    assert delivery_status(run, merged)["delivery_ok"] == 1


def test_a_site_removed_from_the_consortium_is_not_waited_for_nor_left_undelivered(tmp_path, monkeypatch):
    """Hosp C3 trained round 1, then `remove-site` took it out: `oncofed deliver` waited the whole round-timeout for a
    key that can no longer connect, and the run stayed undelivered (its alert on) for good."""
    import time

    import server.delivery
    from privacy.audit import AuditLog
    from privacy.run_config import load_run_config
    from server.delivery import delivery_verdict, redeliver

    out = _run_dir(tmp_path, installed=[1, 2], trained=[[1, 2, 3]])
    assert json.loads((out / "status.json").read_text())["undelivered"] == [3]  # before the removal
    register = tmp_path / "consortium.json"
    register.write_text(json.dumps({"sites": [{"name": "Hosp C3", "node_id": "3", "removed": "2026-12-06T10:00:00Z"}]}))
    final = [np.ones(3, dtype=np.float32)]
    np.savez(out / "final_weights.npz", *final)
    save_package(out, {"run": "r1-key", "round": 1, "arrays_sha256": arrays_sha256(final), "finished": 1.0})
    audit = AuditLog(out / "audit.jsonl")
    audit.append("round", run="r1-key", round=1, weights_sha256=arrays_sha256(final))
    audit.append("run_end", run="r1-key", round=1, arrays_sha256=arrays_sha256(final), deliveries=[])
    generate_signing_key(tmp_path / "signing.key", tmp_path / "signing.pub")
    monkeypatch.setattr(server.delivery, "deliver", lambda grid, final, package, timeout, node_ids, **kw: [])
    cfg = load_run_config({"schema": "s.json", "output-dir": str(out), "signing-key": str(tmp_path / "signing.key"),
                           "round-timeout": 30.0, "base-dir": str(tmp_path), "site-registry": str(register)})
    t0 = time.monotonic()
    redeliver(types.SimpleNamespace(get_node_ids=lambda: [1, 2]), cfg)
    assert time.monotonic() - t0 < 10  # not the round-timeout
    status = json.loads((out / "status.json").read_text())
    assert status["delivery_ok"] == 1 and status["undelivered"] == [] and status["removed"] == {
        "3": "2026-12-06T10:00:00Z"}
    ok, message = delivery_verdict(out)
    assert ok and message == ("final model installed at all 2 site(s) that trained and are still in the consortium; "
                              "Hosp C3 was removed from the consortium (2026-12-06T10:00:00Z): not sent")
    # a run that ends after the removal counts it so from the start (the ServerApp's own delivery)
    deliveries = json.loads((out / "result.json").read_text())["deliveries"]
    assert server.delivery.delivery_status(out, deliveries)["delivery_ok"] == 1


def test_a_site_removed_after_the_delivery_stops_counting_as_undelivered_at_once(tmp_path):
    """Hosp C3 trained, was offline at the delivery, then `remove-site` took it out: the undelivered alert, `oncofed
    runs` and the verdict kept counting it until the next `oncofed deliver` rewrote status.json."""
    from prometheus_client import CollectorRegistry, generate_latest

    from server.metrics import ConsortiumCollector
    from server.runs import RunView

    out = _run_dir(tmp_path, installed=[1, 2], trained=[[1, 2, 3]])
    (out / "run.json").write_text("{}")
    registry = CollectorRegistry()
    registry.register(ConsortiumCollector(tmp_path / "runs"))

    def delivery_ok() -> str:
        return next(line for line in generate_latest(registry).decode().splitlines()
                    if line.startswith("oncofed_run_delivery_ok{"))

    assert delivery_ok().endswith(" 0.0")  # before the removal: C3 is due its model
    (tmp_path / "consortium.json").write_text(json.dumps({"sites": [
        {"name": "Hosp C3", "node_id": "3", "removed": "2026-12-06T10:00:00Z"}]}))  # as remove-site writes it
    status_file = (out / "status.json").read_text()
    assert delivery_ok() == 'oncofed_run_delivery_ok{run="r1",run_key="r1-key"} 1.0'
    ok, message = delivery_verdict(out)
    assert ok and message == ("final model installed at all 2 site(s) that trained and are still in the consortium; "
                              "Hosp C3 was removed from the consortium (2026-12-06T10:00:00Z): not sent")
    line = RunView.load(tmp_path, "r1", None).describe({})  # `oncofed runs`
    assert "Hosp C3 was removed from the consortium" in line and "not at" not in line
    assert (out / "status.json").read_text() == status_file  # read as of the register, not rewritten


def _finished_run(tmp_path, monkeypatch, signing_key=None, installed=True, before_delivery=lambda: None,
                  site_registry=None):
    """Run runs/x of the project's run config through its last round (a RoundRecorder, as the ServerApp records it)
    and `deliver_final` (`before_delivery()` called first), every site that trained answering `installed`: (its
    output dir, final arrays, run config, schema). `site_registry`: a consortium's register (else a simulation's)."""
    from flwr.app import Context, RecordDict
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.history import History
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    import server.app
    from privacy.audit import AuditLog
    from privacy.run_config import load_run_config
    from server.app import RoundRecorder, deliver_final
    from tests.factories import started_run

    out, values, schema, start = started_run(tmp_path)
    values = {**values, **({"site-registry": str(site_registry)} if site_registry else {})}
    cfg = load_run_config(values, source="run config")
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=values)
    recorder = RoundRecorder(cfg, context, schema, out, start, AuditLog(out / "audit.jsonl"), lambda: "", None, 0.0)
    state = RecordDict()
    state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(ndarrays_to_parameters(start.weights),
                                                                                keep_input=True)
    strategy = types.SimpleNamespace(round_info={"status": "updated", "participants": [1, 2, 3]}, state_arrays=dict,
                                     timing={})
    recorder(cfg.federation.num_rounds, types.SimpleNamespace(state=state, strategy=strategy, history=History()))
    answer = {"installed": True, "version": "v0002"} if installed else {"installed": False, "error": "down"}
    monkeypatch.setattr(server.app, "deliver", lambda grid, final, package, timeout, **kw: [
        {"node": n, "site": f"C{n}", **answer} for n in (1, 2, 3)])
    final = [np.asarray(a, dtype=np.float32) for a in start.weights]
    before_delivery()
    deliver_final(None, cfg, schema, out, recorder, final, signing_key, 1)
    return out, final, cfg, schema


def test_a_run_after_the_servers_clock_was_set_back_is_dated_after_the_model_the_sites_hold(tmp_path, monkeypatch,
                                                                                            caplog):
    """Run A was dated by a server clock 3 h ahead and is active at every site; NTP set the clock right and run B,
    trained after A, was dated by the clock alone: before A, so every site refused it as a rollback, and `oncofed
    deliver` sent the same date again. B is dated just after A's saved package, signed so, and the log says why."""
    import time

    from client.model_store import ModelStore
    from privacy.signing import load_private, load_public, verify

    ahead = round(time.time() + 3 * 3600.0, 3)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "package.json").write_text(json.dumps({"run": "a-1", "finished": ahead}))
    generate_signing_key(tmp_path / "signing.key", tmp_path / "signing.pub")
    out, final, cfg, schema = _finished_run(tmp_path, monkeypatch, load_private(tmp_path / "signing.key"))
    package = json.loads((out / "package.json").read_text())
    assert package["finished"] == ahead + 1.0
    verify(package, load_public(tmp_path / "signing.pub"))  # the date the site compares is the one signed
    assert "not after the date of run a's model" in caplog.text and "check the server's clock (NTP)" in caplog.text
    store = ModelStore(tmp_path / "site")  # a site whose active model is A's
    store.install(schema, cfg.model, [a + 1.0 for a in final], {"run": "a-1", "finished": ahead})
    assert store.install(schema, cfg.model, final, package) == "v0002" == store.active()


def test_a_models_date_is_fixed_when_its_last_round_ends_not_when_it_is_delivered(tmp_path):
    """A run resumed days later only to deliver must stay older than the runs that finished meanwhile (the sites would
    roll back to it): the date its last round recorded holds, whatever packages were saved since."""
    from server.delivery import dated_after_earlier_runs, finished_at

    out = tmp_path / "runs" / "late"
    assert dated_after_earlier_runs(out, 1000.0) == (1000.0, None)  # no other run: the clock's
    (tmp_path / "runs" / "b").mkdir(parents=True)
    (tmp_path / "runs" / "b" / "package.json").write_text(json.dumps({"run": "b-1", "finished": 2000.0}))
    assert dated_after_earlier_runs(out, 3000.0) == (3000.0, None)  # an earlier run's date before the clock's
    assert dated_after_earlier_runs(out, 2000.0) == (2001.0, {"run": "b", "finished": 2000.0})
    assert finished_at(out, {"round": 10, "ended": 1000.0, "finished": 1000.0}, [np.ones(3, np.float32)]) == 1000.0


class _Crash(BaseException):
    """The server process dying at this point."""


@pytest.mark.parametrize("crash_at", ["run_end", "status.json", "result.json"])
def test_a_crash_while_a_run_records_its_delivery_leaves_it_alerting_as_undelivered(tmp_path, monkeypatch, crash_at):
    """The ServerApp wrote the audit log's run_end before status.json and result.json: a crash between them left
    status finished 0, and `oncofed deliver` (which set finished 1 only without a run_end) with the sites still down
    left it so: delivery_ok 0, three sites undelivered, and neither the undelivered nor the unfinished alert fired."""
    from privacy.audit import AuditLog
    from privacy.run_config import load_run_config
    from privacy.signing import load_private
    from server.delivery import redeliver
    from server.metrics import undelivered

    import server.app

    generate_signing_key(tmp_path / "signing.key", tmp_path / "signing.pub")
    armed, append, write = [True], AuditLog.append, server.app.write_json_atomic

    def crashing_append(self, event, **fields):
        if armed[0] and event == crash_at:
            armed[0] = False
            raise _Crash
        return append(self, event, **fields)

    def crashing_write(path, payload, **kw):
        if armed[0] and path.name == crash_at:
            armed[0] = False
            raise _Crash
        return write(path, payload, **kw)

    def arm():
        monkeypatch.setattr(AuditLog, "append", crashing_append)
        monkeypatch.setattr(server.app, "write_json_atomic", crashing_write)

    with pytest.raises(_Crash):
        _finished_run(tmp_path, monkeypatch, load_private(tmp_path / "signing.key"), installed=False,
                      before_delivery=arm)
    out = tmp_path / "runs" / "x"
    status = json.loads((out / "status.json").read_text())
    assert crash_at == "status.json" or undelivered(status)  # after the crash, before any `oncofed deliver`
    values = {**json.loads((out / "run.json").read_text())["run_config"], "deliver-only": True, "round-timeout": 1.0,
              "signing-key": str(tmp_path / "signing.key")}
    sites_down = types.SimpleNamespace(get_node_ids=lambda: [], push_messages=lambda messages: [])
    redeliver(sites_down, load_run_config(values, source="run config"))
    status = json.loads((out / "status.json").read_text())
    assert status["finished"] == 1 and status["undelivered"] == [1, 2, 3] and undelivered(status)
    events = [json.loads(x)["event"] for x in (out / "audit.jsonl").read_text().splitlines()]
    assert events.count("run_end") == 1


def test_a_full_disk_at_the_delivery_names_the_final_model_the_disk_and_the_resume(tmp_path, monkeypatch):
    """Writing final_weights.npz on a full disk ended the run with a bare `OSError: [Errno 28] No space left on device`,
    naming neither the file nor what to do (a round's checkpoint says both)."""
    import errno

    import server.app
    from privacy.pki import init_consortium

    init_consortium(tmp_path / "op", "c", "fl.example.org:443")  # its register: the message names `oncofed run`
    savez = server.app.np.savez

    def full_disk():
        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(server.app.np, "savez", full)  # a full disk cannot be made here without mounting one

    with pytest.raises(OSError) as e:
        _finished_run(tmp_path / "op", monkeypatch, before_delivery=full_disk,
                      site_registry=tmp_path / "op" / "consortium.json")
    monkeypatch.setattr(server.app.np, "savez", savez)
    out = tmp_path / "op" / "runs" / "x"
    assert f"final model could not be written to {out / 'final_weights.npz'} (No space left on device)" in str(e.value)
    assert f"the disk holding {out} is full: free space there, then continue the run with `oncofed run " \
           f"{tmp_path / 'op'} --name x --resume`; the checkpoints of every round are kept" in str(e.value)
    assert not list(out.glob("final_weights*"))  # no partial file left
