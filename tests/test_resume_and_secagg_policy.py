"""What a site and the server do so that faults never spend beyond a run's plan or reveal one site's update.

- a run's configuration is frozen when it starts; resuming reloads it and refuses any change;
- a site gives its SecAgg+ key shares only for a sum of enough sites, and a refusing site drops out of
  the round instead of adding a zero vector;
- a released update is kept so that a resumed server gets the same bits back (no second spend).
(The real-process versions of these faults are in tests/test_federation.py.)
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from client.app import site_policy_mod
from client.releases import Release, ReleaseStore
from server.checkpoint import freeze_run, frozen_run, load_latest, run_config_changes, save_checkpoint
from server.deploy import DeployError
from server.submit import resume_values
from tests.factories import fsynced_paths, site_message, unmask_message
from shared_models.protocol import RUN_KEY, SERVER_ROUND
from shared_models.run_config import RunConfigError


def _context(tmp_path, node: dict | None = None, **run) -> Context:
    node = {"data-path": str(tmp_path / "site"), "state-dir": str(tmp_path / "state"), **(node or {})}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                   run_config={"schema": "schema.json", "min-sites": 2, **run})


def _never_called(msg, context):
    raise AssertionError("the SecAgg+ mod must not run: the site refuses before it")


def test_a_site_gives_no_key_shares_for_a_sum_of_fewer_than_min_sites(tmp_path):
    reply = site_policy_mod(unmask_message(active=[1], dead=[2, 3]), _context(tmp_path), _never_called)
    assert reply.has_error()
    assert reply.error.reason.startswith("refused: ") and "1 sites sent masked vectors, fewer than 2" in reply.error.reason
    events = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "unmask_refused" and events[-1]["active_sites"] == 1


def test_the_sites_own_floor_wins_over_a_lower_min_sites_from_the_server(tmp_path):
    ctx = _context(tmp_path, node={"min-aggregate-sites": 3}, **{"min-sites": 2})
    reply = site_policy_mod(unmask_message(active=[1, 2], dead=[3]), ctx, _never_called)
    assert reply.has_error() and "fewer than 3" in reply.error.reason and "min-aggregate-sites 3" in reply.error.reason


def test_a_sum_of_enough_sites_goes_on_to_secagg(tmp_path):
    seen = []

    def secagg(msg, context):  # stands in for what follows the policy: Flower's own SecAgg+ mod
        seen.append(msg)
        return Message(RecordDict(), reply_to=msg)

    import client.app as app_module

    original = app_module.secaggplus_mod
    app_module.secaggplus_mod = lambda msg, ctx, call_next: secagg(msg, ctx)
    try:
        reply = site_policy_mod(unmask_message(active=[1, 2], dead=[3]), _context(tmp_path), _never_called)
    finally:
        app_module.secaggplus_mod = original
    assert not reply.has_error() and len(seen) == 1


def test_a_run_is_frozen_and_a_resume_that_changes_it_is_named(tmp_path):
    config = {"schema": "s.json", "num-rounds": 2, "epsilon": 2.0, "batch-size": 64, "resume": False}
    freeze_run(tmp_path, "r3-abc", config)
    frozen = frozen_run(tmp_path)
    assert frozen["run_key"] == "r3-abc" and "resume" not in frozen["run_config"]
    assert run_config_changes(frozen["run_config"], {**config, "resume": True}) == []
    assert run_config_changes(frozen["run_config"], {**config, "num-rounds": 10, "epsilon": 2}) == [
        "num-rounds: 2 -> 10"], "2 and 2.0 are the same epsilon; 10 rounds are not 2"
    # "auto" is frozen as the code that started the run resolved it: a resume under code whose recipe differs (an
    # upgrade in between) changes the run even though the request is the same
    assert frozen["resolved"]["lr"] == 100 and frozen["resolved"]["max-grad-norm"] == 0.01
    upgraded = {**frozen["resolved"], "lr": 50}
    assert run_config_changes(frozen["run_config"], {**config, "resume": True}, frozen["resolved"]) == []
    assert run_config_changes(frozen["run_config"], {**config, "resume": True}, upgraded) == ["lr: 50 -> 100.0"]
    # a key added after the run started (run.json has none): the run resumes with the value it trained with, though
    # "auto" now resolves otherwise without DP (modality dropout 0.25), and a request with "auto" is named
    nodp = {**config, "dp": False}
    freeze_run(tmp_path / "nodp", "r4-abc", nodp)
    run_json = tmp_path / "nodp" / "run.json"
    old = json.loads(run_json.read_text())
    for part in ("run_config", "resolved"):
        old[part].pop("modality-dropout", None)
    run_json.write_text(json.dumps(old))
    frozen = frozen_run(tmp_path / "nodp")
    assert frozen["run_config"]["modality-dropout"] == frozen["resolved"]["modality-dropout"] == 0.0
    assert run_config_changes(frozen["run_config"], frozen["run_config"], frozen["resolved"]) == []
    assert run_config_changes(frozen["run_config"], nodp, frozen["resolved"]) == ["modality-dropout: 0.0 -> 0.25"]
    resumed = resume_values(tmp_path / "nodp", {})  # what `oncofed run --resume` submits: the ServerApp's check agrees
    assert resumed["modality-dropout"] == 0.0 and run_config_changes(frozen["run_config"], resumed, frozen["resolved"]) == []


def test_oncofed_run_resume_reloads_the_frozen_config_and_refuses_a_changing_set(tmp_path):
    config = {"schema": "s.json", "num-rounds": 2, "epsilon": 2.0, "strategy": "fedavg", "modality-dropout": "auto"}
    freeze_run(tmp_path / "r3", "r3-abc", config)
    # frozen by this code: no key is added (its resolved config lists every key there is, the request's missing ones too)
    assert resume_values(tmp_path / "r3", {}) == {**config, "resume": True}
    assert resume_values(tmp_path / "r3", {"epsilon": 2})["epsilon"] == 2.0  # restating a value is no change
    with pytest.raises(DeployError, match=r"--set would change num-rounds: 2 -> 10; strategy: 'fedavg' -> 'fedadam'"):
        resume_values(tmp_path / "r3", {"num-rounds": 10, "strategy": "fedadam"})
    with pytest.raises(DeployError, match="was never started .* nothing to resume"):
        resume_values(tmp_path / "never", {})


def test_a_run_frozen_before_fusion_blocks_existed_resumes_with_the_two_blocks_it_trained(tmp_path):
    """Every model had 2 fusion blocks before the key existed (2026-11-24); "auto" now builds 1 in dp-mode "site". Such
    a run's run.json has neither the key nor the resolved config (2026-12-05): resumed, it builds 1 block, which its
    2-block checkpoint does not fit."""
    from flwr.app import Context, RecordDict

    from privacy.run_config import load_run_config
    from server.app import start_or_resume
    from shared_models.model import MultiModalTransformer
    from shared_models.run_config import ModelConfig
    from shared_models.weights import state_arrays
    from tests.factories import started_run

    out, values, schema, start = started_run(tmp_path)
    assert load_run_config(values, source="run config").model.fusion_blocks == 1  # dp-mode "site" today
    old = json.loads((out / "run.json").read_text())
    old["run_config"].pop("fusion-blocks")
    del old["resolved"]
    (out / "run.json").write_text(json.dumps(old))
    trained = state_arrays(MultiModalTransformer(schema, ModelConfig(fusion_blocks=2)))
    save_checkpoint(out / "checkpoints", 1, trained, {}, {"run_key": start.run_key, "schema_hash": schema.content_hash()})

    resumed = resume_values(out, {})  # what `oncofed run --resume` submits, to the ServerApp and the sites alike
    cfg = load_run_config(resumed, source="run config")
    assert cfg.model.fusion_blocks == 2
    again = start_or_resume(cfg, Context(run_id=2, node_id=0, node_config={}, state=RecordDict(), run_config=resumed),
                            schema, out)
    assert again.first_round == 2 and [a.shape for a in again.weights] == [a.shape for a in trained]


@pytest.mark.parametrize("started", [{"lr": 1.0}, {"weight-decay": 0.01}])
def test_a_run_started_before_a_new_runs_check_resumes_as_it_trained(tmp_path, started):
    """lr given without max-grad-norm under DP-SGD, or lr x weight-decay 1, are refused for a new run since a4c87bd;
    a run that started with them before resumes (oncofed run --resume and the ServerApp compare the configs by
    loading them: as new runs, they refused it)."""
    from flwr.app import Context, RecordDict

    from privacy.run_config import load_run_config
    from server.app import start_or_resume
    from shared_models.model import MultiModalTransformer
    from shared_models.weights import state_arrays
    from tests.factories import started_run

    out, values, schema, start = started_run(tmp_path)
    with pytest.raises(RunConfigError):  # a new run with it is refused
        load_run_config({**values, **started}, source="run config")
    old = json.loads((out / "run.json").read_text())  # as the code before the check froze it
    old["run_config"].update(started)
    old["resolved"].update(started)
    (out / "run.json").write_text(json.dumps(old))
    cfg0 = load_run_config({**values, **started, "resume": True}, source="run config")
    trained = state_arrays(MultiModalTransformer(schema, cfg0.model))
    save_checkpoint(out / "checkpoints", 1, trained, {}, {"run_key": start.run_key, "schema_hash": schema.content_hash()})

    resumed = resume_values(out, {})
    cfg = load_run_config(resumed, source="run config")
    assert cfg.run.resume and all(cfg.flat()[k] == v for k, v in started.items())
    again = start_or_resume(cfg, Context(run_id=2, node_id=0, node_config={}, state=RecordDict(), run_config=resumed),
                            schema, out)
    assert again.first_round == 2


def test_a_checkpoint_of_another_fusion_depth_is_refused_naming_both(tmp_path):
    """A run.json whose model the checkpoint does not fit (changed since the run trained) is refused naming the run
    and the fusion depth each has, not resumed with a model of another depth."""
    from flwr.app import Context, RecordDict

    from privacy.run_config import load_run_config
    from server.app import start_or_resume
    from shared_models.model import MultiModalTransformer
    from shared_models.run_config import ModelConfig
    from shared_models.weights import state_arrays
    from tests.factories import started_run

    out, values, schema, start = started_run(tmp_path)  # fusion-blocks "auto": 1 in dp-mode "site"
    trained = state_arrays(MultiModalTransformer(schema, ModelConfig(fusion_blocks=3)))
    save_checkpoint(out / "checkpoints", 1, trained, {}, {"run_key": start.run_key, "schema_hash": schema.content_hash()})
    resumed = {**values, "resume": True}
    with pytest.raises(ValueError, match=rf"run {start.run_key}'s checkpoint weights do not fit the model of this run "
                       r"config \(their model has fusion-blocks = 3, this run config's 1\).*restore both"):
        start_or_resume(load_run_config(resumed, source="run config"),
                        Context(run_id=2, node_id=0, node_config={}, state=RecordDict(), run_config=resumed), schema, out)


def test_a_resume_keeps_the_runs_keep_checkpoints_unless_set_and_prunes_nothing_it_kept(tmp_path):
    """keep-checkpoints may change at a resume (it is not frozen): without --set the run keeps the value it started
    with (a run keeping every round, 0, lost all but the project default's 3 at its first resumed round)."""
    config = {"schema": "s.json", "num-rounds": 9, "keep-checkpoints": 0}
    freeze_run(tmp_path / "r", "r-abc", config)
    assert resume_values(tmp_path / "r", {})["keep-checkpoints"] == 0
    assert resume_values(tmp_path / "r", {"keep-checkpoints": 10})["keep-checkpoints"] == 10


def test_a_released_update_is_kept_bit_for_bit(tmp_path):
    store = ReleaseStore(tmp_path)
    delta = [np.random.default_rng(0).normal(size=(3, 4)), np.arange(5, dtype=np.float64)]
    store.save("run-A/../x", 2, Release("abc", delta, 17, {"epsilon": 1.5, "site": "s"}))
    got = store.load("run-A/../x", 2)
    assert got.global_sha256 == "abc" and got.num_examples == 17 and got.metrics == {"epsilon": 1.5, "site": "s"}
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got.delta, delta))
    assert store.load("run-A/../x", 3) is None
    assert all(p.is_relative_to(tmp_path / "released") for p in tmp_path.rglob("*.npz")), "the run key is no path"


def test_a_long_run_keeps_a_bounded_number_of_checkpoints_and_released_updates(tmp_path):
    """250 rounds would keep 1.3 GB of server checkpoints and 500 MB of released updates per site: only the
    newest few stay, the latest is always there to resume from, and a change of keep-checkpoints on resume
    is allowed (it changes no training)."""
    weights = [np.zeros((300, 100), np.float32)]
    root = tmp_path / "checkpoints"
    for rnd in range(1, 41):
        save_checkpoint(root, rnd, [w + rnd for w in weights], {"m_t_0": np.ones(3)}, {"run_key": "r"}, keep=3)
    assert sorted(d.name for d in root.iterdir() if d.is_dir()) == ["round-0038", "round-0039", "round-0040"]
    latest = load_latest(root)
    assert latest.round == 40 and latest.weights[0][0, 0] == 40
    save_checkpoint(root, 39, weights, {}, {"run_key": "r"}, keep=1)  # rewriting an older round: latest stays
    assert sorted(d.name for d in root.iterdir() if d.is_dir()) == ["round-0039", "round-0040"]
    assert load_latest(root).round == 39
    save_checkpoint(root, 41, weights, {}, {"run_key": "r"}, keep=0)  # 0 keeps all
    assert len([d for d in root.iterdir() if d.is_dir()]) == 3

    store = ReleaseStore(tmp_path / "site")
    for rnd in range(1, 41):
        store.save("run-A", rnd, Release("abc", [np.full(4, rnd, np.float64)], 17, {}))
        store.save("run-B", rnd, Release("abc", [np.zeros(4)], 17, {})) if rnd < 3 else None
    assert sorted(p.name for p in (tmp_path / "site" / "released" / "run-A").iterdir()) == [
        "round-0039.npz", "round-0040.npz"]
    assert store.load("run-A", 40).delta[0][0] == 40 and store.load("run-A", 30) is None
    assert store.load("run-B", 1) is not None, "another run's releases are its own"
    freeze_run(tmp_path / "run", "k", {"schema": "s.json", "min-sites": 2, "keep-checkpoints": 3})
    assert run_config_changes(frozen_run(tmp_path / "run")["run_config"],
                              {"schema": "s.json", "min-sites": 2, "keep-checkpoints": 10}) == []


def _train_message(run_key: str = "run-A", rnd: int = 1) -> Message:
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict

    content = fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(2)]),
                                          {SERVER_ROUND: rnd, RUN_KEY: run_key}), keep_input=True)
    return site_message(content)


def test_a_released_round_whose_copy_was_pruned_is_refused_not_trained_again(tmp_path):
    """What the bounded release store relies on: asked again for a released round it no longer holds (or one
    released from other weights), the site refuses, audited, instead of training it again (a second spend)."""
    from flwr.compat.common.recorddict_compat import recorddict_to_fitins

    from client.app import SiteRefusal, SiteSettings, _resend
    from privacy.audit import AuditLog

    msg = _train_message("run-A", 3)
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    settings = SiteSettings(name="s", index=0, paths=None, budget_epsilon=8.0, require_secagg=True)
    audit = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(SiteRefusal, match="no copy of its update is kept.*spend the privacy budget twice"):
        _resend(msg, fitins, settings, None, "abc", audit)
    with pytest.raises(SiteRefusal, match="from other global weights"):
        _resend(msg, fitins, settings, Release("xyz", [np.zeros(2)], 17, {}), "abc", audit)
    # a copy that cannot be read (a file cut short): named, with the fix, instead of numpy's "File is not a zip file"
    from client.app import _release
    from client.releases import ReleaseStore

    store = ReleaseStore(tmp_path / "state")
    store.save("run-A", 3, Release("abc", [np.zeros(2)], 17, {}))
    path = store._path("run-A", 3)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(SiteRefusal, match=r"round-0003.npz\) cannot be read \(BadZipFile.*Restore the file"):
        _release(store, "run-A", 3, fitins, msg, settings, audit)
    events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["round"]) for e in events] == [("round_refused", 3)] * 3


def test_a_deployed_site_refuses_a_run_without_dp_unless_its_node_config_allows_it(tmp_path):
    """The server chooses the run config; the site decides whether its patients are trained on without noise."""
    from client.app import train
    from tests.sitefixtures import site_schema, write_site

    schema_path = site_schema().save(tmp_path / "schema.json")
    write_site(tmp_path / "site")
    ctx = _context(tmp_path, node={"require-secagg": False}, schema=str(schema_path), dp=False, secagg=False)
    reply = site_policy_mod(_train_message(), ctx, train)
    assert reply.has_error() and reply.error.reason.startswith("refused: ")
    assert "training without differential privacy (run config dp = false) is refused" in reply.error.reason
    events = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "round_refused"
    # nothing trained, nothing spent: refused before the site's tables are even read (no ledger opened)
    assert not (tmp_path / "state" / "privacy-ledger.json").exists()


def test_a_checkpoints_arrays_are_on_disk_before_latest_json_names_them(tmp_path, monkeypatch):
    """A power loss must not leave latest.json (fsynced) naming a round whose arrays were still in the page cache."""
    synced = fsynced_paths(monkeypatch)
    save_checkpoint(tmp_path / "ckpt", 1, [np.ones(3)], {"m": np.zeros(2)}, {"run_key": "k"})
    before = synced[:next(i for i, p in enumerate(synced) if re.search(r"/latest\.json\.[0-9a-f]+\.tmp$", p))]
    for name in ("weights.npz", "strategy_state.npz", "meta.json"):
        assert any(p.endswith(f".tmp-round-0001/{name}") for p in before), (name, before)
    assert any(p.endswith(".tmp-round-0001") for p in before)


def test_a_resumed_server_tells_the_sites_the_outcome_of_the_round_before_the_resume(tmp_path):
    """The outcome of a round is told to the sites with the next round; after a resume the strategy (in memory)
    starts empty, so it is read back from metrics.jsonl, and the next round's request carries it."""
    import json

    from server.app import resumed_outcome

    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"round": 1, "status": "updated"}) + "\n"
        + json.dumps({"round": 2, "status": "abandoned", "reason": "3 sites sent masked vectors, fewer than 4"}) + "\n")
    assert resumed_outcome(tmp_path, 3) == {2: {"status": "abandoned", "reason": "3 sites sent masked vectors, fewer than 4"}}
    assert resumed_outcome(tmp_path, 1) == {}  # a fresh run
    assert resumed_outcome(tmp_path, 5) == {}  # the line is not the round the run continues after
    from server.checkpoint import round_outcome  # and the last round's, which the model delivery carries

    assert round_outcome(tmp_path, 2) == {"round": 2, "status": "abandoned",
                                          "reason": "3 sites sent masked vectors, fewer than 4"}
    assert round_outcome(tmp_path, 1) is None and round_outcome(tmp_path / "none", 2) is None


def test_checkpoints_are_pruned_by_round_number_past_round_9999(tmp_path):
    from server.checkpoint import prune_checkpoints

    for rnd in (9998, 9999, 10000):
        (tmp_path / f"round-{rnd:04d}").mkdir()
    assert prune_checkpoints(tmp_path, 2, "round-10000") == ["round-9998"]


def test_a_damaged_or_missing_latest_checkpoint_never_restarts_the_run_from_round_one(tmp_path):
    """A truncated weights.npz gave a raw BadZipFile; the old advice (delete latest.json) restarted the run from round
    1, its sites refusing rounds they had released and the ledgers recording them abandoned. Now: the damaged
    directory is named with the fix; latest.json missing or naming a directory moved aside, the newest round's."""
    from server.checkpoint import CheckpointError

    root = tmp_path / "ckpt"
    for rnd in (1, 2):
        save_checkpoint(root, rnd, [np.full(3, float(rnd))], {"m": np.zeros(2)}, {"run_key": "k"})
    (root / "round-0002" / "weights.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError, match=r"round-0002: checkpoint unreadable \(BadZipFile") as e:
        load_latest(root)
    assert "move the directory out of" in str(e.value) and "Do not delete latest.json alone" in str(e.value)
    (root / "latest.json").unlink()  # the old advice: the newest round directory is still read, not round 1
    with pytest.raises(CheckpointError, match="round-0002"):
        load_latest(root)
    (root / "round-0002").rename(tmp_path / "round-0002.damaged")  # the new advice: the round before it
    assert load_latest(root).round == 1 and load_latest(root).weights[0][0] == 1.0
    save_checkpoint(root, 2, [np.full(3, 2.0)], {"m": np.zeros(2)}, {"run_key": "k"})
    (root / "round-0002").rename(tmp_path / "round-0002.aside")  # latest.json names a directory that is gone
    assert load_latest(root).round == 1
    (root / "latest.json").write_text("{not json")
    assert load_latest(root).round == 1
    assert load_latest(tmp_path / "none") is None
