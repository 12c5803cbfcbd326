"""Site-data validation, as a specification: each problem a hospital can have is found, named and explained.

Every test writes real files into a temporary site directory (see tests/sitefixtures.py) and validates them.
"""

from __future__ import annotations

import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from oncofed.cli import app
from shared_models.schema import FeatureSchema
from shared_models.site_data import encode_labels, raw_matrix, read_site, read_table
from shared_models.validation import Problem, ValidationReport, validate_site
from tests.sitefixtures import FILE_NAMES, site_schema, site_tables, write_site, write_table

from simulations.baseline import SHARED_DATA  # noqa: E402 - ../shared/data, or ONCOFED_SHARED_DATA
SCHEMA = site_schema()


def make_site(tmp_path: Path, change=None) -> Path:
    tables = site_tables()
    if change is not None:
        change(tables)
    return write_site(tmp_path / "site", tables)


def the_problem(report: ValidationReport, code: str) -> Problem:
    found = [p for p in report.problems if p.code == code]
    assert len(found) == 1, f"expected one {code!r} problem, got:\n{report.format_report()}"
    return found[0]


def set_cell(df: pd.DataFrame, row: int, column: str, value) -> None:
    df[column] = df[column].astype(object)
    df.loc[row, column] = value


# --- a valid site --------------------------------------------------------------------------------------------


def test_a_valid_site_passes_with_no_problems_and_a_summary(tmp_path):
    report = validate_site(SCHEMA, make_site(tmp_path))
    assert report.ok and report.problems == [], report.format_report()
    s = report.summary
    assert s.n_patients == 18 and s.class_counts == {"A": 6, "B": 6, "C": 6}
    assert [(m.name, m.file, m.n_patients, m.coverage) for m in s.modalities] == [
        ("expr", "expr.csv.gz", 18, 1.0), ("counts", "counts.parquet", 18, 1.0), ("clinical", "clinical.tsv", 18, 1.0)]
    assert s.modalities[2].missing_rate == pytest.approx(1 / 54)  # one missing stage of 18 x 3 cells
    assert s.absent_feature_share == 0.0
    text = report.format_report()
    assert "SUMMARY" in text and "OK" in text


def test_validation_agrees_with_training_reading_the_site(tmp_path):
    site_dir = make_site(tmp_path)
    assert validate_site(SCHEMA, site_dir).ok
    tables = read_site(SCHEMA, site_dir)
    assert raw_matrix(SCHEMA, tables).shape == (18, 12)
    assert len(encode_labels(SCHEMA, tables.labels)) == 18


# --- files ---------------------------------------------------------------------------------------------------


def test_no_labels_table_is_an_error_that_says_what_to_add(tmp_path):
    site_dir = make_site(tmp_path)
    (site_dir / "labels.csv").unlink()
    p = the_problem(validate_site(SCHEMA, site_dir), "no_labels")
    assert p.severity == "error" and "labels.csv" in p.fix and "'subtype'" in p.fix


def test_labels_in_an_unknown_format_is_an_error_naming_the_file(tmp_path):
    site_dir = make_site(tmp_path)
    (site_dir / "labels.csv").unlink()
    (site_dir / "labels.xlsx").write_bytes(b"PK\x03\x04 not really excel")
    report = validate_site(SCHEMA, site_dir)
    p = the_problem(report, "unknown_format")
    assert (p.severity, p.file) == ("error", "labels.xlsx")
    assert "'.xlsx'" in p.message and "labels.csv" in p.fix
    assert not report.ok


def test_a_table_in_an_unknown_format_next_to_the_real_one_is_a_warning(tmp_path):
    site_dir = make_site(tmp_path)
    (site_dir / "expr.json").write_text("{}")
    report = validate_site(SCHEMA, site_dir)
    p = the_problem(report, "unknown_format")
    assert (p.severity, p.file) == ("warning", "expr.json") and "expr.csv.gz" in p.message
    assert report.ok


def test_a_modality_only_in_an_unknown_format_is_an_error(tmp_path):
    site_dir = make_site(tmp_path)
    (site_dir / "expr.csv.gz").unlink()
    (site_dir / "expr.json").write_text("{}")
    p = the_problem(validate_site(SCHEMA, site_dir), "unknown_format")
    assert (p.severity, p.file) == ("error", "expr.json") and "expr.csv" in p.fix


def test_a_table_named_with_the_wrong_case_is_an_error_with_its_right_name(tmp_path):
    site_dir = make_site(tmp_path)
    (site_dir / "clinical.tsv").rename(site_dir / "Clinical.TSV")
    p = the_problem(validate_site(SCHEMA, site_dir), "misnamed_table")
    assert (p.severity, p.file) == ("error", "Clinical.TSV") and "clinical.tsv" in p.fix



def test_a_tables_name_on_a_broken_link_or_a_directory_is_an_error_not_an_absent_modality(tmp_path):
    site_dir = make_site(tmp_path)
    (site_dir / "counts.parquet").unlink()
    (site_dir / "counts.parquet").symlink_to(tmp_path / "unmounted" / "counts.parquet")
    p = the_problem(validate_site(SCHEMA, site_dir), "not_a_file")
    assert (p.severity, p.file) == ("error", "counts.parquet") and "does not exist" in p.message
    assert "mount or restore" in p.fix
    (site_dir / "counts.parquet").unlink()
    (site_dir / "counts.parquet").mkdir()
    p = the_problem(validate_site(SCHEMA, site_dir), "not_a_file")
    assert "a directory" in p.message and "counts.parquet" in p.fix


def test_a_utf16_table_an_excel_workbook_and_spaces_around_the_id_name_get_their_own_fix(tmp_path):
    site_dir = make_site(tmp_path)
    labels = (site_dir / "labels.csv").read_text()
    (site_dir / "labels.csv").write_bytes(labels.encode("utf-16"))
    (site_dir / "clinical.tsv").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600))  # an .xls renamed
    report = validate_site(SCHEMA, site_dir)
    fixes = {p.file: p.fix for p in report.problems if p.severity == "error"}
    assert "saved as UTF-16" in fixes["labels.csv"] and "Excel workbook" in fixes["clinical.tsv"]
    (site_dir / "labels.csv").write_text(labels.replace("patient", "patient ", 1))
    p = the_problem(validate_site(SCHEMA, site_dir), "no_id_column")
    assert "'patient ' has spaces around its name" in p.fix


def test_a_table_the_account_may_not_read_gets_the_access_fix(tmp_path, monkeypatch):
    import shared_models.validation.reading as reading
    from shared_models.site_data import TableError

    site_dir = make_site(tmp_path)
    real = reading.read_table

    def denied(path, idc, text_columns=()):  # as read_table reports an unreadable file (chmod cannot stop root, who runs the tests)
        if path.name == "clinical.tsv":
            raise TableError(f"{path}: cannot be read ([Errno 13] Permission denied); check that the file is complete")
        return real(path, idc)

    monkeypatch.setattr(reading, "read_table", denied)
    problems = [p for p in validate_site(SCHEMA, site_dir).problems if p.file == "clinical.tsv"]
    assert problems and "read access" in problems[0].fix

def test_two_tables_for_one_modality_is_an_error(tmp_path):
    site_dir = make_site(tmp_path)
    write_table(site_dir / "expr.csv", site_tables()["expr"])
    p = the_problem(validate_site(SCHEMA, site_dir), "ambiguous_table")
    assert "expr.csv" in p.message and "expr.csv.gz" in p.message and "keep exactly one" in p.fix


def test_an_empty_file_is_an_error(tmp_path):
    site_dir = make_site(tmp_path)
    (site_dir / "clinical.tsv").write_bytes(b"")
    p = the_problem(validate_site(SCHEMA, site_dir), "empty_file")
    assert p.file == "clinical.tsv" and "0 bytes" in p.message and "export" in p.fix


def test_a_table_with_a_header_and_no_rows_is_an_error(tmp_path):
    site_dir = make_site(tmp_path)
    (site_dir / "clinical.tsv").write_text("patient\tage\tstage\tsmoker\n")
    p = the_problem(validate_site(SCHEMA, site_dir), "empty_table")
    assert p.file == "clinical.tsv" and "no rows" in p.message


def test_a_truncated_gzip_file_is_an_error_that_says_it_is_damaged(tmp_path):
    site_dir = make_site(tmp_path)
    data = (site_dir / "expr.csv.gz").read_bytes()
    (site_dir / "expr.csv.gz").write_bytes(data[: len(data) // 2])
    p = the_problem(validate_site(SCHEMA, site_dir), "unreadable")
    assert p.file == "expr.csv.gz" and "damaged or incomplete" in p.fix


def test_binary_junk_named_parquet_is_an_error(tmp_path):
    site_dir = make_site(tmp_path)
    (site_dir / "counts.parquet").write_bytes(bytes(range(256)) * 4)
    p = the_problem(validate_site(SCHEMA, site_dir), "unreadable")
    assert p.file == "counts.parquet" and "not a parquet file" in p.fix


def test_text_that_is_not_utf8_is_an_error(tmp_path):
    site_dir = make_site(tmp_path)
    (site_dir / "clinical.tsv").write_bytes("patient\tage\tstage\tsmoker\nP000\t61\tI\u00e9\t0\n".encode("latin-1"))
    report = validate_site(SCHEMA, site_dir)
    p = the_problem(report, "not_utf8")
    assert (p.file, p.column) == ("clinical.tsv", "stage") and "UTF-8" in p.fix


def test_a_missing_site_directory_is_an_error(tmp_path):
    report = validate_site(SCHEMA, tmp_path / "nowhere")
    assert the_problem(report, "no_site_dir").severity == "error"


def test_a_site_with_no_modality_table_cannot_train(tmp_path):
    site_dir = make_site(tmp_path)
    for stem in ("expr", "counts", "clinical"):
        (site_dir / FILE_NAMES[stem]).unlink()
    assert the_problem(validate_site(SCHEMA, site_dir), "no_modality").severity == "error"


# --- ids -----------------------------------------------------------------------------------------------------


def test_no_id_column_is_an_error_that_suggests_the_rename(tmp_path):
    site_dir = make_site(tmp_path, lambda t: t.update(expr=t["expr"].rename(columns={"patient": "Patient"})))
    p = the_problem(validate_site(SCHEMA, site_dir), "no_id_column")
    assert (p.file, p.column) == ("expr.csv.gz", "patient") and "'Patient' to 'patient'" in p.fix


def test_a_wrong_delimiter_is_explained(tmp_path):
    site_dir = make_site(tmp_path)
    site_tables()["clinical"].to_csv(site_dir / "clinical.tsv", index=False)  # commas in a .tsv
    p = the_problem(validate_site(SCHEMA, site_dir), "no_id_column")
    assert p.file == "clinical.tsv" and "separated by commas" in p.fix and "clinical.csv" in p.fix


def test_an_id_saved_as_the_parquet_index_is_explained(tmp_path):
    site_dir = make_site(tmp_path)
    site_tables()["counts"].set_index("patient").to_parquet(site_dir / "counts.parquet")
    p = the_problem(validate_site(SCHEMA, site_dir), "no_id_column")
    assert "reset_index" in p.fix


def test_duplicate_patient_ids_are_an_error_naming_them(tmp_path):
    site_dir = make_site(tmp_path, lambda t: set_cell(t["expr"], 1, "patient", "P000"))
    p = the_problem(validate_site(SCHEMA, site_dir), "duplicate_ids")
    assert (p.file, p.column, p.rows) == ("expr.csv.gz", "patient", ("P000",))
    assert "P000 (x2)" in p.message and "one row per patient" in p.fix


def test_a_patient_twice_in_the_labels_with_two_classes_shows_both(tmp_path):
    """Which row is the patient's class is the site's decision: the message shows the classes it must choose from."""
    def twice(t):
        first = t["labels"].iloc[[0]]
        other = "C" if first.subtype.iloc[0] == "B" else "B"
        t["labels"] = pd.concat([t["labels"], first.assign(subtype=other)], ignore_index=True)
    site_dir = make_site(tmp_path, twice)
    first, other = pd.read_csv(site_dir / "labels.csv").iloc[[0, -1]].itertuples()
    p = the_problem(validate_site(SCHEMA, site_dir), "duplicate_ids")
    assert p.file == "labels.csv" and f"{first.patient} (x2: {first.subtype}, {other.subtype})" in p.message, p.message


def test_an_empty_id_is_an_error_naming_its_line(tmp_path):
    site_dir = make_site(tmp_path, lambda t: set_cell(t["clinical"], 4, "patient", " "))
    p = the_problem(validate_site(SCHEMA, site_dir), "empty_id")
    assert p.file == "clinical.tsv" and p.rows == ("line 6",) and "patient id" in p.fix


def test_a_row_with_a_field_too_many_is_an_error_naming_its_line(tmp_path):
    site_dir = make_site(tmp_path)
    rows = (site_dir / "clinical.tsv").read_text().splitlines()
    rows[3] += "\t99"  # the third patient's row, line 4
    (site_dir / "clinical.tsv").write_text("\n".join(rows) + "\n")
    p = the_problem(validate_site(SCHEMA, site_dir), "ragged_row")
    assert p.file == "clinical.tsv" and "line 4 has 5 fields where the header has 4" in p.message
    assert "a tab too many or too few" in p.fix


def test_a_table_exported_with_semicolons_and_decimal_commas_says_so_not_a_comma_too_many(tmp_path):
    """A European-locale spreadsheet export (fields by ';', decimals by ','), saved as .csv: its header is one field and
    its rows many, which read as 'a comma too many in that row'. The fix named is the export's separator and decimals."""
    site_dir = make_site(tmp_path)
    clinical = pd.read_csv(site_dir / "clinical.tsv", sep="\t", dtype=str, keep_default_na=False)
    clinical["age"] = clinical["age"].str.split(".").str[0] + ",5"  # 60,5 for 60.5
    (site_dir / "clinical.tsv").unlink()
    clinical.to_csv(site_dir / "clinical.csv", sep=";", index=False)
    p = the_problem(validate_site(SCHEMA, site_dir), "ragged_row")
    assert p.file == "clinical.csv" and "separated by semicolons, the decimals by commas" in p.message
    assert "points as decimal marks" in p.fix and "too many or too few" not in p.fix


def test_duplicate_column_names_are_an_error(tmp_path):
    site_dir = make_site(tmp_path)
    (site_dir / "clinical.tsv").write_text("patient\tage\tage\tstage\tsmoker\nP000\t60\t61\tI\t0\n")
    p = the_problem(validate_site(SCHEMA, site_dir), "duplicate_columns")
    assert p.file == "clinical.tsv" and "'age'" in p.message


def test_a_table_whose_numeric_ids_lost_their_leading_zeros_says_so(tmp_path):
    """Hospital record numbers with leading zeros ('0000042'), one table saved with its id column as numbers (Parquet,
    Excel): no id in common with the labels, and the fix was only 'use the same patient ids in every table'."""
    def as_record_numbers(tables):
        for name, t in tables.items():
            numbers = t["patient"].str[1:].astype(int) + 40
            t["patient"] = numbers if name == "counts" else numbers.map(lambda n: f"{n:07d}")

    site_dir = make_site(tmp_path, as_record_numbers)
    p = the_problem(validate_site(SCHEMA, site_dir), "no_common_patients")
    assert p.file == "counts.parquet" and "without their leading zeros" in p.fix and "save it as text" in p.fix


def test_a_table_with_no_patient_in_common_with_the_labels_is_an_error(tmp_path):
    site_dir = make_site(tmp_path, lambda t: t["counts"].__setitem__("patient", "X" + t["counts"].patient))
    p = the_problem(validate_site(SCHEMA, site_dir), "no_common_patients")
    assert (p.severity, p.file) == ("error", "counts.parquet") and "XP000" in p.message and "P000" in p.message


def test_sample_barcodes_instead_of_patient_ids_are_recognised(tmp_path):
    site_dir = make_site(tmp_path, lambda t: t["counts"].__setitem__("patient", t["counts"].patient + "-01A"))
    p = the_problem(validate_site(SCHEMA, site_dir), "no_common_patients")
    assert "cut them to the patient id" in p.fix


def test_rows_of_unlabelled_patients_are_a_warning(tmp_path):
    def add_stranger(t):
        t["expr"] = pd.concat([t["expr"], t["expr"].iloc[[0]].assign(patient="STRANGER")])

    report = validate_site(SCHEMA, make_site(tmp_path, add_stranger))
    p = the_problem(report, "unlabelled_rows")
    assert (p.severity, p.rows) == ("warning", ("STRANGER",)) and report.ok


# --- labels --------------------------------------------------------------------------------------------------


def test_data_of_another_schema_is_said_first_and_no_rename_is_suggested(tmp_path):
    """Another consortium's tables (no label column, columns named otherwise): renaming them to fit would make one
    cohort's data pass as another's, so validate says the schema is likely the wrong one and withholds the guesses."""
    def other_cohort(t):
        t["labels"] = t["labels"].rename(columns={"subtype": "cancer_type"})
        t["expr"] = t["expr"].rename(columns={f"g{i}": f"G{i}" for i in range(6)})  # a rename that would "fit"
        t["counts"] = t["counts"].rename(columns={f"c{i}": f"cnv_{i}" for i in range(3)})
        t["clinical"] = t["clinical"].rename(columns={"age": "age_years", "smoker": "tobacco"})
    report = validate_site(SCHEMA, make_site(tmp_path, other_cohort))
    first = report.problems[0]
    assert first.code == "another_schema" and "'subtype'" in first.message and "1 of the 12 features" in first.message
    assert "check --schema" in first.fix
    renames = [p for p in report.problems if p.code in ("no_schema_features", "no_label_column")]
    assert renames and all("'g0'" not in p.fix and "likely of another schema" in p.fix for p in renames)


def test_a_level_is_suggested_only_for_a_typo_not_for_another_category():
    from shared_models.validation.hints import closest

    assert closest("Male", ["female", "male"]) == "male" and closest("Stage IIa", ["Stage IIA"]) == "Stage IIA"
    assert closest("Basel", ["LumA", "LumB", "Basal"]) == "Basal"
    # 'male' is not a typo of 'female', nor 'Stage II' of 'Stage III', 'T1' of 'T2', 'LumC' of 'LumA' or 'LumB'
    for value, choices in (("male", ["female"]), ("Stage II", ["Stage III"]), ("T1", ["T2"]),
                           ("LumC", ["LumA", "LumB"])):
        assert closest(value, choices) is None, value


def test_labels_outside_the_schema_classes_are_an_error_with_the_likely_class(tmp_path):
    site_dir = make_site(tmp_path, lambda t: t["labels"].__setitem__("subtype", t["labels"].subtype.replace("A", "a")))
    p = the_problem(validate_site(SCHEMA, site_dir), "unknown_label")
    assert (p.file, p.column) == ("labels.csv", "subtype") and len(p.rows) == 6
    assert "'a'" in p.message and "did you mean 'A'" in p.fix


def test_a_missing_label_is_an_error(tmp_path):
    site_dir = make_site(tmp_path, lambda t: set_cell(t["labels"], 3, "subtype", None))
    p = the_problem(validate_site(SCHEMA, site_dir), "missing_label")
    assert p.rows == ("P003",) and "fill in" in p.fix


def test_no_label_column_is_an_error(tmp_path):
    site_dir = make_site(tmp_path, lambda t: t.update(labels=t["labels"].rename(columns={"subtype": "Subtype"})))
    p = the_problem(validate_site(SCHEMA, site_dir), "no_label_column")
    assert "rename 'Subtype' to 'subtype'" in p.fix


def keep_three_of_class_c(tables):
    labels = tables["labels"]
    tables["labels"] = pd.concat([labels[labels.subtype != "C"], labels[labels.subtype == "C"].head(3)])


def test_a_class_below_the_minimum_count_is_a_warning_and_its_count_is_never_shown(tmp_path):
    # Its patients still train (DP protects each record); only their count must not leave the site.
    report = validate_site(SCHEMA, make_site(tmp_path, keep_three_of_class_c))
    assert report.ok
    p = the_problem(report, "small_class")
    assert (p.severity, p.file, p.column) == ("warning", "labels.csv", "subtype")
    assert "'C'" in p.message and "fewer than 5" in p.message and "3" not in p.message and p.rows == ()
    s = report.summary
    assert s.class_counts["C"] is None
    # With one small class, the smallest other one is hidden too: 15 - 6 - 6 would reveal the 3.
    assert s.hidden_classes in (["A"], ["B"]) and s.class_counts[s.hidden_classes[0]] is None
    text = s.format()
    assert "<5" in text and "hidden" in text and " 3\n" not in text
    assert '"C": null' in report.to_json()


def test_the_minimum_count_can_be_lowered_by_the_site(tmp_path):
    report = validate_site(SCHEMA, make_site(tmp_path, keep_three_of_class_c), min_count=3)
    assert not [p for p in report.problems if p.code == "small_class"]
    assert report.summary.class_counts["C"] == 3


# --- cells and columns ---------------------------------------------------------------------------------------


def test_non_numeric_cells_are_an_error_with_examples_and_their_rows(tmp_path):
    def garble(t):
        set_cell(t["expr"], 2, "g1", "high")
        set_cell(t["expr"], 5, "g1", "1,5")

    p = the_problem(validate_site(SCHEMA, make_site(tmp_path, garble)), "non_numeric")
    assert (p.file, p.column, p.rows) == ("expr.csv.gz", "g1", ("P002", "P005"))
    assert "'high' (row P002)" in p.message and "'1,5' (row P005)" in p.message and "1.5, not 1,5" in p.fix


def test_many_columns_with_one_problem_are_folded_after_the_first_ten(tmp_path):
    raw = SCHEMA.model_dump(mode="json")
    raw["modalities"][0]["features"] = [f"g{i}" for i in range(30)]
    schema = FeatureSchema.from_dict(raw)

    def wide(t):
        t["expr"] = pd.DataFrame({"patient": t["expr"].patient, **{f"g{i}": ["x"] + [i + 0.5] * 17 for i in range(30)}})

    bad = [p for p in validate_site(schema, make_site(tmp_path, wide)).problems if p.code == "non_numeric"]
    assert [p.column for p in bad[:10]] == [f"g{i}" for i in range(10)]
    assert len(bad) == 11 and bad[10].message.startswith("20 more columns") and "'g10'" in bad[10].message


def test_infinities_are_an_error(tmp_path):
    p = the_problem(validate_site(SCHEMA, make_site(tmp_path, lambda t: set_cell(t["expr"], 7, "g3", "-inf"))),
                    "infinite")
    assert (p.column, p.rows) == ("g3", ("P007",)) and "-inf (row P007)" in p.message and "empty" in p.fix


def test_an_all_missing_feature_is_an_error(tmp_path):
    p = the_problem(validate_site(SCHEMA, make_site(tmp_path, lambda t: t["expr"].__setitem__("g4", np.nan))),
                    "all_missing")
    assert (p.severity, p.file, p.column) == ("error", "expr.csv.gz", "g4") and "delete" in p.fix


def test_a_constant_feature_is_a_warning_showing_its_value(tmp_path):
    report = validate_site(SCHEMA, make_site(tmp_path, lambda t: t["clinical"].__setitem__("stage", "II")))
    p = the_problem(report, "constant")
    assert (p.severity, p.column) == ("warning", "stage") and "always 'II'" in p.message and report.ok


def test_a_feature_equal_to_the_label_codes_is_an_error(tmp_path):
    def leak(t):
        t["expr"]["g5"] = t["labels"].subtype.map({"A": 0, "B": 1, "C": 2}).to_numpy()

    p = the_problem(validate_site(SCHEMA, make_site(tmp_path, leak)), "label_leak")
    assert (p.severity, p.file, p.column) == ("error", "expr.csv.gz", "g5")
    assert "one-to-one recoding of the label 'subtype'" in p.message and "A -> 0" in p.message
    assert "delete this column" in p.fix


def test_a_feature_derived_from_the_label_is_an_error_even_when_not_one_to_one(tmp_path):
    def leak(t):
        t["clinical"]["smoker"] = (t["labels"].subtype == "A").astype(int).to_numpy()

    p = the_problem(validate_site(SCHEMA, make_site(tmp_path, leak)), "label_leak")
    assert p.column == "smoker" and "determined by the label" in p.message


def test_label_text_in_a_feature_column_is_reported_as_leakage(tmp_path):
    p = the_problem(validate_site(SCHEMA, make_site(tmp_path, lambda t: t["expr"].__setitem__(
        "g0", t["labels"].subtype.str.lower().to_numpy()))), "label_leak")
    assert p.column == "g0" and "A -> 'a'" in p.message


def test_categorical_cells_outside_the_levels_are_an_error_with_the_likely_level(tmp_path):
    p = the_problem(validate_site(SCHEMA, make_site(tmp_path, lambda t: set_cell(t["clinical"], 0, "stage", "iii"))),
                    "unknown_level")
    assert (p.file, p.column, p.rows) == ("clinical.tsv", "stage", ("P000",))
    assert "'iii' (row P000)" in p.message and "did you mean 'III' for 'iii'" in p.fix


def test_binary_cells_other_than_0_and_1_are_an_error(tmp_path):
    p = the_problem(validate_site(SCHEMA, make_site(tmp_path, lambda t: set_cell(t["clinical"], 2, "smoker", 2))),
                    "not_binary")
    assert (p.column, p.rows) == ("smoker", ("P002",)) and "1 = present" in p.fix


def test_values_outside_the_log1p_domain_are_an_error(tmp_path):
    p = the_problem(validate_site(SCHEMA, make_site(tmp_path, lambda t: set_cell(t["counts"], 1, "c0", -2.5))),
                    "log1p_domain")
    assert (p.file, p.column, p.rows) == ("counts.parquet", "c0", ("P001",)) and "log1p" in p.message


def test_negative_counts_in_a_log1p_column_are_a_warning_that_they_look_transformed(tmp_path):
    """-0.5 is inside log1p's domain (training takes it) but no count: most likely a logarithm or z-score."""
    report = validate_site(SCHEMA, make_site(tmp_path, lambda t: set_cell(t["counts"], 1, "c0", -0.5)))
    p = the_problem(report, "negative_counts")
    assert (p.severity, p.column, p.rows) == ("warning", "c0", ("P001",)) and "already transformed" in p.fix
    assert report.ok


def test_absent_schema_features_are_a_warning_with_their_share(tmp_path):
    report = validate_site(SCHEMA, make_site(tmp_path, lambda t: t.update(expr=t["expr"].drop(columns=["g4", "g5"]))))
    p = the_problem(report, "absent_features")
    assert (p.severity, p.file) == ("warning", "expr.csv.gz") and "(33%)" in p.message and "'g4', 'g5'" in p.message
    assert report.ok and report.summary.modalities[0].absent_features == ["g4", "g5"]
    assert report.summary.absent_feature_share == pytest.approx(2 / 12)


def test_an_absent_modality_is_a_warning(tmp_path):
    site_dir = make_site(tmp_path)
    (site_dir / "counts.parquet").unlink()
    report = validate_site(SCHEMA, site_dir)
    p = the_problem(report, "absent_modality")
    assert p.severity == "warning" and "'counts'" in p.message and "25%" in p.message and report.ok
    assert report.summary.modalities[1].file is None and report.summary.modalities[1].absent_share == 1.0


@pytest.mark.parametrize("written", ["G1", " g1 ", "G_1"])
def test_a_schema_feature_written_differently_is_refused_at_training_naming_both_and_the_rename(tmp_path, written):
    # read as it is, the feature would be masked for every patient: the site would train on less data than its table
    # holds, as a prediction with that table is refused (test_serve.py), not just warned about
    site_dir = make_site(tmp_path, lambda t: t.update(expr=t["expr"].rename(columns={"g1": written})))
    report = validate_site(SCHEMA, site_dir)
    p = the_problem(report, "misnamed_columns")
    assert not report.ok and (p.severity, p.file) == ("error", "expr.csv.gz")
    assert f"{written!r} -> 'g1'" in p.message
    assert f"rename them as in the schema ({written!r} -> 'g1') in expr.csv.gz" in p.fix
    assert not [q for q in report.problems if q.code in ("absent_features", "extra_columns")], report.format_report()
    assert report.summary.modalities[0].extra_features == [written]


def test_a_misnamed_feature_stops_the_site_from_training(tmp_path):
    from client.site import SiteDataError, split_site

    site_dir = make_site(tmp_path, lambda t: t.update(clinical=t["clinical"].rename(columns={"age": "Age"})))
    with pytest.raises(SiteDataError, match=r"clinical\.tsv.*'Age' -> 'age'"):
        split_site(SCHEMA, site_dir, val_fraction=0.2, min_count=5, seed=0, dp=False)
    result = run_cli(SCHEMA.save(tmp_path / "schema.json"), site_dir)
    assert result.exit_code == 1 and "'Age' -> 'age'" in result.output, result.output


def test_a_column_only_like_a_schema_feature_stays_a_warning(tmp_path):
    # another name (or other digits: hsa-mir-3651 is not hsa-mir-365-1) may be another measurement: the site is
    # told, and the feature is masked as one it does not measure
    site_dir = make_site(tmp_path, lambda t: t.update(expr=t["expr"].rename(columns={"g1": "g1_old"})))
    report = validate_site(SCHEMA, site_dir)
    assert report.ok, report.format_report()
    assert "'g1_old'" in the_problem(report, "extra_columns").message
    assert "'g1'" in the_problem(report, "absent_features").message


def test_every_problem_of_a_site_is_reported_at_once(tmp_path):
    def many(t):
        set_cell(t["labels"], 0, "subtype", "Z")
        set_cell(t["expr"], 1, "g0", "n/a?")
        set_cell(t["clinical"], 2, "stage", "IV")
        t["counts"]["c2"] = np.inf

    report = validate_site(SCHEMA, make_site(tmp_path, many))
    codes = {p.code for p in report.errors}
    assert {"unknown_label", "non_numeric", "unknown_level", "infinite"} <= codes


# --- real data -----------------------------------------------------------------------------------------------


def real_site(name: str) -> tuple[FeatureSchema, Path]:
    site_dir = SHARED_DATA / name
    if not (site_dir / "labels.csv").is_file():
        pytest.skip(f"needs the consortium's shared data at {site_dir} (absent in this checkout)")
    schema_path = Path(__file__).resolve().parents[1] / "simulations" / "schemas" / f"{name}.json"
    return FeatureSchema.load(schema_path), site_dir


@pytest.mark.data
def test_the_real_pan_cancer_site_validates(tmp_path):
    schema, site_dir = real_site("tcga_pancan33")
    report = validate_site(schema, site_dir)
    assert report.ok, report.format_report()
    assert report.summary.n_patients == 7688 and report.summary.class_counts["BRCA"] == 822
    assert {p.code for p in report.warnings} <= {"extra_columns", "constant"}  # clinical.csv also holds gender


@pytest.mark.data
@pytest.mark.slow
def test_validating_the_high_dimensional_site_costs_little_more_than_reading_it():
    schema, site_dir = real_site("tcga_brca_pam50")
    start = time.perf_counter()
    for path in sorted(site_dir.iterdir()):
        read_table(path, schema.id_column)
    reading = time.perf_counter() - start
    report = validate_site(schema, site_dir)
    assert report.ok, report.format_report()
    assert [p.column for p in report.warnings] == ["gender"]  # every patient is female: constant, a warning
    assert report.seconds < 3 * reading, f"validation {report.seconds:.2f} s vs reading {reading:.2f} s"


# --- the command ---------------------------------------------------------------------------------------------

runner = CliRunner()


def run_cli(schema_path: Path, site_dir: Path, *extra: str):
    return runner.invoke(app, ["validate", "--schema", str(schema_path), "--data", str(site_dir), *extra])


def test_cli_exits_0_on_a_valid_site_and_prints_the_summary(tmp_path):
    schema_path = SCHEMA.save(tmp_path / "schema.json")
    result = run_cli(schema_path, make_site(tmp_path))
    assert result.exit_code == 0, result.output
    assert "SUMMARY" in result.output and "OK" in result.output


def test_cli_exits_1_and_prints_every_problem_on_bad_data(tmp_path):
    schema_path = SCHEMA.save(tmp_path / "schema.json")
    site_dir = make_site(tmp_path, lambda t: set_cell(t["expr"], 1, "g0", "oops"))
    (site_dir / "labels.csv").write_text("")
    result = run_cli(schema_path, site_dir)
    assert result.exit_code == 1, result.output
    assert "labels.csv" in result.output and "empty" in result.output
    assert "expr.csv.gz, column 'g0', row P001" in result.output and "'oops' (row P001)" in result.output
    assert "fix:" in result.output
    assert "Traceback" not in result.output


def test_cli_json_output_is_for_programs(tmp_path):
    schema_path = SCHEMA.save(tmp_path / "schema.json")
    result = run_cli(schema_path, make_site(tmp_path), "--json")
    payload = json.loads(result.output)
    assert payload["ok"] is True and payload["summary"]["class_counts"] == {"A": 6, "B": 6, "C": 6}


@pytest.mark.parametrize("content", [b"{not json", b"{}", b"\xff\xfe\x00binary", None])
def test_cli_exits_2_on_an_unusable_schema_file(tmp_path, content):
    schema_path = tmp_path / "schema.json"
    if content is not None:
        schema_path.write_bytes(content)
    result = run_cli(schema_path, make_site(tmp_path))
    assert result.exit_code == 2, result.output
    assert "schema.json" in result.output and "Traceback" not in result.output


# --- any corruption: a report, never an exception ------------------------------------------------------------

STEMS = list(FILE_NAMES)
TABLE_CHANGES = ["garbage_cell", "drop_column", "duplicate_column", "drop_rows", "duplicate_row", "nan_inf",
                 "duplicate_id", "header_only", "rename_id", "drop_id"]
FILE_CHANGES = ["truncate", "empty", "wrong_delimiter", "binary_junk", "gz_corrupt", "delete", "rename"]


@st.composite
def corruptions(draw):
    stem = draw(st.sampled_from(STEMS))
    kind = draw(st.sampled_from(TABLE_CHANGES + FILE_CHANGES))
    return stem, kind, draw(st.integers(0, 2**16)), draw(st.text(max_size=12))


def corrupt_table(df: pd.DataFrame, kind: str, rng: np.random.Generator, text: str) -> pd.DataFrame:
    if df.empty or (kind in ("duplicate_id", "drop_id") and "patient" not in df.columns):
        return df  # an earlier change already removed what this one would change
    if kind == "duplicate_id" and list(df.columns).count("patient") > 1:
        return df  # an earlier change duplicated the id column: the ids are already ambiguous
    row, col = int(rng.integers(len(df))), df.columns[int(rng.integers(len(df.columns)))]
    if kind == "garbage_cell":
        df = df.astype(object)
        df.loc[row, col] = text
    elif kind == "drop_column":
        df = df.drop(columns=[col])
    elif kind == "duplicate_column":
        df = pd.concat([df, df[[col]]], axis=1)
    elif kind == "drop_rows":
        df = df.iloc[: int(rng.integers(1, len(df) + 1))]
    elif kind == "duplicate_row":
        df = pd.concat([df, df.iloc[[row]]])
    elif kind == "nan_inf":
        df = df.astype(object)
        df.loc[row, col] = [np.nan, np.inf, -np.inf, "NaN", "1e400"][int(rng.integers(5))]
    elif kind == "duplicate_id":
        df = df.assign(patient=df.patient.where(df.index != row, df.patient.iloc[0]))
    elif kind == "header_only":
        df = df.iloc[:0]
    elif kind == "rename_id":
        df = df.rename(columns={"patient": text or "id"})
    elif kind == "drop_id":
        df = df.drop(columns=["patient"])
    return df.reset_index(drop=True)


def corrupt_file(path: Path, kind: str, rng: np.random.Generator, text: str) -> None:
    if not path.exists():
        return
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: int(rng.integers(len(data) + 1))])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "wrong_delimiter":
        path.write_bytes(data.replace(b",", b";").replace(b"\t", b","))
    elif kind == "binary_junk":
        at = int(rng.integers(len(data) + 1))
        path.write_bytes(data[:at] + rng.bytes(int(rng.integers(1, 64))) + data[at:])
    elif kind == "gz_corrupt":
        packed = gzip.compress(data)
        path.write_bytes(packed[: len(packed) // 2] + rng.bytes(8) + packed[len(packed) // 2 + 8:])
    elif kind == "delete":
        path.unlink()
    elif kind == "rename":
        path.rename(path.with_name(path.name.split(".")[0] + (text.replace("/", "_").replace("\x00", "") or ".xls")))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.lists(corruptions(), min_size=1, max_size=3))
def test_any_corrupted_site_gets_a_report_never_an_exception(changes):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tables = site_tables()
        for stem, kind, seed, text in changes:
            if kind in TABLE_CHANGES:
                tables[stem] = corrupt_table(tables[stem], kind, np.random.default_rng(seed), text)
        site_dir = write_site(tmp / "site", tables)
        for stem, kind, seed, text in changes:
            if kind in FILE_CHANGES:
                try:
                    corrupt_file(site_dir / FILE_NAMES[stem], kind, np.random.default_rng(seed), text)
                except OSError:
                    pass  # a name the file system refuses: nothing to validate then

        report = validate_site(SCHEMA, site_dir)
        assert isinstance(report, ValidationReport)
        assert not [p for p in report.problems if p.code == "internal"], report.format_report()
        assert all(p.message and p.fix for p in report.problems)
        report.format_report(), report.to_json()
        if report.ok:  # what validation passes, training reads
            site = read_site(SCHEMA, site_dir)
            raw_matrix(SCHEMA, site)
            encode_labels(SCHEMA, site.labels)

        result = run_cli(SCHEMA.save(tmp / "schema.json"), site_dir)
        assert result.exit_code == (0 if report.ok else 1), result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_rare_feature_constant_in_a_small_class_is_not_leakage(tmp_path):
    """A mutation carried by all 3 patients of a site's smallest class and by no one else (CDH1 in a site's few
    breast cancers) is chance or biology, not a recoding of the label: two values each held by fewer than
    min-count patients prove nothing (a site of the main job's seed-2 partition was refused for this)."""
    def rare(t):
        t["clinical"]["smoker"] = t["labels"].patient.isin(t["labels"].patient[t["labels"].subtype == "A"][:3]).astype(int)
        keep = (t["labels"].subtype != "A") | t["clinical"]["smoker"].astype(bool).to_numpy()
        for name in list(t):
            t[name] = t[name][t[name].patient.isin(t["labels"].patient[keep])].reset_index(drop=True)

    report = validate_site(SCHEMA, make_site(tmp_path, rare))
    assert not [p for p in report.problems if p.code == "label_leak"], report.format_report()


def test_class_names_that_look_like_numbers_are_read_as_written(tmp_path):
    """Classes "01" / "02" were read back as the numbers 1 / 2 (and "0" / "1" beside an empty cell as "0.0" / "1.0"),
    so validation called labels the file literally holds "not a class of the schema"."""
    from shared_models.site_data import read_site

    schema = SCHEMA.model_copy(update={"classes": ["01", "02", "03"]})
    site_dir = make_site(tmp_path, lambda t: t["labels"].__setitem__(
        "subtype", t["labels"].subtype.map({"A": "01", "B": "02", "C": "03"})))
    report = validate_site(schema, site_dir)
    assert report.ok and not [p for p in report.problems if p.code == "unknown_label"], report.format_report()
    assert set(read_site(schema, site_dir).labels) == {"01", "02", "03"}  # what training encodes


def test_a_table_in_latin_1_is_named_as_not_utf8_with_the_fix(tmp_path):
    """An id written in Latin-1 ('José' as one byte) was refused with 'invalid UTF8 data ... check that the file is
    complete', naming neither the encoding nor the fix."""
    from shared_models.site_data import TableError, read_table

    path = tmp_path / "labels.csv"
    path.write_bytes("patient,cancer_type\nJos\xe9,BRCA\nP2,LUAD\n".encode("latin-1"))
    with pytest.raises(TableError, match="not UTF-8 text.*CSV UTF-8"):
        read_table(path, "patient")


def test_cli_given_a_site_json_or_a_manifest_as_the_schema_says_which_file_it_is_and_where_the_schema_is(tmp_path):
    """`oncofed validate --schema sites/C6/site.json` listed 21 problems, each "fix: remove it": a file of OncoFed's that
    is no schema is named as what it is (by its "format"), with the schema to pass instead."""
    from privacy.pki import fingerprint, init_consortium, init_site

    init_consortium(tmp_path / "op", "t", "fl.example.org:8443", internal_port=9092)
    site = init_site(tmp_path / "s", "S", tmp_path / "op" / "public", "",
                     ca_fingerprint=fingerprint(tmp_path / "op" / "ca/ca.crt"))
    data = make_site(tmp_path)
    result = run_cli(tmp_path / "s" / "site.json", data)
    assert result.exit_code == 2, result.output
    assert "not a schema but a site's settings (site.json)" in result.output
    assert f"its `schema`: {site.schema_path}" in result.output and "remove it" not in result.output
    result = run_cli(tmp_path / "op" / "consortium.json", data)
    assert result.exit_code == 2 and "not a schema but a consortium's manifest (consortium.json)" in result.output
    assert f"the schema beside it is {tmp_path / 'op' / 'public' / 'schema.json'}" in result.output
