"""How findings are worded: counts, lists of names, example cells, and where in a file a row is."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared_models.schema import ColumnType, Modality
from shared_models.site_data import LABELS_STEM, TableError, table_format

MAX_EXAMPLES = 3  # example cells shown per problem
MAX_NAMES = 8  # ids or column names listed in one message


def names(items, quote: bool = True, limit: int = MAX_NAMES, total: int | None = None) -> str:
    items = list(items)
    total = len(items) if total is None else total
    shown = [repr(str(x)) if quote else str(x) for x in items[:limit]]
    more = total - len(shown)
    return ", ".join(shown) + (f" and {more:,} more" if more > 0 else "")


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def share(x: float) -> str:
    return f"{x:.1%}"


def examples(pairs) -> str:
    return ", ".join(f"{cell(v)} (row {i})" for v, i in pairs)


def cell(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    text = str(v)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def value_text(m: Modality, column: str, v: float) -> str:
    if m.column_type(column) is ColumnType.categorical and not np.isnan(v):
        return repr(m.levels[column][int(v)])
    return f"{v:g}"


def line(path: Path, position: int) -> str:
    try:
        delimited = table_format(path) != "parquet"
    except TableError:
        delimited = True
    return f"line {position + 2}" if delimited else f"row {position + 1}"


def what(stem: str) -> str:
    return "the labels" if stem == LABELS_STEM else f"modality {stem!r}"


def first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""
