"""The closest valid spelling of a misspelt key, for "did you mean" in errors: a run config's `--set` key (server)
and a /v1/predict body's member (site) are named the same way."""

from __future__ import annotations

import difflib


def closest_key(key: str, known) -> str | None:
    """The one valid key `key` most likely misspells (difflib's ratio at least 0.6), None when none is close."""
    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    return close[0] if close else None
