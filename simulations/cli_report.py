"""`oncofed report`: a research report (Markdown + HTML + PNG plots) from an `oncofed experiment` results directory."""

from __future__ import annotations

from pathlib import Path

import typer

from shared_models.cli import fail


def register(app: typer.Typer) -> None:
    app.command("report")(report)


def report(
    results_dir: Path = typer.Argument(..., help="directory written by `oncofed experiment` (holds results.json)"),
    out: Path | None = typer.Option(None, "--out", help="report directory (default: RESULTS_DIR/report)"),
) -> None:
    """Write report.md, report.html and figures/*.png: summary table, learning curves, privacy-utility, per-site
    metrics, and for the best cells ROC, confusion matrix, t-SNE map, modality importance, accuracy per modality
    pattern and subgroup fairness."""
    from simulations.report import ReportError, build_report  # matplotlib/sklearn only when the command runs

    try:
        path = build_report(results_dir, out)
    except ReportError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write the report to {e.filename or out or results_dir}: {e.strerror}: pass a writable --out DIR")
    typer.echo(f"wrote {path} and {path.with_suffix('.html')} ({path.read_text().count('](figures/')} figures)")
