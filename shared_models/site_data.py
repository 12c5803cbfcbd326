"""Reading a site directory and turning it into model inputs.

Site layout (the consortium contract; the server reads a validation site the same way):

    SITE_DIR/labels.<ext>        id column + label column (+ any other columns, ignored)
    SITE_DIR/<modality>.<ext>    one table per schema modality, rows = patients, id column first
    <ext> = csv | tsv | txt (tab) | parquet, optionally followed by .gz

Ids are read as text ("NA" is a real TCGA site code). In feature columns the cells "", "NA", "NaN",
"nan", "null", "NULL" and "." mean missing. A patient absent from a modality table lacks that modality.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shared_models.files import write_text_atomic
from shared_models.schema import TABLE_SUFFIXES, ColumnType, FeatureSchema, Modality, Transform  # noqa: F401 (re-exported)

MISSING_TOKENS = ["", "NA", "NaN", "nan", "null", "NULL", ".", "N/A", "n/a"]
LABELS_STEM = "labels"
NORMALIZER_FILE = "normalizer.json"  # a site's normalisation: in its state directory, and in each model version's
CLIP = 10.0  # standardised values beyond +-CLIP are clipped: one outlier must not dominate a token
MIN_SPREAD_VALUES = 10  # an unscaled column's spread is kept (to clip and check it) from this many values on


class TableError(ValueError):
    """A table that cannot be read; the message names the file and the fix."""


def find_table(site_dir: Path, stem: str) -> list[Path]:
    """All files in site_dir whose name is `<stem><one of TABLE_SUFFIXES>`."""
    return [site_dir / (stem + s) for s in TABLE_SUFFIXES if (site_dir / (stem + s)).is_file()]


def table_format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for fmt, ext in (("csv", ".csv"), ("tsv", ".tsv"), ("tsv", ".txt"), ("parquet", ".parquet")):
        if name.endswith(ext):
            return fmt
    raise TableError(
        f"{path}: unknown table format; name tables <name>.csv, .tsv, .txt (tab-separated) or .parquet, "
        "optionally with .gz"
    )


def read_table(path: Path, id_column: str, text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a table with string ids as its index; feature columns keep the types found in the file, `text_columns`
    (a labels table's label column) are read as text ('01' stays '01', not 1)."""
    fmt = table_format(path)
    try:
        if fmt == "parquet":
            if path.name.endswith(".gz"):
                import gzip

                with gzip.open(path, "rb") as fh:
                    table = pq.read_table(pa.BufferReader(fh.read()))
            else:
                table = pq.read_table(path)
            _require_unique_columns(path, table.column_names)
            df = table.to_pandas()
        else:
            df = _read_delimited(path, "," if fmt == "csv" else "\t", id_column, text_columns)
    except TableError:
        raise
    except (pa.ArrowInvalid, pa.ArrowException, OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, UnicodeDecodeError) or "invalid UTF8" in str(e):
            raise TableError(f"{path}: the file is not UTF-8 text ({_short(e)}): an export in Latin-1 or Windows-1252 "
                             "(an accented id such as 'José' written as one byte); save it again as UTF-8 (in Excel: "
                             "File > Save As > CSV UTF-8)") from None
        raise TableError(f"{path}: cannot be read as {fmt} ({_short(e)}); check that the file is complete and "
                         "is really the format its name says") from None
    if df.shape[0] == 0:
        raise TableError(f"{path}: the table has no rows; export it again with its data")
    if id_column not in df.columns:
        raise TableError(
            f"{path}: no id column {id_column!r} (columns start {list(df.columns)[:5]}); name the patient id "
            f"column {id_column!r} as the schema's id_column says"
        )
    ids = df[id_column]
    if ids.isna().any():
        raise TableError(f"{path}: {int(ids.isna().sum())} row(s) have an empty {id_column!r}; every row needs an id")
    df = df.set_index(df[id_column].astype(str).str.strip()).drop(columns=[id_column])
    df.index.name = id_column
    df.columns = [str(c) for c in df.columns]
    return df


def _read_delimited(path: Path, sep: str, id_column: str, text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    read = pacsv.ReadOptions(block_size=1 << 26)
    parse = pacsv.ParseOptions(delimiter=sep)
    # Strings never become null, so an id "NA" stays text; numeric columns read the tokens as missing.
    # text columns keep a missing token as its text, as string columns do: readers treat MISSING_TOKENS as missing
    convert = pacsv.ConvertOptions(column_types={id_column: pa.string(), **{c: pa.string() for c in text_columns}},
                                   null_values=MISSING_TOKENS, strings_can_be_null=False)
    try:
        table = pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as e:
        if m := re.search(r"Expected (\d+) columns, got (\d+): (.*)", str(e), re.S):
            raise TableError(_ragged_row(path, sep, int(m[1]), int(m[2]), m[3])) from None
        raise
    _require_unique_columns(path, table.column_names)
    return table.to_pandas()


def _ragged_row(path: Path, sep: str, expected: int, got: int, row: str) -> str:
    """pyarrow's refusal of a row with another number of fields than the header, with the row's line number."""
    import gzip

    start = row.strip().splitlines()[0][:200] if row.strip() else ""
    number, header = None, ""
    try:
        with (gzip.open(path, "rt", errors="replace") if path.name.endswith(".gz")
              else open(path, errors="replace")) as fh:
            header = fh.readline()
            number = 1 if start and header.rstrip("\r\n").startswith(start) else next(
                (i for i, text in enumerate(fh, 2) if start and text.rstrip("\r\n").startswith(start)), None)
    except OSError:
        pass
    where = f"line {number}" if number else "a row"
    kind = "tab" if sep == "\t" else "comma"
    if expected == 1 and ";" in header and sep not in header:
        # a spreadsheet in a European locale: semicolons between fields, commas as decimal marks
        return (f"{path}: {where} has {got} fields where the header has {expected} (it starts {start[:60]!r}): the "
                f"fields are separated by semicolons, the decimals by commas; a spreadsheet's export in a European "
                f"locale: export it again separated by {kind}s, with points as decimal marks (12.5, not 12,5)")
    return (f"{path}: {where} has {got} fields where the header has {expected} (it starts {start[:60]!r}); a {kind} "
            f"too many or too few in that row (a value holding a {kind} needs quotes): correct it, or export the "
            "table again")


def _require_unique_columns(path: Path, names: list[str]) -> None:
    # pandas keeps only one of two same-named columns, silently: refuse instead of losing data.
    seen, dupes = set(), []
    for n in names:
        if n in seen and n not in dupes:
            dupes.append(n)
        seen.add(n)
    if dupes:
        raise TableError(f"{path}: duplicate column names {dupes[:5]}; give every column its own name "
                         "(only one of two same-named columns would be read)")


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def numeric_column(values: pd.Series) -> tuple[np.ndarray, pd.Series]:
    """Float values of a column and the cells that are neither numbers nor missing tokens."""
    if pd.api.types.is_bool_dtype(values):
        return values.astype("float64").to_numpy(), values.iloc[:0]
    if pd.api.types.is_numeric_dtype(values):
        return values.astype("float64").to_numpy(), values.iloc[:0]
    text = values.astype("string").str.strip()
    is_missing = text.isna() | text.isin(MISSING_TOKENS)
    nums = pd.to_numeric(text.where(~is_missing), errors="coerce")
    bad = text[nums.isna() & ~is_missing]
    return nums.astype("float64").to_numpy(), bad


def categorical_codes(values: pd.Series, levels: list[str]) -> tuple[np.ndarray, pd.Series]:
    """Level index per cell (NaN when missing) and the cells that are not one of the levels."""
    text = values.astype("string").str.strip()
    is_missing = text.isna() | text.isin(MISSING_TOKENS)
    lookup = {lv: i for i, lv in enumerate(levels)}
    codes = text.map(lookup).astype("float64")
    bad = text[codes.isna() & ~is_missing]
    return codes.to_numpy(), bad


@dataclass
class SiteTables:
    """The raw tables of a site directory, indexed by patient id."""

    site_dir: Path
    labels: pd.Series  # label per patient id (text)
    modalities: dict[str, pd.DataFrame]  # present tables only
    files: dict[str, Path] = field(default_factory=dict)


def read_site(schema: FeatureSchema, site_dir: str | Path) -> SiteTables:
    """Read the labels table and every modality table present. Raises TableError on unreadable input.

    Use `shared_models.validation.validate_site` first to report every problem at once.
    """
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise TableError(f"{site_dir}: site directory not found")
    files: dict[str, Path] = {}
    found = find_table(site_dir, LABELS_STEM)
    if not found:
        raise TableError(f"{site_dir}: no labels table; add labels.csv with columns "
                         f"{schema.id_column!r} and {schema.label_column!r}")
    files[LABELS_STEM] = found[0]
    labels_df = read_table(found[0], schema.id_column, (schema.label_column,))
    if schema.label_column not in labels_df.columns:
        raise TableError(f"{found[0]}: no label column {schema.label_column!r}; add it (schema label_column)")
    labels = labels_df[schema.label_column].astype("string").str.strip()
    modalities = {}
    for m in schema.modalities:
        paths = find_table(site_dir, m.name)
        if paths:
            files[m.name] = paths[0]
            modalities[m.name] = read_table(paths[0], schema.id_column)
    return SiteTables(site_dir=site_dir, labels=labels, modalities=modalities, files=files)


def raw_matrix(schema: FeatureSchema, tables: SiteTables, ids: list[str] | None = None) -> np.ndarray:
    """(patients, n_inputs) float32 in schema layout, before normalisation; NaN = missing.

    Numeric columns get the schema transform; categorical columns become level indices; features the
    site does not have and patients absent from a modality table are NaN.
    """
    ids = list(tables.labels.index) if ids is None else ids
    layout = schema.layout()
    out = np.full((len(ids), layout.n_inputs), np.nan, dtype=np.float32)
    for m in schema.modalities:
        df = tables.modalities.get(m.name)
        if df is None:
            continue
        df = df[~df.index.duplicated(keep="first")]
        block = _modality_block(m, df.reindex(ids))
        out[:, layout.slices[m.name]] = block
    return out


def _modality_block(m: Modality, df: pd.DataFrame) -> np.ndarray:
    block = np.full((len(df), m.n_features), np.nan, dtype=np.float32)
    present = [f for f in m.features if f in df.columns]
    pos = {f: i for i, f in enumerate(m.features)}
    numeric_cols = [f for f in present if m.column_type(f) is not ColumnType.categorical]
    if numeric_cols:
        sub = df[numeric_cols]
        if all(pd.api.types.is_numeric_dtype(t) for t in sub.dtypes):
            vals = sub.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
        else:
            vals = np.column_stack([numeric_column(sub[c])[0] for c in numeric_cols])
        vals[~np.isfinite(vals)] = np.nan
        if m.transform is Transform.log1p:  # numeric columns only: binary 0/1 stays as is
            t = [i for i, f in enumerate(numeric_cols) if m.column_type(f) is ColumnType.numeric]
            with np.errstate(invalid="ignore", divide="ignore"):
                vals[:, t] = np.log1p(np.where(vals[:, t] > -1, vals[:, t], np.nan))
        block[:, [pos[f] for f in numeric_cols]] = vals
    for f in present:
        if m.column_type(f) is ColumnType.categorical:
            block[:, pos[f]] = categorical_codes(df[f], m.levels[f])[0]
    return block


class Normalizer:
    """Per-feature z-scoring fitted on the rows `client.site.split_site` picks (never a DP run's training part), saved
    and reused at prediction time.

    Only numeric columns of modalities with `standardize` are scaled; binary and categorical
    columns pass through. A feature never observed in training keeps mean 0, scale 1.
    The numeric columns of modalities without `standardize` pass unscaled, but their mean and standard deviation
    on the same rows are kept too (`unscaled_stats`), so that they are clipped to +-CLIP standard deviations like
    the scaled ones and the prediction service can flag their out-of-range values (a file from before
    2026-12-05 has none: those columns pass unchecked, as they did).
    """

    FORMAT = "oncofed-normalizer/1"

    def __init__(self, schema: FeatureSchema, mean: np.ndarray, scale: np.ndarray,
                 unscaled_stats: tuple[np.ndarray, np.ndarray] | None = None):
        self.schema, self.mean, self.scale = schema, mean.astype(np.float32), scale.astype(np.float32)
        self.scaled = scaled_columns(schema)  # once: the prediction service transforms every batch
        self.unscaled = numeric_columns(schema, standardized=False)
        if unscaled_stats is None:
            unscaled_stats = (np.full(len(self.unscaled), np.nan), np.full(len(self.unscaled), np.nan))
        self.unscaled_mean, self.unscaled_scale = (np.asarray(a, np.float64) for a in unscaled_stats)
        known = np.isfinite(self.unscaled_mean) & np.isfinite(self.unscaled_scale)
        # every column with statistics (the scaled ones, the unscaled ones observed), sorted: modality by modality
        checked_mean = np.full(len(self.mean), np.nan)
        checked_scale = np.full(len(self.mean), np.nan)
        checked_mean[self.scaled], checked_scale[self.scaled] = self.mean[self.scaled], self.scale[self.scaled]
        checked_mean[self.unscaled[known]] = self.unscaled_mean[known]
        checked_scale[self.unscaled[known]] = self.unscaled_scale[known]
        self.checked = np.flatnonzero(np.isfinite(checked_mean))
        # their statistics in float64, for the prediction service's out-of-range check
        self.checked_mean, self.checked_scale = checked_mean[self.checked], checked_scale[self.checked]
        # checked columns are clipped to +-CLIP standard deviations (in the model's input: +-CLIP for the scaled
        # ones), the others pass (+-inf bounds): one np.clip over the row, no gather and scatter of the columns
        self._low = np.full(len(self.mean), -np.inf, np.float32)
        self._high = np.full(len(self.mean), np.inf, np.float32)
        self._low[self.scaled], self._high[self.scaled] = -CLIP, CLIP
        cols = self.unscaled[known]
        self._low[cols] = self.unscaled_mean[known] - CLIP * self.unscaled_scale[known]
        self._high[cols] = self.unscaled_mean[known] + CLIP * self.unscaled_scale[known]
        # each modality's checked columns as a range of `checked`
        layout = schema.layout()
        self.checked_groups = [(m.name, *np.searchsorted(self.checked, [layout.slices[m.name].start,
                                                                          layout.slices[m.name].stop]).tolist())
                               for m in schema.modalities]

    def checked_z(self, x: np.ndarray) -> np.ndarray:
        """Signed z-scores of the checked columns' values `x` (raw[:, checked] as float64; NaN stays NaN): how far
        each value is from the site's training patients, as the service judges ranges and units."""
        with np.errstate(invalid="ignore", over="ignore"):
            return (x - self.checked_mean) / self.checked_scale

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything it is made of (for another process): `Normalizer.from_arrays(schema, n.arrays())`."""
        return {"mean": self.mean, "scale": self.scale, "unscaled_mean": self.unscaled_mean,
                "unscaled_scale": self.unscaled_scale}

    @classmethod
    def from_arrays(cls, schema: FeatureSchema, arrays: dict[str, np.ndarray]) -> "Normalizer":
        return cls(schema, arrays["mean"], arrays["scale"], (arrays["unscaled_mean"], arrays["unscaled_scale"]))

    @staticmethod
    def _stats(raw: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean, standard deviation and observed count of each column (NaN = missing)."""
        sub = raw[:, cols].astype(np.float64)
        counts = (~np.isnan(sub)).sum(axis=0)
        with np.errstate(invalid="ignore"):
            mu = np.nanmean(np.where(counts > 0, sub, 0.0), axis=0)
            sd = np.nanstd(np.where(counts > 0, sub, 0.0), axis=0)
        return mu, sd, counts

    @classmethod
    def fit(cls, schema: FeatureSchema, raw_train: np.ndarray) -> "Normalizer":
        n = raw_train.shape[1]
        mean, scale = np.zeros(n, np.float32), np.ones(n, np.float32)
        cols = scaled_columns(schema)
        if cols.size and raw_train.shape[0]:
            mu, sd, counts = cls._stats(raw_train, cols)
            mean[cols] = np.where(counts > 0, mu, 0.0)
            scale[cols] = np.where((counts > 1) & (sd > 1e-8), sd, 1.0)
        unscaled = numeric_columns(schema, standardized=False)
        stats = (np.full(len(unscaled), np.nan), np.full(len(unscaled), np.nan))
        if unscaled.size and raw_train.shape[0]:
            mu, sd, counts = cls._stats(raw_train, unscaled)
            # too few values, or none that differ, say nothing of the spread: such a column stays unchecked (a
            # spread of ~0 would clip every other value to the constant and flag it; the scaled columns take 1)
            seen = (counts >= MIN_SPREAD_VALUES) & (sd > 1e-8)
            stats = (np.where(seen, mu, np.nan), np.where(seen, sd, np.nan))
        return cls(schema, mean, scale, stats)

    def transform(self, raw: np.ndarray) -> np.ndarray:
        x = (raw - self.mean) / self.scale
        np.clip(x, self._low, self._high, out=x)
        return x.astype(np.float32, copy=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": self.FORMAT, "schema_hash": self.schema.content_hash(),
                   "mean": self.mean.tolist(), "scale": self.scale.tolist()}
        if self.unscaled.size:  # null: a column not observed often enough to say its spread
            payload["unscaled"] = {"mean": [None if np.isnan(v) else v for v in self.unscaled_mean.tolist()],
                                   "scale": [None if np.isnan(v) else v for v in self.unscaled_scale.tolist()]}
        write_text_atomic(path, json.dumps(payload))
        return path

    @classmethod
    def load(cls, path: str | Path, schema: FeatureSchema) -> "Normalizer":
        from shared_models.weights import check_schema_hash

        path = Path(path)
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            raise TableError(f"{path}: normalisation file not found; fit it on the site's training rows first") from None
        except (OSError, json.JSONDecodeError) as e:
            raise TableError(f"{path}: unreadable normalisation file ({_short(e)})") from None
        if payload.get("format") != cls.FORMAT:
            raise TableError(f"{path}: not an OncoFed normalisation file")
        check_schema_hash(schema, payload.get("schema_hash"), str(path))
        unscaled = payload.get("unscaled")
        stats = None if unscaled is None else tuple(np.asarray([np.nan if v is None else v for v in unscaled[k]],
                                                               np.float64) for k in ("mean", "scale"))
        return cls(schema, np.asarray(payload["mean"], np.float32), np.asarray(payload["scale"], np.float32), stats)


def scaled_columns(schema: FeatureSchema) -> np.ndarray:
    """The numeric columns of modalities with `standardize`: those the normalisation scales."""
    return numeric_columns(schema, standardized=True)


def numeric_columns(schema: FeatureSchema, standardized: bool) -> np.ndarray:
    """The numeric columns of the modalities whose `standardize` is `standardized`, in layout order."""
    layout, cols = schema.layout(), []
    for m in schema.modalities:
        if bool(m.standardize) != standardized:
            continue
        start = layout.slices[m.name].start
        cols += [start + i for i, f in enumerate(m.features) if m.column_type(f) is ColumnType.numeric]
    return np.asarray(cols, dtype=np.int64)


@dataclass
class SiteDataset:
    """Model-ready arrays of a site: x in schema layout (NaN = missing), integer labels, masks."""

    ids: list[str]
    x: np.ndarray  # (n, n_inputs) float32, normalised
    y: np.ndarray  # (n,) int64 class index
    modality_present: np.ndarray  # (n, M) bool
    feature_missing: np.ndarray  # (n, n_inputs) bool

    def tensors(self):
        import torch

        return torch.from_numpy(self.x), torch.from_numpy(self.y)


def encode_labels(schema: FeatureSchema, labels: pd.Series) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(schema.classes)}
    y = labels.map(lookup)
    if y.isna().any():
        bad = sorted(set(labels[y.isna()].astype(str)))[:5]
        raise TableError(f"labels outside the schema's classes: {bad}; fix the labels or the schema's classes")
    return y.astype("int64").to_numpy()


def make_dataset(schema: FeatureSchema, raw: np.ndarray, y: np.ndarray, ids: list[str],
                 normalizer: Normalizer) -> SiteDataset:
    x = normalizer.transform(raw)
    missing = np.isnan(x)
    layout = schema.layout()
    present = np.stack([~missing[:, layout.slices[m.name]].all(axis=1) for m in schema.modalities], axis=1)
    return SiteDataset(ids=ids, x=x, y=y, modality_present=present, feature_missing=missing)


def load_labelled_site(schema: FeatureSchema, site_dir: str | Path) -> SiteDataset:
    """A whole labelled site directory, normalised with its own statistics (as a site that serves
    the model would); used to evaluate a model on patients no training site holds."""
    tables = read_site(schema, site_dir)
    ids = [str(i) for i in tables.labels.index]
    raw = raw_matrix(schema, tables, ids)
    y = np.array(encode_labels(schema, tables.labels))  # a writable copy (torch.from_numpy warns otherwise)
    return make_dataset(schema, raw, y, ids, Normalizer.fit(schema, raw))
