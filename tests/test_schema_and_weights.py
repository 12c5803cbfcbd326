"""The schema contract and weights that carry its hash."""

from __future__ import annotations

import json

import pytest
import torch

from shared_models import FeatureSchema, ModelConfig, MultiModalTransformer, SchemaError, SchemaMismatchError
from shared_models.weights import WeightsFileError, load_weights, read_weights, save_weights
from tests.factories import random_inputs, tiny_schema


def test_schema_round_trips_through_json_with_the_same_hash(tmp_path):
    s = tiny_schema()
    loaded = FeatureSchema.load(s.save(tmp_path / "schema.json"))
    assert loaded == s and loaded.content_hash() == s.content_hash()


def test_any_change_to_features_or_classes_changes_the_hash():
    s = tiny_schema()
    assert tiny_schema(omics_width=131).content_hash() != s.content_hash()
    other = FeatureSchema.from_dict({**s.model_dump(mode="json"), "classes": ["A", "B", "D"]})
    assert other.content_hash() != s.content_hash()


def test_committed_cohort_schemas_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "simulations" / "schemas"
    pancan = FeatureSchema.load(root / "tcga_pancan33.json")
    brca = FeatureSchema.load(root / "tcga_brca_pam50.json")
    assert pancan.n_classes == 33 and "gender" not in pancan.modality("clinical").features
    assert brca.n_classes == 5 and brca.layout().n_inputs == 12_507


def _write(tmp_path, raw) -> str:
    p = tmp_path / "schema.json"
    p.write_text(json.dumps(raw) if not isinstance(raw, str) else raw)
    return str(p)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r.pop("label_column"), r"label_column: Field required; fix: add it"),
        (lambda r: r.update(classes=["A"]), r"classes: .*at least 2"),
        (lambda r: r.update(classes=["A", "A", "B"]), r"duplicate labels \['A'\]"),
        (lambda r: r["modalities"][0].update(kind="image"), r"modalities\[0\] \('expr'\)\.kind: .*'omics' or 'tabular'"),
        (lambda r: r["modalities"][2]["levels"].pop("stage"), r"categorical column 'stage' needs its levels"),
        (lambda r: r["modalities"][1].update(features=["p1", "p1"]), r"modality 'prot': duplicate feature names \['p1'\]"),
        (lambda r: r.update(colour="blue"), r"colour: .*fix: remove it"),
        (lambda r: r["modalities"][0].update(name="my expr"), r"modality name 'my expr' must start"),
        (lambda r: r["modalities"][3].update(name="prot"), r"duplicate names \['prot'\]"),
    ],
)
def test_malformed_schema_is_refused_naming_the_field_and_the_fix(tmp_path, mutate, expected):
    raw = tiny_schema().model_dump(mode="json")
    mutate(raw)
    with pytest.raises(SchemaError, match=expected) as err:
        FeatureSchema.load(_write(tmp_path, raw))
    assert str(tmp_path / "schema.json") in str(err.value)


def test_schema_file_that_is_not_json_is_refused_with_line_and_column(tmp_path):
    with pytest.raises(SchemaError, match=r"not valid JSON at line 1, column 2"):
        FeatureSchema.load(_write(tmp_path, "{oops"))


def test_missing_schema_file_is_named(tmp_path):
    with pytest.raises(SchemaError, match="schema file not found"):
        FeatureSchema.load(tmp_path / "nope.json")


def test_weights_round_trip_gives_the_same_function(tmp_path):
    s = tiny_schema()
    model = MultiModalTransformer(s, ModelConfig(d_model=64, dropout=0.0)).eval()
    path = save_weights(model, tmp_path / "w.pt", extra={"round": 3})
    again = load_weights(path, s).eval()
    x = random_inputs(s, 5)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert read_weights(path)["extra"] == {"round": 3}
    assert again.state_dict().keys() == model.state_dict().keys()


def test_weights_under_another_schema_are_refused(tmp_path):
    path = save_weights(MultiModalTransformer(tiny_schema()), tmp_path / "w.pt")
    with pytest.raises(SchemaMismatchError, match=r"trained under schema hash .* load them with the schema"):
        load_weights(path, tiny_schema(omics_width=131))


def test_corrupt_weights_file_is_named(tmp_path):
    bad = tmp_path / "w.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsFileError, match=str(bad)):
        load_weights(bad, tiny_schema())


@pytest.mark.parametrize("change, says", [
    ({"modalities": [{"name": "clin", "kind": "tabular", "features": ["age", "subtype"]}]},
     "lists 'subtype', the schema's label_column, as a feature: the model would read the answer"),
    ({"modalities": [{"name": "clin", "kind": "tabular", "features": ["age", "patient"]}]},
     "lists 'patient', the schema's id_column, as a feature"),
    ({"id_column": "subtype"}, "id_column and label_column are both 'subtype'"),
    ({"classes": ["A", "B "]}, r"classes: labels \['B '\] are empty or begin or end with spaces"),
    ({"classes": ["A", ""]}, r"classes: labels \[''\] are empty"),
    ({"modalities": [{"name": "expr", "kind": "omics", "features": ["g1", ""]}]}, r"feature names \[''\] are empty"),
    ({"modalities": [{"name": "omics1.csv.gz", "kind": "omics", "features": ["g1"]}]},
     "ends in a table's file extension: name the modality 'omics1'"),
])
def test_a_schema_that_would_leak_the_label_or_never_match_a_table_is_refused(change, says):
    from shared_models.schema import FeatureSchema, SchemaError

    spec = {"format": "oncofed-schema/1", "name": "t", "label_column": "subtype", "classes": ["A", "B"],
            "modalities": [{"name": "clin", "kind": "tabular", "features": ["age"]}], **change}
    with pytest.raises((SchemaError, ValueError), match=says):
        FeatureSchema.model_validate(spec)
