"""What validation hands back: the problems, the summary a site may share, and both as text or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from shared_models.validation.messages import names, plural, share

Severity = Literal["error", "warning"]


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
            parts.append(("rows " if len(self.rows) > 1 else "row ") + names(self.rows, quote=False))
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
        lines.append(f"  schema features absent at this site: {share(self.absent_feature_share)} of "
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
        lines = [f"Site {s.site_dir}  (schema {s.schema_name!r}, content hash {s.schema_hash})"]
        if not self.ok:
            lines.append(f"{plural(len(self.errors), 'error')} block training; "
                         f"{plural(len(self.warnings), 'warning')}.")
        for title, group in (("ERRORS", self.errors), ("WARNINGS", self.warnings)):
            if group:
                lines += ["", f"{title} ({len(group)})"]
                lines += [f"{i:>3}. {p}" for i, p in enumerate(group, 1)]
        if self.ok:
            lines += ["", self.summary.format()]
        verdict = ("OK" + (f" with {plural(len(self.warnings), 'warning')}" if self.warnings else "")
                   if self.ok else "NOT READY: fix the errors above and run the validation again")
        lines += ["", f"{verdict}  (checked in {self.seconds:.1f} s)"]
        return "\n".join(lines)
