"""Defects a server-side fault-injection review found (a second `oncofed run --resume` beside a healthy run, a SuperLink
restart and a backward clock step while a run trains or delivers), each reproduced on real files: a consortium
directory, run directories as the ServerApp writes them, a SuperLink database with flwr 1.41's layout, and for the
commands end to end a stand-in `flwr` process (no SuperLink runs here)."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.factories import registered_consortium
from tests.test_runs import RUN_ID, _set_run_state, _superlink_db

SITES = {"C0": 11, "C1": 12}
NOT_SENT = "not connected when the final model was sent"


@pytest.fixture
def consortium(tmp_path):
    return registered_consortium(tmp_path / "op", SITES)


def _finished_files(installed: list[str], flwr_run: int | None, **result) -> dict[str, str]:
    """metrics.jsonl, status.json and result.json as the ServerApp of flwr run `flwr_run` leaves a run in which both
    sites trained and only `installed` installed the final model (the other was not connected at the end)."""
    from server.delivery import delivery_status, sites_that_trained

    rounds = [{"round": 1, "ended": time.time(), "status": "updated", "participants": list(SITES.values()),
               "sites": {str(n): {"site": s} for s, n in SITES.items()}, "refused": [], "dropped": [], "failures": []}]
    deliveries = [{"node": n, "site": s, "installed": s in installed, **({} if s in installed else {"error": NOT_SENT})}
                  for s, n in SITES.items()]
    status = {"run": "k", "finished": 1, **delivery_status(Path("unused"), deliveries, sites=sites_that_trained(rounds),
                                                           removed={})}
    return {"metrics.jsonl": "".join(json.dumps(r) + "\n" for r in rounds), "status.json": json.dumps(status),
            "result.json": json.dumps({"run": "k", "round": 1, "deliveries": deliveries, "flwr_run": flwr_run,
                                       **result})}


def _write(run: Path, files: dict[str, str]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (run / name).write_text(text)


def _resume_check(consortium, run: Path):
    """The preflight check of `oncofed run --resume` on the run in `run` (server.submit.run_checks)."""
    from privacy.run_config import load_run_config
    from server.submit import PROJECT, run_checks
    from shared_models.run_config import app_defaults

    cfg = load_run_config({**app_defaults(PROJECT), "base-dir": str(PROJECT)}, source="run config")
    return {c.name: c for c in run_checks(consortium, cfg, run, True, [], "")}[f"run {run.name}"]


def test_resume_is_refused_while_the_run_is_pending_or_running_on_the_superlink_and_allowed_once_it_ended(consortium):
    """A second `oncofed run --resume` beside a healthy `oncofed run` of the same name passed preflight, stopped the
    healthy run (`flwr stop`) and took over; the first then advised `--resume`, which would have stopped the second."""
    root, run = consortium.root, consortium.path("runs", "live")
    _write(run, {"run.json": "{}", "flwr-runs.json": json.dumps([RUN_ID])})  # round 1 done: started
    db = _superlink_db(root, "running")

    def resume_check():
        return _resume_check(consortium, run)

    for state in ("pending", "running"):
        _set_run_state(db, state)
        refused = resume_check()
        assert not refused.ok and f"flwr run {RUN_ID} of this name is still pending or running" in refused.detail
        assert f"`oncofed runs follow {root} live`" in refused.detail, refused.detail
        assert f"`oncofed runs stop {root} live`" in refused.detail, refused.detail
    for state in ("failed", "stopped"):  # its flwr run really ended (a crash, `oncofed runs stop`): resumed
        _set_run_state(db, state)
        assert resume_check().ok, resume_check().detail
    # the server killed while it trained: restarted, its database still says running (until Flower sees the ServerApp's
    # heartbeat lapse), but `oncofed server start` recorded that the server's exit ended it
    _set_run_state(db, "running")
    (run / "interrupted.json").write_text(json.dumps({"flwr_run": RUN_ID, "why": "the server exited",
                                                      "at": time.time()}))
    assert resume_check().ok, resume_check().detail


@pytest.mark.parametrize("state", ["pending", "starting"])
def test_a_run_not_yet_running_when_the_server_exits_is_not_recorded_as_ended_and_its_resume_is_refused_once_it_runs(
        consortium, state):
    """`oncofed server start` recorded a run the SuperLink had pending or starting as ended by the server's exit
    (interrupted.json), but such a run has no ServerApp to lose: the restarted SuperExec launches it. Once it ran,
    the resume preflight took it for the run the exit ended and passed, and the resume then stopped it (stop_previous)
    and trained over it. Only a running one is recorded, and the resume is refused while the launched run runs."""
    from server.runs import read_superlink, record_interrupted

    root, run = consortium.root, consortium.path("runs", "live")
    _write(run, {"run.json": "{}", "flwr-runs.json": json.dumps([RUN_ID])})  # resumed: its latest flwr run waits
    db = _superlink_db(root, state)
    assert record_interrupted(root, "the server was stopped", read_superlink(db)) == []
    _set_run_state(db, "running")  # the restarted SuperExec launched it
    refused = _resume_check(consortium, run)
    assert not refused.ok and f"flwr run {RUN_ID} of this name is still pending or running" in refused.detail, \
        refused.detail
    # one running when the server exits lost its ServerApp: recorded, and resumed while the database still says running
    assert record_interrupted(root, "the server was stopped", read_superlink(db)) == ["live"]
    assert _resume_check(consortium, run).ok


def test_an_interrupted_json_an_older_oncofed_wrote_for_a_pending_run_does_not_call_it_dead_once_it_runs(consortium):
    """OncoFed before 36a5957 wrote interrupted.json for a flwr run the SuperLink had pending too, and such a file
    outlives the upgrade: once the restarted SuperExec launched that run, the --resume preflight took it for the run
    the server's exit ended and passed (the resume then stopped it and trained over it), and `oncofed runs list` called
    its later failure the server's exit. A record applies only to a flwr run running since before it was written: the
    resume preflight is refused while the launched run runs, and removes the file, saying why."""
    from privacy.run_config import load_run_config
    from server.runs import RunView, read_superlink
    from server.submit import PROJECT, run_checks
    from shared_models.run_config import app_defaults

    root, run = consortium.root, consortium.path("runs", "live")
    _write(run, {"run.json": "{}", "flwr-runs.json": json.dumps([RUN_ID])})
    db = _superlink_db(root, "running")  # launched by the restarted SuperExec a minute ago
    older = json.dumps({"flwr_run": RUN_ID, "why": "the server was stopped (`oncofed server stop`, SIGTERM or Ctrl-C)",
                        "at": time.time() - 3600})  # as the older server's exit wrote it an hour ago, the run pending
    (run / "interrupted.json").write_text(older)
    cfg = load_run_config({**app_defaults(PROJECT), "base-dir": str(PROJECT)}, source="run config")
    checks = {c.name: c for c in run_checks(consortium, cfg, run, True, [], "")}
    refused = checks["run live"]
    assert not refused.ok and f"flwr run {RUN_ID} of this name is still pending or running" in refused.detail, \
        refused.detail
    stale = checks["run live: interrupted.json"]
    said = " ".join(stale.detail.split())
    assert stale.warning and f"{run / 'interrupted.json'} records flwr run {RUN_ID} as ended by the server's exit" \
        in said and "but it started running after that, at " in said and "Ignored and removed" in said, said
    assert not (run / "interrupted.json").exists()

    (run / "interrupted.json").write_text(older)
    _set_run_state(db, "failed")  # it failed later, for a reason of its own
    line = RunView.load(root, "live", read_superlink(db)).describe({})
    assert line.startswith("failed") and "server's exit" not in line, line


@contextlib.contextmanager
def _finishing(consortium, superlink: str):
    """Run r1 of `consortium`, trained by C0 and C1 and installed at C0 alone, as its ServerApp ends it: at once
    ("completed") or a second later ("still running", the SuperLink's state with it); yields (root, run dir)."""
    root, run = consortium.root, consortium.path("runs", "r1")
    _write(run, {"flwr-runs.json": json.dumps([RUN_ID])})
    db = _superlink_db(root, "running" if superlink == "still running" else "completed")
    finished = _finished_files(["C0"], RUN_ID)

    def finish():
        if superlink == "still running":
            time.sleep(1.0)
        _write(run, finished)
        _set_run_state(db, "completed")

    finishing = threading.Thread(target=finish)
    finishing.start()
    if superlink == "completed":
        finishing.join()
    try:
        yield root, run
    finally:
        finishing.join()


@pytest.mark.parametrize("superlink", ["still running", "completed"])
def test_a_dropped_log_stream_ends_with_the_runs_delivery_verdict_naming_a_site_that_did_not_install(consortium,
                                                                                                    superlink):
    """The stream drops (a SuperLink restart, which a run survives): `oncofed run` followed the run to its end, then
    exited 0 with "finished: result.json" although C1 never installed the model; finished_verdict says 3, naming C1."""
    from server.runs import after_stream

    with _finishing(consortium, superlink) as (root, run):
        out = io.StringIO()
        code = after_stream(root, "r1", 0, run / "flwr-run.log", out)
    said = out.getvalue()
    assert code == 3, said
    assert f"not at C1 ({NOT_SENT})" in said and f"`oncofed deliver {root} r1`" in said, said


def _stand_in_flwr(tmp_path: Path, monkeypatch, run: Path, files: dict[str, str], dropped: Path | None = None) -> None:
    """`flwr` is the one beside the interpreter (shared_models.flower_tools): a stand-in there whose `flwr run` says it
    started flwr run RUN_ID and leaves `files` in `run` as that run's ServerApp would, its clock an hour behind the
    operator's (stepped back while it ran: an NTP correction, a VM restored); any other `flwr` command fails. With
    `dropped` (the SuperLink's database), its stream drops at once (exit 1, a SuperLink restart) while the ServerApp,
    a process of its own, writes `files` a second later and its flwr run completes in that database."""
    (tmp_path / "serverapp").mkdir()
    _write(tmp_path / "serverapp", files)
    serverapp = tmp_path / "bin" / "serverapp.py"
    serverapp.parent.mkdir()
    serverapp.write_text(f"""import os, shutil, sqlite3, sys, time
time.sleep(float(sys.argv[1]))
for f in os.listdir({str(tmp_path / "serverapp")!r}):
    shutil.copy(os.path.join({str(tmp_path / "serverapp")!r}, f), os.path.join({str(run)!r}, f))
    os.utime(os.path.join({str(run)!r}, f), (time.time() - 3600, time.time() - 3600))
if {str(dropped or "")!r}:
    con = sqlite3.connect({str(dropped or "")!r})
    con.execute("UPDATE task SET finished_at='2026-12-02 10:00:00', sub_status='completed'")
    con.commit()
""")
    flwr = tmp_path / "bin" / "flwr"
    flwr.write_text(f"""#!{sys.executable}
import subprocess, sys
if sys.argv[1:2] != ["run"]:
    sys.exit(1)
print("Successfully started run {RUN_ID}", flush=True)
if {dropped is None}:
    subprocess.run([sys.executable, {str(serverapp)!r}, "0"], check=True)
else:
    subprocess.Popen([sys.executable, {str(serverapp)!r}, "1"], start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # not the stream's pipe: it ends now
    sys.exit(1)
""")
    flwr.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))


def test_oncofed_run_whose_clock_stepped_back_gives_its_own_results_verdict(consortium, tmp_path, monkeypatch):
    """result.json older than the submission by the wall clock was taken for an earlier attempt's: `oncofed run` then
    exited 0, "finished", with C1 never having installed the model. Its own result is the one its flwr run wrote."""
    import server.submit

    run = consortium.path("runs", "r")
    run.mkdir(parents=True)
    _stand_in_flwr(tmp_path, monkeypatch, run, _finished_files(["C0"], RUN_ID))
    monkeypatch.setattr(server.submit, "run_checks", lambda *a: [])  # the server it checks is not running here
    out = io.StringIO()
    code = server.submit.submit_run(consortium.root, "r", {}, out=out)
    said = out.getvalue()
    assert code == 3 and f"not at C1 ({NOT_SENT})" in said, said


def test_oncofed_deliver_whose_clock_stepped_back_reports_the_delivery_it_made(consortium, tmp_path, monkeypatch):
    """`oncofed deliver` took a redelivery dated before its start by the wall clock for none: "did not finish", exit 1,
    after C1 had installed the model. Its delivery is the one its flwr run wrote; a run's own result is not."""
    import server.delivery
    from server.checkpoint import save_checkpoint
    from server.submit import PROJECT
    from shared_models.run_config import app_defaults

    run = consortium.path("runs", "r")
    _write(run, _finished_files(["C0"], RUN_ID - 1))  # the run's own ServerApp: C1 was down at the end
    save_checkpoint(run / "checkpoints", 1, [np.zeros(1)], {},
                    {"run_config": {**app_defaults(PROJECT), "base-dir": str(PROJECT), "output-dir": str(run)}})
    _stand_in_flwr(tmp_path, monkeypatch, run, {})  # first its ServerApp writes nothing: the run's own result stays
    monkeypatch.setattr(server.delivery, "delivery_checks", lambda *a: [])  # the server it checks is not running here
    out = io.StringIO()
    assert server.delivery.submit_delivery(consortium.root, "r", out=out) == 1
    assert "delivery of run 'r' did not finish" in out.getvalue(), out.getvalue()

    _write(tmp_path / "serverapp", _finished_files(["C0", "C1"], RUN_ID, redelivered=time.time() - 3600))
    out = io.StringIO()
    code = server.delivery.submit_delivery(consortium.root, "r", out=out)
    assert code == 0 and "final model installed at all 2 site(s) that trained" in out.getvalue(), out.getvalue()


@pytest.mark.parametrize("superlink", ["still running", "completed"])
def test_runs_follow_ends_with_the_runs_delivery_verdict_naming_a_site_that_did_not_install(consortium, superlink):
    """`oncofed runs follow` exited 0 for any run that completed, although C1, which trained, never installed the
    model: it ends as `oncofed run` does (finished_verdict), 3 naming C1 and `oncofed deliver`."""
    from typer.testing import CliRunner

    from oncofed.cli import app

    with _finishing(consortium, superlink) as (root, run):
        result = CliRunner().invoke(app, ["runs", "follow", str(root), "r1", "--poll", "0.5"])
    assert result.exit_code == 3, result.output
    assert f"not at C1 ({NOT_SENT})" in result.output and f"`oncofed deliver {root} r1`" in result.output, result.output

    _write(run, _finished_files(["C0", "C1"], RUN_ID))  # C1 has it now (an `oncofed deliver`): 0
    result = CliRunner().invoke(app, ["runs", "follow", str(root), "r1", "--poll", "0.5"])
    assert result.exit_code == 0 and "final model installed at all 2 site(s) that trained" in result.output, \
        result.output


def test_oncofed_deliver_whose_log_stream_drops_follows_its_delivery_to_the_end(consortium, tmp_path, monkeypatch):
    """The SuperLink restarts while `oncofed deliver` sends the model: `flwr run --stream` ends (exit 1) while the
    delivery's ServerApp goes on and C1 installs the model. `oncofed deliver` said "did not finish", exit 1; it follows
    that flwr run to its end, as `oncofed run` does, and reports the delivery it made."""
    import server.delivery
    from server.checkpoint import save_checkpoint
    from server.submit import PROJECT
    from shared_models.run_config import app_defaults

    root, run = consortium.root, consortium.path("runs", "r")
    _write(run, _finished_files(["C0"], RUN_ID - 1))  # the run's own ServerApp: C1 was down at the end
    save_checkpoint(run / "checkpoints", 1, [np.zeros(1)], {},
                    {"run_config": {**app_defaults(PROJECT), "base-dir": str(PROJECT), "output-dir": str(run)}})
    db = _superlink_db(root, "running")  # the delivery's flwr run, RUN_ID
    _stand_in_flwr(tmp_path, monkeypatch, run, _finished_files(["C0", "C1"], RUN_ID), dropped=db)
    monkeypatch.setattr(server.delivery, "delivery_checks", lambda *a: [])  # the server it checks is not running here
    out = io.StringIO()
    code = server.delivery.submit_delivery(root, "r", out=out)
    said = out.getvalue()
    assert f"the delivery of run 'r' (flwr run {RUN_ID}) is still running on the SuperLink" in said, said
    assert code == 0 and "final model installed at all 2 site(s) that trained" in said, said
