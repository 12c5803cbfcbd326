"""A site's model store: versioned packages, verified before activation, never half-installed."""

from __future__ import annotations

import json
import re

import pytest
import torch

from client.model_store import SPLIT, ModelStore, ModelStoreError
from shared_models.model import MultiModalTransformer
from shared_models.run_config import ModelConfig
from shared_models.weights import arrays_sha256, load_weights
from tests.factories import fsynced_paths, tiny_schema

CFG = ModelConfig(dropout=0.0)


def _arrays(seed: int):
    torch.manual_seed(seed)
    return [v.numpy().copy() for v in MultiModalTransformer(tiny_schema(), CFG).state_dict().values()]


def test_a_delivered_model_becomes_a_new_active_version_with_its_package(tmp_path):
    store, schema = ModelStore(tmp_path), tiny_schema()
    first = store.install(schema, CFG, _arrays(0), {"run": "r1", "round": 10, "site_epsilon": {"C0": 7.9}})
    second = store.install(schema, CFG, _arrays(1), {"run": "r2", "round": 10})
    assert (first, second, store.active(), store.versions()) == ("v0001", "v0002", "v0002", ["v0001", "v0002"])
    package = store.verify("v0001")
    assert package["site_epsilon"] == {"C0": 7.9} and package["arrays_sha256"] == arrays_sha256(_arrays(0))
    model = load_weights(tmp_path / "v0002" / "weights.pt", schema)
    assert arrays_sha256([v.numpy() for v in model.state_dict().values()]) == arrays_sha256(_arrays(1))


def test_the_same_runs_model_delivered_again_activates_its_installed_version(tmp_path):
    """`oncofed deliver`, or a run resumed after a crash during its delivery, sends the same model again."""
    store, schema = ModelStore(tmp_path), tiny_schema()
    first = store.install(schema, CFG, _arrays(0), {"run": "r1", "round": 10})
    store.install(schema, CFG, _arrays(1), {"run": "r2", "round": 10})
    assert store.install(schema, CFG, _arrays(0), {"run": "r1", "round": 10, "signature": "another"}) == first
    assert store.active() == first and store.versions() == ["v0001", "v0002"]
    # described otherwise (another label on the same weights): a version of its own
    assert store.install(schema, CFG, _arrays(0), {"run": "r1", "round": 10, "dp": False}) == "v0003"
    with open(tmp_path / first / "weights.pt", "r+b") as fh:  # a damaged copy is not reused
        fh.seek(200)
        fh.write(b"\x00\x01\x02\x03")
    assert store.install(schema, CFG, _arrays(0), {"run": "r1", "round": 10}) == "v0004" == store.active()


def test_a_model_whose_hash_differs_from_the_announced_one_is_not_installed(tmp_path):
    store = ModelStore(tmp_path)
    store.install(tiny_schema(), CFG, _arrays(0), {"round": 1})
    with pytest.raises(ModelStoreError, match="differs from the announced .* v0001 stays active"):
        store.install(tiny_schema(), CFG, _arrays(1), {"round": 2}, expected_arrays_sha256=arrays_sha256(_arrays(0)))
    assert store.active() == "v0001" and store.versions() == ["v0001"]


def test_a_model_with_weights_that_are_not_finite_is_not_installed(tmp_path):
    # a diverged run's model would answer every patient with the first class and NaN probabilities
    import numpy as np

    store = ModelStore(tmp_path)
    store.install(tiny_schema(), CFG, _arrays(0), {"round": 1})
    arrays = _arrays(1)
    arrays[3] = np.full_like(arrays[3], np.nan)
    with pytest.raises(ModelStoreError, match="not finite .* not installed, v0001 stays active"):
        store.install(tiny_schema(), CFG, arrays, {"run": "r2", "round": 2})
    assert store.active() == "v0001" and store.versions() == ["v0001"]


def test_an_altered_weights_file_is_detected_and_not_activated(tmp_path):
    store = ModelStore(tmp_path)
    store.install(tiny_schema(), CFG, _arrays(0), {"round": 1})
    store.install(tiny_schema(), CFG, _arrays(1), {"round": 2})
    with open(tmp_path / "v0001" / "weights.pt", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(ModelStoreError, match="weights.pt: SHA-256 .* the file was altered"):
        store.activate("v0001")
    assert store.active() == "v0002"
    assert json.loads((tmp_path / "v0002" / "package.json").read_text())["round"] == 2


def test_a_schema_altered_after_delivery_is_detected_even_with_the_weights_resaved_to_match(tmp_path):
    # The schema names the classes: swapping two names (weights re-saved under the new schema, package.json's
    # weights hash updated) must not be served as verified.
    from shared_models.files import sha256_file
    from shared_models.schema import FeatureSchema
    from shared_models.weights import save_weights

    store = ModelStore(tmp_path)
    store.install(tiny_schema(), CFG, _arrays(0), {"round": 1, "schema_hash": tiny_schema().content_hash()})
    d = tmp_path / "v0001"
    spec = json.loads((d / "schema.json").read_text())
    spec["classes"][0], spec["classes"][1] = spec["classes"][1], spec["classes"][0]
    (d / "schema.json").write_text(json.dumps(spec))
    swapped = FeatureSchema.load(d / "schema.json")
    model = MultiModalTransformer(swapped, CFG)
    model.load_state_dict(load_weights(d / "weights.pt", tiny_schema()).state_dict())
    save_weights(model, d / "weights.pt")
    package = json.loads((d / "package.json").read_text())
    package["weights_sha256"] = sha256_file(d / "weights.pt")
    (d / "package.json").write_text(json.dumps(package))
    with pytest.raises(ModelStoreError, match="schema.json: content hash .* is not the schema of package.json"):
        store.verify("v0001")
    package["schema_hash"] = swapped.content_hash()  # package.json rewritten too: the signed delivery still says
    (d / "package.json").write_text(json.dumps(package))
    with pytest.raises(ModelStoreError, match="is not the schema of the delivery the server signed"):
        store.verify("v0001")


def test_a_weights_file_whose_architecture_was_edited_after_delivery_is_detected(tmp_path):
    # The weights file builds the model from its own copy of the settings. An edited gain changes every answer
    # (a review made a model answer 0.99-1.0 for the wrong classes) without changing an array; the weights
    # re-saved and package.json's hash updated, only the architecture the server signed can tell.
    from shared_models.files import sha256_file
    from shared_models.weights import read_weights, save_weights

    store = ModelStore(tmp_path)
    store.install(tiny_schema(), CFG, _arrays(0), {"run": "r1", "round": 1, "architecture": CFG.model_dump()})
    store.verify("v0001")
    d = tmp_path / "v0001"
    edited = ModelConfig(**{**read_weights(d / "weights.pt")["config"], "wide_gain": 50.0})
    model = MultiModalTransformer(tiny_schema(), edited)
    model.load_state_dict(load_weights(d / "weights.pt", tiny_schema()).state_dict())
    save_weights(model, d / "weights.pt")
    package = json.loads((d / "package.json").read_text())
    package["weights_sha256"] = sha256_file(d / "weights.pt")
    (d / "package.json").write_text(json.dumps(package))
    with pytest.raises(ModelStoreError, match=r"weights.pt: its architecture \(wide_gain\) is not the one the server "
                                              "signed: the file was altered"):
        store.verify("v0001")


def test_a_package_whose_top_level_copies_differ_from_the_signed_delivery_is_not_served(tmp_path):
    # the service shows run, round, metrics and epsilon from package.json's top level: a smaller epsilon written
    # there beside an intact signed delivery must not be shown as verified
    store = ModelStore(tmp_path)
    store.install(tiny_schema(), CFG, _arrays(0), {"run": "r1", "round": 10, "site_epsilon": {"C0": 7.9},
                                                   "metrics": {"macro_f1": 0.41}})
    store.install(tiny_schema(), CFG, _arrays(1), {"run": "r2", "round": 10})
    package = json.loads((tmp_path / "v0001" / "package.json").read_text())
    package["site_epsilon"], package["metrics"] = {"C0": 0.5}, {"macro_f1": 0.97}
    (tmp_path / "v0001" / "package.json").write_text(json.dumps(package))
    with pytest.raises(ModelStoreError, match="package.json: metrics, site_epsilon differ from the delivery the "
                                              "server signed .* the file was altered"):
        store.activate("v0001")
    assert store.active() == "v0002"
    for edit in ("removed", "added"):  # a DP label deleted (the audit would test no bound), or one written beside
        package = json.loads((tmp_path / "v0002" / "package.json").read_text())
        if edit == "removed":
            del package["round"]
        else:
            package["dp"] = True
        (tmp_path / "v0002" / "package.json").write_text(json.dumps(package))
        with pytest.raises(ModelStoreError, match="(round|dp) differ from the delivery .* removed or added"):
            store.verify("v0002")
        if edit == "removed":
            package["round"] = 10
            (tmp_path / "v0002" / "package.json").write_text(json.dumps(package))


def test_an_installed_version_is_on_disk_before_it_is_named_active(tmp_path, monkeypatch):
    synced = fsynced_paths(monkeypatch)
    ModelStore(tmp_path).install(tiny_schema(), CFG, _arrays(0), {"round": 1})
    before = synced[:next(i for i, p in enumerate(synced) if re.search(r"/ACTIVE\.[0-9a-f]+\.tmp$", p))]
    for name in ("weights.pt", "schema.json", "package.json"):
        assert any(p.endswith(f".tmp-v0001/{name}") for p in before), (name, before)
    assert str(tmp_path) in before  # the rename of .tmp-v0001 to v0001


def test_two_deliveries_at_once_install_two_whole_versions(tmp_path):
    # a resumed run's delivery and an operator's `oncofed deliver` at the same moment, in two processes: each
    # takes its own version number, neither removes the other's package being written
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    code = textwrap.dedent(f"""
        import sys
        import time
        import client.model_store as ms
        from client.model_store import ModelStore
        from tests.factories import tiny_schema
        from tests.test_model_store import CFG, _arrays
        save = ms.save_weights
        ms.save_weights = lambda *a, **k: (time.sleep(1.5), save(*a, **k))  # both mid-install at once, unless locked
        seed = int(sys.argv[1])
        print(ModelStore({str(tmp_path)!r}).install(tiny_schema(), CFG, _arrays(seed), {{"run": f"r{{seed}}"}}))
    """)
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(seed)], stdout=subprocess.PIPE, text=True, cwd=root)
             for seed in (0, 1)]
    versions = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert versions == ["v0001", "v0002"] and all(p.returncode == 0 for p in procs)
    store = ModelStore(tmp_path)
    assert store.versions() == versions and {store.verify(v)["run"] for v in versions} == {"r0", "r1"}


def test_a_model_that_finished_before_the_active_one_is_not_installed_over_it(tmp_path):
    # re-delivering an earlier run (`oncofed deliver OLD`, or a finished run resumed) rolled every site back to it
    store = ModelStore(tmp_path)
    store.install(tiny_schema(), CFG, _arrays(0), {"run": "r1", "round": 10, "finished": 1000.0})
    store.install(tiny_schema(), CFG, _arrays(1), {"run": "r2", "round": 10, "finished": 2000.0})
    for old in ({"run": "r1", "round": 10, "finished": 1000.0}, {"run": "r0", "round": 10, "finished": 500.0}):
        with pytest.raises(ModelStoreError, match="finished training before the active v0002 .* v0002 stays active"):
            store.install(tiny_schema(), CFG, _arrays(0) if old["run"] == "r1" else _arrays(2), old)
        assert store.active() == "v0002" and store.versions() == ["v0001", "v0002"]
    store.activate("v0001")  # the site itself may go back
    assert store.active() == "v0001"
    # a newer run installs; an undated package (before 2026-12-05) may be an earlier run: refused over a dated model
    assert store.install(tiny_schema(), CFG, _arrays(3), {"run": "r3", "round": 10, "finished": 3000.0}) == "v0003"
    with pytest.raises(ModelStoreError, match="carries no finish time and the active v0003 .* v0003 stays active"):
        store.install(tiny_schema(), CFG, _arrays(4), {"run": "r4", "round": 10})
    assert store.active() == "v0003" and store.versions() == ["v0001", "v0002", "v0003"]


def test_a_version_is_served_with_the_normalisation_of_its_own_run_whatever_later_runs_write(tmp_path):
    # a review found a later run (even one the site refused) rewriting STATE_DIR/normalizer.json, the one file every
    # version was served with: mean shifts up to 9.7 standard deviations for the model being served
    import numpy as np

    from client.predict import Predictor
    from shared_models.site_data import Normalizer

    schema = tiny_schema()
    n = schema.layout().n_inputs
    own = Normalizer(schema, np.full(n, 1.0), np.full(n, 2.0))
    store = ModelStore(tmp_path / "models")
    store.install(schema, CFG, _arrays(0), {"run": "r1", "round": 1}, normalizer=own)
    (tmp_path / "state").mkdir()
    Normalizer(schema, np.full(n, 9.0), np.full(n, 0.1)).save(tmp_path / "state" / "normalizer.json")  # a later run's
    lm = Predictor(tmp_path / "models", tmp_path / "state" / "normalizer.json").current
    assert np.array_equal(lm.normalizer.mean, own.mean) and np.array_equal(lm.normalizer.scale, own.scale)
    store.install(schema, CFG, _arrays(1), {"run": "r0", "round": 1})  # installed without one: the site's file
    assert Predictor(tmp_path / "models", tmp_path / "state" / "normalizer.json").current.normalizer.mean[0] == 9.0
    # made only when a version is written: the same run's model delivered again reads no site tables
    made = []
    again = store.install(schema, CFG, _arrays(0), {"run": "r1", "round": 1}, normalizer=lambda: made.append(1) or own)
    assert again == "v0001" and made == []
    v3 = store.install(schema, CFG, _arrays(2), {"run": "r3", "round": 1}, normalizer=lambda: made.append(1) or own,
                       split={"seed": 0, "val_fraction": 0.2})
    assert made == [1] and (store.root / v3 / SPLIT).is_file()
    # a site that could not prepare its data for the run trained on none of it: no split for calibration to apply
    v4 = store.install(schema, CFG, _arrays(3), {"run": "r4", "round": 1}, normalizer=lambda: None,
                       split={"seed": 0, "val_fraction": 0.2})
    assert not (store.root / v4 / SPLIT).exists()


def test_a_model_delivered_again_does_not_undo_the_sites_own_rollback(tmp_path):
    """The site's admin activated an earlier version (away from a model it found bad): `oncofed deliver` sending that
    model again leaves the admin's choice active. Without such a choice (an install a crash cut short before its
    activation) the model delivered again becomes active, and a new model always does."""
    import numpy as np

    from client.predict import Predictor
    from shared_models.site_data import Normalizer

    schema = tiny_schema()
    n = schema.layout().n_inputs
    Normalizer(schema, np.zeros(n), np.ones(n)).save(tmp_path / "state" / "normalizer.json")
    store = ModelStore(tmp_path / "models")
    store.install(schema, CFG, _arrays(0), {"run": "r1", "round": 1, "finished": 1.0})
    store.install(schema, CFG, _arrays(1), {"run": "r2", "round": 1, "finished": 2.0})
    Predictor(tmp_path / "models", tmp_path / "state" / "normalizer.json").activate("v0001")  # the admin's rollback
    assert store.install(schema, CFG, _arrays(1), {"run": "r2", "round": 1, "finished": 2.0}) == "v0002"
    assert store.active() == "v0001"
    store.activate("v0001")  # not the admin's (as an install's own activation): the model delivered again is served
    assert store.install(schema, CFG, _arrays(1), {"run": "r2", "round": 1, "finished": 2.0}) == "v0002"
    assert store.active() == "v0002"
    Predictor(tmp_path / "models", tmp_path / "state" / "normalizer.json").activate("v0001")
    assert store.install(schema, CFG, _arrays(2), {"run": "r3", "round": 1, "finished": 3.0}) == "v0003"
    assert store.active() == "v0003" and store.chosen() is None


def test_the_service_serves_a_repaired_version_once_activated_and_a_refitted_normalisation_at_once(tmp_path):
    """A version that failed to load (a missing file) and was repaired serves as soon as the admin activates it; a
    site normalisation rewritten by `serve fit-normalizer` is read by the running service at its next request."""
    import numpy as np

    from client.predict import Predictor
    from shared_models.site_data import Normalizer

    schema = tiny_schema()
    n = schema.layout().n_inputs
    state = tmp_path / "state" / "normalizer.json"
    Normalizer(schema, np.zeros(n), np.ones(n)).save(state)
    store = ModelStore(tmp_path / "models")
    store.install(schema, CFG, _arrays(0), {"run": "r1", "round": 1})
    store.install(schema, CFG, _arrays(1), {"run": "r2", "round": 1})
    weights = tmp_path / "models" / "v0002" / "weights.pt"
    kept = weights.read_bytes()
    weights.unlink()
    predictor = Predictor(tmp_path / "models", state)
    assert predictor.current.version == "v0001" and predictor.degraded["active"] == "v0002"  # the fallback
    weights.write_bytes(kept)  # repaired
    assert not predictor.refresh() and predictor.current.version == "v0001"  # not retried by itself
    predictor.activate("v0002")
    assert predictor.current.version == "v0002" and predictor.degraded is None and predictor.failed is None
    assert not predictor.refresh()
    Normalizer(schema, np.full(n, 3.0), np.full(n, 2.0)).save(state)  # `oncofed serve fit-normalizer`
    assert predictor.refresh() and predictor.current.normalizer.mean[0] == 3.0


def test_a_versions_own_normalisation_edited_after_install_fails_verification(tmp_path):
    """Every answer of a version depends on the normalisation kept with it: the file is hashed at install like the
    weights, and an edit (or its removal) makes the version fail to verify, so it is never served."""
    import numpy as np

    from shared_models.site_data import Normalizer

    schema = tiny_schema()
    n = schema.layout().n_inputs
    store = ModelStore(tmp_path)
    store.install(schema, CFG, _arrays(0), {"run": "r1", "round": 1},
                  normalizer=Normalizer(schema, np.zeros(n), np.ones(n)), split={"seed": 0, "val_fraction": 0.2})
    store.verify("v0001")
    Normalizer(schema, np.full(n, 1.0), np.ones(n)).save(tmp_path / "v0001" / "normalizer.json")
    with pytest.raises(ModelStoreError, match="v0001/normalizer.json: SHA-256 .* the file was altered"):
        store.verify("v0001")
    (tmp_path / "v0001" / "normalizer.json").unlink()
    with pytest.raises(ModelStoreError, match="normalizer.json: missing"):
        store.verify("v0001")


def test_a_model_dated_by_a_server_clock_far_ahead_does_not_block_every_later_model(tmp_path):
    """The server's clock ran years ahead when one run finished: that model installs, but its date must not make
    every later model (dated right) look older than it, refused at every site with no way for the site to install
    it. A model dated within a day of the site's clock still orders deliveries as before."""
    import time

    store = ModelStore(tmp_path)
    now = time.time()
    store.install(tiny_schema(), CFG, _arrays(0), {"run": "r1", "round": 10, "finished": now + 10 * 365 * 86400.0})
    assert store.install(tiny_schema(), CFG, _arrays(1), {"run": "r2", "round": 10, "finished": now}) == "v0002"
    assert store.active() == "v0002"
    store.install(tiny_schema(), CFG, _arrays(2), {"run": "r3", "round": 10, "finished": now + 3600.0})
    with pytest.raises(ModelStoreError, match="finished training before the active v0003"):
        store.install(tiny_schema(), CFG, _arrays(3), {"run": "r4", "round": 10, "finished": now})


def test_a_site_clock_behind_the_servers_still_orders_deliveries(tmp_path):
    """This site's clock a week behind: both models look dated in the future, and an earlier run sent again is still
    refused over the later one."""
    import time

    store = ModelStore(tmp_path)
    ahead = time.time() + 7 * 86400.0
    store.install(tiny_schema(), CFG, _arrays(0), {"run": "r1", "round": 10, "finished": ahead})
    store.install(tiny_schema(), CFG, _arrays(1), {"run": "r2", "round": 10, "finished": ahead + 3600.0})
    with pytest.raises(ModelStoreError, match="finished training before the active v0002"):
        store.install(tiny_schema(), CFG, _arrays(0), {"run": "r1", "round": 10, "finished": ahead})


def test_a_site_clock_behind_the_servers_does_not_let_an_earlier_run_sent_again_roll_it_back(tmp_path):
    """This site's clock two days behind: the later run r1 looks dated in the future, the earlier r0 does not. r0
    delivered again passed the far-ahead exception and was installed over r1. It must be newer than every other
    installed model to pass, and r0 is not."""
    import time

    store = ModelStore(tmp_path)
    now = time.time()
    store.install(tiny_schema(), CFG, _arrays(0), {"run": "r0", "round": 10, "finished": now - 86400.0})
    store.install(tiny_schema(), CFG, _arrays(1), {"run": "r1", "round": 10, "finished": now + 2 * 86400.0})
    with pytest.raises(ModelStoreError, match="finished training before another installed model"):
        store.install(tiny_schema(), CFG, _arrays(0), {"run": "r0", "round": 10, "finished": now - 86400.0})
    assert store.active() == "v0002"
    # a run after both, from a server whose clock is right again (r1's date was its clock's error): installed
    assert store.install(tiny_schema(), CFG, _arrays(2), {"run": "r2", "round": 10, "finished": now}) == "v0003"


def test_a_server_clock_wrong_for_two_runs_does_not_block_the_first_model_dated_right(tmp_path):
    import time

    store = ModelStore(tmp_path)
    now = time.time()
    for i in (1, 2):  # the server's clock a month ahead for two runs
        store.install(tiny_schema(), CFG, _arrays(i), {"run": f"r{i}", "round": 10, "finished": now + 30 * 86400.0 + i})
    assert store.install(tiny_schema(), CFG, _arrays(3), {"run": "r3", "round": 10, "finished": now}) == "v0003"
