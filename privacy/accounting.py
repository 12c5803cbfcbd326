"""Record-level DP accounting for a site: epsilon of a DP-SGD history, and the noise for a schedule.

A history is a list of (noise_multiplier, sample_rate, steps) mechanisms, the format of Opacus'
PRV accountant. Everything a site ever ran on its data is composed into one history, across rounds
and runs; the noise multiplier is chosen once per run so that the whole planned schedule, composed
with what was already spent, lands on the site's budget (see shared/notes/opacus.md for the common
per-round mistakes this avoids).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from opacus.accountants import PRVAccountant, RDPAccountant

from privacy import MAX_BUDGET  # re-exported: the largest budget a site may set

Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
EPS_ERROR = 0.01  # PRV accountant's epsilon discretisation error; the upper bound is reported
PRV_LIMIT = MAX_BUDGET  # above this RDP bound PRV's grid grows to many GB; such spends are reported by RDP


class BudgetError(ValueError):
    """A privacy budget that cannot be met or would be exceeded; the message says by how much."""


def compact(history: list[Mechanism]) -> list[Mechanism]:
    """Merge entries of the same mechanism: T1 then T2 steps of one mechanism = T1 + T2 steps."""
    merged: OrderedDict[tuple[float, float], int] = OrderedDict()
    for sigma, q, steps in history:
        if steps > 0:
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    return [(s, q, t) for (s, q), t in merged.items()]


def epsilon(history: list[Mechanism], delta: float) -> float:
    """Epsilon (PRV upper bound) of composing every mechanism in `history` at `delta`."""
    hist = compact(history)
    if not hist:
        return 0.0
    # RDP is a looser upper bound than PRV (so reporting it is conservative) and cheap. PRV's
    # discretisation needs memory that grows with epsilon: past PRV_LIMIT (no real budget is that
    # large) the RDP bound is the answer.
    rdp = RDPAccountant()
    rdp.history = hist
    with np.errstate(divide="ignore"):
        rdp_eps = float(rdp.get_epsilon(delta=delta))
    if rdp_eps > PRV_LIMIT:
        return rdp_eps
    acc = PRVAccountant()
    acc.history = hist
    with np.errstate(divide="ignore"):
        return min(rdp_eps, float(acc.get_epsilon(delta=delta, eps_error=EPS_ERROR)))


def noise_multiplier_for(
    budget_epsilon: float, delta: float, sample_rate: float, steps: int, spent: list[Mechanism] | None = None,
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier whose `steps` steps, composed with `spent`, stay within the budget.

    Binary search on sigma (epsilon decreases monotonically in sigma). Raises BudgetError when even
    very large noise cannot fit the schedule (the budget is already used up).
    """
    if not (0 < sample_rate <= 1):
        raise BudgetError(f"sample rate {sample_rate} must be in (0, 1]")
    if steps < 1:
        raise BudgetError(f"planned steps {steps} must be at least 1")
    spent = list(spent or [])

    def eps_at(sigma: float) -> float:
        return epsilon(spent + [(sigma, sample_rate, steps)], delta)

    already = epsilon(spent, delta)
    hi = 1.0
    while eps_at(hi) > budget_epsilon:
        hi *= 2
        if hi > 1024:
            raise BudgetError(
                f"the site has spent epsilon {already:.3f} of its budget {budget_epsilon:g}; even noise "
                f"multiplier 1024 for {steps} more steps would exceed it. Raise the site's budget (a decision "
                "for its data governance) or stop training on this data"
            )
    lo = 0.0 if hi == 1.0 else hi / 2
    while hi - lo > tolerance * max(lo, 1e-3) and hi - lo > 1e-4:
        mid = (lo + hi) / 2
        if mid > 0 and eps_at(mid) <= budget_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def planned_steps(n_records: int, batch_size: int, local_epochs: int, rounds: int) -> tuple[float, int]:
    """(sample_rate, total steps) of a schedule, as Opacus' Poisson DPDataLoader will run it.

    Opacus turns a DataLoader of `b = ceil(n / batch_size)` batches into `b` Poisson-sampled steps
    per epoch with sample rate 1 / b.
    """
    if n_records < 1:
        raise BudgetError("a site with no training records cannot train")
    batches = math.ceil(n_records / batch_size)
    return 1.0 / batches, batches * local_epochs * rounds
