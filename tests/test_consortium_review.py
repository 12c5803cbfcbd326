"""Defects a reviewer found standing up a consortium by the docs (server side): each reproduced on real files (a
consortium directory, run directories as the ServerApp writes them, a SuperLink database with flwr 1.41's run table)
and, where cheap, real processes (nginx, leftover server processes)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from server.deploy import Consortium
from tests.factories import registered_consortium

SITES = {"Hosp C1": 11, "Hosp C5": 15, "Hosp C6": 16}
BUDGET = ("run oncofed-2db28c16 asks for epsilon 8 and this site has 0.0726 left of its budget 8 (7.927 spent): its "
          "update would carry noise for 0.0726, many times the run's, which the consortium's sum would carry too. "
          "Nothing was trained or sent; the site's data-protection officer may raise its privacy-budget, or the "
          "consortium run with a smaller epsilon")
SETUP = ("SecAgg+ halted in its setup stage: 0 site(s) left in the round, and a site's neighbourhood kept fewer than "
         "SecAgg+'s reconstruction threshold of 2: abandoned before any site trains")


@pytest.fixture
def consortium(tmp_path):
    return registered_consortium(tmp_path / "op", SITES)


def _ended_without_a_model(c: Consortium, name: str = "r2") -> Path:
    """A run in which every site refused both rounds (privacy budgets spent), as its ServerApp leaves it (the refusals
    as the code before this fix recorded them: no node id, the site's name in front)."""
    run = c.path("runs", name)
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    refused = [{"reason": f"{site}: {BUDGET}"} for site in SITES]
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"round": r, "ended": time.time(), "participants": [], "sites": {}, "failures": [], "refused": refused,
         "dropped": [], "status": "abandoned", "reason": SETUP, "weights_sha256": "51303ba0"}) + "\n" for r in (1, 2)))
    (run / "status.json").write_text(json.dumps(
        {"run": "oncofed-2db28c16", "num_rounds": 2, "round": 2, "finished": 1, "participating": 0,
         "weights_sha256": "51303ba0", "delivered": 0, "trained": 0, "delivery_ok": 0, "undelivered": []}))
    (run / "result.json").write_text(json.dumps(
        {"run": "oncofed-2db28c16", "round": 2, "deliveries": [],
         "not_delivered": "no round updated the global model, so the untrained initial model is neither scored, "
                          "signed nor delivered: rounds 1-2: " + SETUP + " (refused: "
                          + "; ".join(r["reason"] for r in refused) + ")"}))
    return run


def test_a_run_that_ended_without_a_model_has_one_verdict_in_runs_list_run_resume_and_deliver(consortium):
    """`deliver` said "never finished training; continue it with --resume", `run --resume` said "finished: `oncofed
    deliver` sends its model again", `runs list` said completed on a 1,500-character line repeating the refusal
    three times."""
    from privacy.run_config import load_run_config
    from server.delivery import submit_delivery
    from server.deploy import DeployError
    from server.runs import NO_SITE_TRAINED, RunView, finished_verdict, site_names
    from server.submit import PROJECT, run_checks
    from shared_models.run_config import app_defaults

    run = _ended_without_a_model(consortium)
    root = consortium.root
    view = RunView.load(root, "r2", None)
    line = view.describe(site_names(root))
    assert view.state == "failed" and line.startswith(NO_SITE_TRAINED), line
    assert line.count("asks for epsilon 8") == 1 and "Hosp C1, Hosp C5, Hosp C6" in line and len(line) < 450, line
    assert "a new run" in line and "--resume" not in line

    code, said = finished_verdict(run, "r2")
    assert code == 1 and NO_SITE_TRAINED in said and said.count("asks for epsilon 8") == 1, said
    assert f"oncofed run {root} --name NEW_NAME" in said and "sends its model again" not in said

    cfg = load_run_config({**app_defaults(PROJECT), "base-dir": str(PROJECT)}, source="run config")
    resume = {c.name: c for c in run_checks(consortium, cfg, run, True, [], "")}["run r2"]
    assert not resume.ok and NO_SITE_TRAINED in resume.detail and "oncofed deliver" not in resume.detail
    again = {c.name: c for c in run_checks(consortium, cfg, run, False, [], "")}["run r2"]
    assert not again.ok and NO_SITE_TRAINED in again.detail and "oncofed deliver" not in again.detail

    with pytest.raises(DeployError) as refused:
        submit_delivery(root, "r2")
    assert NO_SITE_TRAINED in str(refused.value) and "--resume`" not in str(refused.value), refused.value
    # the command exits 1, as `oncofed run` did for this run (2 is a preflight the operator can fix)
    from typer.testing import CliRunner

    from oncofed.cli import app

    said = CliRunner().invoke(app, ["deliver", str(root), "r2"])
    assert said.exit_code == 1 and NO_SITE_TRAINED in said.output, (said.exit_code, said.output)


def test_the_metrics_of_a_run_that_ended_without_a_model_say_failed_and_name_no_model(consortium):
    """/metrics showed run_finished 1 and oncofed_model_info with the SHA-256 of the untrained weights."""
    from prometheus_client import CollectorRegistry, generate_latest

    from server.metrics import ConsortiumCollector

    _ended_without_a_model(consortium)
    reg = CollectorRegistry()
    reg.register(ConsortiumCollector(consortium.path("runs")))
    text = generate_latest(reg).decode()
    assert 'oncofed_run_failed{run="r2",run_key="oncofed-2db28c16"} 1.0' in text, text
    assert 'oncofed_run_finished{run="r2",run_key="oncofed-2db28c16"} 0.0' in text
    assert "oncofed_model_info" not in text and "51303ba0" not in text

    status = json.loads(consortium.path("runs", "r2", "status.json").read_text())  # a run still training: rounds
    consortium.path("runs", "r2", "status.json").write_text(json.dumps(  # so far abandoned, the model untrained
        {**status, "finished": 0, "model_updated": 0}))
    assert "oncofed_model_info" not in generate_latest(reg).decode()
    consortium.path("runs", "r2", "status.json").write_text(json.dumps({**status, "finished": 0, "model_updated": 1}))
    assert 'sha256="51303ba0"' in generate_latest(reg).decode()


def test_refusals_are_said_once_per_distinct_reason_with_the_sites_that_gave_it():
    from server.checkpoint import why_no_update

    rounds = [{"round": 1, "status": "abandoned", "reason": SETUP,
               "refused": [{"reason": f"Hosp C1: {BUDGET}", "node": 11}, {"reason": BUDGET, "node": 15},
                           {"reason": "Hosp C6: its data failed validation (see its report): fix the file"}]}]
    why = why_no_update(rounds, names={11: "Hosp C1", 15: "Hosp C5", 16: "Hosp C6"})
    assert why.count("asks for epsilon 8") == 1 and "Hosp C1, Hosp C5: run oncofed" in why, why
    assert "Hosp C6: its data failed validation (see its report): fix the file" in why
    short = why_no_update(rounds, names={11: "Hosp C1", 15: "Hosp C5", 16: "Hosp C6"}, short=True)
    assert short == ("round 1: refused by Hosp C1, Hosp C5: run oncofed-2db28c16 asks for epsilon 8 and this site has "
                     "0.0726 left of its budget 8 (7.927 spent); Hosp C6: its data failed validation (see its "
                     "report)"), short


def test_the_end_of_a_run_names_a_site_that_refused_every_round_and_a_registered_site_that_never_connected(consortium):
    """`oncofed run` exited 0 and its last line named neither."""
    from server.runs import finished_verdict

    record = json.loads(consortium.path("consortium.json").read_text())
    record["sites"] += [{"name": "Hosp D7", "node_id": "17", "key_sha256": "cd", "added": "2026-12-06T19:03:25Z"},
                        {"name": "Hosp E8", "node_id": "18", "key_sha256": "ef", "added": "2099-01-01T00:00:00Z"}]
    consortium.path("consortium.json").write_text(json.dumps(record))  # E8: registered after the run ended
    run = consortium.path("runs", "r4")
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"round": r, "ended": time.time(), "status": "updated", "participants": [11, 15], "sites": {"11": {}, "15": {}},
         "refused": [{"reason": f"Hosp C6: {BUDGET}", "node": 16}], "dropped": [], "failures": []}) + "\n"
        for r in (1, 2)))
    (run / "status.json").write_text(json.dumps({"run": "k", "finished": 1, "trained": 2, "delivered": 2,
                                                 "delivery_ok": 1, "undelivered": []}))
    (run / "result.json").write_text(json.dumps({"run": "k", "deliveries": [
        {"node": 11, "site": "Hosp C1", "installed": True}, {"node": 15, "site": "Hosp C5", "installed": True}]}))
    code, said = finished_verdict(run, "r4")
    assert code == 0 and "refused every round: Hosp C6: run oncofed-2db28c16 asks for epsilon 8" in said, said
    assert "never connected while it ran: Hosp D7" in said and "Hosp E8" not in said and "Hosp C1" not in said


def test_a_rounds_count_of_sites_agrees_with_flowers_count_of_failed_messages():
    """"received 2 results and 2 failures" stood next to "aggregated 2 sites (0 refused, 1 failed, 1 dropped)": one
    site gone at two SecAgg+ stages, counted as a failure and as a dropout."""
    from server.strategy import aggregated_line

    said = aggregated_line(4, 2, 3, 0, [13043309448290624991], 2, 1)
    assert said.startswith("round 4: aggregated 2 of 3 sampled sites (0 refused, 1 without an update: nodes "
                           "13043309448290624991)"), said
    assert "Flower's 2 failure(s) are failed messages" in said and "1 distinct error" in said
    assert aggregated_line(1, 3, 3, 0, [], 0, 0) == "round 1: aggregated 3 of 3 sampled sites (0 refused, 0 without " \
                                                   "an update)"


def test_a_misspelt_run_config_key_is_answered_with_the_closest_key():
    from privacy.run_config import load_run_config
    from server.submit import PROJECT
    from shared_models.run_config import RunConfigError, app_defaults

    with pytest.raises(RunConfigError, match="num-round: .*unknown key: did you mean 'num-rounds'"):
        load_run_config({**app_defaults(PROJECT), "num-round": 2}, source="run config")


def test_list_sites_with_the_server_down_lists_the_register_with_online_status_unknown(consortium):
    """It failed with `flwr supernode ls`'s raw output although consortium.json holds the register."""
    from typer.testing import CliRunner

    from oncofed.cli import app

    result = CliRunner().invoke(app, ["consortium", "list-sites", str(consortium.root)])  # no SuperLink listening
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all("unknown" in ln for ln in lines) and "Hosp C5" in result.stdout, result.stdout
    assert "not reachable" in result.stderr and "online is unknown" in result.stderr
    assert "Listing all nodes" not in result.output


def _flwr_run_table(db: Path, runs: dict[int, str]) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE run (run_id BIGINT, fab_id VARCHAR, fab_version VARCHAR, fab_hash VARCHAR, "
                "primary_task_id BIGINT)")
    for run_id, fab_hash in runs.items():
        con.execute("INSERT INTO run VALUES (?, 'oncofed/oncofed', '0.1.0', ?, 1)",
                    (run_id - 2**64 if run_id >= 2**63 else run_id, fab_hash))
    con.commit()
    con.close()


def test_a_resume_after_the_code_changed_says_it_continues_with_the_new_code(consortium):
    """`oncofed run --resume` after the checkout changed installed a new app copy and went on silently."""
    from server.runs import code_change

    first, same, changed = 16654368212550579610, 7, 15309708537477209651
    _flwr_run_table(consortium.path("state", "superlink.db"), {first: "1b9b7a67" * 8, same: "1b9b7a67" * 8,
                                                               changed: "a2e3d5f6" * 8})
    run = consortium.path("runs", "r3")
    run.mkdir(parents=True)
    (run / "flwr-runs.json").write_text(json.dumps([first, changed]))
    said = code_change(consortium.root, "r3", changed)
    assert "the code differs from the code the run started with" in said and "1b9b7a671b9b7a67" in said, said
    assert "a2e3d5f6a2e3d5f6" in said and "continues with the new code" in said
    (run / "flwr-runs.json").write_text(json.dumps([first, same]))
    assert code_change(consortium.root, "r3", same) == ""


def _sleeper(root: Path, new_group: bool) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(root)],
                            start_new_session=new_group)
    threading.Thread(target=proc.wait, daemon=True).start()  # reaped when it ends (not left a zombie)
    deadline = time.monotonic() + 30  # until it has exec'd
    while str(root).encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


def test_server_stop_after_a_killed_server_start_stops_what_it_left_and_says_so(consortium):
    """`oncofed server stop` exited 1 printing only `kill PID PID`."""
    from server.deploy import stop_server

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    link, nginx = _sleeper(consortium.root, True), _sleeper(consortium.root, True)  # their own sessions, as started
    other = _sleeper(consortium.root.parent / "elsewhere", True)  # a reused pid: another process's
    try:
        consortium.path("state").mkdir(exist_ok=True)
        consortium.path("state", "server.json").write_text(json.dumps(
            {"pid": dead.pid, "superlink_pid": link.pid, "superexec_pid": other.pid, "proxy_pid": nginx.pid}))
        said = stop_server(consortium.root, timeout=5)
        assert f"superlink (pid {link.pid}), proxy (pid {nginx.pid})" in said and "server start" in said, said
        deadline = time.monotonic() + 10
        while (link.poll() is None or nginx.poll() is None) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.returncode == -15 and nginx.returncode == -15 and other.poll() is None
        assert "not running" in stop_server(consortium.root)
    finally:
        for p in (link, nginx, other):
            p.kill()


def test_health_answers_the_documented_503_json_when_the_server_behind_nginx_is_gone(consortium, tmp_path):
    """After a kill -9 of `oncofed server start`, its nginx answered /health with its own HTML 502."""
    import socket

    from privacy.preflight import https_health
    from server import proxy

    body = proxy.render(consortium.root, "127.0.0.1", 8443, consortium.internal_port, health_port=9)
    down = body.split("location @health_down {", 1)[1].split("return 503 '", 1)[1].split("\\n';", 1)[0]
    assert json.loads(down)["status"] == "down" and "error_page 502 503 504 = @health_down" in body
    if proxy.nginx_binary() is None:
        pytest.skip("nginx is not installed: the rendered configuration was checked alone")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        public = s.getsockname()[1]
    with socket.socket() as s:  # a port nobody listens on: the health server's, its process gone
        s.bind(("127.0.0.1", 0))
        gone = s.getsockname()[1]
    proxy.write_config(consortium.root, "127.0.0.1", public, consortium.internal_port, health_port=gone)
    nginx = subprocess.Popen(proxy.nginx_command(consortium.root), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import http.client
        import ssl

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                https_health(f"127.0.0.1:{public}", consortium.path("ca", "ca.crt"))
                break
            except OSError:
                time.sleep(0.1)
        conn = http.client.HTTPSConnection("127.0.0.1", public, timeout=5, context=ssl.create_default_context(
            cafile=str(consortium.path("ca", "ca.crt"))))
        conn.request("GET", "/health")
        reply = conn.getresponse()
        assert reply.status == 503 and reply.getheader("Content-Type") == "application/json"
        assert json.loads(reply.read())["down"] == ["server"]
    finally:
        import os
        import signal

        os.killpg(nginx.pid, signal.SIGTERM)
        nginx.wait(10)
