"""`oncofed site status SITE_DIR` (client/site_status.py): a site's budget, spend, runs, models and audit log, read
while the site runs, without writing a file or taking a lock."""

from __future__ import annotations

import fcntl
import subprocess
import sys

import numpy as np

from client.model_store import ModelStore
from privacy.audit import AuditLog
from privacy.ledger import LEDGER_FILE, PrivacyLedger, RunPlan, read_ledger, recorded_spend
from privacy.site_config import SiteConfig
from shared_models.model import MultiModalTransformer
from shared_models.run_config import ModelConfig
from shared_models.weights import state_arrays
from tests.factories import tiny_schema


def _files(root) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


def test_site_status_reads_budget_spend_runs_models_and_audit_while_the_site_holds_its_locks(tmp_path):
    """There was no way to see a site's state without starting it. The status reads it all as the files say, with
    the site's SuperNode lock and the ledger's lock held as a running site holds them (a lock tried would block or
    refuse the site), and changes no file."""
    site, state = tmp_path / "site", tmp_path / "site" / "state"
    site.mkdir()
    SiteConfig(site_name="St Mary", consortium="Test", superlink="fl.example:443", state_dir=str(state),
               model_dir=str(site / "models"), privacy_budget=8.0, simulated=True).write(site / "site.json")
    ledger = PrivacyLedger(state / LEDGER_FILE, 8.0, 1e-5)
    ds = ledger.register_dataset([f"P{i}" for i in range(100)], "h")
    ledger.start_run(ds, "run-1", RunPlan(epsilon=4.0, epsilon_cap=4.0, num_rounds=3, steps_per_round=10,
                                          noise_multiplier=1.1, sample_rate=0.1, terms={"epsilon": 4.0}))
    for rnd in (1, 2):
        ledger.commit_round(ledger.begin_round(ds, "run-1", rnd, 1.1, 0.1, 10, padding_tail=0.0), 10)
    ledger.begin_round(ds, "run-1", 3, 1.1, 0.1, 10, padding_tail=0.0)  # a crash mid-round: counted as spent
    spent = recorded_spend(read_ledger(state / LEDGER_FILE))[0]
    schema = tiny_schema()
    model = MultiModalTransformer(schema, ModelConfig(d_model=16))
    store = ModelStore(site / "models")
    for run in ("run-0", "run-1"):
        store.install(schema, ModelConfig(d_model=16), state_arrays(model), {"run": run, "round": 2})
    store.activate("v0001", chosen=True)
    AuditLog(state / "audit.jsonl").append("model_activated", version="v0001")
    (state / "supernode.lock").write_text("999999999\n")  # a pid no process has
    before = _files(tmp_path)
    with open(state / "supernode.lock", "a") as site_lock, open(state / (LEDGER_FILE + ".lock"), "a") as ledger_lock:
        fcntl.flock(site_lock, fcntl.LOCK_EX)  # as `oncofed site start` and a round in progress hold them
        fcntl.flock(ledger_lock, fcntl.LOCK_EX)
        r = subprocess.run([sys.executable, "-m", "oncofed", "site", "status", str(site)], capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "site 'St Mary' of consortium 'Test'" in out and "SuperNode: not running" in out
    assert "privacy budget: epsilon 8 at delta 1e-05" in out and f"epsilon spent: {spent:.3f}" in out
    assert f"epsilon left: {8.0 - spent:.3f}" in out and "1 round(s) begun and not finished" in out
    assert "runs: 1 recorded, 2 round(s) committed" in out
    assert "run-1: 2 round(s) committed, 1 begun (epsilon 4 over 3 round(s)" in out
    assert "models: 2 installed" in out and "active: v0001 (chosen by the site)" in out
    assert "v0001 *: run run-0, round 2" in out and "v0002: run run-1, round 2" in out
    assert "last entry" in out and "(model_activated, number 0)" in out
    assert _files(tmp_path) == before  # nothing written, nothing created
    assert np.isfinite(spent) and spent > 0


def test_site_status_of_a_site_before_its_first_round_writes_nothing(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    SiteConfig(site_name="New", state_dir=str(site / "state"), model_dir=str(site / "models"),
               simulated=True).write(site / "site.json")
    before = _files(tmp_path)
    r = subprocess.run([sys.executable, "-m", "oncofed", "site", "status", str(site)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "privacy budget: not set" in r.stdout and "none yet" in r.stdout and "models: none installed" in r.stdout
    assert "no entry yet" in r.stdout and _files(tmp_path) == before
