"""`oncofed partition`: a pooled cohort split into complete site directories + manifest."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from oncofed.cli import app
from shared_models.schema import FeatureSchema, Modality
from shared_models.site_data import encode_labels, raw_matrix, read_site
from simulations.partition import FederationManifest, PartitionError, partition_cohort

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["A", "B", "C"]


def cohort_schema() -> FeatureSchema:
    return FeatureSchema(
        name="pooled", label_column="subtype", classes=CLASSES,
        modalities=[
            Modality(name="expr", kind="omics", features=[f"g{j}" for j in range(120)]),
            Modality(name="clinical", kind="tabular", features=["age", "stage"],
                     column_types={"stage": "categorical"}, levels={"stage": ["I", "II"]}),
        ],
    )


def write_cohort(root: Path, n: int = 300) -> Path:
    """Like TCGA: every tss belongs to one class, tss codes are text ("NA", "02"), centers group tss;
    some patients lack expr, and expr has rows for patients not in labels."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    tss_codes = ["NA", "02"] + [f"T{k}" for k in range(28)]
    tss_class = {t: CLASSES[k % 3] for k, t in enumerate(tss_codes)}
    tss = rng.choice(tss_codes, n)
    ids = [f"TCGA-{t}-{i:04d}" for i, t in enumerate(tss)]
    center = {t: f"C{k % 4}" for k, t in enumerate(tss_codes)}
    pd.DataFrame({"patient": ids, "subtype": [tss_class[t] for t in tss], "tss": tss,
                  "center": [center[t] for t in tss]}).to_csv(root / "labels.csv", index=False)
    has_expr = rng.random(n) < 0.8
    expr = pd.DataFrame(rng.normal(size=(n, 120)).round(4), index=pd.Index(ids, name="patient"),
                        columns=[f"g{j}" for j in range(120)])[has_expr]
    stray = pd.DataFrame(np.zeros((2, 120)), index=pd.Index(["X-1", "X-2"], name="patient"), columns=expr.columns)
    pd.concat([expr, stray]).to_csv(root / "expr.csv.gz")
    pd.DataFrame({"patient": ids, "age": rng.uniform(30, 80, n).round(1),
                  "stage": rng.choice(["I", "II", ""], n)}).to_csv(root / "clinical.csv", index=False)
    return root


@pytest.fixture
def cohort(tmp_path) -> Path:
    return write_cohort(tmp_path / "pooled")


def read_labels(site_dir: Path) -> pd.DataFrame:
    return pd.read_csv(site_dir / "labels.csv", dtype=str, keep_default_na=False)


def site_dirs(out: Path, manifest: FederationManifest) -> list[Path]:
    return [out / s.dir for s in manifest.sites]


def test_by_column_makes_one_site_per_value_and_loses_or_duplicates_no_patient(cohort, tmp_path):
    out = tmp_path / "fed"
    manifest = partition_cohort(cohort, cohort_schema(), out, by="center")
    assert [s.name for s in manifest.sites] == ["C0", "C1", "C2", "C3"]
    seen = []
    for s in manifest.sites:
        labels = read_labels(out / s.dir)
        assert set(labels["center"]) == {s.name} and s.group_values == [s.name]
        seen += list(labels["patient"])
    pooled = read_labels(cohort)
    assert sorted(seen) == sorted(pooled["patient"]) and len(seen) == len(set(seen))


def test_by_column_with_fewer_sites_packs_whole_values_into_balanced_sites(cohort, tmp_path):
    manifest = partition_cohort(cohort, cohort_schema(), tmp_path / "fed", by="tss", sites=3)
    values = [v for s in manifest.sites for v in s.group_values]
    assert sorted(values) == sorted(set(read_labels(cohort)["tss"])) and len(values) == len(set(values))
    sizes = [s.patients for s in manifest.sites]
    assert sum(sizes) == 300 and max(sizes) - min(sizes) <= 20
    assert [s.name for s in manifest.sites] == ["site_00", "site_01", "site_02"]


def test_each_site_directory_is_a_complete_site_that_read_site_loads(cohort, tmp_path):
    schema, out = cohort_schema(), tmp_path / "fed"
    manifest = partition_cohort(cohort, schema, out, by="center")
    for s in manifest.sites:
        tables = read_site(schema, out / s.dir)
        assert set(tables.modalities) == {"expr", "clinical"}
        assert tables.files["expr"].name == "expr.csv.gz" and tables.files["clinical"].name == "clinical.csv"
        assert set(tables.modalities["expr"].index) <= set(tables.labels.index)


def test_values_reach_the_sites_unchanged(cohort, tmp_path):
    schema, out = cohort_schema(), tmp_path / "fed"
    manifest = partition_cohort(cohort, schema, out, dirichlet=1.0, sites=3)
    pooled = read_site(schema, cohort)
    for s in manifest.sites:
        site = read_site(schema, out / s.dir)
        ids = list(site.labels.index)
        np.testing.assert_array_equal(raw_matrix(schema, site), raw_matrix(schema, pooled, ids))
        np.testing.assert_array_equal(encode_labels(schema, site.labels), encode_labels(schema, pooled.labels[ids]))


def test_text_codes_such_as_NA_and_02_are_copied_verbatim(cohort, tmp_path):
    out = tmp_path / "fed"
    manifest = partition_cohort(cohort, cohort_schema(), out, iid=True, sites=2)
    tss = pd.concat([read_labels(d) for d in site_dirs(out, manifest)])["tss"]
    assert {"NA", "02"} <= set(tss)
    assert "TCGA-NA-" in (out / manifest.sites[0].dir / "labels.csv").read_text()


def test_manifest_counts_match_the_site_files(cohort, tmp_path):
    schema, out = cohort_schema(), tmp_path / "fed"
    manifest = partition_cohort(cohort, schema, out, dirichlet=0.5, sites=4, seed=3)
    assert FederationManifest.load(out / "manifest.json") == manifest
    assert FeatureSchema.load(out / "schema.json").content_hash() == manifest.schema_hash == schema.content_hash()
    for s in manifest.sites:
        tables = read_site(schema, out / s.dir)
        assert s.patients == len(tables.labels)
        assert s.class_counts == {c: int((tables.labels == c).sum()) for c in CLASSES}
        assert s.modality_counts == {m: len(df) for m, df in tables.modalities.items()}
    assert manifest.dropped == {"expr: ids not in labels.csv": 2}
    assert sum(s.patients for s in manifest.sites) == 300


def test_same_seed_gives_the_same_files_and_another_seed_another_partition(cohort, tmp_path):
    def run(name, seed):
        out = tmp_path / name
        partition_cohort(cohort, cohort_schema(), out, dirichlet=0.5, sites=3, seed=seed)
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first, again, other = run("a", 7), run("b", 7), run("c", 8)
    assert first == again
    assert first["site_00/labels.csv"] != other["site_00/labels.csv"]


def test_small_dirichlet_alpha_skews_labels_and_large_alpha_does_not(cohort, tmp_path):
    skewed = partition_cohort(cohort, cohort_schema(), tmp_path / "a", dirichlet=0.1, sites=3, seed=0)
    even = partition_cohort(cohort, cohort_schema(), tmp_path / "b", dirichlet=1000.0, sites=3, seed=0)
    assert skewed.mean_label_skew() > 0.3 and even.mean_label_skew() < 0.1


def test_iid_sites_have_equal_sizes_and_class_mixes(cohort, tmp_path):
    manifest = partition_cohort(cohort, cohort_schema(), tmp_path / "fed", iid=True, sites=4)
    sizes = [s.patients for s in manifest.sites]
    assert max(sizes) - min(sizes) <= 1
    for c in CLASSES:
        counts = [s.class_counts[c] for s in manifest.sites]
        assert max(counts) - min(counts) <= 1


def test_holdout_takes_whole_tss_groups_that_no_site_sees(cohort, tmp_path):
    schema, out = cohort_schema(), tmp_path / "fed"
    manifest = partition_cohort(cohort, schema, out, by="center", holdout_column="tss", holdout_frac=0.25)
    held = read_labels(out / "holdout")
    in_sites = pd.concat([read_labels(d) for d in site_dirs(out, manifest)])
    assert set(held["tss"]).isdisjoint(in_sites["tss"])
    assert sorted(held["tss"].unique()) == manifest.holdout.group_values
    assert len(held) + len(in_sites) == 300 and 0 < len(held) <= 0.25 * 300
    for c in CLASSES:  # every class keeps most of its patients in the federation
        assert (held["subtype"] == c).sum() <= 0.25 * (read_labels(cohort)["subtype"] == c).sum()
    read_site(schema, out / "holdout")


def test_labels_outside_the_schema_classes_are_refused(cohort, tmp_path):
    schema = FeatureSchema.from_dict({**cohort_schema().model_dump(mode="json"), "classes": ["A", "B"]})
    with pytest.raises(PartitionError, match=r"labels outside the schema's classes \(e.g. \['C'\]\)"):
        partition_cohort(cohort, schema, tmp_path / "fed", iid=True, sites=2)
    assert not (tmp_path / "fed").exists()


def _cli(cohort: Path, out: Path, *args: str):
    schema = out.parent / "schema.json"
    if not schema.exists():
        cohort_schema().save(schema)
    return CliRunner().invoke(app, ["partition", str(cohort), "--schema", str(schema), "--out", str(out), *args])


def test_cli_prints_a_table_of_sites_and_writes_the_manifest(cohort, tmp_path):
    r = _cli(cohort, tmp_path / "fed", "--by", "center", "--holdout-column", "tss")
    assert r.exit_code == 0, r.output
    assert "C3" in r.output and "holdout" in r.output and "expr" in r.output and "skew" in r.output
    assert (tmp_path / "fed" / "manifest.json").is_file()


@pytest.mark.parametrize("args, expected", [
    ([], r"choose exactly one way to split: --by COLUMN, --dirichlet ALPHA or --iid"),
    (["--iid", "--dirichlet", "0.5", "--sites", "2"], r"\(got --dirichlet and --iid\)"),
    (["--iid"], r"--iid needs --sites N"),
    (["--dirichlet", "0", "--sites", "2"], r"--dirichlet must be a positive concentration"),
    (["--by", "hospital"], r"--by hospital: labels.csv has no column 'hospital'; its columns are"),
    (["--by", "center", "--sites", "9"], r"the column has 4 distinct values, fewer than --sites 9"),
    (["--dirichlet", "0.5", "--sites", "40"], r"cannot give 40 sites 10 patients each"),
    (["--iid", "--sites", "2", "--holdout-column", "tss", "--holdout-frac", "1.5"], r"--holdout-frac must be between"),
    (["--iid", "--sites", "2", "--holdout-frac", "0.3"], r"--holdout-frac 0.3 needs --holdout-column COLUMN"),
    (["--iid", "--sites", "2", "--min-site-patients", "5"], r"--min-site-patients 5 applies only to --dirichlet"),
])
def test_cli_bad_flags_give_a_clear_message_and_no_traceback(cohort, tmp_path, args, expected):
    r = _cli(cohort, tmp_path / "fed", *args)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert re.search(expected, r.output), r.output


def test_cli_never_overwrites_without_asking_and_only_replaces_a_federation(cohort, tmp_path):
    out = tmp_path / "fed"
    assert _cli(cohort, out, "--iid", "--sites", "2").exit_code == 0
    r = _cli(cohort, out, "--iid", "--sites", "3")
    assert r.exit_code == 2 and "pass --overwrite" in r.output
    r = _cli(cohort, out, "--iid", "--sites", "3", "--overwrite")
    assert r.exit_code == 0 and len(FederationManifest.load(out / "manifest.json").sites) == 3
    other = tmp_path / "results"
    other.mkdir()
    (other / "keep.txt").write_text("important")
    r = _cli(cohort, other, "--iid", "--sites", "2", "--overwrite")
    assert r.exit_code == 2 and "not a federation directory" in r.output and (other / "keep.txt").exists()


def test_pancan33_by_center8_with_held_out_tss_sites(tmp_path):
    schema = FeatureSchema.load(REPO / "simulations" / "schemas" / "tcga_pancan33.json")
    out = tmp_path / "pancan"
    manifest = partition_cohort(REPO / "simulations" / "data" / "tcga_pancan33", schema, out, by="center8",
                                holdout_column="tss", holdout_frac=0.2, seed=0)
    assert [s.name for s in manifest.sites] == [f"C{k}" for k in range(8)]
    assert sum(s.patients for s in manifest.sites) + manifest.holdout.patients == 7688
    assert 0.1 < manifest.holdout.patients / 7688 <= 0.2
    fed_classes = manifest.federation_class_counts
    assert all(n > 0 for n in fed_classes.values())  # all 33 types stay in the federation
    held_tss = set(read_labels(out / "holdout")["tss"])
    assert "NA" in set(read_labels(REPO / "simulations" / "data" / "tcga_pancan33")["tss"])
    for s in manifest.sites:
        assert held_tss.isdisjoint(read_labels(out / s.dir)["tss"])


def test_simulate_reuses_a_partition_only_if_drawn_with_its_seed(tmp_path):
    """`oncofed simulate --seed N` into an --out holding another seed's partition: replaced with --fresh (the
    default), refused with --keep; a directory without a complete partition (an interrupted one) is refused."""
    import json

    from simulations.federation import SimulationError, ensure_partition

    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "manifest.json").write_text(json.dumps({"seed": 0, "method": {"by": "center8"}}))
    assert ensure_partition(sites, seed=0) == sites  # the same draw: reused as it is
    with pytest.raises(SimulationError, match="drawn with seed 0, not 1: use another --out, or let --fresh"):
        ensure_partition(sites, seed=1)
    (sites / "manifest.json").unlink()
    (sites / "C0").mkdir()
    with pytest.raises(SimulationError, match="holds no complete partition"):
        ensure_partition(sites, seed=0)


def test_simulate_refuses_set_keys_it_sets_itself(tmp_path):
    r = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "o"), "--set", "output-dir=/tmp/x",
                                 "--set", "sites=100"])
    assert r.exit_code == 2 and "--set output-dir, sites: oncofed simulate sets these itself" in r.output
    assert not (tmp_path / "o").exists()


def test_research_guide_label_skew_counts_are_the_main_jobs_partition(tmp_path):
    """docs/research-guide.md, "Label skew", says where READ, COAD, CHOL and LIHC sit among the main job's center8
    hospitals; the numbers it quotes are the partition's (CHOL's hospital holds LIHC too)."""
    from simulations.federation import ensure_partition

    manifest = FederationManifest.load(ensure_partition(tmp_path / "sites", seed=0) / "manifest.json")
    at = {c: {s.name: s.class_counts[c] for s in manifest.sites if s.class_counts[c]}
          for c in ("READ", "COAD", "CHOL", "LIHC")}
    guide = " ".join((REPO / "docs" / "research-guide.md").read_text().split())
    (chol_site, chol), = at["CHOL"].items()
    lihc, lihc_with_chol = sum(at["LIHC"].values()), at["LIHC"][chol_site]
    assert (f"CHOL's {chol} are all at {chol_site}, which also holds {lihc_with_chol} of LIHC's {lihc} "
            f"(and {at['COAD'][chol_site]} COAD), while the other {lihc - lihc_with_chol} LIHC are at") in guide
    read, coad = sum(at["READ"].values()), sum(at["COAD"].values())
    assert f"{at['READ']['C5']} of READ's {read} training patients are at C5, which has no COAD" in guide
    assert "C5" not in at["COAD"] and "C3" not in at["READ"]
    assert f"{at['COAD']['C3']} of COAD's {coad} at C3, which has no READ" in guide
    assert set(at["READ"]) & set(at["COAD"]) == {"C7"}
    assert f"only C7 holds both: {at['COAD']['C7']} COAD, {at['READ']['C7']} READ" in guide


def test_the_partition_commands_help_states_the_defaults_partition_cohort_takes():
    """The CLI leaves these unset (the partition's defaults apply); its help says them, kept equal here."""
    import typer

    from oncofed.cli import app
    from simulations.partition import HOLDOUT_FRAC, MIN_SITE_PATIENTS

    command = typer.main.get_command(app).commands["partition"]
    helps = {p.name: p.help for p in command.params}
    assert f"(default: {HOLDOUT_FRAC:g})" in helps["holdout_frac"]
    assert f"(default: {MIN_SITE_PATIENTS})" in helps["min_site_patients"]
