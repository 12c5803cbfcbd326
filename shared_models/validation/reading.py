"""Reading one table as training does, and its rows: why a file cannot be read, empty and duplicate ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from shared_models.site_data import TableError, read_table
from shared_models.validation.check import Check
from shared_models.validation.hints import content_hint, id_hint
from shared_models.validation.messages import MAX_NAMES, first_line, line, names, plural


def read(check: Check, path: Path, text_columns: tuple[str, ...] = ()) -> pd.DataFrame | None:
    """The table indexed by patient id (`text_columns` read as text), or None when it cannot be read (reported)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        check.add("error", "unreadable", f"cannot be opened ({e.strerror})", "check that you may read it",
                  path.name)
        return None
    if size == 0:
        check.add("error", "empty_file", "the file is empty (0 bytes)",
                  "export the table again (the export or the copy was interrupted)", path.name)
        return None
    try:
        return read_table(path, check.schema.id_column, text_columns)
    except TableError as e:
        _table_error(check, path, str(e))
    except Exception as e:  # noqa: BLE001 - read_table lets a few malformed inputs through as other errors
        check.add("error", "unreadable", f"cannot be read ({type(e).__name__}: {first_line(e)})",
                  "export the table again as plain csv, tsv or parquet", path.name)
    return None


def _table_error(check: Check, path: Path, text: str) -> None:
    """read_table's refusal as a problem with a code, and a better fix where the file shows the cause."""
    text = text.removeprefix(f"{path}: ")
    message, _, fix = text.rpartition("; ")
    if not message:
        message, fix = text, "export the table again"
    idc = check.schema.id_column
    if (hint := content_hint(path)) and ("Excel" in hint or "UTF-16" in hint):
        # what the file is decides the fix, whatever the reader tripped on (an .xls read as an empty csv, a UTF-16
        # file as binary data or a table without an id column)
        check.add("error", "unreadable", "not a text table in the format its name says", hint, path.name)
        return
    if "Permission denied" in message:
        check.add("error", "unreadable", message, "give the account that runs oncofed read access to the file (its "
                  "owner, group or mode)", path.name)
        return
    if "no id column" in message:
        code, fix = "no_id_column", id_hint(path, idc) or fix
    elif "no rows" in message:
        code = "empty_table"
    elif "Empty CSV file" in message:
        code, message, fix = "empty_file", "the file holds no table (empty after decompression)", \
            "export the table again"
    elif "duplicate column names" in message:
        code = "duplicate_columns"
    elif "fields where the header has" in message:
        code = "ragged_row"
    elif f"have an empty {idc!r}" in message:
        code = "empty_id"
    else:
        code = "unreadable"
        fix = content_hint(path) or fix
    check.add("error", code, message, fix, path.name, column=idc if code in ("no_id_column", "empty_id") else None)


def unique_rows(check: Check, df: pd.DataFrame, path: Path, is_labels: bool) -> pd.DataFrame:
    """Report empty and duplicate ids; return the rows training would use (first of each id)."""
    ids = df.index
    empty = np.asarray(ids == "")
    if empty.any():
        where = [line(path, i) for i in np.flatnonzero(empty)]
        check.add("error", "empty_id", f"{plural(int(empty.sum()), 'row')} with an empty "
                  f"{check.schema.id_column!r}",
                  "give every row its patient id, or delete the rows", path.name, check.schema.id_column,
                  where[:MAX_NAMES])
    dup = np.asarray(ids.duplicated(keep=False)) & ~empty
    if dup.any():
        counts = ids[dup].value_counts(sort=False)
        col = check.schema.label_column
        # a labels table's repeats with different classes: which is the patient's is what the site must decide
        classes = (df.loc[dup, col].astype(str).groupby(level=0, sort=False).agg(lambda v: list(dict.fromkeys(v)))
                   if is_labels and col in df.columns else {})
        listing = names([f"{i} (x{n}" + (f": {', '.join(classes[i])})" if len(classes.get(i, ())) > 1 else ")")
                         for i, n in counts.items()], quote=False)
        what = "with one label each" if is_labels else "(merge replicates or aliquots before export)"
        check.add("error", "duplicate_ids", f"{plural(len(counts), 'patient id')} more than once: {listing}",
                  f"keep one row per patient {what}; " + ("which row is the patient cannot be guessed, so "
                  "nothing is scored" if check.for_prediction else "training would silently use the first row"),
                  path.name, check.schema.id_column, list(counts.index[:MAX_NAMES]))
    keep = ~empty & ~np.asarray(ids.duplicated(keep="first"))
    return df[keep]
