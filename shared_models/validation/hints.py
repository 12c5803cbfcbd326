"""Guesses at the fix: the class or level a value was meant to be, a rename, why ids or a file do not match."""

from __future__ import annotations

import difflib
import gzip
import re
from pathlib import Path

import pandas as pd

from shared_models.site_data import table_format
from shared_models.validation.messages import names


def norm(name: str) -> str:
    text = re.sub(r"[^0-9a-z]", "", str(name).lower())
    return text


def closest(value: str, choices: list[str]) -> str | None:
    value = str(value).strip()
    if re.fullmatch(r"-?\d+\.0+", value):
        value = value.split(".")[0]
    key = norm(value)
    for c in choices:
        if str(c) == value or (key and norm(c) == key):
            return c
    # a typo of exactly one choice; not a choice that contains the value or is contained in it ('male' in
    # 'female', 'Stage II' in 'Stage III'), nor one with other numbers ('T1' / 'T2'): those are other categories
    close = difflib.get_close_matches(value.lower(), [str(c).lower() for c in choices], n=2, cutoff=0.75)
    if len(close) != 1:
        return None
    c = next(c for c in choices if str(c).lower() == close[0])
    other = norm(c)
    if key in other or other in key or not same_name_written_differently(value, str(c)):
        return None
    return c


def rename_pairs(absent: list[str], extra: list[str]) -> list[tuple[str, str]]:
    """(column, the schema feature it seems to be): names equal but for case, spaces and punctuation."""
    by_key = {}
    for f in absent:
        by_key.setdefault(norm(f), f)
    return [(c, by_key[norm(c)]) for c in extra if norm(c) in by_key]


def affix_pairs(absent: list[str], extra: list[str], least: int = 3) -> list[tuple[str, str]]:
    """(column, the schema feature it seems to be) for columns that carry, or lack, one prefix or suffix against the
    schema's names ('chr1q' for '1q', 'hsa-mir-21-5p' for 'hsa-mir-21'), compared as `norm` writes them: the
    affix that pairs the most columns, when it pairs at least `least` of them and half the unknown ones (one stray
    column that happens to contain a feature's name is no pattern)."""
    if len(extra) < least or not absent:
        return []
    keys = {norm(c): c for c in extra}
    features = {norm(f): f for f in absent}
    found: dict[tuple, list[tuple[str, str]]] = {}
    for k in range(1, 6):
        for longer, shorter, column_longer in ((keys, features, True), (features, keys, False)):
            for key, name in longer.items():
                if len(key) <= k:
                    continue
                for where, rest in (("prefix", key[k:]), ("suffix", key[:-k])):
                    if rest in shorter:
                        affix = key[:k] if where == "prefix" else key[-k:]
                        pair = (name, shorter[rest]) if column_longer else (shorter[rest], name)
                        found.setdefault((where, affix, column_longer), []).append(pair)
    if not found:
        return []
    best = max(found.values(), key=len)
    return best if len(best) >= least and 2 * len(best) >= len(extra) else []


def same_name_written_differently(a: str, b: str) -> bool:
    """Whether a column and a feature whose names normalise alike are surely one: their digit groups match too
    (hsa-mir-3651 and hsa-mir-365-1 normalise alike and are two miRNAs)."""
    return re.findall(r"\d+", a) == re.findall(r"\d+", b)


def misnamed_pairs(absent: list[str], extra: list[str]) -> list[tuple[str, str]]:
    """(column, the schema feature it surely is): the names equal but for case, spaces and punctuation, with the same
    digit groups; failing those, one affix on (or off) many columns (a systematic naming, not a stray column). The
    rule training's validation and a prediction's input check both refuse a table by (tables.check_frame)."""
    return [(a, b) for a, b in rename_pairs(absent, extra) if same_name_written_differently(a, b)] or \
        affix_pairs(absent, extra)


def rename_hints(absent: list[str], extra: list[str]) -> str:
    pairs = rename_pairs(absent, extra)
    if not pairs:
        return ""
    return names([f"{a!r} -> {b!r}" for a, b in pairs[:4]], quote=False, total=len(pairs))


def number_fix(examples) -> str:
    texts = [str(v) for v, _ in examples]
    if any("\n" in t for t in texts):
        return ("a cell holds a line break: look for an unbalanced quote (\") in the file; then write numbers only, "
                "and leave missing cells empty")
    if any(re.fullmatch(r"-?\d+,\d+", t.strip()) for t in texts):
        return "write decimals with a point (1.5, not 1,5) and no thousands separators"
    return "write numbers only (no units or text; decimal point '.'); leave a missing value empty or write NA"


def id_mismatch_hint(ids: pd.Index, label_ids: pd.Index, reference: str = "the labels table") -> str | None:
    """How `ids` (a table's) are the patient ids of `reference` written differently, if they are."""
    lengths = label_ids.str.len()
    if len(lengths):
        n = int(lengths.value_counts().idxmax())
        if (ids.str.len() > n).mean() > 0.5 and len(ids.str[:n].intersection(label_ids)):
            return (f"the ids here are longer than the patient ids in {reference} (e.g. {ids[0]!r}): cut them to "
                    f"the patient id ({n} characters), keeping one row per patient")
    if len(ids.str.upper().intersection(label_ids.str.upper())):
        return f"the ids differ only in upper/lower case: write them exactly as in {reference}"
    if len(ids) and ids.str.fullmatch(r"\d+").all() and label_ids.str.fullmatch(r"\d+").all():
        # numeric record numbers with leading zeros, one table saved with its id column as numbers (Parquet, Excel)
        bare = ids.str.lstrip("0").str.zfill(1)
        if len(bare.intersection(label_ids.str.lstrip("0").str.zfill(1))):
            if sum(map(len, ids)) / len(ids) < sum(map(len, label_ids)) / len(label_ids):
                return (f"the ids here are {reference}'s without their leading zeros (e.g. {ids[0]!r}): this table's "
                        f"id column was saved as numbers; save it as text, with the zeros, as in {reference}")
            return (f"{reference}'s ids are these without their leading zeros (e.g. {label_ids[0]!r}): its id column "
                    "was saved as numbers; save it as text, with the zeros, as here")
    return None


def content_hint(path: Path) -> str | None:
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
    if head[:8] == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" or (head[:2] == b"PK" and not name.endswith(".parquet")):
        return ("this is an Excel workbook (or another zip archive), not a text table: in Excel, File > Save As > "
                "CSV UTF-8, and name it .csv")
    if head[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(head) > 3 and head[1:8:2].count(0) >= 3):
        return "the file is saved as UTF-16 text: save it again as UTF-8 (in Excel: File > Save As > CSV UTF-8)"
    if b"\x00" in head and not name.endswith(".parquet"):
        return "the file holds binary data, not text: export the table again as csv or tsv"
    return None


def id_hint(path: Path, idc: str) -> str | None:
    """Why a table has no id column `idc`: a saved pandas index, another separator, a near name, a row index."""
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
    raw_cells = [c.strip('"') for c in header.split(sep)]
    cells = [c.strip() for c in raw_cells]
    near = [raw for raw, c in zip(raw_cells, cells) if c.lower() == idc.lower() or norm(c) == norm(idc)]
    if near:
        if near[0].strip() == idc:
            return f"the column {near[0]!r} has spaces around its name: remove them, so that it reads {idc!r}"
        return f"rename the column {near[0]!r} to {idc!r} (names are case-sensitive)"
    if cells and cells[0] in ("", "Unnamed: 0", "index", "X", "rownames"):
        return (f"the first column has no usable name (a saved row index?): name it {idc!r}, or export "
                "without the index (pandas: index=False)")
    return None
