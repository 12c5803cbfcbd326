"""Operator-path faults found in review: each test reproduces one without starting Flower or nginx (test_i2 runs a
SuperNode's start-up, in a process of its own, only until it launches its SuperExec)."""

from __future__ import annotations

import socket
import types

import pytest

from privacy.pki import init_consortium
from server.deploy import Consortium, server_checks
from tests.factories import stand_in_server


@pytest.fixture
def consortium(tmp_path):
    init_consortium(tmp_path / "op", "t", "127.0.0.1:8443", internal_port=9092)
    return Consortium.load(tmp_path / "op")


def test_a_metrics_port_in_use_fails_preflight_naming_the_option(consortium):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        failed = [c for c in server_checks(consortium, port) if not c.ok]
    assert any(f"127.0.0.1:{port}" in c.name and "--metrics-port" in c.name for c in failed), failed
    assert all("--metrics-port" not in c.name for c in server_checks(consortium, 0))


def test_b_two_serverapps_of_one_run_never_share_its_directory(tmp_path):
    """Two `oncofed run --name X` at once both passed preflight (run.json is written only by the ServerApp)
    and both ServerApps trained into runs/X: run.json's key replaced, checkpoints of two runs interleaved."""
    from flwr.app import Context, RecordDict

    from privacy.run_config import load_run_config
    from server.app import start_or_resume
    from server.checkpoint import CheckpointError, frozen_run, hold_run_lock
    from shared_models.schema import FeatureSchema
    from shared_models.run_config import app_defaults
    from server.submit import PROJECT

    out = tmp_path / "runs" / "x"
    first = hold_run_lock(out)
    with pytest.raises(CheckpointError, match="another ServerApp is running this run"):
        hold_run_lock(out)  # a second process (or open file) cannot take it
    first.close()  # the first ServerApp's process ended (a crash included): the run is free again
    hold_run_lock(out).close()

    values = {**app_defaults(PROJECT), "base-dir": str(PROJECT), "output-dir": str(out)}
    cfg = load_run_config(values, source="run config")
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=values)
    schema = FeatureSchema.load(cfg.path(cfg.run.schema_path))
    key = start_or_resume(cfg, ctx, schema, out).run_key
    with pytest.raises(ValueError, match=f"already holds run {key}"):
        start_or_resume(cfg, ctx, schema, out)  # a second new run on the same directory
    assert frozen_run(out)["run_key"] == key


def test_c_a_second_oncofed_run_of_one_name_is_refused_while_the_first_submits(consortium):
    from server.deploy import DeployError
    from server.submit import submit_lock

    held = submit_lock(consortium, "x")
    with pytest.raises(DeployError, match="is submitting run 'x' right now"):
        submit_lock(consortium, "x")
    submit_lock(consortium, "y").close()  # another name is not held up
    held.close()
    submit_lock(consortium, "x").close()


def test_d_oncofed_run_trains_on_the_schema_the_sites_received(tmp_path):
    """`consortium init --schema` sent the sites one schema; `oncofed run` trained on the project's default."""
    from privacy.pki import fingerprint
    from privacy.run_config import load_run_config
    from server.submit import PROJECT, run_checks, run_values

    init_consortium(tmp_path / "brca", "b", "127.0.0.1:8443", schema=PROJECT / "simulations/schemas/tcga_brca_pam50.json")
    c = Consortium.load(tmp_path / "brca")
    cfg = load_run_config(run_values(c, c.path("runs", "x"), {}, False, 2), source="run config")
    assert fingerprint(cfg.path(cfg.run.schema_path)) == c.record["schema_sha256"]
    other = run_values(c, c.path("runs", "x"), {"schema": "simulations/schemas/tcga_pancan33.json"}, False, 2)
    checks = run_checks(c, load_run_config(other, source="run config"), c.path("runs", "x"), False, [], "")
    assert any("against the sites' bundle" in k.name and not k.ok and "drop --set schema" in k.detail for k in checks)


def test_e_a_deployed_site_uses_its_own_pinned_schema_not_the_servers_path(tmp_path):
    """The ClientApp loaded the schema from the run config's path, an absolute path on the server machine
    (base-dir): at a site whose checkout lives elsewhere every round and every delivery failed."""
    from flwr.app import Context, RecordDict

    from client.app import site_schema_path
    from privacy.run_config import load_run_config

    cfg = load_run_config({"schema": "simulations/schemas/tcga_pancan33.json", "base-dir": "/srv/elsewhere/oncofed"},
                          source="run config")
    own = tmp_path / "trust" / "schema.json"
    deployed = Context(run_id=1, node_id=1, node_config={"data-path": "/d", "schema": str(own)}, state=RecordDict(),
                       run_config={})
    simulated = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    assert site_schema_path(deployed, cfg) == own
    assert site_schema_path(simulated, cfg) == __import__("pathlib").Path(
        "/srv/elsewhere/oncofed/simulations/schemas/tcga_pancan33.json")


def test_f_processes_a_killed_server_start_left_running_are_named_with_the_fix(consortium):
    """Killed (kill -9) outside a service manager, `oncofed server start` left its SuperLink and nginx running
    (their own sessions), and a restart said only that the ports were taken."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    from server.deploy import orphaned_processes

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(consortium.root)])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    deadline = time.monotonic() + 30  # until the children have exec'd: before, /proc shows the forking parent's
    while str(consortium.root).encode() not in Path(f"/proc/{ours.pid}/cmdline").read_bytes() and (
            time.monotonic() < deadline):
        time.sleep(0.05)
    try:
        consortium.path("state").mkdir(exist_ok=True)
        consortium.path("state", "server.json").write_text(json.dumps(
            {"pid": dead.pid, "superlink_pid": ours.pid, "proxy_pid": other.pid}))
        # a pid whose command line does not name this consortium (a reused pid) is not blamed
        assert orphaned_processes(consortium) == [("superlink", ours.pid)]
        failed = [c for c in server_checks(consortium) if not c.ok]
        assert any(f"superlink pid {ours.pid}" in c.detail and "was killed" in c.detail and
                   f"`oncofed server stop {consortium.root}` stops them" in c.detail for c in failed), failed
    finally:
        ours.kill()
        other.kill()


def test_g_a_serverapp_traceback_reaches_the_operator_as_its_error_line(tmp_path):
    from server.submit import TracebackFolder

    stream = ["INFO :      [ROUND 1]\n", "ERROR :     ServerApp thread raised an exception\n",
              "Traceback (most recent call last):\n", '  File "/x/flwr/server/run.py", line 10, in run\n',
              "    main(grid, context)\n", "\n", "During handling of the above exception, another exception occurred:\n",
              "\n", "Traceback (most recent call last):\n", '  File "/x/server/app.py", line 160, in main\n',
              "ValueError: run config resume = true but runs/x holds no started run\n", "INFO :      done\n"]
    folder = TracebackFolder(tmp_path / "flwr-run.log")
    shown = [out for line in stream if (out := folder.show(line)) is not None]
    assert shown == ["INFO :      [ROUND 1]\n", "ERROR :     ServerApp thread raised an exception\n",
                     f"ValueError: run config resume = true but runs/x holds no started run  (traceback in "
                     f"{tmp_path / 'flwr-run.log'})\n", "INFO :      done\n"]


def test_h_a_round_that_can_never_be_unmasked_is_abandoned_before_any_site_trains(monkeypatch):
    """After key sharing 2 of 3 sites remain and min-sites is 3: the collect stage, where the sites train and
    spend their budget, used to run before the round was abandoned."""
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    import server.workflow
    from server.workflow import TimedSecAggPlusWorkflow

    ran = []

    def stage(name, active):
        def run(self, grid, context, state):
            state.active_node_ids = set(active)
            state.sampled_node_ids, state.nid_to_neighbours = set(active), {i: set(active) for i in active}
            ran.append(name)
            return True
        return run

    for name, active in (("setup_stage", {1, 2, 3}), ("share_keys_stage", {1, 2}),
                         ("collect_masked_vectors_stage", {1, 2}), ("unmask_stage", {1, 2})):
        monkeypatch.setattr(SecAggPlusWorkflow, name, stage(name, active))
    monkeypatch.setattr(server.workflow.progress, "stage", lambda *a: None)
    abandoned = []

    class Strategy:
        round_info, timing = {"status": "halted"}, {}

        def record_abandoned(self, rnd, failures, replied, reason):  # as server.strategy's
            abandoned.append(reason)
            self.round_info = {"round": rnd, "status": "abandoned", "reason": reason}

    context = types.SimpleNamespace(strategy=Strategy(), state=types.SimpleNamespace(
        config_records={MAIN_CONFIGS_RECORD: {Key.CURRENT_ROUND: 1}}))
    wf = TimedSecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.66, max_weight=1000.0, timeout=10,
                                 min_contributors=3)
    state = WorkflowState()
    for step in (wf.setup_stage, wf.share_keys_stage, wf.collect_masked_vectors_stage, wf.unmask_stage):
        if not step(None, context, state):
            break
    assert ran == ["setup_stage", "share_keys_stage"]  # no site was asked to train
    assert abandoned == ["2 sites completed SecAgg+'s share keys, fewer than 3 (min-sites, or trusted-sites in "
                         "dp-mode 'distributed'): abandoned before any site trains"]
    # more sites than SecAgg+'s 21 neighbours, min-sites above that: every site would refuse its key shares at the
    # unmask stage, after training and spending; the round is abandoned before any site trains
    ran.clear(), abandoned.clear()
    many = set(range(1, 31))

    def sparse(name):
        def run(self, grid, context, state):
            state.active_node_ids, state.sampled_node_ids = set(many), set(many)
            order = sorted(many)
            state.nid_to_neighbours = {nid: {order[(i + k) % 30] for k in range(-10, 11)} for i, nid in enumerate(order)}
            ran.append(name)
            return True
        return run

    monkeypatch.setattr(SecAggPlusWorkflow, "setup_stage", sparse("setup_stage"))
    wf = TimedSecAggPlusWorkflow(num_shares=21 / 30, reconstruction_threshold=0.66, max_weight=1000.0, timeout=10,
                                 min_contributors=22)
    assert not wf.setup_stage(None, context, WorkflowState()) and ran == ["setup_stage"]
    assert "neighbourhood holds 21 of them, fewer than 22" in abandoned[0] and "before any site trains" in abandoned[0]


def test_i_a_serverapp_the_superexec_launched_is_reaped_once_it_ends_not_left_defunct(monkeypatch):
    """Flower's SuperExec drops each ServerApp's Popen: a finished run's flwr-serverapp stayed <defunct> until the
    next launch. The SuperExec oncofed runs reaps them (server/flower_processes.py)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import threading

    import flwr.supercore.cli
    from flwr.supercore.retry import http_retry

    from server.flower_processes import superexec
    from shared_models.flower_tools import reap_dropped_children

    threads = []  # the SuperExec oncofed starts runs the reaper beside Flower's own
    monkeypatch.setattr(http_retry, "_RETRYABLE_STATUS_CODES", http_retry._RETRYABLE_STATUS_CODES)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(flwr.supercore.cli, "flower_superexec", lambda: threads.extend(threading.enumerate()))
    superexec([])
    assert "reap-serverapps" in [t.name for t in threads]

    def state(pid: int) -> str | None:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return None

    pid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"]).pid  # the Popen dropped
    deadline = time.time() + 30
    while state(pid) != "Z" and time.time() < deadline:
        time.sleep(0.05)
    assert state(pid) == "Z"  # ended, and nobody waited for it
    reap_dropped_children()
    assert state(pid) is None


_FIRST_LAUNCH = """
import json, os, subprocess, sys
real = subprocess.Popen
def launched(command, *a, **kw):  # the SuperNode's SuperExec (given the Runtime API's address): printed, not started
    if "--runtime-api-address" not in command:
        return real(command, *a, **kw)  # e.g. platform's `uname -p`
    print(json.dumps(list(command)), flush=True)
    os._exit(0)
subprocess.Popen = launched
from client.supernode import run_supernode
from privacy.site_config import SiteConfig
run_supernode(SiteConfig.load(sys.argv[1]), int(sys.argv[2]))
"""


def test_i2_a_sites_superexec_is_one_that_reaps_the_clientapps_it_launched(consortium, tmp_path, monkeypatch):
    """Flower's site SuperExec dropped each ClientApp's Popen: ~2 `flwr-clientapp` zombies a round for the SuperNode's
    whole life (operator review, 2026-12-06). `oncofed site start`'s SuperNode launches client/flower_superexec.py in
    its place: Flower's SuperExec beside the reaper test_i checks. The last part runs `run_supernode` itself, Flower's
    own start-up included, up to the SuperExec's launch (which it prints instead): the launch mapping and the module
    say nothing if `site start` never puts them in Flower's way."""
    import json
    import os
    import subprocess
    import sys
    import threading

    import flwr.supercore.cli
    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.retry import http_retry

    from client.flower_superexec import REAPER
    from client.supernode import _launch_reaping_superexec
    from shared_models.flower_tools import run_superexec

    launched = []
    monkeypatch.setattr(sci, "subprocess", sci.subprocess)  # put back after the test
    monkeypatch.setattr(subprocess, "Popen", lambda command, *a, **kw: launched.append(command))
    _launch_reaping_superexec(sci)
    sci.subprocess.Popen(["flower-superexec", "--insecure", "--runtime-api-address", "127.0.0.1:9094"])
    assert launched == [[sys.executable, "-m", "client.flower_superexec", "--insecure", "--runtime-api-address",
                         "127.0.0.1:9094"]]
    monkeypatch.undo()
    help_text = subprocess.run([sys.executable, "-m", "client.flower_superexec", "--help"], capture_output=True,
                               text=True, timeout=120)
    assert help_text.returncode == 0 and "--runtime-api-address" in help_text.stdout  # Flower's own SuperExec
    threads = []
    monkeypatch.setattr(http_retry, "_RETRYABLE_STATUS_CODES", http_retry._RETRYABLE_STATUS_CODES)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(flwr.supercore.cli, "flower_superexec", lambda: threads.extend(threading.enumerate()))
    run_superexec([], REAPER)
    assert REAPER in [t.name for t in threads]

    from privacy.pki import fingerprint, init_site

    init_site(tmp_path / "s", "S", consortium.path("public"), "",
              ca_fingerprint=fingerprint(consortium.path("ca", "ca.crt")))
    with socket.socket() as s:  # the SuperNode's own port (its Runtime API): a free one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr")}
    out = subprocess.run([sys.executable, "-c", _FIRST_LAUNCH, str(tmp_path / "s" / "site.json"), str(port)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip(), out.stdout + out.stderr
    launch = json.loads(out.stdout.strip().splitlines()[-1])
    assert launch[:3] == [sys.executable, "-m", "client.flower_superexec"], launch  # not Flower's `flower-superexec`
    assert "--runtime-api-address" in launch


def test_j_server_stop_ends_this_consortiums_server_and_never_signals_a_reused_pid(consortium, tmp_path, monkeypatch):
    """There was no `oncofed server stop`: an operator without a service manager had to find the pid. It sends
    SIGTERM to the recorded `oncofed server start` only if that pid is still this consortium's server."""
    import json
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    import server.deploy as deploy
    from server.deploy import DeployError, stop_server, systemd_unit

    def spawn(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args], cwd=tmp_path)
        threading.Thread(target=proc.wait, daemon=True).start()  # reaped when it ends (not left a zombie)
        deadline = time.monotonic() + 30  # until it has exec'd
        while b"sleep" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        return proc

    state = consortium.path("state", "server.json")
    state.parent.mkdir(exist_ok=True)
    assert "not running" in stop_server(consortium.root)
    server = spawn("server", "start", str(consortium.root.relative_to(tmp_path)))  # as the operator typed it
    other = spawn("server", "start", "elsewhere")
    assert systemd_unit("0::/system.slice/oncofed-server.service\n") == "oncofed-server.service"
    assert systemd_unit("0::/user.slice/user-1000.slice/user@1000.service/app.slice/vte-spawn-1.scope\n") is None
    assert systemd_unit("12:pids:/\n0::/\n") is None  # a container, a shell
    unit = spawn("server", "start", str(consortium.root))
    try:
        monkeypatch.setattr(deploy, "_systemd_unit_of", lambda pid: "oncofed-server.service" if pid == unit.pid else None)
        state.write_text(json.dumps({"pid": unit.pid}))  # its unit would start it again: systemctl's to stop
        with pytest.raises(DeployError, match="systemctl stop oncofed-server.service"):
            stop_server(consortium.root, timeout=5)
        assert unit.poll() is None
        state.write_text(json.dumps({"pid": other.pid}))  # the pid of a process that is not this consortium's
        with pytest.raises(DeployError, match="not this consortium's"):
            stop_server(consortium.root, timeout=5)
        assert other.poll() is None
        state.write_text(json.dumps({"pid": server.pid}))
        assert "server stopped" in stop_server(consortium.root, timeout=30)
        assert server.wait(5) == -15  # SIGTERM, as Ctrl-C's handler stops it
    finally:
        server.kill()
        other.kill()
        unit.kill()


def test_server_stop_refuses_while_a_run_trains_unless_forced_and_names_the_resume(consortium, tmp_path):
    """Flower 1.41 ends a ServerApp with the SuperExec that started it: stopping the server stops the run."""
    import json

    from server.deploy import DeployError, stop_server
    from tests.test_runs import RUN_ID, _superlink_db

    run = consortium.path("runs", "r1")
    run.mkdir(parents=True)
    (run / "flwr-runs.json").write_text(json.dumps([RUN_ID]))
    _superlink_db(consortium.root, "running")
    with stand_in_server(consortium.root, tmp_path) as server:
        with pytest.raises(DeployError, match=r"run\(s\) r1 are training.*--force.*--name r1 --resume"):
            stop_server(consortium.root, timeout=5)
        assert server.poll() is None
        said = stop_server(consortium.root, timeout=30, force=True)
        assert "server stopped" in said and f"`oncofed run {consortium.root} --name r1 --resume`" in said, said
        assert server.wait(5) == -15


@pytest.mark.parametrize("state", ["pending", "starting"])
def test_server_stop_names_a_run_not_started_yet_as_pending_and_does_not_refuse_for_it(consortium, tmp_path, state):
    """A run the SuperLink has pending (or starting) has no ServerApp for the server's exit to end: the restarted
    server launches it (record_interrupted records none such). `oncofed server stop` called it "training" and refused
    without --force; it stops the server and says the run is pending and starts when the server is back."""
    import json

    from server.deploy import stop_server
    from tests.test_runs import RUN_ID, _superlink_db

    run = consortium.path("runs", "r1")
    run.mkdir(parents=True)
    (run / "flwr-runs.json").write_text(json.dumps([RUN_ID]))
    _superlink_db(consortium.root, state)
    with stand_in_server(consortium.root, tmp_path) as server:
        said = stop_server(consortium.root, timeout=30)
        assert "server stopped" in said and "training" not in said and "--resume" not in said, said
        assert ("run(s) r1 pending (not started yet), which stopping the server does not end: the server starts them "
                f"when it is back (`oncofed server start {consortium.root}`)") in said, said
        assert server.wait(5) == -15


def test_server_stop_says_it_ended_a_run_that_was_pending_when_it_looked_and_started_before_the_server_ended(
        consortium, tmp_path):
    """`oncofed server stop` words what it stops from a look at the SuperLink's database before it signals: a run
    pending then, launched before the server ended, ends with it (its exit records it, record_interrupted), and was
    still called pending, which stopping the server does not end, with no --resume named. It now says what the exit
    recorded."""
    import json

    from server.deploy import stop_server
    from tests.test_runs import RUN_ID, _superlink_db

    run = consortium.path("runs", "r1")
    run.mkdir(parents=True)
    (run / "flwr-runs.json").write_text(json.dumps([RUN_ID]))
    db = _superlink_db(consortium.root, "pending")
    # the stand-in server's exit: the SuperExec had launched the run meanwhile, and the exit records it as ended
    on_stop = f"""import sqlite3
from pathlib import Path
from server.runs import read_superlink, record_interrupted
at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - 1))
con = sqlite3.connect({str(db)!r}); con.execute("UPDATE task SET starting_at=?, running_at=?", (at, at)); con.commit()
con.close()
record_interrupted(Path({str(consortium.root)!r}), "the server stopped", read_superlink(Path({str(db)!r})))"""
    with stand_in_server(consortium.root, tmp_path, on_stop) as server:
        said = stop_server(consortium.root, timeout=30)
        assert server.wait(5) == 0
    assert (run / "interrupted.json").exists()
    assert "it stopped run(s) r1" in said and f"`oncofed run {consortium.root} --name r1 --resume`" in said, said
    assert "pending" not in said, said
