"""site.json, a site's settings: one typed model (privacy/site_config.py) that every writer writes and every
command reads, refusing what it does not know with the file, the key and the fix."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from oncofed.cli import app
from privacy.site_config import FILE_FORMAT, SiteConfig, SiteConfigError

# as `oncofed site init` wrote it before the model existed (keys in its order, values as it typed them)
SITE_INIT = {"format": "oncofed-site/1", "site-name": "C0", "consortium": "c", "superlink": "fl.example.org:443",
             "data-path": "/data/C0", "state-dir": "/srv/site/state", "model-dir": "/srv/site/models",
             "privacy-budget": 8.0, "min-count": 5, "require-secagg": True,
             "signing-public-key": "/srv/site/trust/signing.pub", "root-certificates": "/srv/site/trust/ca.crt",
             "auth-supernode-private-key": "/srv/site/keys/site.key", "schema": "/srv/site/trust/schema.json",
             "schema-sha256": "a" * 64, "public-key-sha256": "b" * 64}


def _write(tmp_path, settings: dict):
    path = tmp_path / "site.json"
    path.write_text(json.dumps(settings, indent=1) + "\n")
    return path


def test_a_site_init_file_and_a_serving_only_file_load(tmp_path):
    site = SiteConfig.load(_write(tmp_path, {**SITE_INIT, "max-trusted-sites": 3, "serve": {"max-patients": 10}}))
    assert site.site_name == "C0" and site.privacy_budget == 8.0 and site.max_trusted_sites == 3
    assert site.serve.max_patients == 10 and site.serve.min_coverage == 0.02  # unset serve keys: their defaults
    minimal = SiteConfig.load(_write(tmp_path, {"model-dir": "m", "state-dir": "s"}))  # what serving needs
    assert (minimal.require_secagg, minimal.require_dp, minimal.min_aggregate_sites, minimal.min_count,
            minimal.signing_public_key, minimal.privacy_budget) == (True, True, 2, 5, "", None)


@pytest.mark.parametrize("change, key, said", [
    ({"privacy-budgt": 8.0}, "privacy-budgt", "unknown key: check its spelling"),
    ({"serve": {"max-patient": 5}}, "serve.max-patient", "unknown key"),
    ({"require-dp": "sometimes"}, "require-dp", "(got 'sometimes')"),
    ({"require-secagg": "off"}, "require-secagg", "valid boolean (got 'off')"),  # a security switch: true or false
    ({"require-dp": 0}, "require-dp", "valid boolean (got 0)"),
    ({"min-count": "five"}, "min-count", "valid integer"),
    ({"privacy-budget": -1}, "privacy-budget", "greater than 0 (got -1); fix the value or remove the key"),
    ({"privacy-budget": 500}, "privacy-budget", "less than or equal to 100 (got 500)"),
    ({"min-aggregate-sites": 1}, "min-aggregate-sites", "greater than or equal to 2"),
    ({"privacy-delta": 1}, "privacy-delta", "less than or equal to 0.0001 (got 1)"),
    ({"serve": {"min-coverage": 2}}, "serve.min-coverage", "less than or equal to 1 (got 2)"),
    ({"state-dir": None}, "state-dir", "valid string"),
    ({"superlink": "fl.example"}, "superlink", "write HOST:PORT with a port 1-65535"),  # a traceback before
    ({"superlink": "fl.example:99999"}, "superlink", "write HOST:PORT"),
    ({"site-name": 'C"1'}, "site-name", "holds no quote"),  # the SuperNode would not start
])
def test_a_bad_file_names_the_file_the_key_and_the_fix(tmp_path, change, key, said):
    path = _write(tmp_path, {**SITE_INIT, **change})
    with pytest.raises(SiteConfigError) as e:
        SiteConfig.load(path)
    assert str(e.value).startswith(f"{path}: {key}: ") and said in str(e.value)


def test_every_problem_at_once_and_a_missing_key(tmp_path):
    path = _write(tmp_path, {"model-dir": "m", "min-count": 0, "colour": "blue"})
    with pytest.raises(SiteConfigError) as e:
        SiteConfig.load(path)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{path}: invalid (3 problems):"
    assert any(x.startswith("  - state-dir: Field required; add it (`oncofed site init` writes it)") for x in lines)
    assert any(x.startswith("  - min-count: ") for x in lines) and any(x.startswith("  - colour: ") for x in lines)
    with pytest.raises(SiteConfigError, match="no readable site.json"):
        SiteConfig.load(tmp_path / "absent" / "site.json")


def test_a_command_names_the_setting_it_needs(tmp_path):
    path = _write(tmp_path, {"model-dir": "m", "state-dir": "s", "data-path": ""})
    with pytest.raises(SiteConfigError, match=rf"^{path}: invalid \(2 problems\):\n  - site-name: not set; fix: the "
                                              r"site's name.*\n  - data-path: not set; fix: the site directory"):
        SiteConfig.load(path).require("site-name", "data-path", fix="fix")
    r = CliRunner().invoke(app, ["site", "start", str(tmp_path)])
    assert r.exit_code == 2 and "site-name: not set; set it in site.json" in r.output
    r = CliRunner().invoke(app, ["serve", "token", "list", "--site-config", str(_write(tmp_path, {"model-dir": "m"}))])
    assert r.exit_code == 2 and "state-dir: Field required" in r.output


def test_what_a_writer_writes_is_what_a_reader_reads(tmp_path):
    """Only the keys the writer set are written (a default stays the reader's), byte for byte as site init wrote."""
    site = SiteConfig.parse(SITE_INIT)
    site.write(tmp_path / "site.json")
    assert (tmp_path / "site.json").read_text() == json.dumps(SITE_INIT, indent=1) + "\n"
    assert _set(SiteConfig.load(tmp_path / "site.json")) == _set(site)
    served = SiteConfig(model_dir="m", state_dir="s", serve={"api-docs": True})
    served.write(tmp_path / "served.json")
    assert json.loads((tmp_path / "served.json").read_text()) == {"model-dir": "m", "state-dir": "s",
                                                                  "serve": {"api-docs": True}}
    # (relative paths are read from the file's directory)
    assert _set(SiteConfig.load(tmp_path / "served.json")) == {**_set(served), "model_dir": str(tmp_path.resolve() / "m"),
                                                               "state_dir": str(tmp_path.resolve() / "s")}


def _set(site: SiteConfig) -> dict:
    return site.model_dump(exclude_unset=True)


def test_simulate_writes_its_sites_settings_through_the_model(tmp_path):
    from simulations.cli_simulate import write_site_configs

    manifest = {"sites": [{"name": "C0", "dir": "C0"}, {"name": "C1", "dir": "C1"}]}
    paths = write_site_configs(tmp_path, tmp_path / "sites", manifest, {"site-state-root": str(tmp_path / "state"),
                                                                        "epsilon": 4.0, "signing-public-key": "k.pub"})
    sites = [SiteConfig.load(p) for p in paths]
    assert [s.site_name for s in sites] == ["C0", "C1"] and {s.privacy_budget for s in sites} == {4.0}
    assert sites[1].model_dir == str(tmp_path / "state" / "C1" / "models")
    assert sites[0].signing_public_key == str(paths[0].resolve().parent / "k.pub")  # relative: from site.json's dir


def test_the_supernodes_node_config_carries_every_node_key_and_each_is_a_site_json_key():
    """One list (privacy.site_config.NODE_CONFIG_KEYS) says what the SuperNode hands the deployed ClientApp."""
    from client.supernode import node_config
    from privacy.site_config import NODE_CONFIG_KEYS, NODE_POLICY_KEYS

    aliases = {f.alias or name for name, f in SiteConfig.model_fields.items()}
    assert set(NODE_CONFIG_KEYS) <= aliases and set(NODE_POLICY_KEYS) <= set(NODE_CONFIG_KEYS)
    values = {"data-path": "/d", "state-dir": "/s", "model-dir": "/m", "signing-public-key": "/k.pub", "min-count": 5,
              "site-name": "H1", "privacy-budget": 4.0, "require-secagg": True, "min-aggregate-sites": 3,
              "require-dp": True, "max-trusted-sites": 2, "require-padded-batches": True, "privacy-delta": 1e-6,
              "schema": "/t/schema.json"}
    sent = dict(item.split("=", 1) for item in node_config(SiteConfig.parse(values, source="test")).split())
    assert set(sent) == set(NODE_CONFIG_KEYS)
    assert {k: json.loads(v) for k, v in sent.items()} == values


def test_the_sites_delta_bounds_every_runs_accounting(tmp_path):
    """privacy-delta in site.json: the ledger accounts at it, or at a run's delta if that is smaller."""
    from flwr.app import Context, RecordDict

    from client.app import accounting_delta, delta_refusal, site_settings
    from privacy.run_config import load_run_config

    def delta(node: dict, run_delta: float) -> tuple[float, str]:
        cfg = load_run_config({"schema": "s.json", "delta": run_delta})
        ctx = Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path / "site"), **node},
                      state=RecordDict(), run_config={})
        settings = site_settings(ctx, cfg)
        return accounting_delta(settings, cfg), delta_refusal(settings, cfg)

    assert delta({}, 1e-4) == (1e-4, "")  # no site delta: the run's (the ledger then keeps the smallest ever)
    assert delta({"privacy-delta": 1e-6}, 1e-4) == (1e-6, "")  # a looser run: accounted at the site's
    # a stricter run would re-price the site's spend for good: refused, naming both
    assert "the run's delta 1e-08 is below this site's privacy-delta 1e-06" in delta({"privacy-delta": 1e-6}, 1e-8)[1]


def test_true_or_false_where_a_number_belongs_and_a_key_given_twice_are_refused(tmp_path):
    """pydantic reads true as 1 and json keeps the last of two values: a site.json with `"privacy-budget": true`
    would have run on a budget of 1, and one giving privacy-budget twice on whichever came last."""
    from privacy.run_config import load_run_config
    from shared_models.run_config import RunConfigError

    for key in ("privacy-budget", "min-count"):
        with pytest.raises(SiteConfigError, match=f"{key}: a number is expected here, not true or false"):
            SiteConfig.parse({"format": FILE_FORMAT, "state-dir": "s", "model-dir": "m", key: True}, source="site.json")
    path = tmp_path / "site.json"
    path.write_text('{"format": "%s", "state-dir": "s", "model-dir": "m", "privacy-budget": 8.0, '
                    '"privacy-budget": 100}' % FILE_FORMAT)
    with pytest.raises(SiteConfigError, match="key 'privacy-budget' given twice"):
        SiteConfig.load(path)
    for key in ("epsilon", "num-rounds", "max-grad-norm", "modality-dropout"):  # the last two also take "auto"
        with pytest.raises(RunConfigError, match=f"{key}: a number is expected here, not true or false"):
            load_run_config({"schema": "s.json", key: True})
    with pytest.raises(SiteConfigError, match="serve.out-of-range-sd: a number is expected here"):
        SiteConfig.parse({"format": FILE_FORMAT, "state-dir": "s", "model-dir": "m", "serve": {"out-of-range-sd": True}})
    assert load_run_config({"schema": "s.json", "secagg": True}).secagg.enabled  # a boolean setting keeps them


def test_relative_paths_are_read_from_site_jsons_directory_whatever_directory_a_process_runs_in(tmp_path,
                                                                                              monkeypatch):
    """"state-dir": "state" read from the working directory gave each process of the site (the SuperNode, the
    training app, the service, a command run elsewhere) its own state: its own privacy ledger, its spend from zero."""
    path = _write(tmp_path, {**SITE_INIT, "state-dir": "state", "model-dir": "models", "data-path": "../data/C0",
                             "schema": "trust/schema.json"})
    for cwd in (tmp_path, tmp_path.parent):
        monkeypatch.chdir(cwd)
        site = SiteConfig.load(path)
        assert site.state_dir == str(tmp_path.resolve() / "state") and site.model_dir == str(tmp_path.resolve() / "models")
        assert site.data_path == str(tmp_path.resolve() / ".." / "data" / "C0")
        assert site.schema_path == str(tmp_path.resolve() / "trust" / "schema.json")
        assert site.signing_public_key == "/srv/site/trust/signing.pub"  # absolute ones as they are


def test_flowers_node_config_carries_a_non_ascii_name_and_the_preflight_names_a_value_it_cannot(tmp_path):
    """The node config is parsed by Flower: a name with a non-ASCII letter is carried as it is (it was escaped into a
    form Flower refused), and a path holding a double quote fails the preflight naming the key, instead of the
    SuperNode stopping after every check passed."""
    from flwr.common.config import parse_config_args

    from client.supernode import _node_config_check, node_config

    site = SiteConfig.parse({"state-dir": "/s", "model-dir": "/m", "site-name": "Hôpital Saint-Éloi 😀",
                             "privacy-budget": 4.0, "require-dp": True})
    assert parse_config_args([node_config(site)])["site-name"] == "Hôpital Saint-Éloi 😀"
    assert _node_config_check(site).ok
    quoted = SiteConfig.parse({"state-dir": "/s", "model-dir": "/m", "data-path": '/data/"C0"'})
    check = _node_config_check(quoted)
    assert not check.ok and "cannot carry site.json's data-path" in check.detail


def test_a_tightened_site_json_holds_at_the_next_message_and_a_loosened_one_waits_for_a_restart(tmp_path):
    """A site that lowered its budget in site.json kept training on the old one until it restarted its SuperNode:
    the node config is read once, at start. The training app now re-reads site.json's policy at every message
    and holds to the stricter of the two; a loosened policy still needs a restart (and its preflight). A site.json it
    cannot read refuses training in words: an exception would carry its path and values to the server."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import parse_config_args

    from client.app import SITE_JSON_UNREADABLE, site_settings, unready_refusal
    from client.supernode import node_config
    from privacy.run_config import load_run_config

    path = tmp_path / "site.json"
    start = {"format": FILE_FORMAT, "state-dir": "state", "model-dir": "models", "data-path": "data",
             "site-name": "H1", "privacy-budget": 8.0, "max-trusted-sites": 2, "require-dp": False}
    path.write_text(json.dumps(start))
    node = parse_config_args([node_config(SiteConfig.load(path))])  # what the SuperNode hands the training app
    cfg = load_run_config({"schema": "s.json"})

    def settings_now(**edit):
        path.write_text(json.dumps({**start, **edit}))
        return read()

    def read():
        return site_settings(Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}), cfg)

    assert settings_now().budget_epsilon == 8.0
    start.update({"require-secagg": False, "require-padded-batches": False, "min-aggregate-sites": 2})
    assert settings_now().require_secagg  # (the node config still says true: loosened in the file, not in force)
    path.write_text(json.dumps(start))
    node = parse_config_args([node_config(SiteConfig.load(path))])  # restarted with the looser file
    tight = settings_now(**{"privacy-budget": 3.0, "max-trusted-sites": 1, "require-dp": True, "min-count": 20,
                            "privacy-delta": 1e-7, "require-secagg": True, "require-padded-batches": True,
                            "min-aggregate-sites": 3})
    assert (tight.budget_epsilon, tight.max_trusted_sites, tight.require_dp, tight.min_count, tight.delta,
            tight.require_secagg, tight.require_padded_batches, tight.min_aggregate_sites) == (
        3.0, 1, True, 20, 1e-7, True, True, 3)
    loose = settings_now(**{"privacy-budget": 50.0, "max-trusted-sites": 5})
    assert (loose.budget_epsilon, loose.max_trusted_sites) == (8.0, 2)
    path.write_text(json.dumps({k: v for k, v in start.items() if k != "privacy-budget"}))
    assert read().budget_missing  # no budget now: the site trains no DP run
    path.write_text('{"privacy-budget": 3,')  # a half-saved edit: no training, and nothing of the file leaves the site
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    settings = read()
    reason, _ = unready_refusal(settings, cfg, ctx, "run-X", audit=None)
    assert settings.policy_unreadable and reason == SITE_JSON_UNREADABLE and str(tmp_path) not in reason


def test_a_training_message_reads_site_json_once_and_the_next_message_reads_it_again(tmp_path, monkeypatch):
    """The policy checks of one training message (site_policy_mod, SecAgg+'s collect stage, the train handler) hold to
    one read of site.json: the collect stage read it, and the train handler again, for every round. A later message
    still holds to site.json as it is then."""
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.common.config import parse_config_args
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict

    import client.app
    from client.app import REQUIRE_DP_REFUSAL, SITE_JSON_UNREADABLE, site_policy_mod, train
    from client.supernode import node_config
    from shared_models.protocol import RUN_KEY, SERVER_ROUND
    from tests.factories import site_message

    path = tmp_path / "site.json"
    path.write_text(json.dumps({"format": FILE_FORMAT, "state-dir": "state", "model-dir": "models", "data-path": "data",
                                "site-name": "H1", "privacy-budget": 8.0, "require-dp": True}))
    node = parse_config_args([node_config(SiteConfig.load(path))])
    reads, load = [], SiteConfig.load
    monkeypatch.setattr(SiteConfig, "load", lambda *a, **k: reads.append(1) or load(*a, **k))
    # Flower's SecAgg+ mod at its collect stage hands the request to the train handler (its state checks left out)
    monkeypatch.setattr(client.app, "secaggplus_mod", lambda msg, ctx, call_next: call_next(msg, ctx))

    def collect_stage():
        content = fitins_to_recorddict(FitIns(ndarrays_to_parameters([]), {SERVER_ROUND: 1, RUN_KEY: "run-X"}), True)
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS})
        state = RecordDict({RECORD_KEY_STATE: ConfigRecord({"public_keys_dict:K": [1, 2, 3], "threshold": 2})})
        ctx = Context(run_id=1, node_id=1, node_config=node, state=state, run_config={"schema": "s.json", "dp": False})
        return site_policy_mod(site_message(content), ctx, train)

    reply = collect_stage()
    assert reply.has_error() and reply.error.reason.endswith(REQUIRE_DP_REFUSAL), reply.error.reason
    assert len(reads) == 1
    path.write_text('{"privacy-budget": 3,')  # a half-saved edit: the next message refuses on it
    reply = collect_stage()
    assert reply.has_error() and reply.error.reason.endswith(SITE_JSON_UNREADABLE), reply.error.reason
    assert len(reads) == 2


def test_a_directory_given_for_site_json_says_so_not_is_a_directory(tmp_path):
    """`serve --site-config DIR` said '.: no readable s1 (Is a directory)'."""
    with pytest.raises(SiteConfigError, match="a directory, where a JSON file is expected: give the file's path"):
        SiteConfig.load(tmp_path)
