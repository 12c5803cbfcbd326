"""An `oncofed deliver`'s own flwr run as the operator's commands see it: stopped with `oncofed runs stop`, cut off by
the server's exit, followed by `oncofed runs follow`. On real files (a consortium directory, a finished run, a
SuperLink database with flwr 1.41's layout) and, for the commands end to end, a stand-in `flwr` process beside the
interpreter (no SuperLink runs here), as in tests/test_fault_review.py."""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.factories import registered_consortium, stand_in_server
from tests.test_fault_review import NOT_SENT, SITES, _finished_files, _write
from tests.test_runs import RUN_ID, _set_run_state, _superlink_db

DELIVERY = RUN_ID  # the delivery's flwr run; the run trained as RUN_ID - 1
PYTHON = sys.executable  # (the tests below put a stand-in `flwr` beside another one)


@pytest.fixture
def consortium(tmp_path):
    return registered_consortium(tmp_path / "op", SITES)


def _finished_run(consortium) -> Path:
    """Run r, trained by C0 and C1, its model installed at C0 alone (C1 was down at the end), as its ServerApp left
    it: what `oncofed deliver` sends again."""
    from server.checkpoint import save_checkpoint
    from server.submit import PROJECT
    from shared_models.run_config import app_defaults

    run = consortium.path("runs", "r")
    _write(run, _finished_files(["C0"], RUN_ID - 1))
    save_checkpoint(run / "checkpoints", 1, [np.zeros(1)], {},
                    {"run_config": {**app_defaults(PROJECT), "base-dir": str(PROJECT), "output-dir": str(run)}})
    return run


def _stand_in_flwr(tmp_path: Path, monkeypatch, db: Path, stream: str, stop_returns_after: Path | None = None) -> None:
    """A `flwr` beside the interpreter (shared_models.flower_tools). Its `flwr run` says it started flwr run DELIVERY,
    whose ServerApp writes nothing, and then, `stream`: "followed", streams until that run ends in the SuperLink's
    database (at most 30 s), or "dropped", ends at once with exit 1 (the server went down under it). Its `flwr stop
    DELIVERY` stops that run in the database, as the SuperLink does, and returns (once `stop_returns_after` exists, at
    most 30 s, when given); any other `flwr` command fails."""
    flwr = tmp_path / "bin" / "flwr"
    flwr.parent.mkdir()
    flwr.write_text(f"""#!{sys.executable}
import os, sqlite3, sys, time
def execute(sql):
    con = sqlite3.connect({str(db)!r})
    row = con.execute(sql).fetchone()
    con.commit()
    con.close()
    return row
if sys.argv[1:3] == ["stop", "{DELIVERY}"]:
    execute("UPDATE task SET finished_at='2026-12-02 10:00:00', sub_status='stopped'")
    print("Run {DELIVERY} stopped.")
    deadline = time.time() + 30
    while {str(stop_returns_after or "")!r} and not os.path.exists({str(stop_returns_after)!r}) and time.time() < deadline:
        time.sleep(0.05)
    sys.exit(0)
if sys.argv[1:2] != ["run"]:
    sys.exit(1)
print("Successfully started run {DELIVERY}", flush=True)
if {stream!r} == "dropped":
    sys.exit(1)
deadline = time.time() + 30
while execute("SELECT finished_at FROM task")[0] is None and time.time() < deadline:
    time.sleep(0.1)
""")
    flwr.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))


def _deliver_in_background(consortium, monkeypatch) -> tuple[threading.Thread, io.StringIO, list[int]]:
    """`oncofed deliver CONSORTIUM r` in a thread (its preflight skipped: the server it checks is not running here),
    once its flwr run is recorded in the run's directory (or 10 s passed): (the thread, what it printed, its exit)."""
    import server.delivery

    monkeypatch.setattr(server.delivery, "delivery_checks", lambda *a: [])
    out, code = io.StringIO(), []
    thread = threading.Thread(daemon=True, target=lambda: code.append(
        server.delivery.submit_delivery(consortium.root, "r", out=out)))
    thread.start()
    deadline = time.monotonic() + 10
    while not consortium.path("runs", "r", "delivery-runs.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return thread, out, code


def _records(run: Path) -> dict[str, str]:
    return {f: (run / f).read_text() for f in ("result.json", "status.json", "metrics.jsonl")}


def test_runs_stop_stops_an_oncofed_deliver_in_progress_and_the_run_records_it(consortium, tmp_path, monkeypatch):
    """`oncofed runs stop` stopped only the flwr runs in flwr-runs.json (the training attempts): a delivery's flwr run
    is in none of the run's files, so it said "nothing running to stop" while `oncofed deliver` went on sending (and
    the ServerApp's run lock told the operator to `oncofed runs stop` it). It stops the delivery; the run's directory
    records it as stopped, its records of the deliveries are as they were, and `oncofed deliver` and `oncofed runs`
    say that `oncofed deliver` sends the model again."""
    from typer.testing import CliRunner

    import privacy.preflight
    import privacy.registry
    from oncofed.cli import app
    from privacy.preflight import Check
    from server.runs import RunView, read_superlink

    root, run = consortium.root, _finished_run(consortium)
    db = _superlink_db(root, "running")  # the delivery's flwr run
    _stand_in_flwr(tmp_path, monkeypatch, db, "followed")
    before = _records(run)
    deliver, said_by_deliver, code = _deliver_in_background(consortium, monkeypatch)
    # the server is up, as far as `runs stop` asks (none runs here)
    monkeypatch.setattr(privacy.preflight, "check_reachable", lambda *a: Check("SuperLink", True, "up"))
    monkeypatch.setattr(privacy.registry, "foreign_superlink", lambda root: "")
    result = CliRunner().invoke(app, ["runs", "stop", str(root), "r"])
    deliver.join(timeout=30)
    again = f"`oncofed deliver {root} r` sends it again to the sites that have not installed it"
    assert result.exit_code == 0, result.output
    assert f"flwr run {DELIVERY} (`oncofed deliver`): stopped" in result.output, result.output
    assert "1 flwr run(s) stopped" in result.output and again in result.output, result.output
    assert "--resume" not in result.output, result.output  # a finished run is not resumed: its model is sent again

    assert not deliver.is_alive() and code == [1], said_by_deliver.getvalue()
    assert f"(flwr run {DELIVERY}) was stopped (`oncofed runs stop`, " in said_by_deliver.getvalue(), \
        said_by_deliver.getvalue()
    assert again in said_by_deliver.getvalue(), said_by_deliver.getvalue()
    ended = json.loads((run / "delivery-runs.json").read_text())[-1]
    assert ended["flwr_run"] == DELIVERY and ended["ended"]["how"] == "stopped", ended
    assert _records(run) == before  # the deliveries as recorded before it: C1 still lacks the model
    line = RunView.load(root, "r", read_superlink(db)).describe({})
    assert "was stopped (`oncofed runs stop`" in line and f"not at C1 ({NOT_SENT})" in line, line
    result = CliRunner().invoke(app, ["runs", "stop", str(root), "r"])
    assert result.exit_code == 0 and "nothing running to stop" in result.output, result.output


def test_a_delivery_seen_stopped_before_runs_stop_returns_is_said_stopped_by_runs_stop(consortium, tmp_path,
                                                                                      monkeypatch):
    """The SuperLink calls the delivery's flwr run stopped as soon as `flwr stop` asks it, so `oncofed deliver`, whose
    stream that ends, read its state before `oncofed runs stop` (still waiting for `flwr stop` to return) recorded
    the stop, and told the operator it was stopped with `flwr stop` (about 1 run in 6 of the test above). `runs stop`
    records who stops it before asking: whenever `oncofed deliver` looks, it names `oncofed runs stop`."""
    from server.runs import stop
    from server.submit import env_for

    root, run = consortium.root, _finished_run(consortium)
    db = _superlink_db(root, "running")
    returns = tmp_path / "flwr-stop-may-return"
    _stand_in_flwr(tmp_path, monkeypatch, db, "followed", stop_returns_after=returns)
    deliver, said_by_deliver, code = _deliver_in_background(consortium, monkeypatch)
    said_by_stop = io.StringIO()
    stopping = threading.Thread(daemon=True, target=lambda: stop(root, "r", env_for(consortium), said_by_stop))
    stopping.start()
    deliver.join(timeout=30)  # its verdict given while `flwr stop` has not returned
    returns.touch()
    stopping.join(timeout=30)
    said = said_by_deliver.getvalue()
    assert not deliver.is_alive() and code == [1], said
    assert f"(flwr run {DELIVERY}) was stopped (`oncofed runs stop`, " in said, said
    assert not stopping.is_alive() and f"flwr run {DELIVERY} (`oncofed deliver`): stopped" in said_by_stop.getvalue()
    ended = json.loads((run / "delivery-runs.json").read_text())[-1]
    assert ended["ended"]["how"] == "stopped" and "stopping" not in ended, ended


def test_a_delivery_the_servers_exit_ended_is_recorded_so_and_says_to_deliver_again(consortium, tmp_path,
                                                                                  monkeypatch):
    """The server was killed (kill -9) while `oncofed deliver` sent the model: its ServerApp died with it, but nothing
    recorded that, as record_interrupted does for a training run, so the run showed no delivery ended and `oncofed
    deliver`, following a flwr run the database still called running, gave up only after the server's give-up time,
    saying "did not finish". The next `oncofed server start` records it as ended by the server's exit: `oncofed
    deliver` says so at once, and it and `oncofed runs` name the next step."""
    import signal

    import server.deploy
    from server.deploy import DeployError, start_server
    from server.runs import RunView, read_superlink

    root, run = consortium.root, _finished_run(consortium)
    db = _superlink_db(root, "running")  # the delivery's flwr run, whose ServerApp the kill ended
    _stand_in_flwr(tmp_path, monkeypatch, db, "dropped")
    before = _records(run)
    deliver, said_by_deliver, code = _deliver_in_background(consortium, monkeypatch)

    def no_superlink_here(self):
        raise DeployError("stand-in: no SuperLink is started here")

    # `oncofed server start` up to where it starts its SuperLink, after it recorded what the last server's exit ended
    monkeypatch.setattr(server.deploy, "server_checks", lambda *a: [])
    monkeypatch.setattr(server.deploy.proxy, "nginx_command", lambda root: ["nginx"])
    monkeypatch.setattr(server.deploy.Supervised, "start", no_superlink_here)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # not the test process's own handlers
    started = io.StringIO()
    assert start_server(root, metrics_port=0, out=started) == 1
    assert (f"the delivery of run(s) r stopped: the server exited (killed or crashed) while it ran; "
            f"`oncofed deliver {root} NAME` sends each again") in started.getvalue(), started.getvalue()
    deliver.join(timeout=30)
    said = said_by_deliver.getvalue()
    assert not deliver.is_alive() and code == [1], said
    assert (f"(flwr run {DELIVERY}) was ended by the server's exit (the server exited (killed or crashed) while it "
            "ran, ") in said, said
    assert f"`oncofed server start {root}`), `oncofed deliver {root} r` sends it again" in said, said
    assert _records(run) == before
    line = RunView.load(root, "r", read_superlink(db)).describe({})  # the database still says running
    assert "is delivering" not in line and "was ended by the server's exit" in line, line


def test_a_delivery_pending_when_the_server_exits_is_not_recorded_as_ended(consortium):
    """Only a running delivery's ServerApp dies with the server: a pending one (or one being started, which Flower
    puts back to pending) the restarted SuperExec launches."""
    from server.runs import read_superlink, record_delivery_run, record_interrupted_deliveries

    run = _finished_run(consortium)
    record_delivery_run(run, DELIVERY)
    db = _superlink_db(consortium.root, "pending")
    assert record_interrupted_deliveries(consortium.root, "the server was stopped", read_superlink(db)) == []
    _set_run_state(db, "running")
    assert record_interrupted_deliveries(consortium.root, "the server was stopped", read_superlink(db)) == ["r"]


def test_runs_follow_follows_an_oncofed_deliver_in_progress_to_its_verdict(consortium):
    """`oncofed runs follow` of a run being delivered again gave at once the verdict from before the delivery (exit 3,
    "not at C1 ...: `oncofed deliver`", the command that was running); it follows the delivery to its end."""
    from typer.testing import CliRunner

    from oncofed.cli import app
    from server.runs import record_delivery_run

    root, run = consortium.root, _finished_run(consortium)
    record_delivery_run(run, DELIVERY)
    db = _superlink_db(root, "running")

    def delivered():  # the delivery's ServerApp: C1 is back and installs the model
        time.sleep(1.0)
        _write(run, _finished_files(["C0", "C1"], DELIVERY))
        _set_run_state(db, "completed")

    delivering = threading.Thread(target=delivered)
    delivering.start()
    result = CliRunner().invoke(app, ["runs", "follow", str(root), "r", "--poll", "0.5"])
    delivering.join()
    assert f"`oncofed deliver` (flwr run {DELIVERY}, since " in result.output, result.output
    assert result.exit_code == 0 and "final model installed at all 2 site(s) that trained" in result.output, \
        result.output


@pytest.mark.parametrize("holder,state", [("delivery", "pending"), ("delivery", "running"), ("training", "running")])
def test_oncofed_deliver_is_refused_at_preflight_while_a_flwr_run_of_the_run_is_pending_or_running(
        consortium, tmp_path, monkeypatch, holder, state):
    """A second `oncofed deliver` beside one in progress (or beside the run's training, whose ServerApp delivers the
    model itself) passed preflight and submitted a ServerApp that waited 60 s for the run's lock, then failed. It is
    refused at once, naming the flwr run in progress and what to do, and allowed once that flwr run ended."""
    import privacy.preflight
    import server.deploy
    from typer.testing import CliRunner

    from oncofed.cli import app
    from privacy.audit import AuditLog
    from privacy.preflight import Check
    from server.delivery import save_package
    from server.runs import record_delivery_run
    from shared_models.weights import arrays_sha256

    root, run = consortium.root, _finished_run(consortium)
    final = [np.ones(3, dtype=np.float32)]  # its saved final model, as its audit log recorded it: preflight passes it
    np.savez(run / "final_weights.npz", *final)
    save_package(run, {"run": "k", "round": 1, "arrays_sha256": arrays_sha256(final)})
    AuditLog(run / "audit.jsonl").append("round", run="k", round=1, weights_sha256=arrays_sha256(final))
    if holder == "delivery":
        record_delivery_run(run, DELIVERY)
    else:  # the training's own flwr run, delivering the model at its end
        (run / "flwr-runs.json").write_text(json.dumps([RUN_ID]))
    db = _superlink_db(root, state)
    up = Check("stand-in", True, "the server is not running here")
    monkeypatch.setattr(privacy.preflight, "check_reachable", lambda *a: up)
    monkeypatch.setattr(server.deploy, "check_server_health", lambda c: up)
    flwr = tmp_path / "bin" / "flwr"  # a `flwr` beside the interpreter that says it ran and ends
    flwr.parent.mkdir()
    flwr.write_text(f"#!{sys.executable}\nimport pathlib, sys\npathlib.Path({str(tmp_path / 'ran')!r}).touch()\n"
                    "sys.exit(1)\n")
    flwr.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))

    started = time.monotonic()
    result = CliRunner().invoke(app, ["deliver", str(root), "r"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and time.monotonic() - started < 10, result.output
    what = "an `oncofed deliver` of this run" if holder == "delivery" else "this run's training (`oncofed run`)"
    assert f"flwr run {RUN_ID}, {what}" in said and "still pending or running on the SuperLink" in said, said
    assert f"`oncofed runs follow {root} r`" in said and f"`oncofed runs stop {root} r`" in said, said
    assert not (tmp_path / "ran").exists()  # no flwr run submitted
    if holder == "training":  # its ServerApp wrote result.json and is ending: the delivery waits for it (its lock)
        _write(run, _finished_files(["C0"], RUN_ID))
        result = CliRunner().invoke(app, ["deliver", str(root), "r"])
        assert (tmp_path / "ran").exists() and "preflight passed" in result.output, result.output
    _set_run_state(db, "completed")  # it ended: the next delivery goes ahead
    result = CliRunner().invoke(app, ["deliver", str(root), "r"])
    assert (tmp_path / "ran").exists() and "preflight passed" in result.output, result.output


SUBMITTED = RUN_ID - 2  # the flwr run a stand-in `flwr run` submits to the SuperLink's database


def _deliverable_run(consortium, tmp_path, monkeypatch, flwr_run_after: float, submits: bool = False) -> Path:
    """Run r as `_finished_run`, its final model saved as its audit log recorded it, so that `oncofed deliver`'s own
    preflight passes (the server's reachability and health, which it asks, stand in as up: no server runs here); a
    stand-in `flwr` beside the interpreter whose `flwr run` notes its launch in tmp_path/launched, says after
    `flwr_run_after` seconds (and once tmp_path/hold is gone, or 30 s passed) that it started flwr run DELIVERY, and
    ends (its ServerApp writes nothing). `submits`: it first submits flwr run SUBMITTED, pending, to the SuperLink's
    database (with its --run-config, as the SuperLink records it), and says that one started."""
    import privacy.preflight
    import server.deploy
    from privacy.audit import AuditLog
    from privacy.preflight import Check
    from server.delivery import save_package
    from shared_models.weights import arrays_sha256

    run = _finished_run(consortium)
    final = [np.ones(3, dtype=np.float32)]
    np.savez(run / "final_weights.npz", *final)
    save_package(run, {"run": "k", "round": 1, "arrays_sha256": arrays_sha256(final)})
    AuditLog(run / "audit.jsonl").append("round", run="k", round=1, weights_sha256=arrays_sha256(final))
    up = Check("stand-in", True, "the server is not running here")
    monkeypatch.setattr(privacy.preflight, "check_reachable", lambda *a: up)
    monkeypatch.setattr(server.deploy, "check_server_health", lambda c: up)
    flwr = tmp_path / "bin" / "flwr"
    flwr.parent.mkdir()
    submit = f"""
import datetime, json, sqlite3, sys
from flwr.common.config import parse_config_args
con = sqlite3.connect({str(consortium.path("state", "superlink.db"))!r})
con.execute("INSERT INTO run (run_id, primary_task_id, override_config) VALUES (?, 2, ?)",
            ({SUBMITTED - 2**64}, json.dumps(parse_config_args([sys.argv[sys.argv.index("--run-config") + 1]]))))
con.execute("INSERT INTO task (task_id, pending_at) VALUES (2, ?)",
            (datetime.datetime.now(datetime.timezone.utc).isoformat(sep=" "),))
con.commit()
con.close()
""" if submits else ""
    flwr.write_text(f"#!{sys.executable}\nimport os, pathlib, time\n{submit}"
                    f"with open({str(tmp_path / 'launched')!r}, 'a') as f:\n    f.write(str(os.getpid()) + '\\n')\n"
                    f"time.sleep({flwr_run_after})\ndeadline = time.time() + 30\n"
                    f"while pathlib.Path({str(tmp_path / 'hold')!r}).exists() and time.time() < deadline:\n"
                    "    time.sleep(0.05)\n"
                    f"print('Successfully started run {SUBMITTED if submits else DELIVERY}', flush=True)\n")
    flwr.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    return run


def _launched(tmp_path: Path) -> int:
    """How many `flwr run`s the stand-in `flwr` was started for."""
    return len((tmp_path / "launched").read_text().split()) if (tmp_path / "launched").exists() else 0


def test_two_oncofed_delivers_started_at_once_submit_one_delivery_and_the_other_is_refused_naming_it(
        consortium, tmp_path, monkeypatch):
    """Two `oncofed deliver` of one run started at the same moment both passed the preflight, which reads
    delivery-runs.json, before either had recorded its flwr run there: two ServerApps of the run were submitted, the
    second to wait 60 s for the run's lock and fail. The first holds the run's submit lock from before its preflight
    until its flwr run is recorded; the second is refused at once naming the run and the `oncofed deliver` in
    progress, and submits nothing. Two real concurrent calls (threads: each opens the lock file itself, as two
    processes do), the lock a real flock."""
    from server.delivery import submit_delivery
    from server.deploy import DeployError

    root = consortium.root
    _deliverable_run(consortium, tmp_path, monkeypatch, flwr_run_after=3.0)
    _superlink_db(root, "completed")  # (the delivery's flwr run, once submitted, ends at once)
    start, said = threading.Barrier(2), {}

    def deliver(who: str) -> None:
        out = io.StringIO()
        start.wait()
        try:
            said[who] = (submit_delivery(root, "r", out=out), out.getvalue())
        except DeployError as e:
            said[who] = ("refused", str(e))

    both = [threading.Thread(target=deliver, args=(who,)) for who in ("a", "b")]
    for t in both:
        t.start()
    for t in both:
        t.join(timeout=60)
    assert _launched(tmp_path) == 1, said  # one flwr run submitted, not two
    refused = [text for code, text in said.values() if code == "refused"]
    assert len(refused) == 1, said
    assert "`oncofed deliver` (pid " in refused[0] and "is submitting run 'r' right now" in refused[0], refused
    assert "nothing was submitted" in refused[0] and f"`oncofed runs follow {root} r`" in refused[0], refused
    assert [e["flwr_run"] for e in json.loads(consortium.path("runs", "r", "delivery-runs.json").read_text())] == \
        [DELIVERY]
    # recorded, the lock is free: the next `oncofed deliver` passes the lock and its preflight reads the record
    from server.submit import submit_lock

    submit_lock(consortium, "r", "`oncofed deliver`").close()


@pytest.mark.parametrize("moment", ["just locked", "releasing"])
def test_a_submit_lock_whose_holder_is_naming_itself_or_letting_go_is_not_called_unknown(consortium, moment):
    """The holder of a run's submit lock writes who it is just after it takes the flock and empties the file just
    before it lets go: a second command in between read an empty file and was refused as by "another `oncofed run` or
    `oncofed deliver`" (the test above failed so 3 runs in 30). Just after locking, it is refused naming the holder;
    just before release, it takes the lock. The holder here: another open file of the lock, whose flock is its own as
    another process's is."""
    from server.deploy import DeployError
    from server.submit import submit_lock
    from shared_models.files import exclusive_lock

    holder = exclusive_lock(consortium.path("runs", ".r.submit.lock"))

    def a_moment_later() -> None:
        time.sleep(0.1)
        if moment == "just locked":
            holder.write(json.dumps({"pid": 4242, "command": "`oncofed deliver`", "since": time.time()}))
            holder.flush()
        else:
            holder.close()

    later = threading.Thread(target=a_moment_later)
    later.start()
    try:
        if moment == "just locked":
            with pytest.raises(DeployError, match=r"`oncofed deliver` \(pid 4242, since .*\) is submitting run 'r'"):
                submit_lock(consortium, "r", "`oncofed deliver`")
        else:
            submit_lock(consortium, "r", "`oncofed deliver`").close()
    finally:
        later.join()
        holder.close()


def _deliver_until_its_flwr_run_launched(root: Path, tmp_path: Path):
    """A real `oncofed deliver CONSORTIUM r` process (the server stands in as up) once its preflight passed and its
    `flwr run` (the stand-in of _deliverable_run) launched, held there by tmp_path/hold (created here)."""
    import os
    import subprocess

    (tmp_path / "hold").touch()
    first = subprocess.Popen([PYTHON, "-c", f"""
import sys
import privacy.preflight, server.deploy
from privacy.preflight import Check
up = Check("stand-in", True, "the server is not running here")
privacy.preflight.check_reachable = lambda *a: up
server.deploy.check_server_health = lambda c: up
sys.executable = {str(tmp_path / "bin" / "python")!r}
from server.delivery import submit_delivery
submit_delivery({str(root)!r}, "r")
"""], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not _launched(tmp_path) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if _launched(tmp_path) != 1:
        first.kill()
        pytest.fail(f"its `flwr run` never launched (exit {first.wait()})")
    return first


def _kill(pid: int) -> None:
    """SIGKILL process `pid`, once it is dead (a zombie not reaped yet: the kill of a process is not its end)."""
    import psutil

    deadline = time.monotonic() + 10
    try:
        proc = psutil.Process(pid)
        proc.kill()
        while proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.02)
    except psutil.NoSuchProcess:
        pass


def _its_flwr_run(tmp_path: Path) -> int:
    """The pid of the first `flwr run` the stand-in was started for."""
    return int((tmp_path / "launched").read_text().split()[0])


def test_an_oncofed_deliver_killed_while_it_submits_leaves_the_run_to_the_next_one_which_says_so(
        consortium, tmp_path, monkeypatch):
    """A real `oncofed deliver` process, killed (kill -9) between its preflight and recording its flwr run, its `flwr
    run` (a session of its own) killed too before it submitted: while it lived, another `oncofed deliver` of the run
    was refused naming it; once it is gone the run is not left locked (the kernel ends its flock with it), and the
    next `oncofed deliver` takes the lock over, saying whose it was and that it submitted nothing (the SuperLink's
    database holds no flwr run of the run since it locked)."""
    from server.delivery import submit_delivery
    from server.deploy import DeployError

    root = consortium.root
    _deliverable_run(consortium, tmp_path, monkeypatch, flwr_run_after=0.0)
    _superlink_db(root, "completed")
    first = _deliver_until_its_flwr_run_launched(root, tmp_path)
    try:
        with pytest.raises(DeployError, match=rf"`oncofed deliver` \(pid {first.pid}, since .*\) is submitting run "
                                              "'r' right now"):
            submit_delivery(root, "r", out=io.StringIO())
        assert _launched(tmp_path) == 1
    finally:
        _kill(first.pid)
        first.wait(timeout=10)
        _kill(_its_flwr_run(tmp_path))  # (gone before the takeover below: one still running refuses it)
    # only now: gone while the first still lived, its `flwr run` could say it started and the first release the lock
    # before the second `oncofed deliver` above looked
    (tmp_path / "hold").unlink()  # (the next `flwr run` says at once that it started)
    out = io.StringIO()
    assert submit_delivery(root, "r", out=out) == 1  # (the stand-in's delivery writes nothing)
    said = " ".join(out.getvalue().split())
    assert f"left by `oncofed deliver` (pid {first.pid}, since " in said and ") of run 'r', which ended (killed or " \
        "crashed) before recording its flwr run; taken over: it submitted no flwr run" in said, said
    assert "preflight passed" in said and _launched(tmp_path) == 2, said


def test_a_flwr_run_a_killed_oncofed_deliver_submitted_is_recorded_by_the_next_which_refuses_while_it_runs(
        consortium, tmp_path, monkeypatch):
    """`oncofed deliver` starts `flwr run` in a session of its own, so killing it (kill -9) after that `flwr run` had
    submitted its flwr run, before it recorded it, left a ServerApp on the run's directory that no record named: the
    next `oncofed deliver` warned and submitted a second one beside it (which waits 60 s for the run's lock, then
    fails), and `oncofed runs stop` and --resume could not see the first. The next one finds it in the SuperLink's
    database (its run config's output-dir is the run's, submitted since the killed one locked), records it in
    delivery-runs.json, and its preflight refuses while it is pending, naming it and `oncofed runs follow` / `stop`,
    which now reach it. Real processes: the killed `oncofed deliver` and its `flwr run`, which goes on."""
    from typer.testing import CliRunner

    from oncofed.cli import app
    from server.runs import delivery_runs

    root = consortium.root
    run = _deliverable_run(consortium, tmp_path, monkeypatch, flwr_run_after=0.0, submits=True)
    _superlink_db(root, "completed")
    first = _deliver_until_its_flwr_run_launched(root, tmp_path)  # (its flwr run submitted: in the database)
    try:
        _kill(first.pid)
        first.wait(timeout=10)
        result = CliRunner().invoke(app, ["deliver", str(root), "r"])
    finally:
        _kill(_its_flwr_run(tmp_path))
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and _launched(tmp_path) == 1, said  # nothing submitted beside it
    assert f"left by `oncofed deliver` (pid {first.pid}, since " in said, said
    assert (f"taken over: it had submitted flwr run {SUBMITTED} (an `oncofed deliver`, recorded now in "
            f"{run / 'delivery-runs.json'})") in said, said
    assert f"flwr run {SUBMITTED}, an `oncofed deliver` of this run, is still pending or running" in said, said
    assert f"`oncofed runs follow {root} r`" in said and f"`oncofed runs stop {root} r`" in said, said
    assert [e["flwr_run"] for e in delivery_runs(run)] == [SUBMITTED]


def test_while_a_killed_oncofed_delivers_flwr_run_may_still_submit_the_next_is_refused_naming_it(
        consortium, tmp_path, monkeypatch):
    """Killed (kill -9) while its `flwr run`, which outlives it, had not submitted yet: the next `oncofed deliver`
    found nothing in the SuperLink's database and went ahead, and that `flwr run` submitted a second ServerApp of the
    run moments later, which no record names. It is refused, naming that `flwr run`'s pid and what to do, the lock
    file still naming the killed one; once that `flwr run` ended, the next takes the lock over."""
    from server.delivery import submit_delivery
    from server.deploy import DeployError

    root = consortium.root
    _deliverable_run(consortium, tmp_path, monkeypatch, flwr_run_after=0.0)
    _superlink_db(root, "completed")
    first = _deliver_until_its_flwr_run_launched(root, tmp_path)
    flwr_run = _its_flwr_run(tmp_path)
    try:
        _kill(first.pid)
        first.wait(timeout=10)
        for _ in range(2):  # (and again: the lock still names the killed one)
            with pytest.raises(DeployError) as refused:
                submit_delivery(root, "r", out=io.StringIO())
            said = " ".join(str(refused.value).split())
            assert f"left by `oncofed deliver` (pid {first.pid}, since " in said, said
            assert f"its `flwr run` (pid {flwr_run}) still runs and may yet submit" in said, said
            assert f"nothing was submitted. Wait for it to end, or end it (`kill {flwr_run}`;" in said, said
        assert _launched(tmp_path) == 1
    finally:
        _kill(flwr_run)
    (tmp_path / "hold").unlink()
    out = io.StringIO()
    assert submit_delivery(root, "r", out=out) == 1
    said = " ".join(out.getvalue().split())
    assert "taken over: it submitted no flwr run" in said and "preflight passed" in said, said


def test_a_training_a_killed_oncofed_run_submitted_is_recorded_where_resume_and_runs_stop_look(consortium):
    """As for `oncofed deliver`: the flwr run a killed `oncofed run` had submitted (not deliver-only), found in the
    SuperLink's database, is recorded by the next holder of the run's submit lock in flwr-runs.json, the run's
    training attempts, which the preflights (live_flwr_runs) and `oncofed runs stop` read; a flwr run of the run
    submitted before the killed one locked is not its own, and is left alone."""
    import sqlite3

    from server.submit import live_flwr_runs, submit_lock

    run = consortium.path("runs", "r")
    run.mkdir(parents=True)
    locked = time.time() - 30
    consortium.path("runs", ".r.submit.lock").write_text(json.dumps({"pid": 99999999, "command": "`oncofed run`",
                                                                     "since": locked}))
    db = _superlink_db(consortium.root, "running")  # (a flwr run of no run directory)
    con = sqlite3.connect(db)
    for run_id, task, at in ((SUBMITTED, 2, locked + 1), (SUBMITTED - 1, 3, locked - 60)):
        con.execute("INSERT INTO run VALUES (?, ?, ?)", (run_id - 2**64, task, json.dumps({"output-dir": str(run)})))
        con.execute("INSERT INTO task (task_id, pending_at) VALUES (?, ?)",
                    (task, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))))
    con.commit()
    con.close()
    out = io.StringIO()
    submit_lock(consortium, "r", "`oncofed run`", out).close()
    said = " ".join(out.getvalue().split())
    assert (f"taken over: it had submitted flwr run {SUBMITTED} (training, recorded now in "
            f"{run / 'flwr-runs.json'})") in said, said
    assert json.loads((run / "flwr-runs.json").read_text()) == [SUBMITTED]
    assert live_flwr_runs(consortium, run) == [SUBMITTED]


def test_resume_is_refused_while_an_oncofed_deliver_of_the_run_is_in_progress(consortium):
    """A run whose training ended but whose own delivery a crash cut short (no result.json) is delivered by `oncofed
    deliver`; the --resume preflight looked only at the training's flwr runs (flwr-runs.json), so a resume passed
    while that delivery ran: its ServerApp waited 60 s for the run's lock and failed. It is refused, naming the
    delivery and what to do (wait for it, or `oncofed runs stop`), and allowed once the delivery ended."""
    from server.runs import record_delivery_run
    from tests.test_fault_review import _resume_check

    root, run = consortium.root, consortium.path("runs", "r")
    # trained as flwr run RUN_ID - 1, which the database no longer holds; delivered again as DELIVERY
    _write(run, {"run.json": "{}", "flwr-runs.json": json.dumps([RUN_ID - 1])})
    record_delivery_run(run, DELIVERY)
    db = _superlink_db(root, "running")
    refused = _resume_check(consortium, run)
    said = " ".join(refused.detail.split())
    assert not refused.ok and f"flwr run {DELIVERY}, an `oncofed deliver` of this run" in said, said
    assert f"Wait for it (`oncofed runs follow {root} r`" in said and f"`oncofed runs stop {root} r`" in said, said
    _set_run_state(db, "stopped")  # `oncofed runs stop`
    assert _resume_check(consortium, run).ok, _resume_check(consortium, run).detail


def test_server_stop_names_the_oncofed_deliver_it_would_end_and_says_to_deliver_again(consortium, tmp_path):
    """`oncofed server stop` refused only while a run trained: a running `oncofed deliver` it was about to end (its
    ServerApp dies with the SuperExec) went unmentioned. It is refused naming the delivery, and with --force says
    which delivery it ended and that `oncofed deliver` sends the model again."""
    from server.deploy import DeployError, stop_server
    from server.runs import record_delivery_run

    run = _finished_run(consortium)
    record_delivery_run(run, DELIVERY)
    _superlink_db(consortium.root, "running")
    with stand_in_server(consortium.root, tmp_path) as server:
        delivery = f"the delivery of run(s) r (`oncofed deliver`, flwr run {DELIVERY})"
        with pytest.raises(DeployError) as refused:
            stop_server(consortium.root, timeout=5)
        said = " ".join(str(refused.value).split())
        assert f"{delivery} is in progress" in said and "--force" in said, said
        assert f"`oncofed deliver {consortium.root} r` sends the model again" in said, said
        assert server.poll() is None
        said = stop_server(consortium.root, timeout=30, force=True)
        assert "server stopped" in said and f"it stopped {delivery}" in said, said
        assert f"`oncofed deliver {consortium.root} r` sends the model again" in said, said
        assert server.wait(5) == -15


def test_runs_stop_kept_waiting_for_delivery_runs_json_names_the_file_and_what_to_do_without_a_traceback(
        consortium, monkeypatch):
    """Past its wait for another command's change of delivery-runs.json (60 s), `oncofed runs stop` raised a bare
    RuntimeError: the operator read a traceback. It says which file, held by which lock (and how to find its holder),
    that nothing was recorded and to run it again (exit 1), and stops nothing."""
    from typer.testing import CliRunner

    import privacy.preflight
    import privacy.registry
    import server.runs
    from oncofed.cli import app
    from privacy.preflight import Check
    from server.runs import delivery_runs, record_delivery_run
    from shared_models.files import exclusive_lock

    root, run = consortium.root, _finished_run(consortium)
    record_delivery_run(run, DELIVERY)
    _superlink_db(root, "running")
    monkeypatch.setattr(privacy.preflight, "check_reachable", lambda *a: Check("SuperLink", True, "up"))
    monkeypatch.setattr(privacy.registry, "foreign_superlink", lambda root: "")
    monkeypatch.setattr(server.runs, "DELIVERIES_LOCK_WAIT", 0.3)
    held = exclusive_lock(run / "delivery-runs.json.lock")  # another command's, as far as this one can tell
    try:
        result = CliRunner().invoke(app, ["runs", "stop", str(root), "r"])
    finally:
        held.close()
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.exception, said)
    assert f"{run / 'delivery-runs.json'}: another oncofed command has kept it locked for 0.3 s" in said, said
    assert f"`fuser -v {run / 'delivery-runs.json.lock'}` names it" in said, said
    assert "nothing was recorded; run this command again once that one is done" in said, said
    assert "Traceback" not in said and "stopped" not in said, said
    assert "stopping" not in delivery_runs(run)[-1]


def test_a_delivery_whose_record_was_kept_waiting_is_said_so_and_recorded_by_the_next_oncofed_deliver(
        consortium, tmp_path, monkeypatch):
    """`oncofed deliver` records its flwr run in delivery-runs.json as soon as it is submitted; kept waiting past the
    wait, it raised a bare RuntimeError (a traceback) and the delivery, which goes on, was recorded nowhere: the next
    `oncofed deliver` passed its preflight beside it. It says which file, and that flwr run, not recorded, goes on and
    the next `oncofed deliver` records it; which that one does, refusing while it is pending."""
    from typer.testing import CliRunner

    import server.runs
    from oncofed.cli import app
    from shared_models.files import exclusive_lock

    root = consortium.root
    run = _deliverable_run(consortium, tmp_path, monkeypatch, flwr_run_after=0.0, submits=True)
    _superlink_db(root, "completed")
    monkeypatch.setattr(server.runs, "DELIVERIES_LOCK_WAIT", 0.3)
    held = exclusive_lock(run / "delivery-runs.json.lock")
    try:
        result = CliRunner().invoke(app, ["deliver", str(root), "r"])
    finally:
        held.close()
    said = " ".join(result.output.split())
    # exit 1, not 2: a delivery was submitted, so this is no preflight the operator fixes before anything ran
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.exception, said)
    assert f"{run / 'delivery-runs.json'}: another oncofed command has kept it locked for 0.3 s" in said, said
    assert (f"flwr run {SUBMITTED}, an `oncofed deliver` of the run, is not recorded there, and goes on: once that "
            f"command is done, the next `oncofed deliver {root} r` records it") in said, said
    assert "Traceback" not in said, said
    result = CliRunner().invoke(app, ["deliver", str(root), "r"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and _launched(tmp_path) == 1, said
    assert f"flwr run {SUBMITTED} (an `oncofed deliver`, recorded now in {run / 'delivery-runs.json'})" in said, said
    assert f"flwr run {SUBMITTED}, an `oncofed deliver` of this run, is still pending or running" in said, said


def test_deliveries_recorded_at_the_same_moment_are_all_kept(tmp_path):
    """`oncofed deliver` records its delivery, `oncofed runs stop` and the server's exit how one ended, each a
    read-change-write of delivery-runs.json; two at once kept only the last writer's list, losing a delivery that
    no stop or exit record could then find. Two real processes record 150 each: all 300 are kept."""
    import subprocess

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    code = ("import sys; from pathlib import Path; from server.runs import record_delivery_run\n"
            "for i in range(150): record_delivery_run(Path(sys.argv[1]), int(sys.argv[2]) + i)")
    writers = [subprocess.Popen([sys.executable, "-c", code, str(run), str(first)]) for first in (1000, 2000)]
    assert [w.wait(120) for w in writers] == [0, 0]
    from server.runs import delivery_runs

    assert sorted(e["flwr_run"] for e in delivery_runs(run)) == [*range(1000, 1150), *range(2000, 2150)]
