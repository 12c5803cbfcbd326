"""Split a pooled cohort into simulated hospital sites.

A pooled cohort directory (site layout: `labels.<ext>` + one table per schema modality) is cut into
N site directories, each a complete site: its labels rows and, for every modality, the rows of its
own patients, cells copied as text (so ids such as "NA" and values survive unchanged). Three ways:

- by a labels column: one site per value (`center8` -> 8 hospitals), or values grouped into N
  sites of similar size (`tss` -> N);
- Dirichlet label skew: each class is spread over the sites with proportions ~ Dir(alpha); small
  alpha -> each site sees few classes (Hsu et al. 2019, "Measuring the effects of non-identical data");
- IID: stratified, every site gets the same class mix.

Optionally whole groups of a column (e.g. `tss`, the tissue-source site) are first set aside as a
held-out evaluation directory: patients from sites the federation never saw.

`manifest.json` (`FederationManifest`) records what went where; `simulations.synthetic` writes the
same manifest for generated federations.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from shared_models.files import write_text_atomic
from shared_models.schema import FeatureSchema
from shared_models.site_data import LABELS_STEM, TableError, find_table, table_format

MANIFEST_FORMAT = "oncofed-federation/1"
HOLDOUT_DIR = "holdout"
GZIP_MIN_COLUMNS = 100  # tables at least this wide are written gzipped
HOLDOUT_FRAC = 0.2  # the share of patients a held-out column's groups take unless told otherwise
MIN_SITE_PATIENTS = 10  # Dirichlet partitions: the fewest patients a site may get unless told otherwise
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class PartitionError(ValueError):
    """A partition that cannot be made; the message names the flag, file or column and the fix."""


# --- manifest ------------------------------------------------------------------------------------
class SiteEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    dir: str  # relative to the federation directory
    patients: int
    class_counts: dict[str, int]  # every schema class, in schema order
    modality_counts: dict[str, int]  # patients with a row in each modality table
    group_values: list[str] = []  # values of the --by column that went to this site

    def label_skew(self, reference: dict[str, int]) -> float:
        """Total-variation distance between this site's class mix and `reference` (0 = same, 1 = disjoint)."""
        p = np.array([self.class_counts.get(c, 0) for c in reference], float)
        q = np.array(list(reference.values()), float)
        if p.sum() == 0 or q.sum() == 0:
            return 0.0
        return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


class FederationManifest(BaseModel):
    """What a federation directory holds: written by `partition` and `synthetic`, read by runs."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["oncofed-federation/1"] = MANIFEST_FORMAT
    kind: Literal["partition", "synthetic"]
    schema_file: str = "schema.json"
    schema_hash: str
    seed: int
    method: dict  # how the sites were made (flags and their values)
    sites: list[SiteEntry]
    holdout: SiteEntry | None = None
    dropped: dict[str, int] = {}  # rows not copied anywhere, by reason

    @property
    def federation_class_counts(self) -> dict[str, int]:
        first = self.sites[0].class_counts
        return {c: sum(s.class_counts.get(c, 0) for s in self.sites) for c in first}

    def mean_label_skew(self) -> float:
        ref = self.federation_class_counts
        return float(np.mean([s.label_skew(ref) for s in self.sites]))

    def save(self, path: Path) -> Path:
        write_text_atomic(path, self.model_dump_json(indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FederationManifest":
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise PartitionError(f"{path}: no manifest; make the federation with `oncofed partition` or "
                                 "`oncofed synthetic`") from None
        except ValueError as e:
            raise PartitionError(f"{path}: not a federation manifest ({str(e).splitlines()[0]})") from None


def format_manifest(manifest: FederationManifest, modalities: list[str]) -> str:
    """A readable table: one row per site (and the hold-out), patients, class mix, modality coverage."""
    ref = manifest.federation_class_counts
    head = ["site", "patients", "classes", "largest class", "skew"] + modalities
    rows = []
    entries = [(s, True) for s in manifest.sites] + ([(manifest.holdout, False)] if manifest.holdout else [])
    for s, in_federation in entries:
        present = {c: n for c, n in s.class_counts.items() if n}
        top = max(present, key=present.get) if present else "-"
        share = f"{top} {present[top] / s.patients:.0%}" if present else "-"
        skew = f"{s.label_skew(ref):.2f}" if in_federation else "-"
        rows.append([s.name, f"{s.patients:,}", str(len(present)), share, skew]
                    + [f"{s.modality_counts.get(m, 0):,}" for m in modalities])
    total = sum(s.patients for s in manifest.sites)
    rows.append(["total", f"{total:,}", str(sum(1 for n in ref.values() if n)), "", f"{manifest.mean_label_skew():.2f}"]
                + [f"{sum(s.modality_counts.get(m, 0) for s in manifest.sites):,}" for m in modalities])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) if i in (0, 3) else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    for r in rows:
        lines.append("  ".join(v.ljust(w) if i in (0, 3) else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    lines.append("skew: total-variation distance between a site's class mix and the federation's (0 = IID)")
    return "\n".join(lines)


# --- assignment ----------------------------------------------------------------------------------
def assign_by_values(values: np.ndarray, n_sites: int | None, rng: np.random.Generator,
                     column: str) -> tuple[np.ndarray, list[list[str]]]:
    """Site index per patient and the values of each site: one site per value, or values packed into
    n_sites sites of similar patient counts (largest value first to the currently smallest site)."""
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    if n_sites is None or n_sites == len(uniq):
        return inverse, [[str(v)] for v in uniq]
    if n_sites > len(uniq):
        raise PartitionError(f"--by {column}: the column has {len(uniq)} distinct values, fewer than --sites "
                             f"{n_sites}; lower --sites or leave it out for one site per value")
    order = rng.permutation(len(uniq))  # seeded tie-break among equal counts
    order = order[np.argsort(-counts[order], kind="stable")]
    load = np.zeros(n_sites, dtype=np.int64)
    site_of_value = np.empty(len(uniq), dtype=np.int64)
    for v in order:
        s = int(np.argmin(load))
        site_of_value[v] = s
        load[s] += counts[v]
    groups = [[str(uniq[v]) for v in range(len(uniq)) if site_of_value[v] == s] for s in range(n_sites)]
    return site_of_value[inverse], groups


def assign_dirichlet(y: np.ndarray, n_classes: int, n_sites: int, alpha: float, rng: np.random.Generator,
                     min_patients: int, max_tries: int = 1000) -> np.ndarray:
    """Each class's patients are shuffled and cut with proportions ~ Dir(alpha); redrawn until every
    site has at least min_patients patients."""
    if len(y) < n_sites * min_patients:
        raise PartitionError(f"{len(y)} patients cannot give {n_sites} sites {min_patients} patients each; "
                             "lower --sites or --min-site-patients")
    for _ in range(max_tries):
        site = np.empty(len(y), dtype=np.int64)
        for c in range(n_classes):
            idx = rng.permutation(np.flatnonzero(y == c))
            if len(idx) == 0:
                continue
            p = rng.dirichlet(np.full(n_sites, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).round().astype(np.int64)
            for s, part in enumerate(np.split(idx, cuts)):
                site[part] = s
        if np.bincount(site, minlength=n_sites).min() >= min_patients:
            return site
    raise PartitionError(f"--dirichlet {alpha}: no draw in {max_tries} gave every one of {n_sites} sites "
                         f"{min_patients} patients; raise alpha, lower --sites or lower --min-site-patients")


def assign_iid(y: np.ndarray, n_sites: int, rng: np.random.Generator) -> np.ndarray:
    """Stratified: patients dealt round-robin class by class, so site sizes and class counts differ by <= 1."""
    order = rng.permutation(len(y))
    order = order[np.argsort(y[order], kind="stable")]
    site = np.empty(len(y), dtype=np.int64)
    site[order] = rng.permutation(n_sites)[np.arange(len(y)) % n_sites]
    return site


def choose_holdout(groups: np.ndarray, y: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Mask of held-out patients: whole groups, drawn in seeded random order, taken while the hold-out
    stays within `frac` of all patients and within `frac` of each class it touches (so every class
    keeps most of its patients in the federation). Classes whose every group is larger than that
    share are not held out at all."""
    uniq, inverse = np.unique(groups, return_inverse=True)
    n_classes = int(y.max()) + 1
    per_group = np.zeros((len(uniq), n_classes), dtype=np.int64)
    np.add.at(per_group, (inverse, y), 1)
    cap_class = frac * np.bincount(y, minlength=n_classes)
    cap_total = frac * len(y)
    held_class = np.zeros(n_classes, dtype=np.int64)
    held = np.zeros(len(uniq), dtype=bool)
    for g in rng.permutation(len(uniq)):
        after = held_class + per_group[g]
        if held_class.sum() + per_group[g].sum() <= cap_total and np.all(after <= cap_class + 1e-9):
            held[g] = True
            held_class = after
    return held[inverse]


# --- tables --------------------------------------------------------------------------------------
def read_text_table(path: Path, id_column: str, columns: list[str] | None = None) -> tuple[pa.Table, np.ndarray]:
    """A table with every delimited cell kept as text, and its ids (stripped) as a string array; `columns`:
    read only these (and the ids), e.g. to check a config against a cohort's labels without reading all of it."""
    fmt = table_format(path)
    wanted = None if columns is None else list(dict.fromkeys([id_column, *columns]))
    try:
        if fmt == "parquet":
            table = read_parquet(path)
            if wanted is not None:
                table = table.select([c for c in wanted if c in table.column_names])
        else:
            header = _header(path, "," if fmt == "csv" else "\t")
            convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in header}, strings_can_be_null=False,
                                           include_columns=[c for c in wanted if c in header] if wanted else None)
            table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 26),
                                   parse_options=pacsv.ParseOptions(delimiter="," if fmt == "csv" else "\t"),
                                   convert_options=convert)
    except (pa.ArrowException, OSError, EOFError, UnicodeDecodeError, ValueError, StopIteration) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TableError(f"{path}: cannot be read as {fmt} ({reason}); check that the file is complete and is "
                         "really the format its name says") from None
    if id_column not in table.column_names:
        raise TableError(f"{path}: no id column {id_column!r} (columns start {table.column_names[:5]}); name the "
                         f"patient id column {id_column!r} as the schema's id_column says")
    ids = np.array([("" if v is None else str(v)).strip() for v in table.column(id_column).to_pylist()], dtype=object)
    if (ids == "").any():
        raise TableError(f"{path}: {int((ids == '').sum())} row(s) have an empty {id_column!r}; every row needs an id")
    return table, ids


def table_columns(path: Path) -> list[str]:
    """The column names of a table, from its header alone."""
    fmt = table_format(path)
    try:
        if fmt == "parquet":
            return read_parquet(path).column_names if path.name.endswith(".gz") else pq.read_schema(path).names
        return _header(path, "," if fmt == "csv" else "\t")
    except (pa.ArrowException, OSError, EOFError, UnicodeDecodeError, ValueError, StopIteration) as e:
        raise TableError(f"{path}: cannot read its header as {fmt} ({type(e).__name__}); check that the file is "
                         "complete and is really the format its name says") from None


def read_parquet(path: Path) -> pa.Table:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            return pq.read_table(pa.BufferReader(fh.read()))
    return pq.read_table(path)


def _header(path: Path, sep: str) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as fh:
        return next(csv.reader(fh, delimiter=sep))


def write_table(table: pa.Table, site_dir: Path, stem: str, gz: bool, compresslevel: int = 1) -> Path:
    """CSV (gzipped when `gz`; level 1: 5x faster than 6 for ~20% more bytes), minimal quoting,
    deterministic bytes (no gzip timestamp)."""
    head = io.StringIO()
    csv.writer(head, lineterminator="\n").writerow(table.column_names)
    body = pa.BufferOutputStream()
    try:
        pacsv.write_csv(table, body, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    except pa.ArrowInvalid:  # a cell holds a comma, quote or newline: quote the text cells
        body = pa.BufferOutputStream()
        pacsv.write_csv(table, body, pacsv.WriteOptions(include_header=False, quoting_style="needed"))
    data = head.getvalue().encode() + body.getvalue().to_pybytes()
    path = site_dir / (stem + (".csv.gz" if gz else ".csv"))
    path.write_bytes(gzip.compress(data, compresslevel=compresslevel, mtime=0) if gz else data)
    return path


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create out_dir; an existing non-empty one is replaced only with --overwrite and only if it is a
    federation written before (it has a manifest), so a mistyped path never deletes other data."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PartitionError(f"{out_dir} is a file; choose a directory for --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise PartitionError(f"{out_dir} exists and is not empty; choose a new directory or pass --overwrite")
        if not (out_dir / "manifest.json").is_file():
            raise PartitionError(f"{out_dir} is not a federation directory (no manifest.json); --overwrite only "
                                 "replaces a directory written by `oncofed partition` or `oncofed synthetic`")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def site_dir_names(groups: list[list[str]], one_per_value: bool) -> list[str]:
    """Directory per site: the value itself for one site per value when all values are safe and
    distinct as file names, else site_00, site_01, ..."""
    if one_per_value:
        names = [g[0] for g in groups]
        if (all(_SAFE_NAME.match(n) for n in names) and len({n.lower() for n in names}) == len(names)
                and HOLDOUT_DIR not in {n.lower() for n in names}):
            return names
    width = max(2, len(str(len(groups) - 1)))
    return [f"site_{i:0{width}d}" for i in range(len(groups))]


# --- the partition -------------------------------------------------------------------------------
def partition_cohort(
    cohort_dir: str | Path,
    schema: FeatureSchema,
    out_dir: str | Path,
    *,
    sites: int | None = None,
    by: str | None = None,
    dirichlet: float | None = None,
    iid: bool = False,
    seed: int = 0,
    holdout_column: str | None = None,
    holdout_frac: float = HOLDOUT_FRAC,
    min_site_patients: int = MIN_SITE_PATIENTS,
    overwrite: bool = False,
) -> FederationManifest:
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    _check_method(sites, by, dirichlet, iid, holdout_frac, min_site_patients)
    if not cohort_dir.is_dir():
        raise PartitionError(f"{cohort_dir}: cohort directory not found")
    label_paths = find_table(cohort_dir, LABELS_STEM)
    if not label_paths:
        raise PartitionError(f"{cohort_dir}: no labels table; the cohort needs labels.csv with "
                             f"{schema.id_column!r} and {schema.label_column!r}")
    modality_paths = {}
    for m in schema.modalities:
        found = find_table(cohort_dir, m.name)
        if not found:
            raise PartitionError(f"{cohort_dir}: no table for the schema's modality {m.name!r}; add "
                                 f"{m.name}.csv (or .csv.gz, .tsv, .parquet) or use a schema without it")
        modality_paths[m.name] = found[0]

    labels_path = label_paths[0]
    labels, ids = read_text_table(labels_path, schema.id_column)
    _, first = np.unique(ids, return_index=True)
    if len(first) != len(ids):
        dup = ids[np.setdiff1d(np.arange(len(ids)), first)][0]
        raise PartitionError(f"{labels_path}: patient {dup!r} is listed more than once; keep one row per patient")
    y = encode_label_column(labels, labels_path, schema)
    rng = np.random.default_rng(seed)

    in_holdout, hold_values = np.zeros(len(ids), dtype=bool), None
    if holdout_column:
        hold_values = _column_values(labels, labels_path, holdout_column, "--holdout-column")
        in_holdout = choose_holdout(hold_values, y, holdout_frac, rng)
        if not in_holdout.any():
            raise PartitionError(f"--holdout-column {holdout_column}: every {holdout_column!r} group is larger than "
                                 f"--holdout-frac {holdout_frac} of its class; raise --holdout-frac")
    fed = np.flatnonzero(~in_holdout)

    site_of = np.full(len(ids), -1, dtype=np.int64)
    if by:
        values = _column_values(labels, labels_path, by, "--by")
        site_fed, groups = assign_by_values(values[fed], sites, rng, by)
        names = site_dir_names(groups, one_per_value=all(len(g) == 1 for g in groups))
        method = {"by": by, "sites": len(groups)}
    else:
        assert sites is not None
        if dirichlet is not None:
            site_fed = assign_dirichlet(y[fed], schema.n_classes, sites, dirichlet, rng, min_site_patients)
            method = {"dirichlet": dirichlet, "sites": sites, "min_site_patients": min_site_patients}
        else:
            if len(fed) < sites:
                raise PartitionError(f"--iid: {len(fed)} patients cannot fill {sites} sites; lower --sites")
            site_fed = assign_iid(y[fed], sites, rng)
            method = {"iid": True, "sites": sites}
        groups = [[] for _ in range(sites)]
        names = site_dir_names(groups, one_per_value=False)
    site_of[fed] = site_fed
    if holdout_column:
        method.update(holdout_column=holdout_column, holdout_frac=holdout_frac)
    n_sites = len(names)

    prepare_out_dir(out_dir, overwrite)
    schema.save(out_dir / "schema.json")
    row_of = {pid: i for i, pid in enumerate(ids)}
    dirs = [out_dir / n for n in names]
    hold_dir = out_dir / HOLDOUT_DIR
    for d in dirs + ([hold_dir] if holdout_column else []):
        d.mkdir()

    dest = np.where(in_holdout, n_sites, site_of)  # site index per labels row; n_sites = the hold-out
    modality_counts = np.zeros((n_sites + 1, len(schema.modalities)), dtype=np.int64)
    dropped = {}
    for stem, table, table_ids, gz in _tables(labels_path, labels, ids, modality_paths, schema):
        row = np.array([row_of.get(pid, -1) for pid in table_ids], dtype=np.int64)
        if stem != LABELS_STEM and (row < 0).any():
            dropped[f"{stem}: ids not in {labels_path.name}"] = int((row < 0).sum())
        row_dest = np.where(row >= 0, dest[np.maximum(row, 0)], -1)
        for s, d in enumerate(dirs + ([hold_dir] if holdout_column else [])):
            take = np.flatnonzero(row_dest == s)
            if stem != LABELS_STEM:
                modality_counts[s, schema.modality_names.index(stem)] = len(np.unique(table_ids[take]))
            if len(take) or stem == LABELS_STEM:
                write_table(table.take(take), d, stem, gz)

    def entry(s: int, name: str, values: list[str]) -> SiteEntry:
        members = dest == s
        counts = np.bincount(y[members], minlength=schema.n_classes)
        return SiteEntry(name=name, dir=name, patients=int(members.sum()),
                         class_counts={c: int(n) for c, n in zip(schema.classes, counts)},
                         modality_counts={m: int(n) for m, n in zip(schema.modality_names, modality_counts[s])},
                         group_values=values)

    holdout = entry(n_sites, HOLDOUT_DIR, sorted(set(hold_values[in_holdout]))) if hold_values is not None else None
    manifest = FederationManifest(
        kind="partition", schema_hash=schema.content_hash(), seed=seed,
        method={"source": str(cohort_dir), **method},
        sites=[entry(s, names[s], groups[s]) for s in range(n_sites)], holdout=holdout, dropped=dropped,
    )
    manifest.save(out_dir / "manifest.json")
    return manifest


def _check_method(sites, by, dirichlet, iid, holdout_frac, min_site_patients) -> None:
    chosen = [flag for flag, on in (("--by", by), ("--dirichlet", dirichlet is not None), ("--iid", iid)) if on]
    if len(chosen) != 1:
        raise PartitionError("choose exactly one way to split: --by COLUMN, --dirichlet ALPHA or --iid"
                             + (f" (got {' and '.join(chosen)})" if chosen else ""))
    if sites is not None and sites < 1:
        raise PartitionError(f"--sites must be at least 1 (got {sites})")
    if not by and sites is None:
        raise PartitionError(f"{chosen[0]} needs --sites N, the number of sites to make")
    if dirichlet is not None and not dirichlet > 0:
        raise PartitionError(f"--dirichlet must be a positive concentration such as 0.5 (got {dirichlet})")
    if not 0 < holdout_frac < 1:
        raise PartitionError(f"--holdout-frac must be between 0 and 1, e.g. 0.2 (got {holdout_frac})")
    if min_site_patients < 1:
        raise PartitionError(f"--min-site-patients must be at least 1 (got {min_site_patients})")


def encode_label_column(labels: pa.Table, path: Path, schema: FeatureSchema) -> np.ndarray:
    if schema.label_column not in labels.column_names:
        raise PartitionError(f"{path}: no label column {schema.label_column!r} (the schema's label_column); "
                             f"columns are {labels.column_names[:10]}")
    text = column_text(labels, schema.label_column).tolist()
    lookup = {c: i for i, c in enumerate(schema.classes)}
    y = np.array([lookup.get(t, -1) for t in text], dtype=np.int64)
    if (y < 0).any():
        bad = sorted({t for t, k in zip(text, y) if k < 0})
        raise PartitionError(f"{path}: {int((y < 0).sum())} patient(s) have labels outside the schema's classes "
                             f"(e.g. {bad[:5]}); drop those rows or use the cohort's schema")
    return y


def column_text(labels: pa.Table, column: str) -> np.ndarray:
    """A labels column as stripped text, "" where a patient has no value."""
    return np.array([("" if v is None else str(v)).strip() for v in labels.column(column).to_pylist()], dtype=str)


def _column_values(labels: pa.Table, path: Path, column: str, flag: str) -> np.ndarray:
    if column not in labels.column_names:
        raise PartitionError(f"{flag} {column}: {path.name} has no column {column!r}; its columns are "
                             f"{labels.column_names}")
    values = column_text(labels, column)
    if (values == "").any():
        raise PartitionError(f"{flag} {column}: {int((values == '').sum())} patient(s) in {path.name} have no "
                             f"{column!r} value; fill them in or choose another column")
    return values


def _tables(labels_path, labels, ids, modality_paths, schema):
    """(stem, text table, ids, write gzipped?) for labels then each modality, read one at a time."""
    yield LABELS_STEM, labels, ids, _is_gz(labels_path, labels)
    for name, path in modality_paths.items():
        table, table_ids = read_text_table(path, schema.id_column)
        yield name, table, table_ids, _is_gz(path, table)


def _is_gz(path: Path, table: pa.Table) -> bool:
    return path.name.endswith(".gz") or table.num_columns >= GZIP_MIN_COLUMNS
