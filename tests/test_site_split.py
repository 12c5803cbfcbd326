"""A site's split and normalisation as DP-SGD's guarantee needs them: the training part of a neighbouring dataset
(one patient more or less, or one patient's values changed) differs from this one's in that patient alone."""

from __future__ import annotations

import numpy as np
import pytest

from client.site import SiteDataError, held_out_split, normalisation_half, split_site
from shared_models.site_data import Normalizer, raw_matrix, read_site
from tests.sitefixtures import site_schema, site_tables, write_site


def _parts(ids, seed=0, val_fraction=0.2):
    tr, va = held_out_split(ids, val_fraction, seed)
    return {ids[i] for i in tr}, {ids[i] for i in va}


def test_adding_a_patient_moves_no_other_patient_between_the_parts():
    ids = [f"TCGA-{i:04d}" for i in range(500)]
    train, held = _parts(ids)
    for extra in ("TCGA-9999", "TCGA-0000x", "A"):
        train2, held2 = _parts(ids + [extra])
        assert train2 - {extra} == train and held2 - {extra} == held
    # nor does the order of the table's rows
    assert _parts(ids[::-1]) == (train, held)


def test_the_held_out_part_is_about_val_fraction_and_the_seed_keys_it():
    ids = [f"P{i}" for i in range(20_000)]
    train, held = _parts(ids)
    assert abs(len(held) / len(ids) - 0.2) < 0.01 and not train & held and len(train | held) == len(ids)
    assert _parts(ids, seed=1)[1] != held
    assert _parts(ids, val_fraction=0.0) == (set(ids), set())


def _changed_patient(tables, train_ids, column="g0"):
    """The tables with one training patient's expression value changed (a neighbouring dataset)."""
    expr = tables["expr"].copy()
    row = expr.index[expr["patient"] == sorted(train_ids)[0]][0]
    expr.loc[row, column] = expr.loc[row, column] + 25.0
    return {**tables, "expr": expr}, sorted(train_ids)[0]


@pytest.mark.parametrize("dp", [True, False])
def test_under_dp_no_training_row_depends_on_another_training_patient(tmp_path, dp):
    """Under DP the normalisation is fitted on half the held-out part: changing one training patient changes that
    patient's row alone. Fitted on the training part (without DP) it shifts every training row."""
    schema, tables = site_schema(), site_tables(n_per_class=30)
    write_site(tmp_path / "a", tables)
    a = split_site(schema, tmp_path / "a", val_fraction=0.2, min_count=5, seed=0, dp=dp)
    changed, who = _changed_patient(tables, a.train.ids)
    write_site(tmp_path / "b", changed)
    b = split_site(schema, tmp_path / "b", val_fraction=0.2, min_count=5, seed=0, dp=dp)
    assert a.train.ids == b.train.ids
    others = [i for i, p in enumerate(a.train.ids) if p != who]
    same = np.array_equal(a.train.x[others], b.train.x[others], equal_nan=True)
    assert same is dp


def test_a_dp_run_without_a_held_out_part_is_refused_naming_val_fraction(tmp_path):
    write_site(tmp_path / "s", site_tables(n_per_class=10))
    with pytest.raises(SiteDataError, match="val-fraction > 0"):
        split_site(site_schema(), tmp_path / "s", val_fraction=0.0, min_count=5, seed=0, dp=True)
    parts = split_site(site_schema(), tmp_path / "s", val_fraction=0.0, min_count=5, seed=0, dp=False)
    assert len(parts.val.y) == 0 and len(parts.train.y) == 30


def test_under_dp_the_normalisation_is_fitted_on_half_the_held_out_part_and_the_other_half_is_unseen(tmp_path):
    """The half the normalisation never saw are the audit's non-members: no held-out patient of it changes the
    normalisation, and the half is decided patient by patient."""
    schema, tables = site_schema(), site_tables(n_per_class=60)
    write_site(tmp_path / "a", tables)
    a = split_site(schema, tmp_path / "a", val_fraction=0.2, min_count=5, seed=0, dp=True)
    seen = normalisation_half(a.val.ids, 0)
    assert 0 < seen.sum() < len(seen) and np.array_equal(a.unseen, np.flatnonzero(~seen))
    read = read_site(schema, tmp_path / "a")
    fitted = Normalizer.fit(schema, raw_matrix(schema, read, [a.val.ids[i] for i in np.flatnonzero(seen)]))
    assert np.allclose(fitted.mean, a.normalizer.mean, equal_nan=True)
    assert np.allclose(fitted.scale, a.normalizer.scale, equal_nan=True)
    # changing an unseen held-out patient's values changes no other row, training or held out
    who = a.val.ids[a.unseen[0]]
    changed, _ = _changed_patient(tables, [who])
    write_site(tmp_path / "b", changed)
    b = split_site(schema, tmp_path / "b", val_fraction=0.2, min_count=5, seed=0, dp=True)
    assert np.array_equal(a.train.x, b.train.x, equal_nan=True)
    ids = ["P1", "P2", "P3"]
    assert normalisation_half(ids, 0).tolist() == normalisation_half(ids[::-1], 0).tolist()[::-1]
    # without DP the whole held-out part is unseen
    plain = split_site(schema, tmp_path / "a", val_fraction=0.2, min_count=5, seed=0, dp=False)
    assert len(plain.unseen) == len(plain.val.y)


def test_a_dp_run_whose_held_out_part_leaves_no_patient_to_fit_on_is_refused_naming_val_fraction(tmp_path):
    """Seed 9 at val-fraction 0.1 holds out 2 of these 30 patients and neither falls in the normalisation's half."""
    from client.site import HeldOutError

    write_site(tmp_path / "s", site_tables(n_per_class=10))
    with pytest.raises(HeldOutError, match="2 patients .*larger val-fraction"):
        split_site(site_schema(), tmp_path / "s", val_fraction=0.1, min_count=5, seed=9, dp=True)
    assert len(split_site(site_schema(), tmp_path / "s", val_fraction=0.1, min_count=5, seed=9, dp=False).val.y) == 2
