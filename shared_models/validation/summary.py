"""The summary a site may share: counts from 1 to min_count - 1 never appear in it, nor follow from the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared_models.schema import Modality
from shared_models.validation.check import Check
from shared_models.validation.labels import Labels
from shared_models.validation.report import ModalitySummary, SiteSummary
from shared_models.validation.tables import Checked


def modality_summary(check: Check, m: Modality, path: Path | None, result: Checked | None) -> ModalitySummary:
    """Coverage and missingness of one modality over the labelled patients; an absent table is a warning."""
    if path is None or result is None:
        if path is None:
            check.add("warning", "absent_modality", f"no table for modality {m.name!r} ({m.n_features:,} "
                      f"features, {m.n_features / check.schema.layout().n_inputs:.0%} of the schema's inputs); it "
                      "is masked for every patient", f"nothing, if the site has no {m.name} data; otherwise add "
                      f"it as {m.name}.csv")
        return ModalitySummary(m.name, path.name if path else None, m.n_features, list(m.features), [],
                               0, None, None)
    present = set(result.present)
    absent = [f for f in m.features if f not in present]
    n_pat, coverage, missing, mostly = None, None, None, 0
    if check.labels is not None:
        rows = result.ids.get_indexer(check.labels.ids)
        rows = rows[rows >= 0]
        n_pat = len(rows)
        coverage = n_pat / len(check.labels.ids) if len(check.labels.ids) else None
        if n_pat:
            miss = np.isnan(result.values[rows])
            missing = float(miss.mean())
            mostly = int((miss.mean(axis=0) > 0.5).sum())
    if n_pat is not None and 0 < n_pat < check.min_count:
        n_pat, coverage = None, None
    return ModalitySummary(m.name, path.name, m.n_features, absent, result.extra, n_pat, coverage, missing,
                           mostly)


def site_summary(check: Check, site_dir: Path, modalities: list[ModalitySummary],
                 labels: Labels | None) -> SiteSummary:
    """Class counts with the small ones suppressed; when exactly one is small, the smallest other is hidden too."""
    classes = check.schema.classes
    counts = np.bincount(labels.codes, minlength=len(classes)) if labels is not None else np.zeros(len(classes))
    shown: dict[str, int | None] = {c: int(n) for c, n in zip(classes, counts)}
    small = [c for c in classes if 0 < shown[c] < check.min_count]
    for c in small:
        shown[c] = None
    hidden = []
    if len(small) == 1:  # otherwise n_patients minus the other counts gives the small one away
        others = [c for c in classes if shown[c]]
        if others:
            hidden = [min(others, key=lambda c: shown[c])]
            shown[hidden[0]] = None
    total = int(counts.sum())
    return SiteSummary(str(site_dir), check.schema.name, check.schema.content_hash(), check.min_count,
                       None if 0 < total < check.min_count else total, shown, modalities, hidden)
