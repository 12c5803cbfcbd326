"""The files of a site directory: which table training reads for each stem, and every file it would not read."""

from __future__ import annotations

import difflib
from pathlib import Path

from shared_models.site_data import LABELS_STEM, TABLE_SUFFIXES, find_table
from shared_models.validation.check import Check
from shared_models.validation.messages import names, what
from shared_models.validation.report import Severity


def inventory(check: Check, site_dir: Path) -> dict[str, Path]:
    """The table of each stem as training will pick it; every file that is not one is reported."""
    # One pass over the directory: each kind of stray file gets its own message, in directory order.
    stems = [LABELS_STEM] + check.schema.modality_names
    chosen = {s: find_table(site_dir, s)[0] for s in stems if find_table(site_dir, s)}
    for s in stems:
        if len(find_table(site_dir, s)) > 1:
            found = [p.name for p in find_table(site_dir, s)]
            check.add("error", "ambiguous_table", f"{len(found)} tables for {what(s)}: {', '.join(found)}; "
                      f"training would read {chosen[s].name} and ignore the others",
                      "keep exactly one of them in the site directory", found[0])
    expected = {(s + suf).lower(): s + suf for s in stems for suf in TABLE_SUFFIXES}
    for path in sorted(site_dir.iterdir()):
        name = path.name
        if not name.startswith(".") and not path.is_file() and name.lower() in expected:
            # a table's name on something that is not a readable file: without this its modality would be reported
            # absent ("add it as ...") while the file is there by name
            broken = path.is_symlink() and not path.exists()
            check.add("error", "not_a_file", (f"a link to {path.readlink()}, which does not exist (an unmounted "
                      "share?)" if broken else "a directory, not a table") + f": {what(expected[name.lower()].split('.')[0])} "
                      "is not read", "mount or restore the file the link points to" if broken else
                      f"put the table itself here as {name}", name)
            continue
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
            check.add(severity, "misnamed_table", f"file names are case-sensitive: this is not read as "
                      f"{canonical}{ignored}", f"rename it to {canonical}" if not taken else
                      "delete it or move it out of the site directory", name)
        elif stem is not None:
            suffix = name[len(stem):]
            hint = " (in Excel: File > Save As > CSV UTF-8)" if suffix.lower() in (".xlsx", ".xls") else ""
            check.add(severity, "unknown_format", f"unknown table format {suffix!r} for {what(stem)}{ignored}",
                      f"export it as {stem}.csv (comma-separated), {stem}.tsv (tab-separated) or "
                      f"{stem}.parquet, optionally gzipped (.csv.gz){hint}" if not taken else
                      "delete it or move it out of the site directory", name)
        else:
            close = difflib.get_close_matches(name.split(".")[0].lower(), [s.lower() for s in stems], n=1,
                                              cutoff=0.6)
            fix = (f"if it holds {what(stems[[s.lower() for s in stems].index(close[0])])}, rename it "
                   f"(e.g. to {close[0]}.csv)" if close else
                   "nothing, if it is not site data; tables must be named after the schema's modalities: "
                   + names([s + ".csv" for s in stems]))
            check.add("warning", "unrelated_file", "not a table of this schema; it is ignored", fix, name)
    return chosen
