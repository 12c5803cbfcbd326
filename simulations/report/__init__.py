"""`oncofed report`: a research report (Markdown + HTML + PNG plots) from an `oncofed experiment` results directory.

Reads only what the runner writes (results.json rows, cells/<id>/final.json, predictions.npz and privacy_audit.json;
see the results-directory contract), never a model: the report can be rebuilt anywhere, without torch, as often as
wanted. In the order a report is made:

- load.py: results.json into a tidy frame, the final numbers per cell and per configuration, the cell files;
- analyse.py: the cells shown in detail, and subgroup fairness (demographic-parity and equalized-odds gaps);
- plots.py: one PNG per figure, or the reason it could not be drawn (a partial results directory still gives a
  report);
- render.py: the Markdown around the figures, and the same text as HTML (markdown-it, raw HTML escaped);
- labels.py: how privacy budgets, numbers and names are spelled and ordered throughout.
"""

from __future__ import annotations

from pathlib import Path

from simulations.report.analyse import demographic_parity_gap, equalized_odds_gap, subgroup_table
from simulations.report.load import ReportError, Results, load_results
from simulations.report.render import build_markdown, markdown_to_html

__all__ = ["ReportError", "Results", "build_report", "demographic_parity_gap", "equalized_odds_gap", "load_results",
           "subgroup_table"]


def build_report(results_dir: Path, out_dir: Path | None = None) -> Path:
    """Write report.md, report.html and figures/*.png (default: RESULTS_DIR/report); return the report.md path."""
    res = load_results(Path(results_dir))
    out = Path(out_dir) if out_dir is not None else res.dir / "report"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    md = build_markdown(res, out)
    path = out / "report.md"
    path.write_text(md, encoding="utf-8")
    for png in (out / "figures").glob("*.png"):  # an earlier report's figure this one does not show
        if f"figures/{png.name}" not in md:
            png.unlink()
    title = md.splitlines()[0].lstrip("# ")
    (out / "report.html").write_text(markdown_to_html(md, title), encoding="utf-8")
    return path
