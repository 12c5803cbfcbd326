"""Site-data validation: read a site directory the way training will, and report every problem at once.

A hospital's bioinformatician runs `oncofed validate`; the federated client runs `validate_site`
before its first round. Errors block training; warnings are reported and training goes on. Every
problem names the file, the column or the rows, and the fix.

Tables are read with `site_data.read_table` and cells converted with `numeric_column` /
`categorical_codes`, the functions training uses, so "valid" means "training reads it as intended".
Per-column checks run on whole matrices (one pass over all cells), so a site with 12,000 features is
checked in about the time it takes to read it.

The summary may leave the site. Counts of patients from 1 to `min_count - 1` are therefore never
stored in it (None, shown "<5"); when exactly one class is that small, the smallest other class is
hidden too, otherwise its count would follow from the total. Problems name patient ids and cell
values: they are for the site's own staff and stay at the site.
"""

from __future__ import annotations

import difflib
import gzip
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from shared_models.schema import ColumnType, FeatureSchema, Modality, Transform
from shared_models.site_data import (
    LABELS_STEM,
    MISSING_TOKENS,
    TABLE_SUFFIXES,
    TableError,
    categorical_codes,
    find_table,
    numeric_column,
    read_table,
    table_format,
)

Severity = Literal["error", "warning"]

MAX_EXAMPLES = 3  # example cells shown per problem
MAX_NAMES = 8  # ids or column names listed in one message
MAX_PER_CHECK = 10  # problems of one kind in one file; more are folded into one
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Problem:
    """One finding. `code` is a stable identifier for programs (e.g. "duplicate_ids")."""

    severity: Severity
    code: str
    message: str
    fix: str
    file: str | None = None  # file name inside the site directory; None = the directory itself
    column: str | None = None
    rows: tuple[str, ...] = ()  # patient ids (or "line N" when a row has no usable id)

    @property
    def where(self) -> str:
        parts = [self.file or "site directory"]
        if self.column is not None:
            parts.append(f"column {self.column!r}")
        if self.rows:
            parts.append(("rows " if len(self.rows) > 1 else "row ") + _names(self.rows, quote=False))
        return ", ".join(parts)

    def __str__(self) -> str:
        return f"{self.where}: {self.message}\n    fix: {self.fix}"


@dataclass(frozen=True)
class ModalitySummary:
    name: str
    file: str | None  # None: the site has no (readable) table for this modality
    n_features: int  # in the schema
    absent_features: list[str]  # schema features the site lacks: masked at training
    extra_features: list[str]  # columns the schema does not know: ignored
    n_patients: int | None  # labelled patients with a row in the table; None = suppressed (< min_count)
    coverage: float | None  # their share of the labelled patients; None when suppressed or unknown
    missing_rate: float | None  # share of missing cells over those patients x the present features
    mostly_missing: int = 0  # present features missing for more than half of those patients

    @property
    def absent_share(self) -> float:
        return len(self.absent_features) / self.n_features


@dataclass(frozen=True)
class SiteSummary:
    """What a site may report about itself: no patient count from 1 to min_count - 1 appears here."""

    site_dir: str
    schema_name: str
    schema_hash: str
    min_count: int
    n_patients: int | None  # unique patients with a label in the schema's classes; None = suppressed
    class_counts: dict[str, int | None]  # every schema class, schema order; None = suppressed
    modalities: list[ModalitySummary]
    hidden_classes: list[str] = field(default_factory=list)  # >= min_count, hidden so a small one stays hidden

    @property
    def n_schema_features(self) -> int:
        return sum(m.n_features for m in self.modalities)

    @property
    def absent_feature_share(self) -> float:
        return sum(len(m.absent_features) for m in self.modalities) / max(self.n_schema_features, 1)

    def count_text(self, n: int | None) -> str:
        return f"<{self.min_count}" if n is None else f"{n:,}"

    def format(self) -> str:
        """The summary as a table for people."""
        lines = ["SUMMARY", f"  patients with a valid label: {self.count_text(self.n_patients)}"]
        width = max(len(c) for c in self.class_counts)
        for c, n in self.class_counts.items():
            lines.append(f"    {c:<{width}}  {'hidden' if c in self.hidden_classes else self.count_text(n):>7}")
        if any(n is None for n in self.class_counts.values()):
            lines.append(f"    (<{self.min_count}: counts that small are not reported outside the site"
                         + ("; 'hidden': not shown, so that the small count cannot be derived from the total)"
                            if self.hidden_classes else ")"))
        lines.append(f"  {'modality':<14} {'file':<22} {'patients':>9} {'coverage':>9} {'missing':>8} "
                     f"{'absent features':>20} {'extra cols':>10}")
        for m in self.modalities:
            cov = "-" if m.coverage is None else f"{m.coverage:.0%}"
            miss = "-" if m.missing_rate is None else f"{m.missing_rate:.1%}"
            absent = f"{len(m.absent_features):,}/{m.n_features:,} ({m.absent_share:.0%})"
            lines.append(f"  {m.name:<14} {m.file or '(none)':<22} {self.count_text(m.n_patients):>9} {cov:>9} "
                         f"{miss:>8} {absent:>20} {len(m.extra_features):>10,}")
        lines.append(f"  schema features absent at this site: {_share(self.absent_feature_share)} of "
                     f"{self.n_schema_features:,} (masked at training)")
        return "\n".join(lines)


@dataclass
class ValidationReport:
    problems: list[Problem]
    summary: SiteSummary
    seconds: float

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when nothing blocks training (warnings allowed)."""
        return not self.errors

    def to_dict(self) -> dict:
        summary = asdict(self.summary)
        for m, ms in zip(summary["modalities"], self.summary.modalities):
            m["absent_share"] = ms.absent_share
        summary["absent_feature_share"] = self.summary.absent_feature_share
        return {"ok": self.ok, "seconds": round(self.seconds, 3), "summary": summary,
                "errors": [asdict(p) for p in self.errors], "warnings": [asdict(p) for p in self.warnings]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def format_report(self) -> str:
        """Human-readable: all problems if training is blocked, else warnings and the summary."""
        s = self.summary
        lines = [f"Site {s.site_dir}  (schema {s.schema_name!r}, hash {s.schema_hash[:12]})"]
        if not self.ok:
            lines.append(f"{_plural(len(self.errors), 'error')} block training; "
                         f"{_plural(len(self.warnings), 'warning')}.")
        for title, group in (("ERRORS", self.errors), ("WARNINGS", self.warnings)):
            if group:
                lines += ["", f"{title} ({len(group)})"]
                lines += [f"{i:>3}. {p}" for i, p in enumerate(group, 1)]
        if self.ok:
            lines += ["", self.summary.format()]
        verdict = ("OK" + (f" with {_plural(len(self.warnings), 'warning')}" if self.warnings else "")
                   if self.ok else "NOT READY: fix the errors above and run the validation again")
        lines += ["", f"{verdict}  (checked in {self.seconds:.1f} s)"]
        return "\n".join(lines)



def validate_site(schema: FeatureSchema, site_dir: str | Path, min_count: int = 5) -> ValidationReport:
    """Check every file of a site directory against the schema. Never raises for bad input."""
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    start = time.perf_counter()
    check = _SiteCheck(schema, Path(site_dir), min_count)
    summary = check.run()
    return ValidationReport(problems=check.problems, summary=summary, seconds=time.perf_counter() - start)


@dataclass
class PredictionTables:
    """Patients to score, checked with the same rules as a training site's tables."""

    ids: list[str]  # every patient with a row in at least one table, first-seen order
    raw: np.ndarray  # (patients, n_inputs) float32 in schema layout, transforms applied; NaN = missing
    problems: list[Problem]  # errors refuse the request; warnings go with the answer


def check_prediction_tables(schema: FeatureSchema, frames: dict[str, tuple[pd.DataFrame, str]]) -> PredictionTables:
    """The input contract of predictions, for uploaded tables and JSON payloads alike.

    `frames`: modality -> (table indexed by patient id, the name its problems are reported under:
    the file name, or e.g. "JSON modality 'mirna'"). Cells are read by the checks training's
    validation runs (`_check_frame`): duplicate ids, non-numbers, infinities and values beyond float32,
    non-0/1 binaries, unknown levels, log1p's domain, no schema feature; and a table mostly of columns
    that are not its modality's features is refused. Never raises for bad input."""
    check = _SiteCheck(schema, Path("."), min_count=1, for_prediction=True)
    layout = schema.layout()
    checked: dict[str, tuple[Modality, _Checked]] = {}
    seen: dict[str, None] = {}
    for m in schema.modalities:
        if m.name not in frames:
            continue
        df, file = frames[m.name]
        result = check._guarded(Path(file), lambda p, m=m, df=df: check._check_frame(m, df, p))
        if result is not None:
            checked[m.name] = (m, result)
            seen.update(dict.fromkeys(str(i) for i in result.ids))
    ids = list(seen)
    raw = np.full((len(ids), layout.n_inputs), np.nan, dtype=np.float32)
    index = pd.Index(ids)
    for m, result in checked.values():
        rows = index.get_indexer(result.ids)
        values = result.values.copy()
        values[np.abs(values) > FLOAT32_MAX] = np.nan  # refused above; never cast to float32's infinity
        if m.transform is Transform.log1p:  # as training's raw_matrix: numeric columns only, binary 0/1 stays
            numeric = [j for j, f in enumerate(result.present) if m.column_type(f) is ColumnType.numeric]
            with np.errstate(invalid="ignore", divide="ignore"):
                values[:, numeric] = np.log1p(np.where(values[:, numeric] > -1, values[:, numeric], np.nan))
        pos = {f: i for i, f in enumerate(m.features)}
        cols = [layout.slices[m.name].start + pos[f] for f in result.present]
        raw[np.ix_(rows, cols)] = values
    return PredictionTables(ids, raw, check.problems)


# --- the checks ------------------------------------------------------------------------------------------


@dataclass
class _Labels:
    all_ids: pd.Index  # every id in the labels table
    ids: pd.Index  # unique ids with a label in the schema's classes
    codes: np.ndarray  # class index per id in `ids`


@dataclass
class _Checked:
    """One modality table after the checks: its cleaned matrix, for the summary."""

    ids: pd.Index
    present: list[str]
    extra: list[str]
    values: np.ndarray  # (rows, present) float64, NaN = missing or unusable


class _SiteCheck:
    def __init__(self, schema: FeatureSchema, site_dir: Path, min_count: int, for_prediction: bool = False):
        self.schema, self.site_dir, self.min_count = schema, site_dir, min_count
        self.for_prediction = for_prediction  # a table mostly of other columns is refused, not just noted
        self.problems: list[Problem] = []
        self.labels: _Labels | None = None
        self.labels_file = LABELS_STEM + ".csv"

    def add(self, severity: Severity, code: str, message: str, fix: str, file: str | None = None,
            column: str | None = None, rows=()) -> None:
        self.problems.append(Problem(severity, code, message, fix, file, column, tuple(str(r) for r in rows)))

    def add_folded(self, found: list[Problem], what: str) -> None:
        """Keep the first MAX_PER_CHECK problems of one kind in one file; fold the rest into one."""
        self.problems += found[:MAX_PER_CHECK]
        rest = found[MAX_PER_CHECK:]
        if rest:
            first = rest[0]
            self.add(first.severity, first.code, f"{_plural(len(rest), 'more column')} {what}: "
                     f"{_names([p.column for p in rest])}", first.fix, first.file)

    def run(self) -> SiteSummary:
        schema = self.schema
        empty = self._summary([ModalitySummary(m.name, None, m.n_features, list(m.features), [], 0, None, None)
                               for m in schema.modalities], None)
        if not self.site_dir.is_dir():
            what = "is a file, not a directory" if self.site_dir.exists() else "does not exist"
            self.add("error", "no_site_dir", f"{self.site_dir} {what}",
                     "pass the site directory that holds labels.csv and one table per modality")
            return empty
        try:
            paths = self._inventory()
        except OSError as e:
            self.add("error", "unreadable", f"cannot list the directory ({e.strerror})",
                     "check the path and that you may read it")
            return empty
        if LABELS_STEM in paths:
            self._guarded(paths[LABELS_STEM], self._check_labels)
        else:
            self.add("error", "no_labels", "no labels table",
                     f"add labels.csv (or .tsv, .txt, .parquet, optionally gzipped) with the columns "
                     f"{schema.id_column!r} and {schema.label_column!r}")
        summaries, checked = [], {}
        for m in schema.modalities:
            path = paths.get(m.name)
            result = self._guarded(path, lambda p, m=m: self._check_modality(m, p)) if path else None
            if result is not None:
                checked[m.name] = result
            summaries.append(self._modality_summary(m, path, result))
        if not any(p for name, p in paths.items() if name != LABELS_STEM):
            self.add("error", "no_modality", "the site has no table for any modality of the schema: nothing to "
                     "train on", f"add at least one of {_names([m + '.csv' for m in schema.modality_names])}")
        elif self.labels is not None and checked:
            covered = pd.Index([]).append([c.ids for c in checked.values()])
            orphans = self.labels.ids.difference(covered)
            if len(orphans):
                self.add("warning", "no_data", f"{_plural(len(orphans), 'labelled patient')} with no row in any "
                         "modality table: unusable for training", "add their data, or ignore this if they have "
                         "none", self.labels_file, rows=orphans[:MAX_NAMES])
        return self._summary(summaries, self.labels)

    def _guarded(self, path: Path, check):
        # The checks must never raise on odd input; anything unexpected becomes an error that names the file.
        try:
            return check(path)
        except Exception as e:  # noqa: BLE001 - reported, not swallowed
            self.add("error", "internal", f"could not be checked ({type(e).__name__}: {_first_line(e)})",
                     "this file has a shape the validator does not expect: re-export it as a plain table, and "
                     "report the case to the OncoFed maintainers", path.name)
            return None

    # --- files in the directory ------------------------------------------------------------------------
    def _inventory(self) -> dict[str, Path]:
        """The table of each stem as training will pick it; every file that is not one is reported."""
        stems = [LABELS_STEM] + self.schema.modality_names
        chosen = {s: find_table(self.site_dir, s)[0] for s in stems if find_table(self.site_dir, s)}
        for s in stems:
            if len(find_table(self.site_dir, s)) > 1:
                names = [p.name for p in find_table(self.site_dir, s)]
                self.add("error", "ambiguous_table", f"{len(names)} tables for {_what(s)}: {', '.join(names)}; "
                         f"training would read {chosen[s].name} and ignore the others",
                         "keep exactly one of them in the site directory", names[0])
        expected = {(s + suf).lower(): s + suf for s in stems for suf in TABLE_SUFFIXES}
        for path in sorted(self.site_dir.iterdir()):
            name = path.name
            if name.startswith(".") or not path.is_file() or path in chosen.values():
                continue
            if name in expected.values():
                continue  # an extra table of an ambiguous stem: reported above
            stem = next((s for s in sorted(stems, key=len, reverse=True)
                         if name.lower().startswith(s.lower() + ".")), None)
            canonical = expected.get(name.lower())
            taken = stem is not None and stem in chosen
            severity: Severity = "warning" if taken else "error"
            ignored = f"; it is ignored (training reads {chosen[stem].name})" if taken else ""
            if canonical is not None:
                self.add(severity, "misnamed_table", f"file names are case-sensitive: this is not read as "
                         f"{canonical}{ignored}", f"rename it to {canonical}" if not taken else
                         "delete it or move it out of the site directory", name)
            elif stem is not None:
                suffix = name[len(stem):]
                hint = " (in Excel: File > Save As > CSV UTF-8)" if suffix.lower() in (".xlsx", ".xls") else ""
                self.add(severity, "unknown_format", f"unknown table format {suffix!r} for {_what(stem)}{ignored}",
                         f"export it as {stem}.csv (comma-separated), {stem}.tsv (tab-separated) or "
                         f"{stem}.parquet, optionally gzipped (.csv.gz){hint}" if not taken else
                         "delete it or move it out of the site directory", name)
            else:
                close = difflib.get_close_matches(name.split(".")[0].lower(), [s.lower() for s in stems], n=1,
                                                  cutoff=0.6)
                fix = (f"if it holds {_what(stems[[s.lower() for s in stems].index(close[0])])}, rename it "
                       f"(e.g. to {close[0]}.csv)" if close else
                       "nothing, if it is not site data; tables must be named after the schema's modalities: "
                       + _names([s + ".csv" for s in stems]))
                self.add("warning", "unrelated_file", "not a table of this schema; it is ignored", fix, name)
        return chosen

    # --- reading --------------------------------------------------------------------------------------
    def _read(self, path: Path) -> pd.DataFrame | None:
        try:
            size = path.stat().st_size
        except OSError as e:
            self.add("error", "unreadable", f"cannot be opened ({e.strerror})", "check that you may read it",
                     path.name)
            return None
        if size == 0:
            self.add("error", "empty_file", "the file is empty (0 bytes)",
                     "export the table again (the export or the copy was interrupted)", path.name)
            return None
        try:
            return read_table(path, self.schema.id_column)
        except TableError as e:
            self._table_error(path, str(e))
        except Exception as e:  # noqa: BLE001 - read_table lets a few malformed inputs through as other errors
            self.add("error", "unreadable", f"cannot be read ({type(e).__name__}: {_first_line(e)})",
                     "export the table again as plain csv, tsv or parquet", path.name)
        return None

    def _table_error(self, path: Path, text: str) -> None:
        text = text.removeprefix(f"{path}: ")
        message, _, fix = text.rpartition("; ")
        if not message:
            message, fix = text, "export the table again"
        idc = self.schema.id_column
        if "no id column" in message:
            code, fix = "no_id_column", self._id_hint(path) or fix
        elif "no rows" in message:
            code = "empty_table"
        elif "Empty CSV file" in message:
            code, message, fix = "empty_file", "the file holds no table (empty after decompression)", \
                "export the table again"
        elif "duplicate column names" in message:
            code = "duplicate_columns"
        elif f"have an empty {idc!r}" in message:
            code = "empty_id"
        else:
            code = "unreadable"
            fix = _content_hint(path) or fix
        self.add("error", code, message, fix, path.name, column=idc if code in ("no_id_column", "empty_id") else None)

    def _id_hint(self, path: Path) -> str | None:
        idc = self.schema.id_column
        try:
            fmt = table_format(path)
            if fmt == "parquet":
                import pyarrow.parquet as pq

                meta = pq.read_schema(path).pandas_metadata or {}
                if idc in [c for c in meta.get("index_columns", []) if isinstance(c, str)]:
                    return (f"{idc!r} was saved as the pandas index: write the table with "
                            "df.reset_index().to_parquet(...)")
                return None
            opener = gzip.open if path.name.lower().endswith(".gz") else open
            with opener(path, "rb") as fh:
                header = fh.read(1 << 20).split(b"\n")[0].decode("utf-8", "replace").strip("\r\ufeff")
        except Exception:  # noqa: BLE001 - a hint is optional
            return None
        sep = "," if fmt == "csv" else "\t"
        if sep not in header:
            for other, name in ((",", "commas"), ("\t", "tabs"), (";", "semicolons"), ("|", "'|'")):
                if other != sep and other in header:
                    proper = {",": f"{path.name.split('.')[0]}.csv", "\t": f"{path.name.split('.')[0]}.tsv"}
                    rename = f", or rename the file to {proper[other]}" if other in proper else ""
                    return (f"the header is separated by {name}, but a {fmt} file must be separated by "
                            f"{'commas' if sep == ',' else 'tabs'}: export it again with that separator{rename}")
        cells = [c.strip().strip('"') for c in header.split(sep)]
        near = [c for c in cells if c.lower() == idc.lower() or _norm(c) == _norm(idc)]
        if near:
            return f"rename the column {near[0]!r} to {idc!r} (names are case-sensitive)"
        if cells and cells[0] in ("", "Unnamed: 0", "index", "X", "rownames"):
            return (f"the first column has no usable name (a saved row index?): name it {idc!r}, or export "
                    "without the index (pandas: index=False)")
        return None

    def _unique_rows(self, df: pd.DataFrame, path: Path, is_labels: bool) -> pd.DataFrame:
        """Report empty and duplicate ids; return the rows training would use (first of each id)."""
        ids = df.index
        empty = np.asarray(ids == "")
        if empty.any():
            where = [_line(path, i) for i in np.flatnonzero(empty)]
            self.add("error", "empty_id", f"{_plural(int(empty.sum()), 'row')} with an empty "
                     f"{self.schema.id_column!r}",
                     "give every row its patient id, or delete the rows", path.name, self.schema.id_column,
                     where[:MAX_NAMES])
        dup = np.asarray(ids.duplicated(keep=False)) & ~empty
        if dup.any():
            counts = ids[dup].value_counts(sort=False)
            listing = _names([f"{i} (x{n})" for i, n in counts.items()], quote=False)
            what = "with one label each" if is_labels else "(merge replicates or aliquots before export)"
            self.add("error", "duplicate_ids", f"{_plural(len(counts), 'patient id')} more than once: {listing}",
                     f"keep one row per patient {what}; " + ("which row is the patient cannot be guessed, so "
                     "nothing is scored" if self.for_prediction else "training would silently use the first row"),
                     path.name, self.schema.id_column, list(counts.index[:MAX_NAMES]))
        keep = ~empty & ~np.asarray(ids.duplicated(keep="first"))
        return df[keep]

    # --- labels ---------------------------------------------------------------------------------------
    def _check_labels(self, path: Path) -> None:
        self.labels_file = path.name
        df = self._read(path)
        if df is None:
            return
        df = self._unique_rows(df, path, is_labels=True)
        col, classes = self.schema.label_column, self.schema.classes
        if col not in df.columns:
            close = _closest(col, list(df.columns))
            self.add("error", "no_label_column", f"no label column {col!r} (columns: {_names(list(df.columns))})",
                     f"rename {close!r} to {col!r}" if close else f"add the column {col!r} (the schema's "
                     "label_column) with each patient's class", path.name, col)
            self.labels = _Labels(df.index, pd.Index([]), np.zeros(0, np.int64))
            return
        raw = df[col]
        if raw.dtype == object:
            block, undecodable = _decode_bytes(raw.to_numpy(dtype=object)[:, None])
            if undecodable:
                self.add("error", "not_utf8", "labels that are not valid UTF-8 text", "save the file with UTF-8 "
                         "encoding", path.name, col)
            raw = pd.Series(block[:, 0], index=raw.index, dtype=object)
        labels = raw.astype("string").str.strip()  # as read_site reads them
        known = labels.isin(classes).fillna(False).to_numpy(bool)
        missing = (labels.isna() | labels.isin(MISSING_TOKENS)).fillna(True).to_numpy(bool) & ~known
        if missing.any():
            ids = df.index[missing]
            self.add("error", "missing_label", f"{_plural(len(ids), 'patient')} without a label",
                     f"fill in their class ({', '.join(classes)}) or delete their rows", path.name, col,
                     ids[:MAX_NAMES])
        outside = ~known & ~missing
        found = []
        for value, ids in df.index[outside].groupby(labels[outside].to_numpy()).items():
            close = _closest(str(value), classes)
            hint = f"did you mean {close!r}? " if close else ""
            found.append(Problem("error", "unknown_label", f"label {value!r} ({_plural(len(ids), 'patient')}) is "
                                 "not a class of the schema", f"{hint}use one of the schema's classes "
                                 f"({', '.join(classes)}) or delete these patients' rows", path.name, col,
                                 tuple(ids[:MAX_NAMES])))
        self.problems += found[:MAX_PER_CHECK]
        if len(found) > MAX_PER_CHECK:
            self.add("error", "unknown_label", f"{_plural(len(found) - MAX_PER_CHECK, 'more label')} outside the "
                     "schema's classes", found[0].fix, path.name, col)
        lookup = {c: i for i, c in enumerate(classes)}
        valid = labels[known]
        self.labels = _Labels(df.index, valid.index, valid.map(lookup).to_numpy(np.int64))
        counts = np.bincount(self.labels.codes, minlength=len(classes))
        small = [c for c, n in zip(classes, counts) if 0 < n < self.min_count]
        for c in small:
            # A warning, not an error: a hospital's few patients of a rare cancer still train (DP-SGD
            # protects each record); what the minimum forbids is reporting their count. No count and no
            # ids appear here, and the summary suppresses them.
            self.add("warning", "small_class", f"class {c!r} has fewer than {self.min_count} patients at this site; "
                     "they train, but their count is never reported outside the site",
                     "nothing to do; to drop them instead, remove their rows from "
                     f"{path.name}", path.name, col)

    # --- modality tables ------------------------------------------------------------------------------
    def _check_modality(self, m: Modality, path: Path) -> _Checked | None:
        df = self._read(path)
        if df is None:
            return None
        return self._check_frame(m, df, path)

    def _check_frame(self, m: Modality, df: pd.DataFrame, path: Path) -> _Checked | None:
        df = self._unique_rows(df, path, is_labels=False)
        file = path.name
        columns = list(df.columns)
        present = [f for f in m.features if f in df.columns]
        features = set(m.features)
        extra = [c for c in columns if c not in features]
        absent = [f for f in m.features if f not in df.columns]
        renames = _rename_hints(absent, extra)
        if not present:
            hint = f"rename the columns as in the schema, e.g. {renames}" if renames else \
                f"name the columns as the schema does (e.g. {_names(m.features[:3])})"
            found = f"columns start {_names(columns[:3])}" if columns else "the table has no column but the ids"
            self.add("error", "no_schema_features", f"none of the schema's {m.n_features:,} {m.name!r} features is a "
                     f"column here ({found})", hint, file)
            return None
        if absent and not self.for_prediction:  # a prediction reports coverage per patient instead
            rename = f"; or rename: {renames}" if renames else ""
            self.add("warning", "absent_features", f"absent: {len(absent):,} of the schema's {m.n_features:,} "
                     f"{m.name!r} features ({len(absent) / m.n_features:.0%}): {_names(absent)}; they are masked at "
                     "training", f"nothing, if the site does not measure them{rename}", file)
        if self.for_prediction and len(extra) > len(present):
            # a table of another kind saved under this modality's name: scoring it would be a guess
            self.add("error", "foreign_columns", f"{len(extra):,} of the {len(columns):,} columns are not "
                     f"{m.name!r} features ({_names(extra)}); only {_plural(len(present), 'column')} "
                     f"({_names(present)}) belong to the modality", f"check that this is the {m.name} table; "
                     f"its columns must be the schema's {m.name!r} features (e.g. {_names(m.features[:3])})", file)
            return None
        if extra:
            fix = "nothing, unless one of them should be a schema feature (then check its spelling)"
            if renames:
                fix += f": {renames}"
            if any(c == "" or c.startswith("Unnamed:") for c in extra):
                fix += "; an unnamed column is usually a saved row index: export without it (pandas: index=False)"
            self.add("warning", "extra_columns", f"{_plural(len(extra), 'column')} not in the schema, ignored: "
                     f"{_names(extra)}", fix, file)
        if self.labels is not None and len(self.labels.all_ids):
            self._check_overlap(df.index, file)
        values, unusable, texts = self._check_cells(m, df[present], file)
        if self.for_prediction:  # empty or constant columns are normal in a few patients
            return _Checked(df.index, present, extra, values)
        self._check_columns(m, present, values, unusable, file)
        if self.labels is not None and len(self.labels.ids):
            self._check_leakage(m, present, values, texts, df.index, file)
        return _Checked(df.index, present, extra, values)

    def _check_overlap(self, ids: pd.Index, file: str) -> None:
        common = ids.intersection(self.labels.all_ids)
        if len(common) == 0:
            self.add("error", "no_common_patients", f"no patient id in common with {self.labels_file} "
                     f"(ids here look like {_names(list(ids[:2]))}, in {self.labels_file} like "
                     f"{_names(list(self.labels.all_ids[:2]))})", _id_mismatch_hint(ids, self.labels.all_ids)
                     or "use the same patient ids in every table", file, self.schema.id_column)
        elif len(common) < len(ids):
            stray = ids.difference(self.labels.all_ids)
            self.add("warning", "unlabelled_rows", f"{_plural(len(stray), 'row')} of patients not in "
                     f"{self.labels_file}, ignored", "nothing, unless they should have labels", file,
                     self.schema.id_column, stray[:MAX_NAMES])

    def _check_cells(self, m: Modality, df: pd.DataFrame, file: str):
        """Convert every cell as training does; report non-numbers, infinities, values the type forbids.

        Returns the (rows, features) matrix with NaN for missing or unusable cells, a mask of columns
        whose cells could not be read (already reported), and their text for the leakage check.
        """
        n, cols = len(df), list(df.columns)
        values = np.full((n, len(cols)), np.nan)
        unusable = np.zeros(len(cols), bool)
        texts: dict[int, pd.Series] = {}
        ids = df.index
        kind = {c: m.column_type(c) for c in cols}
        num = [j for j, c in enumerate(cols) if kind[c] is not ColumnType.categorical]
        is_num_dtype = np.array([pd.api.types.is_numeric_dtype(t) for t in df.dtypes])
        direct = [j for j in num if is_num_dtype[j]]
        if direct:
            values[:, direct] = df.iloc[:, direct].to_numpy(dtype=np.float64, na_value=np.nan)
        text_cols = [j for j in num if not is_num_dtype[j]]
        bad_found, undecodable = [], []
        if text_cols:
            block = df.iloc[:, text_cols].to_numpy(dtype=object)
            block, undecodable_cols = _decode_bytes(block)
            for k in undecodable_cols:
                undecodable.append(cols[text_cols[k]])
            # One vectorised pass over every text cell, with the rules training uses.
            nums, bad = numeric_column(pd.Series(block.ravel(order="F"), dtype=object))
            values[:, text_cols] = nums.reshape((n, len(text_cols)), order="F")
            if len(bad):
                pos = bad.index.to_numpy()
                col_k, row = pos // max(n, 1), pos % max(n, 1)
                cells = bad.to_numpy(dtype=object)
                for k in np.unique(col_k):
                    j = text_cols[k]
                    sel = col_k == k
                    unusable[j] = True
                    texts[j] = pd.Series(block[:, k])
                    examples = list(zip(cells[sel][:MAX_EXAMPLES], ids[row[sel][:MAX_EXAMPLES]]))
                    bad_found.append(Problem(
                        "error", "non_numeric", f"{_plural(int(sel.sum()), 'cell')} not a number: "
                        f"{_examples(examples)}", _number_fix(examples), file, cols[j],
                        tuple(ids[row[sel][:MAX_NAMES]])))
        for c in undecodable:
            self.add("error", "not_utf8", "cells are not valid UTF-8 text", "save the file with UTF-8 encoding",
                     file, c)
        self.add_folded(bad_found, "with cells that are not numbers")

        for j, c in enumerate(cols):
            if kind[c] is ColumnType.categorical:
                col = df[c]
                if col.dtype == object:
                    block, bad_cols = _decode_bytes(col.to_numpy(dtype=object)[:, None])
                    col = pd.Series(block[:, 0], index=col.index, dtype=object)
                    if bad_cols:
                        self.add("error", "not_utf8", "cells are not valid UTF-8 text",
                                 "save the file with UTF-8 encoding", file, c)
                codes, bad = categorical_codes(col, m.levels[c])
                values[:, j] = codes
                if len(bad):
                    unusable[j] = True
                    texts[j] = col.reset_index(drop=True)
                    levels = m.levels[c]
                    examples = list(zip(bad.to_numpy(dtype=object)[:MAX_EXAMPLES], bad.index[:MAX_EXAMPLES]))
                    near = {v: _closest(str(v), levels) for v in pd.unique(bad.to_numpy(dtype=object))[:MAX_EXAMPLES]}
                    means = ", ".join(f"{n!r} for {v!r}" for v, n in near.items() if n)
                    self.add("error", "unknown_level", f"{_plural(len(bad), 'cell')} not a level of the schema: "
                             f"{_examples(examples)}", (f"did you mean {means}? " if means else "") +
                             f"use one of {_names(levels, limit=12)}, leave unknown cells empty, or ask the "
                             "consortium to add the level to the schema", file, c, tuple(bad.index[:MAX_NAMES]))

        finite_problems = {"infinite": [], "not_binary": [], "log1p_domain": []}
        with np.errstate(invalid="ignore"):
            inf = np.abs(values) > FLOAT32_MAX  # the model reads float32: 1e300 would become infinite
            binary = np.array([kind[c] is ColumnType.binary for c in cols])
            not01 = np.isfinite(values) & (values != 0) & (values != 1) & binary
            counts_t = np.array([kind[c] is ColumnType.numeric for c in cols]) & (m.transform is Transform.log1p)
            low = np.isfinite(values) & (values <= -1) & counts_t
        for mask, code in ((inf, "infinite"), (not01, "not_binary"), (low, "log1p_domain")):
            for j in np.flatnonzero(mask.any(axis=0)):
                rows = np.flatnonzero(mask[:, j])
                examples = [(values[r, j], ids[r]) for r in rows[:MAX_EXAMPLES]]
                message, fix = {
                    "infinite": (f"{_plural(len(rows), 'cell')} infinite or beyond float32 (+-3.4e38): "
                                 f"{_examples(examples)}",
                                 "infinities come from log(0) or a division by zero upstream: write the finite "
                                 "value, or leave the cell empty (missing)"),
                    "not_binary": (f"{_plural(len(rows), 'cell')} neither 0 nor 1 in a binary column: "
                                   f"{_examples(examples)}",
                                   "code it 1 = present, 0 = absent; leave unknown cells empty"),
                    "log1p_domain": (f"the schema applies log1p to {m.name!r}, which needs values > -1; "
                                     f"{_plural(len(rows), 'cell')} <= -1: {_examples(examples)}",
                                     "give the untransformed values the schema expects (e.g. counts, not their "
                                     "logarithm); training would treat these cells as missing"),
                }[code]
                finite_problems[code].append(Problem("error", code, message, fix, file, cols[j],
                                                     tuple(ids[rows[:MAX_NAMES]])))
        for code, what in (("infinite", "with infinite cells"), ("not_binary", "with values other than 0 and 1"),
                           ("log1p_domain", "with values <= -1")):
            self.add_folded(finite_problems[code], what)
        values[~np.isfinite(values)] = np.nan
        return values, unusable, texts

    def _check_columns(self, m: Modality, present: list[str], values: np.ndarray, unusable: np.ndarray,
                       file: str) -> None:
        observed = (~np.isnan(values)).sum(axis=0)
        all_missing = (observed == 0) & ~unusable
        if all_missing.any():
            names = [present[j] for j in np.flatnonzero(all_missing)]
            self.add("error", "all_missing", f"{_plural(len(names), 'column')} with no value in any row: "
                     f"{_names(names)}",
                     "fill them in, or delete these columns: a feature the site lacks must be absent, not empty "
                     "(it is then masked at training)", file, names[0] if len(names) == 1 else None)
        if len(values) == 0:
            return
        lo, hi = np.fmin.reduce(values, axis=0), np.fmax.reduce(values, axis=0)
        constant = (observed > 0) & (lo == hi) & ~unusable
        if constant.any():
            # A warning: a breast-cancer site is all female, a small site may see no case of a rare mutation.
            # The column is true and harmless (it standardises to 0); an export bug is what the warning catches.
            js = np.flatnonzero(constant)
            shown = [f"{present[j]} (always {_value_text(m, present[j], lo[j])})" for j in js[:MAX_NAMES]]
            self.add("warning", "constant", f"{_plural(len(js), 'feature')} with the same value in every patient: "
                     f"{_names(shown, quote=False, total=len(js))}; no information at this site",
                     "nothing, if that is true of your patients; if not, check the export", file,
                     present[js[0]] if len(js) == 1 else None)

    def _check_leakage(self, m: Modality, present: list[str], values: np.ndarray, texts: dict[int, pd.Series],
                       ids: pd.Index, file: str) -> None:
        """A feature whose value is fixed by the class (a recoding of the label) hands the model the answer."""
        pos = ids.get_indexer(self.labels.ids)
        have = pos >= 0
        if have.sum() < 3:
            return
        x = values[pos[have]]
        levels_of = {}
        for j, series in texts.items():  # unreadable columns: compare their text instead of their numbers
            text = series.astype("string").str.strip()
            codes, levels_of[j] = pd.factorize(text.where(~(text.isna() | text.isin(MISSING_TOKENS))))
            x[:, j] = np.where(codes[pos[have]] < 0, np.nan, codes[pos[have]])
        leak, one_to_one, per_class, classes = _label_determined(x, self.labels.codes[have], self.min_count)
        found = []
        for j in np.flatnonzero(leak):
            col = present[j]
            pairs = [f"{self.schema.classes[c]} -> "
                     + (repr(str(levels_of[j][int(v)])) if j in levels_of else _value_text(m, col, v))
                     for c, v in zip(classes, per_class[:, j]) if not np.isnan(v)]
            kind = "a one-to-one recoding of" if one_to_one[j] else "determined by"
            found.append(Problem("error", "label_leak", f"the values are {kind} the label "
                                 f"{self.schema.label_column!r} ({_names(pairs[:6], quote=False, total=len(pairs))}): "
                                 "the model would read the answer from this column",
                                 "delete this column (if the schema lists it, ask the consortium to remove it); "
                                 "a model input must not be derived from the label", file, col))
        self.add_folded(found, "derived from the label")

    # --- summary --------------------------------------------------------------------------------------
    def _modality_summary(self, m: Modality, path: Path | None, result: _Checked | None) -> ModalitySummary:
        if path is None or result is None:
            if path is None:
                self.add("warning", "absent_modality", f"no table for modality {m.name!r} ({m.n_features:,} "
                         f"features, {m.n_features / self.schema.layout().n_inputs:.0%} of the schema's inputs); it "
                         "is masked for every patient", f"nothing, if the site has no {m.name} data; otherwise add "
                         f"it as {m.name}.csv")
            return ModalitySummary(m.name, path.name if path else None, m.n_features, list(m.features), [],
                                   0, None, None)
        present = set(result.present)
        absent = [f for f in m.features if f not in present]
        n_pat, coverage, missing, mostly = None, None, None, 0
        if self.labels is not None:
            rows = result.ids.get_indexer(self.labels.ids)
            rows = rows[rows >= 0]
            n_pat = len(rows)
            coverage = n_pat / len(self.labels.ids) if len(self.labels.ids) else None
            if n_pat:
                miss = np.isnan(result.values[rows])
                missing = float(miss.mean())
                mostly = int((miss.mean(axis=0) > 0.5).sum())
        if n_pat is not None and 0 < n_pat < self.min_count:
            n_pat, coverage = None, None
        return ModalitySummary(m.name, path.name, m.n_features, absent, result.extra, n_pat, coverage, missing,
                               mostly)

    def _summary(self, modalities: list[ModalitySummary], labels: _Labels | None) -> SiteSummary:
        classes = self.schema.classes
        counts = np.bincount(labels.codes, minlength=len(classes)) if labels is not None else np.zeros(len(classes))
        shown: dict[str, int | None] = {c: int(n) for c, n in zip(classes, counts)}
        small = [c for c in classes if 0 < shown[c] < self.min_count]
        for c in small:
            shown[c] = None
        hidden = []
        if len(small) == 1:  # otherwise n_patients minus the other counts gives the small one away
            others = [c for c in classes if shown[c]]
            if others:
                hidden = [min(others, key=lambda c: shown[c])]
                shown[hidden[0]] = None
        total = int(counts.sum())
        return SiteSummary(str(self.site_dir), self.schema.name, self.schema.content_hash(), self.min_count,
                           None if 0 < total < self.min_count else total, shown, modalities, hidden)


# --- helpers -----------------------------------------------------------------------------------------------


def _label_determined(x: np.ndarray, y: np.ndarray, min_support: int = 5):
    """Columns of x whose value is constant within every class and differs between classes.

    Returns (leak, one_to_one, per-class value (k, p), class codes present). Needs two classes with at least
    two observed patients each, so a class of one patient cannot make every feature look derived; and,
    unless the column recodes three or more such classes one to one, two of its values each held by at
    least `min_support` patients: a rare binary feature present in all 3 patients of a small class and
    absent elsewhere (a CDH1 mutation in a site's few breast cancers) is chance or biology, not a recoding.
    """
    order = np.argsort(y, kind="stable")
    ys, xs = y[order], x[order]
    starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
    classes = ys[starts]
    observed = ~np.isnan(xs)
    count = np.add.reduceat(observed, starts, axis=0)  # (k, p)
    lo, hi = np.fmin.reduceat(xs, starts, axis=0), np.fmax.reduceat(xs, starts, axis=0)
    within = np.all((count == 0) | (lo == hi), axis=0)
    supported_classes = (count >= 2).sum(axis=0)
    per_class = np.where(count > 0, lo, np.nan)
    srt = np.sort(per_class, axis=0)  # NaN last
    n_obs = (count > 0).sum(axis=0)
    with np.errstate(invalid="ignore"):
        steps = (np.diff(srt, axis=0) != 0) & ~np.isnan(srt[1:]) & ~np.isnan(srt[:-1])
    distinct = (n_obs > 0).astype(int) + steps.sum(axis=0)
    leak = within & (supported_classes >= 2) & (distinct >= 2)
    one_to_one = leak & (distinct == n_obs)
    for j in np.flatnonzero(leak & ~(one_to_one & (supported_classes >= 3))):
        held = {}  # value -> patients with it
        for c in np.flatnonzero(count[:, j] > 0):
            held[per_class[c, j]] = held.get(per_class[c, j], 0) + int(count[c, j])
        leak[j] = sum(n >= min_support for n in held.values()) >= 2
    return leak, leak & one_to_one, per_class, classes


def _decode_bytes(block: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Bytes cells (pyarrow's reading of text that is not UTF-8) as replacement-decoded text."""
    cols = []
    for k in range(block.shape[1]):
        if pd.api.types.infer_dtype(block[:, k], skipna=True) in ("bytes", "mixed"):
            is_bytes = np.array([isinstance(v, bytes) for v in block[:, k]])
            if is_bytes.any():
                block = block.copy() if not cols else block
                block[is_bytes, k] = [v.decode("utf-8", "replace") for v in block[is_bytes, k]]
                cols.append(k)
    return block, cols


def _value_text(m: Modality, column: str, v: float) -> str:
    if m.column_type(column) is ColumnType.categorical and not np.isnan(v):
        return repr(m.levels[column][int(v)])
    return f"{v:g}"


def _examples(pairs) -> str:
    return ", ".join(f"{_cell(v)} (row {i})" for v, i in pairs)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    text = str(v)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _number_fix(examples) -> str:
    texts = [str(v) for v, _ in examples]
    if any("\n" in t for t in texts):
        return ("a cell holds a line break: look for an unbalanced quote (\") in the file; then write numbers only, "
                "and leave missing cells empty")
    if any(re.fullmatch(r"-?\d+,\d+", t.strip()) for t in texts):
        return "write decimals with a point (1.5, not 1,5) and no thousands separators"
    return "write numbers only (no units or text; decimal point '.'); leave a missing value empty or write NA"


def _names(items, quote: bool = True, limit: int = MAX_NAMES, total: int | None = None) -> str:
    items = list(items)
    total = len(items) if total is None else total
    shown = [repr(str(x)) if quote else str(x) for x in items[:limit]]
    more = total - len(shown)
    return ", ".join(shown) + (f" and {more:,} more" if more > 0 else "")


def _norm(name: str) -> str:
    text = re.sub(r"[^0-9a-z]", "", str(name).lower())
    return text


def _closest(value: str, choices: list[str]) -> str | None:
    value = str(value).strip()
    if re.fullmatch(r"-?\d+\.0+", value):
        value = value.split(".")[0]
    key = _norm(value)
    for c in choices:
        if str(c) == value or (key and _norm(c) == key):
            return c
    close = difflib.get_close_matches(value.lower(), [str(c).lower() for c in choices], n=1, cutoff=0.75)
    if close:
        return next(c for c in choices if str(c).lower() == close[0])
    return None


def _rename_hints(absent: list[str], extra: list[str]) -> str:
    by_key = {}
    for f in absent:
        by_key.setdefault(_norm(f), f)
    pairs = [(c, by_key[_norm(c)]) for c in extra if _norm(c) in by_key]
    if not pairs:
        return ""
    return _names([f"{a!r} -> {b!r}" for a, b in pairs[:4]], quote=False, total=len(pairs))


def _id_mismatch_hint(ids: pd.Index, label_ids: pd.Index) -> str | None:
    lengths = label_ids.str.len()
    if len(lengths):
        n = int(lengths.value_counts().idxmax())
        if (ids.str.len() > n).mean() > 0.5 and len(ids.str[:n].intersection(label_ids)):
            return (f"the ids here are longer than the patient ids in the labels (e.g. {ids[0]!r}): cut them to "
                    f"the patient id ({n} characters), keeping one row per patient")
    if len(ids.str.upper().intersection(label_ids.str.upper())):
        return "the ids differ only in upper/lower case: write them exactly as in the labels table"
    return None


def _content_hint(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return None
    name = path.name.lower()
    gz = head[:2] == b"\x1f\x8b"
    if name.endswith(".gz") and not gz:
        return "the file is not gzip-compressed although its name ends in .gz: compress it, or drop '.gz'"
    if gz and not name.endswith(".gz"):
        return "the file is gzip-compressed: add '.gz' to its name"
    if gz:
        return "the compressed file is damaged or incomplete (interrupted copy?): copy or export it again"
    if name.endswith(".parquet") and head[:4] != b"PAR1":
        return "this is not a parquet file: export it again with a parquet writer (pandas: df.to_parquet)"
    if b"\x00" in head and not name.endswith(".parquet"):
        return "the file holds binary data, not text: export the table again as csv or tsv"
    return None


def _line(path: Path, position: int) -> str:
    try:
        delimited = table_format(path) != "parquet"
    except TableError:
        delimited = True
    return f"line {position + 2}" if delimited else f"row {position + 1}"


def _what(stem: str) -> str:
    return "the labels" if stem == LABELS_STEM else f"modality {stem!r}"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _share(x: float) -> str:
    return f"{x:.1%}"
