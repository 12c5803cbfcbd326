"""Defects a server-side fault-injection review found (a second `oncofed run --resume` beside a healthy run),
each reproduced on real files: a consortium directory, run directories as the ServerApp writes them, a SuperLink
database with flwr 1.41's layout."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from privacy.pki import init_consortium
from server.deploy import Consortium
from tests.test_runs import RUN_ID, _set_run_state, _superlink_db

SITES = {"C0": 11, "C1": 12}


@pytest.fixture
def consortium(tmp_path):
    with socket.socket() as s:  # a SuperLink port nothing listens on (another consortium's may be on 9092)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_consortium(tmp_path / "op", "t", "127.0.0.1:8443", internal_port=port)
    record = json.loads((tmp_path / "op" / "consortium.json").read_text())
    record["sites"] = [{"name": n, "node_id": str(i), "key_sha256": "ab", "added": "2026-12-06T19:03:22Z"}
                       for n, i in SITES.items()]
    (tmp_path / "op" / "consortium.json").write_text(json.dumps(record))
    return Consortium.load(tmp_path / "op")


def _write(run: Path, files: dict[str, str]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (run / name).write_text(text)


def test_resume_is_refused_while_the_run_is_pending_or_running_on_the_superlink_and_allowed_once_it_ended(consortium):
    """A second `oncofed run --resume` beside a healthy `oncofed run` of the same name passed preflight, stopped the
    healthy run (`flwr stop`) and took over; the first then advised `--resume`, which would have stopped the second."""
    from privacy.run_config import load_run_config
    from server.submit import PROJECT, run_checks
    from shared_models.run_config import app_defaults

    root, run = consortium.root, consortium.path("runs", "live")
    _write(run, {"run.json": "{}", "flwr-runs.json": json.dumps([RUN_ID])})  # round 1 done: started
    db = _superlink_db(root, "running")
    cfg = load_run_config({**app_defaults(PROJECT), "base-dir": str(PROJECT)}, source="run config")

    def resume_check():
        return {c.name: c for c in run_checks(consortium, cfg, run, True, [], "")}["run live"]

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
    (run / "interrupted.json").write_text(json.dumps({"flwr_run": RUN_ID, "why": "the server exited", "at": 0}))
    assert resume_check().ok, resume_check().detail
