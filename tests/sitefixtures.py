"""A small valid site directory on disk: every column kind, a log1p modality, four table formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shared_models.schema import FeatureSchema, Modality

# One file per stem, in different formats, so every reader path is exercised.
FILE_NAMES = {"labels": "labels.csv", "expr": "expr.csv.gz", "counts": "counts.parquet", "clinical": "clinical.tsv"}


def site_schema() -> FeatureSchema:
    return FeatureSchema(
        name="site-test",
        label_column="subtype",
        classes=["A", "B", "C"],
        modalities=[
            Modality(name="expr", kind="omics", features=[f"g{i}" for i in range(6)]),
            Modality(name="counts", kind="omics", features=["c0", "c1", "c2"], transform="log1p"),
            Modality(
                name="clinical", kind="tabular", features=["age", "stage", "smoker"],
                column_types={"stage": "categorical", "smoker": "binary"}, levels={"stage": ["I", "II", "III"]},
            ),
        ],
    )


def site_tables(n_per_class: int = 6, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Tables of a valid site, keyed by stem; the id column `patient` comes first."""
    rng = np.random.default_rng(seed)
    n = 3 * n_per_class
    ids = [f"P{i:03d}" for i in range(n)]
    labels = rng.permutation(np.repeat(["A", "B", "C"], n_per_class))
    stage = rng.choice(["I", "II", "III"], n).astype(object)
    stage[1] = None  # a gap: missing values are normal
    return {
        "labels": pd.DataFrame({"patient": ids, "subtype": labels, "tss": rng.choice(["NA", "3C"], n)}),
        "expr": pd.DataFrame({"patient": ids, **{f"g{i}": rng.normal(size=n).round(4) for i in range(6)}}),
        "counts": pd.DataFrame({"patient": ids, **{f"c{i}": rng.poisson(20, n).astype(float) for i in range(3)}}),
        "clinical": pd.DataFrame({"patient": ids, "age": rng.normal(60, 10, n).round(1), "stage": stage,
                                  "smoker": rng.integers(0, 2, n)}),
    }


def write_table(path: Path, df: pd.DataFrame) -> Path:
    name = path.name
    if name.endswith(".parquet"):
        # Through pyarrow, not pandas, so that broken tables (same-named columns) can be written too. A parquet
        # column has one type: a column of mixed cells (tests put text into numbers) is stored as text.
        columns = [df.iloc[:, i] for i in range(df.shape[1])]
        arrays = [pa.array(c.astype("string") if c.dtype == object else c) for c in columns]
        pq.write_table(pa.Table.from_arrays(arrays, names=[str(c) for c in df.columns]), path)
    else:
        sep = "\t" if name.removesuffix(".gz").endswith((".tsv", ".txt")) else ","
        df.to_csv(path, sep=sep, index=False, compression="gzip" if name.endswith(".gz") else None)
    return path


def write_site(site_dir: Path, tables: dict[str, pd.DataFrame] | None = None,
               names: dict[str, str] = FILE_NAMES) -> Path:
    site_dir.mkdir(parents=True, exist_ok=True)
    for stem, df in (site_tables() if tables is None else tables).items():
        write_table(site_dir / names[stem], df)
    return site_dir
