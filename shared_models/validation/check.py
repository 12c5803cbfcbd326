"""What every check reads and writes: the schema, the site's rules, its labels once read, the problems so far."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shared_models.schema import FeatureSchema
from shared_models.validation.messages import first_line, names, plural
from shared_models.validation.report import Problem, Severity

if TYPE_CHECKING:
    from shared_models.validation.labels import Labels

MAX_PER_CHECK = 10  # problems of one kind in one file; more are folded into one


@dataclass
class Check:
    """One validation run; problems are kept in the order they are found, which is the report's order."""

    schema: FeatureSchema
    min_count: int
    for_prediction: bool = False  # a table mostly of other columns is refused, not just noted
    labels: Labels | None = None
    problems: list[Problem] = field(default_factory=list)

    def add(self, severity: Severity, code: str, message: str, fix: str, file: str | None = None,
            column: str | None = None, rows=()) -> None:
        self.problems.append(Problem(severity, code, message, fix, file, column, tuple(str(r) for r in rows)))

    def add_folded(self, found: list[Problem], what: str) -> None:
        """Keep the first MAX_PER_CHECK problems of one kind in one file; fold the rest into one."""
        self.problems += found[:MAX_PER_CHECK]
        rest = found[MAX_PER_CHECK:]
        if rest:
            first = rest[0]
            self.add(first.severity, first.code, f"{plural(len(rest), 'more column')} {what}: "
                     f"{names([p.column for p in rest])}", first.fix, first.file)

    def guarded(self, path: Path, check):
        # The checks must never raise on odd input; anything unexpected becomes an error that names the file.
        try:
            return check(path)
        except Exception as e:  # noqa: BLE001 - reported, not swallowed
            self.add("error", "internal", f"could not be checked ({type(e).__name__}: {first_line(e)})",
                     "this file has a shape the validator does not expect: re-export it as a plain table, and "
                     "report the case to the OncoFed maintainers", path.name)
            return None
