"""Site-data validation: read a site directory the way training will, and report every problem at once.

A hospital's bioinformatician runs `oncofed validate`; the federated client runs `validate_site`
before its first round. Errors block training; warnings are reported and training goes on. Every
problem names the file, the column or the rows, and the fix.

Tables are read with `site_data.read_table` and cells converted with `numeric_column` /
`categorical_codes`, the functions training uses, so "valid" means "training reads it as intended".
Per-column checks run on whole matrices (one pass over all cells), so a site with 12,000 features is
checked in about the time it takes to read it.

The summary may leave the site. Counts of patients from 1 to `min_count - 1` are therefore never
stored in it (None, shown "<5"); when exactly one class is that small, the smallest other class is
hidden too, otherwise its count would follow from the total. Problems name patient ids and cell
values: they are for the site's own staff and stay at the site.

In the order a site is checked:

- site.py: `validate_site`, the run over a site directory; prediction.py: `check_prediction_tables`, the
  same table checks on the patients a site service is asked to score;
- inventory.py: which file training reads for each table, and every file it would not read;
- reading.py: reading one table, and why it cannot be read; empty and duplicate patient ids;
- labels.py: the labels table;
- tables.py: a modality table's columns against the schema and its patients against the labels;
- cells.py: its cells (numbers, levels, ranges) and columns (empty, constant);
- leakage.py: features that recode the label;
- summary.py: the summary a site may share, small counts suppressed;
- check.py: the state every check shares (schema, labels, problems in report order); report.py: the problems,
  the summary and the report; messages.py and hints.py: how problems are worded, and guesses at their fix.
"""

from __future__ import annotations

from shared_models.validation.cells import FLOAT32_MAX
from shared_models.validation.prediction import check_prediction_tables, read_prediction_table
from shared_models.validation.report import Problem, ValidationReport
from shared_models.validation.site import validate_site

__all__ = ["FLOAT32_MAX", "Problem", "ValidationReport", "check_prediction_tables", "read_prediction_table",
           "validate_site"]
