"""`oncofed synthetic`: a generated federation with label skew, batch effects and missingness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from oncofed.cli import app
from shared_models.infer import InferOptions, infer_schema
from shared_models.schema import ColumnType, FeatureSchema, ModalityKind
from shared_models.site_data import encode_labels, raw_matrix, read_site
from simulations.partition import FederationManifest
from simulations.synthetic import SyntheticConfig, SyntheticError, generate_federation

SMALL = dict(sites=4, patients_per_site=100, omics_widths=[500], tabular_columns=10)


def generate(out: Path, **kw) -> FederationManifest:
    return generate_federation(out, SyntheticConfig(**{**SMALL, **kw}))


def load_site(fed: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    schema = FeatureSchema.load(fed / "schema.json")
    tables = read_site(schema, fed / name)
    return raw_matrix(schema, tables), encode_labels(schema, tables.labels)


def test_same_seed_gives_the_same_files_and_another_seed_other_data(tmp_path):
    def files(name, seed):
        generate(tmp_path / name, seed=seed, sites=2, patients_per_site=40, omics_widths=[200])
        out = tmp_path / name
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first, again, other = files("a", 5), files("b", 5), files("c", 6)
    assert first == again
    assert first["site_00/omics1.csv.gz"] != other["site_00/omics1.csv.gz"]


def test_every_site_is_a_complete_site_directory_matching_schema_and_manifest(tmp_path):
    fed = tmp_path / "fed"
    manifest = generate(fed, holdout_patients=40)
    schema = FeatureSchema.load(fed / "schema.json")
    assert schema.content_hash() == manifest.schema_hash
    assert [(m.name, m.kind, m.n_features) for m in schema.modalities] == [
        ("omics1", ModalityKind.omics, 500), ("clinical", ModalityKind.tabular, 10)]
    clinical = schema.modality("clinical")
    assert {clinical.column_type(f) for f in clinical.features} == set(ColumnType)
    for s in manifest.sites + [manifest.holdout]:
        tables = read_site(schema, fed / s.dir)
        assert s.patients == len(tables.labels)
        assert s.class_counts == {c: int((tables.labels == c).sum()) for c in schema.classes}
        assert s.modality_counts == {m: len(df) for m, df in tables.modalities.items()}
    assert manifest.holdout.class_counts == {c: 10 for c in schema.classes}


def test_wide_omics_modalities_are_generated(tmp_path):
    fed = tmp_path / "fed"
    generate(fed, sites=2, patients_per_site=30, omics_widths=[6000, 500])
    x, _ = load_site(fed, "site_00")
    assert x.shape[1] == 6000 + 500 + 10


def test_small_alpha_skews_labels_across_sites_and_large_alpha_does_not(tmp_path):
    skewed = generate(tmp_path / "a", alpha=0.1, omics_widths=[20])
    even = generate(tmp_path / "b", alpha=1000.0, omics_widths=[20])
    assert skewed.mean_label_skew() > 0.3 and even.mean_label_skew() < 0.1
    assert sum(even.federation_class_counts.values()) == 400


def test_sites_miss_modalities_and_single_values(tmp_path):
    fed = tmp_path / "fed"
    manifest = generate(fed, missing_modality_rate=0.2, missing_value_rate=0.05)
    for m in ("omics1", "clinical"):
        assert sum(s.modality_counts[m] for s in manifest.sites) < sum(s.patients for s in manifest.sites)
    x, _ = load_site(fed, "site_00")
    schema = FeatureSchema.load(fed / "schema.json")
    block = x[:, schema.layout().slices["omics1"]]
    lacking = np.isnan(block).all(axis=1)
    assert lacking.any() and not np.isnan(x).all(axis=1).any()  # nobody has no data at all
    assert 0.02 < np.isnan(block[~lacking]).mean() < 0.1


def test_batch_effects_shift_features_between_sites(tmp_path):
    def site_gap(batch):
        fed = tmp_path / f"b{batch}"
        generate(fed, batch=batch, alpha=1000.0, signal=0.0, missing_value_rate=0.0)
        (x0, _), (x1, _) = load_site(fed, "site_00"), load_site(fed, "site_01")
        return np.nanmean(np.abs(np.nanmean(x0[:, :500], 0) - np.nanmean(x1[:, :500], 0)))

    assert site_gap(1.0) > 3 * site_gap(0.0)


def test_features_come_in_correlated_blocks(tmp_path):
    fed = tmp_path / "fed"
    generate(fed, signal=0.0, batch=0.0, missing_value_rate=0.0, missing_modality_rate=0.0, noise_block_frac=0.0)
    x, _ = load_site(fed, "site_00")
    c = np.abs(np.corrcoef(x[:, :500], rowvar=False))
    block = np.arange(500) // 25
    same = (block[:, None] == block[None, :]) & ~np.eye(500, dtype=bool)
    assert c[same].mean() > 0.15 and c[~same].mean() < c[same].mean() / 2


def _lr_accuracy(x_train, y_train, x_test, y_test) -> float:
    from sklearn.linear_model import LogisticRegression

    mean = np.nanmean(x_train, axis=0)
    mean = np.where(np.isnan(mean), 0.0, mean)
    x_train, x_test = np.where(np.isnan(x_train), mean, x_train), np.where(np.isnan(x_test), mean, x_test)
    sd = x_train.std(axis=0)
    sd[sd < 1e-8] = 1.0
    model = LogisticRegression(max_iter=2000).fit((x_train - mean) / sd, y_train)
    return float((model.predict((x_test - mean) / sd) == y_test).mean())


def _pooled(fed: Path, manifest: FederationManifest):
    parts = [load_site(fed, s.dir) for s in manifest.sites]
    return np.vstack([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_default_signal_is_learnable_but_not_trivial(tmp_path):
    # default signal, skew, batch effects and missingness; narrow and few patients to stay fast
    from sklearn.model_selection import train_test_split

    fed = tmp_path / "fed"
    manifest = generate(fed, seed=0, holdout_patients=300)
    x, y = _pooled(fed, manifest)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    assert 0.70 <= _lr_accuracy(x_tr, y_tr, x_te, y_te) <= 0.95  # held-out rows of the pooled sites
    assert 0.65 <= _lr_accuracy(x, y, *load_site(fed, "holdout")) <= 0.95  # an unseen site, balanced classes


def test_without_signal_an_unseen_site_is_at_chance(tmp_path):
    fed = tmp_path / "fed"
    manifest = generate(fed, signal=0.0, holdout_patients=300)
    x, y = _pooled(fed, manifest)
    assert _lr_accuracy(x, y, *load_site(fed, "holdout")) < 0.4  # 4 classes: chance is 0.25


def test_schema_infer_on_a_site_recovers_the_generated_schema(tmp_path):
    fed = tmp_path / "fed"
    generate(fed, patients_per_site=200)
    schema = FeatureSchema.load(fed / "schema.json")
    inferred = infer_schema(fed / "site_01", InferOptions(label_column="subtype",
                                                          modalities=schema.modality_names)).schema
    for m in schema.modalities:
        got = inferred.modality(m.name)
        assert (got.kind, got.features, got.column_types) == (m.kind, m.features, m.column_types)


@pytest.mark.parametrize("kw, expected", [
    ({"alpha": 0.0}, r"--alpha must be positive"),
    ({"classes": 1}, r"--classes must be at least 2"),
    ({"omics_widths": [], "tabular_columns": 0}, r"give at least one modality"),
    ({"sites": 40, "patients_per_site": 10, "alpha": 0.01}, r"--alpha 0.01: no draw gave each of 40 sites"),
])
def test_impossible_settings_are_refused_naming_the_flag(tmp_path, kw, expected):
    with pytest.raises(SyntheticError, match=expected):
        generate(tmp_path / "fed", **kw)
    assert not (tmp_path / "fed").exists()


def test_cli_writes_a_federation_and_refuses_bad_flags(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["synthetic", str(tmp_path / "fed"), "--sites", "3", "--classes", "3",
                            "--omics-widths", "300,50", "--tabular-columns", "5", "--patients-per-site", "40",
                            "--seed", "2"])
    assert r.exit_code == 0, r.output
    assert "site_02" in r.output and "omics2" in r.output
    assert len(FederationManifest.load(tmp_path / "fed" / "manifest.json").sites) == 3
    r = runner.invoke(app, ["synthetic", str(tmp_path / "x"), "--omics-widths", "6k"])
    assert r.exit_code == 2 and "--omics-widths '6k': give comma-separated whole numbers" in r.output
    r = runner.invoke(app, ["synthetic", str(tmp_path / "fed"), "--sites", "3"])
    assert r.exit_code == 2 and "pass --overwrite" in r.output and "Traceback" not in r.output
