"""Numbers that several modules and the command lines of both sides state, in a module that imports nothing, so
that --help can show them without importing pydantic or torch."""

MIN_COUNT = 5
"""Counts below this are never reported (a class, a pattern, a held-out part): a site's `min-count` and the run's
default; a site reports with the larger of its own and the run's."""
