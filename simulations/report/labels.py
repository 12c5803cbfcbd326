"""How the report spells and orders values (privacy budgets, numbers, names in files): one spelling for the tables,
the plots and the text."""

from __future__ import annotations

import math
import re

import numpy as np


def budget_key(privacy: str) -> float:
    """Sort/plot key: the budget, inf for no DP (weakest privacy), NaN when the text is not a number."""
    if privacy == "off":
        return math.inf
    try:
        return float(privacy)
    except ValueError:
        return math.nan


def privacy_label(privacy: str) -> str:
    return "no DP" if privacy == "off" else f"ε={privacy}"


def privacy_order(values) -> list[str]:
    """'off' first, then budgets from the largest (weakest privacy) to the smallest."""
    return sorted(set(values), key=lambda p: (p != "off", -budget_key(p) if not math.isnan(budget_key(p)) else 0, p))


def natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"
