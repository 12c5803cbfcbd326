"""The site's normalisation (shared_models/site_data.py): a modality without `standardize` passes unscaled, but
its values are clipped and checked against the spread the site saw, so that a value the model never saw is
flagged by the prediction service instead of answered with a confident class."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.prediction_input import ContractModel, check_patients
from privacy.site_config import ServeSettings
from shared_models.schema import FeatureSchema, Modality
from shared_models.site_data import CLIP, Normalizer


def _schema() -> FeatureSchema:
    return FeatureSchema(name="unscaled", label_column="subtype", classes=["A", "B", "C"], modalities=[
        Modality(name="expr", kind="omics", features=[f"g{i}" for i in range(6)]),
        Modality(name="counts", kind="omics", features=[f"c{i}" for i in range(4)], standardize=False),
        Modality(name="rare", kind="omics", features=["r0"], standardize=False)])


def _fitted(schema):
    rng = np.random.default_rng(0)
    raw = np.concatenate([rng.normal(0, 1, (50, 6)), rng.normal(100, 5, (50, 4)), np.full((50, 1), np.nan)], axis=1)
    raw[0, 10] = 3.0  # the rare column: one value says nothing of its spread
    return Normalizer.fit(schema, raw.astype(np.float32))


def test_an_unscaled_modality_passes_unscaled_but_clipped_to_the_spread_the_site_saw():
    schema = _schema()
    norm = _fitted(schema)
    row = np.array([[0.0] * 6 + [101.0, 1e30, -1e30, 99.0] + [1e30]], np.float32)
    x = norm.transform(row)[0]
    assert x[6] == pytest.approx(101.0) and x[9] == pytest.approx(99.0)  # unscaled
    m, s = norm.unscaled_mean[1], norm.unscaled_scale[1]
    assert 95 < m < 105 and 3 < s < 7
    assert x[7] == pytest.approx(m + CLIP * s) and x[8] == pytest.approx(norm.unscaled_mean[2] - CLIP * norm.unscaled_scale[2])
    assert x[10] == pytest.approx(1e30)  # no spread known: passes, and is not checked


def test_the_unscaled_statistics_survive_the_file_and_an_older_file_has_none(tmp_path):
    schema = _schema()
    norm = _fitted(schema)
    path = norm.save(tmp_path / "normalizer.json")
    again = Normalizer.load(path, schema)
    assert np.allclose(again.unscaled_mean[:4], norm.unscaled_mean[:4]) and np.isnan(again.unscaled_mean[4])
    assert again.checked.tolist() == norm.checked.tolist() == list(range(10))
    payload = json.loads(path.read_text())
    del payload["unscaled"]  # as written before 2026-12-05
    path.write_text(json.dumps(payload))
    older = Normalizer.load(path, schema)
    assert older.checked.tolist() == list(range(6))  # the unscaled columns pass unchecked, as they did
    assert older.transform(np.array([[0.0] * 6 + [1e30] * 5], np.float32))[0, 7] == pytest.approx(1e30)


@pytest.mark.parametrize("refuse", [False, True])
def test_a_value_far_outside_an_unscaled_columns_spread_is_flagged_or_refused(refuse):
    schema = _schema()
    lm = ContractModel(schema, _fitted(schema))
    # ~15 SD: beyond out-of-range-sd (10), short of the narrow modality's unit line (20 SD, refused as `units`)
    raw = np.array([[0.0] * 6 + [100.0, 175.0, 100.0, 100.0, np.nan]], np.float32)
    notes, errors = check_patients(lm, ["P1"], raw, ServeSettings(refuse_out_of_range=refuse))
    if refuse:
        assert [e["code"] for e in errors] == ["out_of_range"] and "counts.c1 = 175" in errors[0]["msg"]
    else:
        assert not errors
        assert [(o["modality"], o["feature"]) for o in notes[0]["out_of_range"]] == [("counts", "c1")]
        assert "out_of_range" in [w["code"] for w in notes[0]["warnings"]]


def test_an_unscaled_column_with_no_spread_or_few_values_stays_unchecked_not_erased():
    # all zeros where it was fitted (a sparse count in a small held-out half): a spread of ~0 would clip every
    # other value to 0 in training and serving alike, and flag it; so does a column seen in fewer than 10 rows
    schema = _schema()
    raw = np.concatenate([np.random.default_rng(0).normal(0, 1, (50, 6)), np.zeros((50, 4)),
                          np.full((50, 1), np.nan)], axis=1)
    raw[:5, 10] = [1.0, 2.0, 3.0, 4.0, 5.0]
    norm = Normalizer.fit(schema, raw.astype(np.float32))
    assert norm.checked.tolist() == list(range(6))
    assert norm.transform(np.array([[0.0] * 6 + [4.0, 1.0, 0.0, 7.0, 9.0]], np.float32))[0, 6:].tolist() == \
        [4.0, 1.0, 0.0, 7.0, 9.0]
