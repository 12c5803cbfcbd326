"""Faults an operator met walking through the guide (operator review of 2026-12-06): each test reproduces one with
real files, without starting Flower or nginx."""

from __future__ import annotations

import json
import logging
import types

import pytest


def test_a_site_that_never_connects_is_named_while_the_run_waits_and_in_its_failure(tmp_path, monkeypatch, caplog):
    """A run waited up to round-timeout (600 s) for a site showing only `round 0/2 done`, then failed with a count
    ("3 did; at least 4 needed") and no name: the registered sites not connected are named, a removed one is not."""
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy

    import server.workflow
    from privacy.registry import read_register
    from server.workflow import RoundsWorkflow, active_sites

    register = tmp_path / "consortium.json"
    register.write_text(json.dumps({"sites": [
        {"name": "Hosp A", "node_id": "11"}, {"name": "Hosp B", "node_id": "12"},
        {"name": "Hosp C", "node_id": "13", "removed": "2026-12-06T10:00:00Z"}, {"name": "Hosp D", "node_id": "14"}]}))
    cm = SimpleClientManager()
    cm.register(GridClientProxy(11, None, 0))
    context = types.SimpleNamespace(client_manager=cm, state=types.SimpleNamespace(config_records={}),
                                    run_config={"output-dir": str(tmp_path / "r1")})
    (tmp_path / "r1").mkdir()
    monkeypatch.setattr(server.workflow, "WAIT_REPORT_EVERY", 0.3)
    workflow = RoundsWorkflow(wait_for_sites=3, wait_timeout=1.0, enough_sites=2,
                              registered=active_sites(*read_register(register)))  # as the ServerApp reads it
    caplog.set_level(logging.INFO, logger="flwr")
    with pytest.raises(RuntimeError, match=r"\(1 did; at least 2 needed\); not connected: Hosp B \(node 12\), "
                                           r"Hosp D \(node 14\); check that each one's SuperNode is running"):
        workflow._wait_for_sites(context)
    assert "not yet: Hosp B (node 12), Hosp D (node 14)" in caplog.text and "Hosp C" not in caplog.text
    progress = json.loads((tmp_path / "r1" / "progress.json").read_text())  # what `oncofed run` prints meanwhile
    assert progress["stage"] == "waiting for sites" and progress["asked"] == [11, 12, 14]
    assert progress["answered"] == [11]
    cm.register(GridClientProxy(12, None, 0))  # enough (min-sites 2) to start without Hosp D, named
    caplog.clear()
    workflow._wait_for_sites(context)
    assert "only 2 of the 3 expected sites connected within 1 s; not connected: Hosp D (node 14); starting" \
        in caplog.text


_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from server.checkpoint import resume_command, save_checkpoint
root = Path(sys.argv[1])
save_checkpoint(root, 1, [np.zeros(10, dtype=np.float32)], {}, {})  # fits
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with an OSError, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    save_checkpoint(root, 2, [np.zeros(100_000, dtype=np.float32)], {}, {},
                    resume=resume_command(root.parent, Path(sys.argv[2])))
except OSError as e:
    print(e)
"""


def test_a_checkpoint_the_disk_cannot_hold_names_the_directory_and_the_resume_and_keeps_the_earlier_rounds(tmp_path):
    """A full runs directory gave a bare `OSError: [Errno 28] No space left on device`, three times chained. Here the
    write fails for real (a file-size limit on the process: a full disk cannot be made without mounting one)."""
    import subprocess
    import sys

    root = tmp_path / "runs" / "r5" / "checkpoints"
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, str(root), str(tmp_path / "consortium.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    message = out.stdout.strip()
    assert f"round 2's checkpoint could not be written in {root} (File too large)" in message
    # the cause named, not "fix that": the process's file-size limit, at the value it has
    assert "larger than this process's file-size limit, 4096 bytes (`ulimit -f`, RLIMIT_FSIZE): raise it" in message
    assert f"`oncofed run {tmp_path} --name r5 --resume`" in message and "rounds checkpointed before are kept" in message
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "round-0001"]  # no .tmp-round-0002 left


def test_a_full_disk_at_a_checkpoint_says_so(tmp_path, monkeypatch):
    import errno

    import server.checkpoint
    from server.checkpoint import save_checkpoint

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(server.checkpoint.np, "savez", full)  # a full disk cannot be made here without mounting one
    with pytest.raises(OSError, match=f"the disk holding {tmp_path / 'c'} is full: free space there, then continue"):
        save_checkpoint(tmp_path / "c", 1, [], {}, {})


@pytest.mark.parametrize("deployed", [False, True], ids=["simulation", "consortium-run"])
def test_a_full_disk_at_a_checkpoint_names_the_command_that_continues_this_kind_of_run(tmp_path, monkeypatch, deployed):
    """The ServerApp's message named `oncofed run CONSORTIUM --name server --resume` in a simulation too, whose run
    directory is --out/server and whose command (`oncofed simulate`) has no --resume: it starts over."""
    import errno

    from flwr.app import Context, RecordDict
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.history import History
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    import server.checkpoint
    from privacy.audit import AuditLog
    from privacy.pki import init_consortium
    from privacy.run_config import load_run_config
    from server.app import RoundRecorder
    from tests.factories import started_run

    out, values, schema, start = started_run(tmp_path)
    if deployed:  # `oncofed run` names the consortium's register; a simulation has none
        init_consortium(tmp_path / "op", "c", "fl.example.org:443")
        values = {**values, "site-registry": str(tmp_path / "op" / "consortium.json")}
    cfg = load_run_config(values, source="run config")
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=values)
    recorder = RoundRecorder(cfg, context, schema, out, start, AuditLog(out / "audit.jsonl"), lambda: None, None, 0.0)
    state = RecordDict()
    state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(ndarrays_to_parameters(start.weights),
                                                                                keep_input=True)
    strategy = types.SimpleNamespace(round_info={"status": "ok", "participants": []}, state_arrays=dict, timing={})
    lctx = types.SimpleNamespace(state=state, strategy=strategy, history=History())

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(server.checkpoint.np, "savez", full)
    with pytest.raises(OSError) as e:
        recorder(1, lctx)
    if deployed:
        assert f"then continue the run with `oncofed run {tmp_path / 'op'} --name x --resume`" in str(e.value)
    else:
        assert "then run the simulation again (`oncofed simulate` has no --resume" in str(e.value)
        assert "oncofed run" not in str(e.value)


def test_runs_stop_with_the_server_down_says_so_and_fails(tmp_path):
    """It printed flwr's "Connection to the SuperLink is unavailable", then "nothing running to stop", and exited 0."""
    from typer.testing import CliRunner

    from oncofed.cli import app
    from privacy.pki import init_consortium
    from server.processes import free_port

    root = tmp_path / "op"
    init_consortium(root, "t", f"127.0.0.1:{free_port()}", internal_port=free_port())  # no server started
    (root / "runs" / "r6").mkdir(parents=True)
    result = CliRunner().invoke(app, ["runs", "stop", str(root), "r6"])
    assert result.exit_code == 1, result.output
    assert "run 'r6': nothing stopped: the server is not running" in result.output
    assert f"`oncofed server start {root}`" in result.output and "nothing running to stop" not in result.output


@pytest.mark.parametrize("edit, command, named", [
    (lambda r: r.pop("address"), ["server", "preflight"], "address: Field required"),
    (lambda r: r.update(sites="Hosp A"), ["consortium", "list-sites"], "sites: Input should be a valid list"),
    (lambda r: r.pop("sites"), ["consortium", "list-sites"], "sites: Field required"),
    (lambda r: r.update(address="fl.example.org"), ["server", "preflight"], "address: Value error, 'fl.example.org' "
                                                                              "is not HOST:PORT"),
])
def test_a_hand_edited_consortium_json_that_is_still_json_is_named_key_by_key_not_a_traceback(tmp_path, edit, command,
                                                                                              named):
    """Without "address", `server preflight` raised KeyError: 'address'; "sites" not a list gave list-sites an
    AttributeError."""
    from typer.testing import CliRunner

    from oncofed.cli import app
    from privacy.pki import init_consortium

    root = tmp_path / "op"
    init_consortium(root, "t", "127.0.0.1:18443", internal_port=19092)
    record = json.loads((root / "consortium.json").read_text())
    edit(record)
    (root / "consortium.json").write_text(json.dumps(record))
    result = CliRunner().invoke(app, [*command, str(root)])
    assert result.exit_code == 2, result.output
    assert f"{root / 'consortium.json'}: {named}" in result.output and "as `oncofed consortium init` wrote it" \
        in result.output
