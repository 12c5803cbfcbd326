"""Federated training end to end in Flower's simulation engine (real SuperLink, real SecAgg+, real Opacus).

One module-scoped synthetic federation of 3 small sites; each run is a real `flwr run`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simulations.federation import ROOT, SimulationError, run_federation
from simulations.synthetic import SyntheticConfig, generate_federation
from tests.factories import in_stage, kill_local_superlink_when

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fed")
    generate_federation(root / "sites", SyntheticConfig(sites=3, classes=3, patients_per_site=60, omics_widths=[200],
                                                        tabular_columns=4, alpha=5.0, seed=1))
    from privacy.signing import generate_signing_key

    generate_signing_key(root / "signing.key", root / "signing.pub")  # the consortium's
    generate_signing_key(root / "other.key", root / "other.pub")  # someone else's
    return root


def _run_in(federation: Path, work: Path, overrides: dict, flower_dir: Path | None = None) -> dict:
    sites = overrides.pop("sites_dir", federation / "sites")
    cfg = {"base-dir": str(ROOT), "schema": str(sites / "schema.json"), "data-root": str(sites),
           "site-state-root": str(work / "state"), "output-dir": str(work / "server"), "num-rounds": 2, "sites": 3,
           "min-sites": 2, "round-timeout": 300.0, "batch-size": 16, "d-model": 64, "seed": 7, **overrides}
    return run_federation(flower_dir or work, cfg, n_sites=3, stream=None)


def _run(federation: Path, name: str, **overrides) -> tuple[dict, Path]:
    work = federation / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return _run_in(federation, work, overrides), work


def _weights(work: Path) -> np.ndarray:
    with np.load(work / "server" / "final_weights.npz") as z:
        return np.concatenate([z[f"arr_{i}"].ravel().astype(np.float64) for i in range(len(z.files))])


def _metrics(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "server" / "metrics.jsonl").read_text().splitlines()]


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def test_secagg_aggregate_equals_fedavg_of_what_the_sites_released_and_every_site_holds_the_model(federation):
    with_sa, work_sa = _run(federation, "secagg", secagg=True, **{
        "eval-data": str(federation / "sites" / "site_00"), "signing-key": str(federation / "signing.key"),
        "signing-public-key": str(federation / "signing.pub")})
    # what SecAgg+ unmasked is the weighted mean of the updates the sites released (each site keeps its
    # released update: client/releases.py), up to SecAgg+'s quantisation: round 1's weights + that mean
    from client.releases import ReleaseStore

    with np.load(work_sa / "server" / "checkpoints" / "round-0001" / "weights.npz") as z:
        before = _flat(z[f"arr_{i}"] for i in range(len(z.files)))
    released = [ReleaseStore(work_sa / "state" / s / "state").load(with_sa["run"], 2)
                for s in ("site_00", "site_01", "site_02")]
    total = sum(r.num_examples for r in released)
    mean = sum(r.num_examples / total * _flat(r.delta) for r in released)
    assert np.linalg.norm(_weights(work_sa) - (before + mean)) / np.linalg.norm(mean) < 1e-5
    status = json.loads((work_sa / "server" / "status.json").read_text())
    assert status["rounds_updated"] == 2 and status["model_updated"] == 1  # both rounds moved the model: /metrics
    for result, work in ((with_sa, work_sa),):
        assert len(result["deliveries"]) == 3 and all(d["installed"] for d in result["deliveries"])
        for d in result["deliveries"]:  # each in its site's own model store (the reply names no path)
            version = work / "state" / d["site"] / "models" / d["version"]
            package = json.loads((version / "package.json").read_text())
            assert package["arrays_sha256"] == result["arrays_sha256"] and package["round"] == 2
            # its architecture signed, and the site's normalisation of the run kept with it (served with it)
            assert package["architecture"]["d_model"] == 64 and (version / "normalizer.json").is_file()
    for d in with_sa["deliveries"]:  # signed by the server, verified by the site, re-verifiable in its store
        from client.model_store import ModelStore
        from privacy.signing import load_public

        store = ModelStore(work_sa / "state" / d["site"] / "models")
        assert "signature" in store.verify(d["version"], signing_public_key=load_public(federation / "signing.pub"))[
            "delivery"]
    # per-site cumulative epsilon is reported every round and saved with the model
    rounds = _metrics(work_sa)
    assert [r["round"] for r in rounds] == [1, 2]
    eps = rounds[-1]["site_epsilon"]
    assert set(eps) == {"site_00", "site_01", "site_02"} and all(0 < e <= 8.0 for e in eps.values())
    assert all(rounds[0]["site_epsilon"][s] < eps[s] for s in eps)
    assert with_sa["site_epsilon"] == eps
    # each site's first run: the run's own epsilon is the site's total, and travels in the package beside it
    assert rounds[-1]["site_run_epsilon"] == pytest.approx(eps, rel=1e-9)
    assert package["site_run_epsilon"] == pytest.approx(eps, rel=1e-9)
    # the last round's evaluation measured the final model per modality pattern: summed, they travel in the package
    from shared_models.protocol import consortium_patterns
    from shared_models.schema import FeatureSchema

    assert "patterns" not in rounds[0] and rounds[-1]["patterns"], rounds[-1]
    assert all(1 <= e["sites"] <= 3 and 0 <= e["right"] <= e["n"] for e in rounds[-1]["patterns"].values())
    names = [m.name for m in FeatureSchema.load(federation / "sites" / "schema.json").modalities]
    assert with_sa.get("patterns", {}) == consortium_patterns(rounds[-1]["patterns"], names)
    # the operator's optional evaluation site is scored after every round; each phase is timed
    labels = pd.read_csv(federation / "sites" / "site_00" / "labels.csv")
    for r in rounds:
        assert r["server_eval"]["patients"] == len(labels) and 0 <= r["server_eval"]["macro_f1"] <= 1
        assert {"fit", "aggregate", "site_evaluate", "secagg_setup", "secagg_share_keys",
                "secagg_collect_masked_vectors", "secagg_unmask"} <= set(r["timing"])
        assert all(s["train_seconds"] > 0 for s in r["sites"].values())
    # the held-out evaluation names the types it predicts that none of the scored patients has
    from simulations.federation import evaluate_on_site

    store = work_sa / "state" / with_sa["deliveries"][0]["site"] / "models"
    one_type = federation / "one_type"
    shutil.copytree(federation / "sites" / "site_01", one_type, dirs_exist_ok=True)
    labels1 = pd.read_csv(one_type / "labels.csv")
    label_col = [c for c in labels1.columns if c != labels1.columns[0]][0]
    kept = labels1[labels1[label_col] == labels1[label_col].mode()[0]]
    kept.to_csv(one_type / "labels.csv", index=False)
    held = evaluate_on_site(store, one_type)
    (only, f1), = held["per_class_f1"].items()
    wrong = held["patients"] - round(held["accuracy"] * held["patients"])
    assert held["patients"] == len(kept) and sum(held["predicted_absent_types"].values()) == wrong
    assert only not in held["predicted_absent_types"]
    assert held["macro_f1"] == pytest.approx(f1 / (1 + len(held["predicted_absent_types"])))
    # the server's and every site's hash-chained audit log verify, and say what happened
    from privacy.audit import verify

    server_log = work_sa / "server" / "audit.jsonl"
    assert verify(server_log).ok
    events = [json.loads(x) for x in server_log.read_text().splitlines()]
    assert [e["event"] for e in events] == ["run_start", "round", "round", "run_end"]
    assert events[2]["site_epsilon"] == eps and events[-1]["arrays_sha256"] == with_sa["arrays_sha256"]
    for site in eps:
        site_log = work_sa / "state" / site / "state" / "audit.jsonl"
        assert verify(site_log).ok
        site_events = [json.loads(x)["event"] for x in site_log.read_text().splitlines()]
        assert site_events == ["round_trained", "round_trained", "model_installed"]


@pytest.mark.parametrize("n_sites, shares", [(3, 3), (8, 8), (21, 21), (30, 21), (100, 21)])
def test_secagg_parameters_follow_the_number_of_sites(n_sites, shares):
    """All-to-all key sharing up to 21 sites, 21 neighbours beyond; the quantised sum never wraps."""
    from privacy.run_config import load_run_config
    from server.app import secagg_workflow

    cfg = load_run_config({"schema": "x.json"})
    wf = secagg_workflow(cfg, n_sites)
    derived = round(wf.num_shares * n_sites)  # Flower's rule for a float num_shares (SecAggPlusWorkflow)
    if derived < n_sites and derived % 2 == 0:
        derived += 1
    assert derived == shares
    assert (n_sites + 1) * wf.quantization_range <= wf.modulus_range == 2**32
    assert wf.timeout == cfg.federation.round_timeout


def test_an_unusable_eval_data_directory_stops_the_server_naming_the_setting(tmp_path):
    from privacy.run_config import load_run_config
    from server.app import server_evaluation
    from shared_models.schema import FeatureSchema

    schema = FeatureSchema.load(ROOT / "simulations" / "schemas" / "tcga_pancan33.json")
    cfg = load_run_config({"schema": "x.json", "eval-data": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="eval-data"):
        server_evaluation(cfg, schema)


def test_a_run_expecting_more_sites_than_come_starts_with_min_sites_after_the_wait(federation):
    """`sites` 4 but 3 hospitals: after round-timeout the run starts with the 3 (min-sites 2 met) instead of failing
    because one hospital is down; with min-sites 4 it fails naming how many came."""
    # round-timeout is also the round's reply deadline: 20 s was missed on a machine running four federations
    result, work = _run(federation, "fewer", sites=4, **{"round-timeout": 45.0, "num-rounds": 1})
    assert [len(m["sites"]) for m in _metrics(work)] == [3]
    assert all(d.get("installed") for d in result["deliveries"])
    with pytest.raises(SimulationError):
        _run(federation, "too-few", sites=4, **{"min-sites": 4, "round-timeout": 20.0, "num-rounds": 1})
    log = (federation / "too-few" / "flwr-run.log").read_text()
    assert "fewer than 4 sites connected within 20 s (3 did; at least 4 needed)" in log


def test_a_site_with_invalid_data_is_refused_and_the_round_goes_on(federation):
    broken = federation / "broken"
    shutil.copytree(federation / "sites", broken)
    labels = pd.read_csv(broken / "site_01" / "labels.csv", dtype=str, keep_default_na=False)
    labels.loc[0, labels.columns[1]] = "not-a-class"
    labels.to_csv(broken / "site_01" / "labels.csv", index=False)
    result, work = _run(federation, "refusal", sites_dir=broken, **{
        "num-rounds": 1, "signing-key": str(federation / "other.key"),
        "signing-public-key": str(federation / "signing.pub")})
    (r,) = _metrics(work)
    assert len(r["participants"]) == 2 and r["status"] == "updated"
    assert len(r["refused"]) == 1 and "site_01" in r["refused"][0]["reason"]
    assert "failed validation" in r["refused"][0]["reason"] and "not-a-class" not in r["refused"][0]["reason"]
    site_log = work / "state" / "site_01" / "state" / "audit.jsonl"
    assert [json.loads(x)["event"] for x in site_log.read_text().splitlines()][0] == "round_refused"
    # a model signed by a key the sites do not trust is refused by every site, which says why
    assert len(result["deliveries"]) == 3
    for d in result["deliveries"]:
        assert not d["installed"] and "signed by another key" in d["error"]
    events = [json.loads(x)["event"] for x in site_log.read_text().splitlines()]
    assert events[-1] == "model_refused" and not (work / "state" / "site_01" / "models" / "ACTIVE").exists()


def test_a_server_killed_in_any_stage_resumes_and_every_round_spends_once(federation):
    """SIGKILL of the whole server stack (SuperLink, ServerApp, simulated sites) in one stage of a round, three
    times in one 4-round DP run, each followed by a resume: in round 2's setup (no site has trained round 2:
    the retry trains it once), round 3's unmask (every site trained and sent round 3's masked update), round 4's
    evaluation (round 4 aggregated, not checkpointed: re-run from round 3's checkpoint). A round whose update left
    is neither retrained nor, as a resumed simulation's SuperNodes have new node ids, sent into a second SecAgg+
    exchange: the sites refuse it and the round is abandoned. The run finishes with its frozen configuration, and
    each site's ledger holds each round once, committed (the ledgers checked to the step)."""
    work = federation / "crash"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    progress = work / "server" / "progress.json"
    latest = work / "server" / "checkpoints" / "latest.json"
    flower_dir, overrides, resent = work, {"num-rounds": 4}, 0
    for rnd, stage in ((2, "setup"), (3, "unmask"), (4, "evaluate")):
        watcher = kill_local_superlink_when(flower_dir, in_stage(progress, rnd, stage))
        with pytest.raises(SimulationError):
            _run_in(federation, work, dict(overrides), flower_dir=flower_dir)
        watcher.join()
        # the kill races the server: on a loaded machine the sites may answer round 4's evaluation and the server
        # checkpoint it before the SIGKILL lands. Then the resume has nothing to train, which it must also get right.
        checkpointed = json.loads(latest.read_text())["round"]
        assert checkpointed == rnd - 1 or (stage == "evaluate" and checkpointed == rnd), (stage, checkpointed)
        resent += stage != "setup" and checkpointed < rnd
        flower_dir, overrides = work / f"again-{stage}", {"num-rounds": 4, "resume": True}
        flower_dir.mkdir()
    resumed = _run_in(federation, work, overrides, flower_dir=flower_dir)
    assert resumed["first_round"] == checkpointed + 1
    assert [r["round"] for r in _metrics(work)][-1] == 4
    from server.app import ROUND_RECORDS
    from server.checkpoint import load_latest

    assert load_latest(work / "server" / "checkpoints").meta[ROUND_RECORDS]["metrics"] == _metrics(work)[-1], \
        "the checkpoint carries the round's records, for a resume after a crash before them"
    run_log = [json.loads(x) for x in (work / "server" / "audit.jsonl").read_text().splitlines()]
    assert sorted({e["round"] for e in run_log if e["event"] == "round"}) == [1, 2, 3, 4]
    for site in ("site_00", "site_01", "site_02"):
        state = work / "state" / site / "state"
        ledger = json.loads((state / "privacy-ledger.json").read_text())
        entries = ledger["entries"]
        assert all(e["status"] == "committed" for e in entries), "no pending spend is left behind"
        assert sorted(e["round"] for e in entries) == [1, 2, 3, 4], entries
        (plan,) = ledger["runs"].values()
        assert [e["steps"] for e in entries] == [plan["steps_per_round"]] * 4, "the ledger, to the step"
        events = [json.loads(x)["event"] for x in (state / "audit.jsonl").read_text().splitlines()]
        assert events.count("round_trained") == 4, "no round was trained twice"
        assert events.count("round_resent") == 0 and events.count("round_refused") == resent, \
            "the released rounds were neither retrained nor sent into a second exchange (new node ids)"


def test_a_resume_that_changes_the_run_is_refused_by_the_server(federation):
    work = federation / "crash"  # left by the test above: a finished 4-round run with its run.json
    if not (work / "server" / "run.json").exists():
        pytest.skip("needs the resumed run of test_a_server_killed_in_any_stage_resumes_...")
    (work / "again2").mkdir(exist_ok=True)
    finished = (work / "server" / "result.json").stat().st_mtime
    try:
        _run_in(federation, work, {"resume": True, "num-rounds": 5}, flower_dir=work / "again2")
    except SimulationError:
        pass
    assert "this request changes num-rounds: 4 -> 5" in (work / "again2" / "flwr-run.log").read_text()
    assert (work / "server" / "result.json").stat().st_mtime == finished, "nothing ran"


def test_a_round_most_sites_refuse_is_never_unmasked(federation):
    """2 of 3 sites refuse (their data fails validation): the one site left would be the whole "sum", so the
    server does not unmask it; the round is abandoned and the model is unchanged. The refusals come at SecAgg+'s
    setup, so the round is abandoned before the third site trains: it spends nothing."""
    broken = federation / "two-broken"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(federation / "sites", broken)
    for site in ("site_01", "site_02"):
        labels = pd.read_csv(broken / site / "labels.csv", dtype=str, keep_default_na=False)
        labels.loc[0, labels.columns[1]] = "not-a-class"
        labels.to_csv(broken / site / "labels.csv", index=False)
    result, work = _run(federation, "abandoned", sites_dir=broken, **{"num-rounds": 1})
    (r,) = _metrics(work)
    assert r["status"] == "abandoned" and r["participants"] == [], r
    assert "before any site trains" in r["reason"], r["reason"]  # our count, or Flower's halt at setup, which says so
    assert sorted(x["reason"].split(":")[0] for x in r["refused"]) == ["site_01", "site_02"]
    status = json.loads((work / "server" / "status.json").read_text())  # what /metrics exports
    assert status["round"] == 1 and status["rounds_updated"] == 0 and status["model_updated"] == 0, status
    with np.load(work / "server" / "checkpoints" / "round-0001" / "weights.npz") as z:
        after = [z[f"arr_{i}"] for i in range(len(z.files))]
    import torch

    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.schema import FeatureSchema
    from shared_models.weights import state_arrays

    cfg = load_run_config({"schema": str(broken / "schema.json"), "d-model": 64, "seed": 7})
    torch.manual_seed(7)
    initial = state_arrays(MultiModalTransformer(FeatureSchema.load(broken / "schema.json"), cfg.model))
    assert all(np.array_equal(a, b) for a, b in zip(after, initial)), "nothing was aggregated"
    ledger = work / "state" / "site_00" / "state" / "privacy-ledger.json"
    assert not ledger.exists() or json.loads(ledger.read_text())["entries"] == [], "no spend on a sum never unmasked"


def test_stopping_the_local_superlink_ends_what_it_started_in_other_sessions(tmp_path):
    """The SuperExec and Ray leave the SuperLink's process group (new sessions); stop() ends them too."""
    import sys

    from server.processes import LocalSuperLink

    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
              "time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the stand-in SuperLink did not start its child"
        time.sleep(0.1)
    grandchild = int(pid_file.read_text())
    assert os.getsid(grandchild) != os.getsid(proc.pid)  # it left the SuperLink's session
    LocalSuperLink(proc, {}, tmp_path / "log").stop()
    assert proc.poll() is not None
    deadline = time.monotonic() + 5
    while Path(f"/proc/{grandchild}").exists() and "Z" not in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the process in its own session outlived stop()"
        time.sleep(0.1)


def test_simulated_federations_get_the_recipe_of_their_privacy_as_a_deployment_does(tmp_path):
    from privacy.run_config import load_run_config
    from shared_models.run_config import app_defaults
    from simulations.federation import federation_config

    def cfg(dp, **extra):
        c = federation_config(tmp_path, tmp_path / "sites", 2, rounds=1, dp=dp, epsilon=8, secagg=True,
                              strategy="fedavg", seed=0, extra=extra)
        assert "lr" not in c and "batch-size" not in c and "max-grad-norm" not in c  # the recipe's, not a copy
        run = load_run_config({**app_defaults(ROOT), **c})
        return run.training.optimizer, run.training.lr, run.training.batch_size, run.privacy.max_grad_norm

    assert cfg(False) == ("sgd", 0.2, 64, 1.0)
    assert cfg(False, **{"local-optimizer": "adamw"}) == ("adamw", 0.002, 64, 1.0)
    assert cfg(True) == ("sgd", 100.0, 192, 0.01)
    assert cfg(True, **{"local-optimizer": "adamw"}) == ("adamw", 0.02, 192, 1.0)


def test_a_simulation_leaves_what_it_is_not_told_to_the_run_configs_defaults(tmp_path):
    """`oncofed simulate` without options runs the run config's defaults: none of them is written a second time."""
    from privacy.run_config import load_run_config
    from shared_models.run_config import app_defaults
    from simulations.federation import federation_config

    c = federation_config(tmp_path, tmp_path / "sites", 8, seed=0)
    assert not {"num-rounds", "dp", "epsilon", "secagg", "strategy", "local-epochs", "min-sites"} & set(c)
    defaults = load_run_config({**app_defaults(ROOT), "schema": "s.json"})
    run = load_run_config({**app_defaults(ROOT), **c})
    # what a simulation sets itself: the site count and a round timeout (Ray's start on this machine)
    assert (run.federation, run.privacy, run.secagg) == (
        defaults.federation.model_copy(update={"sites": 8, "round_timeout": 900.0}), defaults.privacy, defaults.secagg)
    assert run.training.local_epochs == defaults.training.local_epochs
    assert load_run_config({**app_defaults(ROOT), **federation_config(tmp_path, tmp_path / "s", 1, seed=0,
                                                                       secagg=False)}).federation.min_sites == 1


def test_held_out_f1_is_split_by_how_many_patients_a_type_has_across_the_federation():
    from simulations.federation import f1_by_class_size

    sizes = f1_by_class_size({"A": 0.9, "B": 0.7, "C": 0.2, "D": 0.4}, {"A": 300, "B": 60, "C": 24, "D": 59})
    assert sizes["common"] == {"types": ["A", "B"], "patients": [300, 60], "mean_f1": pytest.approx(0.8)}
    assert sizes["rare"] == {"types": ["C", "D"], "patients": [24, 59], "mean_f1": pytest.approx(0.3)}
    assert f1_by_class_size({"A": 1.0}, {"A": 5}, threshold=5)["rare"]["mean_f1"] is None


def test_a_run_whose_server_app_raised_is_not_reported_complete_with_an_earlier_result(tmp_path, monkeypatch):
    """`flwr run` exits 0 when the ServerApp raised: the result.json an earlier attempt left was returned as this
    run's (a resume refused for a changed sample-rate printed 'completed')."""
    from types import SimpleNamespace

    import simulations.federation as fed

    out = tmp_path / "server"
    out.mkdir()
    (out / "result.json").write_text('{"run": "earlier"}')
    monkeypatch.setattr(fed, "start_local_superlink", lambda work: SimpleNamespace(env={}, stop=lambda: None,
                                                                                   log_file=work / "superlink.log"))
    monkeypatch.setattr(fed, "run_flwr", lambda *a, **k: 0)  # exit 0, no new result
    with pytest.raises(fed.SimulationError, match="ended without a result"):
        fed.run_federation(tmp_path, {"output-dir": str(out)}, n_sites=2, stream=None)

    def writes(*a, **k):  # a run that finishes writes its result
        (out / "result.json").write_text('{"run": "this"}')
        return 0
    monkeypatch.setattr(fed, "run_flwr", writes)
    assert fed.run_federation(tmp_path, {"output-dir": str(out)}, n_sites=2, stream=None) == {"run": "this"}


def test_a_simulation_that_fails_leaves_no_summary_of_the_run_before_it(tmp_path, monkeypatch):
    """The server output of the last run is cleared when a new one starts; its summary.json stayed and, when the
    new run failed, described a run whose files were gone."""
    import json

    import typer
    from typer.testing import CliRunner

    import simulations.federation as fed
    from simulations.cli_simulate import register

    out = tmp_path / "run"
    sites = out / "sites"
    sites.mkdir(parents=True)
    (sites / "manifest.json").write_text(json.dumps({"sites": [{"name": "C0", "dir": "C0"}, {"name": "C1", "dir": "C1"}],
                                                     "holdout": {"dir": "holdout", "patients": 10}}))
    (out / "summary.json").write_text('{"held_out": {"macro_f1": 0.9}}')  # the run before
    monkeypatch.setattr(fed, "ensure_partition", lambda data_root, **k: data_root)

    def fails(*a, **k):
        raise fed.SimulationError("the federated run did not complete")
    monkeypatch.setattr(fed, "run_federation", fails)
    app = typer.Typer()
    register(app)
    app.command("other")(lambda: None)  # two commands: typer keeps the command name
    res = CliRunner().invoke(app, ["simulate", "--out", str(out), "--rounds", "1"])
    assert res.exit_code == 1 and "did not complete" in res.output, res.output
    assert not (out / "summary.json").exists()
