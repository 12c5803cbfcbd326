"""`check_prediction_tables`: the tables of patients to score, held to the rules of a training site's tables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared_models.schema import ColumnType, FeatureSchema, Modality, Transform
from shared_models.validation.cells import FLOAT32_MAX
from shared_models.validation.check import Check
from shared_models.validation.reading import read
from shared_models.validation.report import Problem
from shared_models.validation.tables import Checked, check_frame


@dataclass
class PredictionTables:
    """Patients to score, checked with the same rules as a training site's tables."""

    ids: list[str]  # every patient with a row in at least one table, first-seen order
    raw: np.ndarray  # (patients, n_inputs) float32 in schema layout, transforms applied; NaN = missing
    problems: list[Problem]  # errors refuse the request; warnings go with the answer


def read_prediction_table(schema: FeatureSchema, path: Path) -> tuple[pd.DataFrame | None, list[Problem]]:
    """A table of patients to score, read as `oncofed validate` reads a site's (the same codes, messages and
    fixes: another separator, a saved index, an empty file); None and the problems when it cannot be."""
    check = Check(schema, min_count=1, for_prediction=True)
    return read(check, path), check.problems


def check_prediction_tables(schema: FeatureSchema, frames: dict[str, tuple[pd.DataFrame, str]]) -> PredictionTables:
    """The input contract of predictions, for uploaded tables and JSON payloads alike.

    `frames`: modality -> (table indexed by patient id, the name its problems are reported under:
    the file name, or e.g. "JSON modality 'mirna'"). Cells are read by the checks training's
    validation runs (`tables.check_frame`): duplicate ids, non-numbers, infinities and values beyond float32,
    non-0/1 binaries, unknown levels, log1p's domain, no schema feature; and a table mostly of columns
    that are not its modality's features is refused. Never raises for bad input."""
    check = Check(schema, min_count=1, for_prediction=True)
    layout = schema.layout()
    checked: dict[str, tuple[Modality, Checked]] = {}
    seen: dict[str, None] = {}
    for m in schema.modalities:
        if m.name not in frames:
            continue
        df, file = frames[m.name]
        result = check.guarded(Path(file), lambda p, m=m, df=df: check_frame(check, m, df, p))
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
