"""The schema's content hash: what it covers, and artefacts stamped with the legacy hash of the same schema.

An artefact "written by the code before" is made with `FeatureSchema.content_hash` replaced by
`legacy_content_hash` (the former hash, kept for exactly this): that code could not run here beside this one.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.app.message_type import MessageType

from shared_models.model import MultiModalTransformer
from shared_models.run_config import ModelConfig
from shared_models.schema import DESCRIPTIVE_FIELDS, DESCRIPTIVE_MODALITY_FIELDS, FeatureSchema, Modality
from shared_models.weights import SchemaMismatchError, load_weights, save_weights, state_arrays
from tests.factories import tiny_schema

CFG = ModelConfig(d_model=32, dropout=0.0)


def _edited(schema: FeatureSchema, edit) -> FeatureSchema:
    spec = schema.model_dump(mode="json")
    edit(spec)
    return FeatureSchema.from_dict(spec)


@contextmanager
def _written_by_the_former_code():
    """Inside, every artefact is stamped as before the hash left the descriptions out."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FeatureSchema, "content_hash", FeatureSchema.legacy_content_hash)
        yield


def _described(spec: dict) -> None:
    spec["description"] = "Breast cancer subtypes (typo fixed)"
    spec["name"] = "tiny-renamed"
    spec["version"] = "1.1"
    spec["modalities"][0]["description"] = "RNA-seq expression, log2 TPM"


# --- what the hash covers -------------------------------------------------------------------------------------

def test_a_description_name_or_version_edit_keeps_the_content_hash():
    s = tiny_schema()
    edited = _edited(s, _described)
    assert edited.content_hash() == s.content_hash()
    assert edited.legacy_content_hash() != s.legacy_content_hash()  # the former hash changed with them


SEMANTIC_EDITS = {
    "id column": lambda d: d.update(id_column="sample"),
    "label column": lambda d: d.update(label_column="pam50"),
    "class order": lambda d: d["classes"].reverse(),
    "a class added": lambda d: d["classes"].append("D"),
    "modality order": lambda d: d["modalities"].reverse(),
    "modality name (its table)": lambda d: d["modalities"][0].update(name="rna"),
    "modality kind": lambda d: d["modalities"][1].update(kind="tabular"),
    "feature order": lambda d: d["modalities"][0]["features"].reverse(),
    "a feature renamed": lambda d: d["modalities"][0]["features"].__setitem__(0, "G0"),
    "column type": lambda d: d["modalities"][2]["column_types"].update(smoker="numeric"),
    "level order": lambda d: d["modalities"][2]["levels"]["stage"].reverse(),
    "transform": lambda d: d["modalities"][0].update(transform="log1p"),
    "standardize": lambda d: d["modalities"][0].update(standardize=False),
}


@pytest.mark.parametrize("edit", SEMANTIC_EDITS.values(), ids=SEMANTIC_EDITS.keys())
def test_a_semantic_edit_changes_the_content_hash_and_matches_neither_hash(edit):
    s = tiny_schema()
    edited = _edited(s, edit)
    assert edited.content_hash() != s.content_hash()
    assert not edited.matches(s.content_hash()) and not edited.matches(s.legacy_content_hash())


def test_every_schema_field_is_hashed_unless_listed_as_descriptive():
    # a field added to the schema is part of the contract until someone decides it only describes
    assert DESCRIPTIVE_FIELDS == {"name", "version", "description"} and DESCRIPTIVE_MODALITY_FIELDS == {"description"}
    assert set(FeatureSchema.model_fields) - DESCRIPTIVE_FIELDS == {
        "format", "id_column", "label_column", "classes", "modalities"}
    assert set(Modality.model_fields) - DESCRIPTIVE_MODALITY_FIELDS == {
        "name", "kind", "features", "column_types", "levels", "transform", "standardize"}


# --- weights and normalisations -------------------------------------------------------------------------------

def test_weights_load_under_the_schema_with_a_corrected_description(tmp_path):
    s = tiny_schema()
    path = save_weights(MultiModalTransformer(s, CFG), tmp_path / "w.pt")
    load_weights(path, _edited(s, _described))


def test_weights_with_the_legacy_hash_load_and_new_weights_carry_the_new_one(tmp_path):
    s = tiny_schema()
    with _written_by_the_former_code():
        path = save_weights(MultiModalTransformer(s, CFG), tmp_path / "w.pt")
    assert torch.load(path, weights_only=True)["schema_hash"] == s.legacy_content_hash()
    model = load_weights(path, s)
    assert save_weights(model, tmp_path / "again.pt") and torch.load(
        tmp_path / "again.pt", weights_only=True)["schema_hash"] == s.content_hash()


def test_weights_with_the_legacy_hash_are_refused_under_a_semantically_different_schema(tmp_path):
    s = tiny_schema()
    with _written_by_the_former_code():
        path = save_weights(MultiModalTransformer(s, CFG), tmp_path / "w.pt")
    with pytest.raises(SchemaMismatchError, match=r"trained under schema hash .* load them with the schema"):
        load_weights(path, _edited(s, SEMANTIC_EDITS["class order"]))


def test_a_normalisation_with_the_legacy_hash_loads(tmp_path):
    import numpy as np

    from shared_models.site_data import Normalizer

    s = tiny_schema()
    n = s.layout().n_inputs
    with _written_by_the_former_code():
        path = Normalizer(s, np.zeros(n, np.float32), np.ones(n, np.float32)).save(tmp_path / "normalizer.json")
    assert Normalizer.load(path, s).mean.shape == (n,)
    with pytest.raises(SchemaMismatchError):
        Normalizer.load(path, _edited(s, SEMANTIC_EDITS["transform"]))


# --- checkpoint resume ----------------------------------------------------------------------------------------

def _run_with_a_checkpoint(tmp_path, schema_hash_of):
    """A run started under the project's schema whose round 1 is checkpointed with `schema_hash_of(schema)`."""
    from privacy.run_config import load_run_config
    from server.app import start_or_resume
    from server.checkpoint import save_checkpoint
    from tests.factories import started_run

    out, values, schema, start = started_run(tmp_path)
    save_checkpoint(out / "checkpoints", 1, start.weights, {},
                    {"run_key": start.run_key, "schema_hash": schema_hash_of(schema)})
    resume = {**values, "resume": True}

    def resumed(under: FeatureSchema):
        return start_or_resume(load_run_config(resume, source="run config"),
                               Context(run_id=2, node_id=0, node_config={}, state=RecordDict(), run_config=resume),
                               under, out)
    return schema, start, resumed


def test_a_checkpoint_with_the_legacy_hash_resumes(tmp_path):
    schema, start, resumed = _run_with_a_checkpoint(tmp_path, FeatureSchema.legacy_content_hash)
    again = resumed(schema)
    assert (again.run_key, again.first_round) == (start.run_key, 2)


def test_a_checkpoint_resumes_under_the_schema_with_a_corrected_description(tmp_path):
    schema, start, resumed = _run_with_a_checkpoint(tmp_path, FeatureSchema.content_hash)
    assert resumed(_edited(schema, _described)).first_round == 2


def test_a_checkpoint_is_refused_under_a_semantically_different_schema(tmp_path):
    schema, _, resumed = _run_with_a_checkpoint(tmp_path, FeatureSchema.legacy_content_hash)
    with pytest.raises(ValueError, match="checkpoint was trained under another schema; resume with that schema"):
        resumed(_edited(schema, lambda d: d["classes"].reverse()))


# --- model packages: delivery, the store, serving -------------------------------------------------------------

def _signed_package(schema_hash: str, arrays, key, run="r-1", **fields) -> dict:
    from privacy.signing import load_private, sign
    from shared_models.protocol import ModelPackage
    from shared_models.weights import arrays_sha256

    return sign(ModelPackage(run=run, round=2, schema_hash=schema_hash, arrays_sha256=arrays_sha256(arrays),
                             **fields).description(), load_private(key))


def test_a_site_installs_a_signed_package_with_the_legacy_hash_and_refuses_another_schemas(tmp_path):
    """`oncofed deliver` sends a run's saved package again: one saved before carries the legacy hash."""
    from client.app import save_model
    from privacy.run_config import load_run_config
    from privacy.signing import generate_signing_key
    from shared_models.protocol import ARRAYS_RECORD, CONFIG_RECORD, PACKAGE_INFO, REPLY, SAVE_MODEL
    from tests.factories import site_message
    from tests.sitefixtures import site_schema

    schema = site_schema()
    generate_signing_key(tmp_path / "k", tmp_path / "k.pub")
    run = {"schema": str(schema.save(tmp_path / "schema.json")), "min-sites": 2}
    arrays = state_arrays(MultiModalTransformer(schema, load_run_config(run).model))
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run,
                  node_config={"data-path": str(tmp_path / "site"), "state-dir": str(tmp_path / "state"),
                               "signing-public-key": str(tmp_path / "k.pub")})

    def deliver(package):
        message = site_message(RecordDict({ARRAYS_RECORD: ArrayRecord(numpy_ndarrays=arrays), CONFIG_RECORD:
                                           ConfigRecord({PACKAGE_INFO: json.dumps(package)})}),
                               f"{MessageType.QUERY}.{SAVE_MODEL}")
        return json.loads(str(save_model(message, ctx).content[CONFIG_RECORD][REPLY]))

    legacy = _signed_package(schema.legacy_content_hash(), arrays, tmp_path / "k")
    reply = deliver(legacy)
    assert reply["installed"], reply
    stored = json.loads((tmp_path / "state" / "models" / "v0001" / "package.json").read_text())
    assert stored["delivery"] == legacy and stored["schema_hash"] == legacy["schema_hash"]  # as the server signed
    weights = torch.load(tmp_path / "state" / "models" / "v0001" / "weights.pt", weights_only=True)
    assert weights["schema_hash"] == schema.content_hash()  # what the site writes itself carries the new hash

    other = _edited(schema, lambda d: d["classes"].reverse())
    reply = deliver(_signed_package(other.legacy_content_hash(), arrays, tmp_path / "k", run="r-2"))
    assert not reply["installed"] and reply["error"].startswith("model built for schema ")
    tampered = {**legacy, "round": 3}  # the signature still covers the package exactly
    reply = deliver(tampered)
    assert not reply["installed"] and "signature" in reply["error"], reply


def test_a_model_version_installed_with_the_legacy_hash_verifies_and_is_served(tmp_path):
    """A version the former code installed: weights.pt, normalizer.json, package.json and the signed delivery all
    carry the legacy hash. The store verifies it (signature included) and the service loads it."""
    import numpy as np

    from client.model_store import ModelStore, ModelStoreError
    from client.predict import Predictor
    from privacy.signing import generate_signing_key
    from shared_models.site_data import Normalizer

    s = tiny_schema()
    generate_signing_key(tmp_path / "k", tmp_path / "k.pub")
    arrays = state_arrays(MultiModalTransformer(s, CFG))
    delivery = _signed_package(s.legacy_content_hash(), arrays, tmp_path / "k", architecture=CFG.model_dump())
    n = s.layout().n_inputs
    store = ModelStore(tmp_path / "models")
    with _written_by_the_former_code():
        version = store.install(s, CFG, arrays, delivery, normalizer=Normalizer(
            s, np.zeros(n, np.float32), np.ones(n, np.float32)))
    package = store.package(version)
    assert package["schema_hash"] == s.legacy_content_hash() == package["delivery"]["schema_hash"]

    from privacy.signing import load_public

    store.verify(version, load_public(tmp_path / "k.pub"))
    served = Predictor(tmp_path / "models", tmp_path / "state" / "normalizer.json",
                       signing_public_key=tmp_path / "k.pub").current
    assert served is not None and served.version == version and served.schema.classes == s.classes

    # an installed schema.json altered in what the model reads is still detected
    spec = json.loads((tmp_path / "models" / version / "schema.json").read_text())
    spec["classes"].reverse()
    (tmp_path / "models" / version / "schema.json").write_text(json.dumps(spec))
    with pytest.raises(ModelStoreError, match="schema.json: content hash .* is not the schema of package.json"):
        store.verify(version)


# --- the privacy ledger ---------------------------------------------------------------------------------------

def test_a_site_whose_ledger_registered_its_data_under_the_legacy_hash_keeps_its_dataset_and_run(tmp_path):
    """The fingerprint is salted with the schema hash: under a new hash the same patients would be a new dataset,
    and a run started before would be refused as started on another training set."""
    from client.site import SitePaths, ledger_path, prepare_site, split_site
    from privacy.ledger import PrivacyLedger, RunPlan
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema()
    write_site(tmp_path / "site", site_tables(n_per_class=10))
    paths = SitePaths(tmp_path / "site", tmp_path / "state", tmp_path / "models")

    def prepared():
        return prepare_site(schema, paths, budget_epsilon=8.0, delta=1e-5, val_fraction=0.2, min_count=3, seed=0,
                            dp=True)

    ids = split_site(schema, paths.site_dir, val_fraction=0.2, min_count=3, seed=0, dp=True).train.ids
    ledger = PrivacyLedger(ledger_path(paths), budget_epsilon=8.0, delta=1e-5)
    before = ledger.register_dataset(ids, schema.legacy_content_hash())  # as the former code registered it
    ledger.start_run(before, "run-1", RunPlan(epsilon=4.0, epsilon_cap=4.0, num_rounds=2, steps_per_round=3,
                                              noise_multiplier=1.1, sample_rate=0.2))
    ledger.commit_round(ledger.begin_round(before, "run-1", 1, 1.1, 0.2, 3, padding_tail=0.0), 3)

    site = prepared()
    assert site.dataset_fingerprint == before
    assert site.ledger.run_plan(before, "run-1").num_rounds == 2
    assert site.ledger.released(before, "run-1", 1) is not None
    assert list(json.loads(ledger_path(paths).read_text())["datasets"]) == [before]


def test_a_new_ledger_registers_the_data_under_the_new_hash(tmp_path):
    from privacy.ledger import PrivacyLedger, dataset_fingerprint

    s = tiny_schema()
    ledger = PrivacyLedger(tmp_path / "ledger.json", budget_epsilon=8.0, delta=1e-5)
    ids = [f"p{i}" for i in range(20)]
    assert ledger.register_dataset(ids, *s.accepted_hashes()) == dataset_fingerprint(ids, s.content_hash())[0]
    assert ledger.register_dataset(ids, *_edited(s, _described).accepted_hashes()) == dataset_fingerprint(
        ids, s.content_hash())[0]


# --- what the commands print ----------------------------------------------------------------------------------

def test_schema_show_names_the_content_hash(tmp_path):
    from typer.testing import CliRunner

    from oncofed.cli import app

    s = tiny_schema()
    res = CliRunner().invoke(app, ["schema", "show", str(s.save(tmp_path / "schema.json"))])
    assert res.exit_code == 0 and f"content hash {s.content_hash()}" in res.output
