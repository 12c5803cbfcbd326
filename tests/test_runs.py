"""The operator's view of runs (server/runs.py) and of the server's processes (server.deploy.server_health),
on real files: a SQLite database with the SuperLink's layout (flwr 1.41: run, task, node), run
directories as the ServerApp writes them, a /health answered over HTTP."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from server.runs import RunView, after_stream, read_superlink

RUN_ID = 2**64 - 5  # Flower's uint64 ids are stored as signed integers: this one is -5 in the database
NODES = {"C0": 11, "C1": 2**63 + 7}


def _superlink_db(root: Path, run_state: str) -> Path:
    db = root / "state" / "superlink.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(db)
    con.executescript("CREATE TABLE run (run_id INTEGER, primary_task_id INTEGER, override_config TEXT);"
                      "CREATE TABLE task (task_id INTEGER, pending_at TEXT, starting_at TEXT, running_at TEXT, "
                      "finished_at TEXT, sub_status TEXT);"
                      "CREATE TABLE node (node_id INTEGER, status TEXT, online_until REAL);")
    con.execute("INSERT INTO run VALUES (?, 1, '{}')", (RUN_ID - 2**64,))  # (its run config: flwr's JSON)
    con.execute("INSERT INTO task VALUES (1, ?, NULL, NULL, NULL, '')",
                (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - 120)),))
    con.execute("INSERT INTO node VALUES (?, 'online', ?)", (NODES["C0"], time.time() + 60))
    con.execute("INSERT INTO node VALUES (?, 'online', ?)", (NODES["C1"] - 2**64, time.time() - 60))
    con.commit()
    con.close()
    _set_run_state(db, run_state)
    return db


def _set_run_state(db: Path, state: str) -> None:
    now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - 60))  # as Flower writes it: UTC, ISO
    cols = {"pending": (None, None, None, ""), "starting": (now, None, None, ""), "running": (now, now, None, ""),
            "completed": (now, now, now, "completed"), "failed": (now, now, now, "failed"),
            "stopped": (now, now, now, "stopped")}[state]
    con = sqlite3.connect(db)
    con.execute("UPDATE task SET starting_at=?, running_at=?, finished_at=?, sub_status=?", cols)
    con.commit()
    con.close()


@pytest.fixture
def consortium(tmp_path):
    (tmp_path / "consortium.json").write_text(json.dumps({  # the keys a consortium.json must hold (privacy.pki)
        "name": "t", "address": "fl.example.org:8443", "control-address": "127.0.0.1:9092",
        "sites": [{"name": n, "node_id": str(i)} for n, i in NODES.items()]}))
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "flwr-runs.json").write_text(json.dumps([RUN_ID]))
    (run / "status.json").write_text(json.dumps({"run": "r1-x", "num_rounds": 3, "round": 1, "round_seconds": 60}))
    (run / "progress.json").write_text(json.dumps({"round": 2, "stage": "share_keys", "asked": list(NODES.values()),
                                                   "answered": [NODES["C0"]], "stage_started": time.time()}))
    return tmp_path


def test_the_superlink_database_is_read_with_uint64_ids_and_lapsed_heartbeats_as_offline(consortium):
    view = read_superlink(_superlink_db(consortium, "running"))
    assert view["runs"] == {RUN_ID: "running"}
    assert view["nodes"] == {NODES["C0"]: "online", NODES["C1"]: "offline"}
    assert read_superlink(consortium / "state" / "missing.db") is None


def test_progress_names_the_stage_the_sites_that_answered_those_awaited_and_an_eta(consortium):
    superlink = read_superlink(_superlink_db(consortium, "running"))
    line = RunView.load(consortium, "r1", superlink).describe({v: k for k, v in NODES.items()})
    assert line.startswith("running · round 1/3 done · round 2: share_keys, 1/2 sites answered (C0), waiting for C1"), line
    assert "ETA ~" in line


def test_a_dropped_log_stream_of_a_running_run_follows_it_and_never_suggests_resume(consortium):
    db = _superlink_db(consortium, "running")

    def finish_later():
        time.sleep(1.0)
        (consortium / "runs" / "r1" / "result.json").write_text(json.dumps({"deliveries": [], "flwr_run": RUN_ID}))
        _set_run_state(db, "completed")

    threading.Thread(target=finish_later).start()
    out = io.StringIO()
    code = after_stream(consortium, "r1", 0, consortium / "runs" / "r1" / "flwr-run.log", out)
    assert code == 0, out.getvalue()
    assert "still running" in out.getvalue() and "--resume" not in out.getvalue()


def test_a_failed_run_suggests_resume(consortium):
    _superlink_db(consortium, "failed")
    out = io.StringIO()
    assert after_stream(consortium, "r1", 1, consortium / "runs" / "r1" / "flwr-run.log", out) == 1
    assert "failed" in out.getvalue() and "--resume" in out.getvalue()


def test_a_run_the_operator_stopped_is_told_how_to_resume_not_to_fix_a_cause(consortium):
    _superlink_db(consortium, "stopped")
    (consortium / "runs" / "r1" / "run.json").write_text("{}")  # it started: round 1 of 3 is checkpointed
    out = io.StringIO()
    assert after_stream(consortium, "r1", 0, consortium / "runs" / "r1" / "flwr-run.log", out) == 1
    said = out.getvalue()
    assert "was stopped" in said and "fixing the cause" not in said and "failed" not in said, said
    assert f"round 1/3 done): `oncofed run {consortium} --name r1 --resume` continues it" in said, said


def test_a_run_stopped_before_it_started_training_is_started_again_not_resumed(consortium):
    _superlink_db(consortium, "stopped")
    out = io.StringIO()
    after_stream(consortium, "r1", 0, consortium / "runs" / "r1" / "flwr-run.log", out)
    assert f"`oncofed run {consortium} --name r1` (without --resume) starts it again" in out.getvalue(), out.getvalue()


def test_following_a_run_gives_up_when_the_server_stays_down_and_says_what_to_do(consortium):
    """A crashed server leaves its database saying "running": the follower gives up after the server has not
    answered for the give-up time (SERVER_DOWN_GIVE_UP in use), instead of printing a stage clock for ever."""
    from server.runs import follow

    _superlink_db(consortium, "running")
    down = (False, "the server is not running (its /health does not answer): start it with `oncofed server start`")
    out, t0 = io.StringIO(), time.time()
    code = follow(consortium, "r1", out, poll=0.1, health=lambda: down, give_up=0.5)
    said = out.getvalue()
    assert code == 3 and time.time() - t0 < 10, said
    assert "the server has not answered for 0.5 s" in said and "stopped following" in said, said
    assert f"`oncofed server start {consortium}`" in said and "--resume" in said, said
    assert "s in this stage" not in said and "not training: the server is down since" in said, said


def test_runs_list_says_the_server_is_down_and_that_a_running_run_is_not_training(consortium):
    from typer.testing import CliRunner

    from oncofed.cli import app

    _superlink_db(consortium, "running")  # no state/server.json: the server is not running
    result = CliRunner().invoke(app, ["runs", "list", str(consortium)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("server: down (the server is not running"), result.output
    assert "running when the server went down · round 1/3 done · not training" in result.output, result.output
    assert "s in this stage" not in result.output, result.output


def test_a_run_the_servers_exit_ended_says_so_in_runs_list_and_in_a_metric_an_alert_can_fire_on(consortium):
    """Flower 1.41 ends a ServerApp with its SuperExec: the server records the runs its exit ends, and /metrics
    exports every run whose training ended unfinished (else it looks like a slow one: rounds frozen, finished 0)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from server.metrics import ConsortiumCollector
    from server.runs import record_interrupted, unfinished_run_names

    db = _superlink_db(consortium, "running")
    assert record_interrupted(consortium, "the SuperExec exited (killed by signal 9)", read_superlink(db)) == ["r1"]
    assert unfinished_run_names(consortium, read_superlink(db)) == set()  # still running as far as it knows
    _set_run_state(db, "failed")  # what the SuperLink makes of it
    line = RunView.load(consortium, "r1", read_superlink(db)).describe({})
    assert line.startswith("failed: ended by the server's exit (the SuperExec exited (killed by signal 9), "), line
    registry = CollectorRegistry()
    registry.register(ConsortiumCollector(consortium / "runs", None, None,
                                          lambda superlink: unfinished_run_names(consortium, superlink),
                                          lambda: read_superlink(db)))
    assert 'oncofed_run_unfinished{run="r1"} 1.0' in generate_latest(registry).decode()
    (consortium / "runs" / "r1" / "flwr-runs.json").write_text(json.dumps([RUN_ID, 7]))  # resumed: a new flwr run
    assert "server's exit" not in RunView.load(consortium, "r1", read_superlink(db)).describe({})


def test_one_scrape_of_the_servers_metrics_reads_the_superlinks_database_once(consortium, monkeypatch):
    """The registered sites, the live runs and the unfinished runs of one scrape come from one read of the SuperLink's
    state (it read it three times: three SQLite opens per scrape, and gauges from three moments)."""
    import urllib.request

    import server.runs
    from server.deploy import Consortium
    from server.metrics import serve_metrics
    from server.processes import free_port

    _superlink_db(consortium, "failed")
    reads = []
    monkeypatch.setattr(server.runs, "read_superlink", lambda db: reads.append(db) or read_superlink(db))
    port = free_port()
    httpd, _ = serve_metrics(Consortium.load(consortium), port)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert reads == [consortium.resolve() / "state" / "superlink.db"]
    assert "oncofed_sites_registered 2.0" in text and "oncofed_sites_online 1.0" in text, text
    assert 'oncofed_run_unfinished{run="r1"} 1.0' in text, text


def test_preflight_names_the_server_process_that_is_down(tmp_path):
    from server.deploy import Consortium, check_server_health

    body = {"status": "down", "down": ["superexec"], "reason": "superexec is down (killed by signal 9)"}

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            data = json.dumps(body).encode()
            self.send_response(503)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "state").mkdir()
        c = Consortium(tmp_path, {})
        check = check_server_health(c)
        assert not check.ok and "oncofed server start" in check.detail
        (tmp_path / "state" / "server.json").write_text(json.dumps({"health_port": server.server_address[1]}))
        check = check_server_health(c)
        assert not check.ok and "superexec is down" in check.detail
    finally:
        server.shutdown()


def test_oncofed_run_refuses_set_keys_it_sets_itself(tmp_path):
    # an --set output-dir trained, completed and then reported failure (the result was outside runs/NAME)
    from server.deploy import DeployError
    from server.submit import submit_run

    for key in ("output-dir", "base-dir", "resume", "deliver-only"):
        with pytest.raises(DeployError, match=f"--set {key}: `oncofed run` sets this itself"):
            submit_run(tmp_path / "consortium", "r1", {key: "x"})


def test_a_finished_run_without_a_model_exits_1_with_the_reason_not_3_with_a_deliver_that_cannot_help(tmp_path):
    """Every site refused round 1: the run exited 3 advising `oncofed deliver`, whose preflight then failed (there is
    no final model); the operator guide says exit 1, and why."""
    import json

    from server.runs import finished_verdict

    run = tmp_path / "runs" / "third"
    run.mkdir(parents=True)
    reason = "no round updated the global model (every site refused, or every round was abandoned: ...)"
    (run / "result.json").write_text(json.dumps({"run": "k", "deliveries": [], "not_delivered": reason}))
    (run / "status.json").write_text(json.dumps({"run": "k", "finished": 1}))
    code, message = finished_verdict(run, "third")
    assert code == 1 and reason in message and "oncofed deliver" not in message
    (run / "result.json").write_text(json.dumps({"run": "k", "deliveries": [{"site": "A", "installed": True}]}))
    (run / "status.json").write_text(json.dumps({"run": "k", "delivery_ok": 1, "delivered": 1, "trained": 1}))
    assert finished_verdict(run, "third")[0] == 0


def test_the_runs_the_superlink_has_pending_or_running_are_named_for_the_metrics(consortium):
    from server.runs import live_run_names

    db = _superlink_db(consortium, "running")
    assert live_run_names(consortium, read_superlink(db)) == {"r1"}
    _set_run_state(db, "completed")
    assert live_run_names(consortium, read_superlink(db)) == set()


def test_runs_list_says_of_a_short_delivery_how_many_sites_that_trained_installed_and_why_not_the_others(consortium):
    run = consortium / "runs" / "r1"
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "participants": list(NODES.values())}) + "\n")
    deliveries = [{"node": NODES["C0"], "site": "C0", "installed": True},
                  {"node": NODES["C1"], "site": "C1", "installed": False, "error": "no reply within 90 s"}]
    (run / "result.json").write_text(json.dumps({"run": "r1-x", "deliveries": deliveries}))
    line = RunView.load(consortium, "r1", read_superlink(_superlink_db(consortium, "completed"))).describe({})
    assert "final model installed at 1 of the 2 sites that trained; not at C1 (no reply within 90 s)" in line, line


def test_runs_stop_counts_a_flwr_run_already_finished_as_nothing_to_stop_not_a_failure(consortium, monkeypatch):
    """With the SuperLink's database busy (unread), `stop` asks Flower to stop every flwr run of the name, a resumed
    run's finished ones too; Flower refuses those ("Run is already finished."), which read as "not stopped" and made
    `runs stop` exit 1 after it had stopped the live run (review of 2026-12-06)."""
    import subprocess
    import types

    import server.runs
    from server.runs import stop

    (consortium / "runs" / "r1" / "flwr-runs.json").write_text(json.dumps([111, RUN_ID]))
    monkeypatch.setattr(server.runs, "read_superlink", lambda path: None)

    def flwr(argv, **kw):
        finished = argv[2] == "111"
        return types.SimpleNamespace(returncode=1 if finished else 0, stderr="",
                                     stdout="Run is already finished." if finished else "stopped")
    monkeypatch.setattr(subprocess, "run", flwr)
    out = io.StringIO()
    assert stop(consortium, "r1", {}, out) == (1, 0)  # (training flwr runs, deliveries) stopped
    assert "not stopped" not in out.getvalue() and "flwr run 111: already finished" in out.getvalue()
