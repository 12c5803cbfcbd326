"""What a site's Gaussian DP-SGD rounds give under replace-one ("substitute one patient") adjacency, beside the
add/remove epsilon its ledger accounts.

The ledger accounts add/remove adjacency (Opacus' PRV accountant). A site also sends its number of training
patients in the clear (FedAvg's weight, the `patients` metric) and derives its sample rate and steps from it;
under add/remove the count itself distinguishes neighbours, so the honest reading with a public count is
replace-one adjacency, which this estimates (docs/privacy.md, "What DP-SGD covers here").

Method: the privacy-loss distribution of one Poisson-subsampled Gaussian step between (1-q) N(0, s^2) + q N(1, s^2)
and (1-q) N(0, s^2) + q N(-1, s^2) (one patient's clipped gradient replaced by its opposite, the worst case),
as a histogram of the loss on a fine grid, composed over the steps by FFT, and the smallest epsilon whose delta
is at most the ledger's. A histogram estimate, not a certified upper bound (the grid rounds each loss to the
nearest bin of width h).

    python benchmarks/replace_one_epsilon.py                          # a few schedules
    python benchmarks/replace_one_epsilon.py STATE/privacy-ledger.json  # a site's committed Gaussian rounds
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import norm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from privacy.accounting import epsilon  # noqa: E402


def _loss_pmf(sigma: float, q: float, h: float) -> tuple[int, np.ndarray]:
    x = np.linspace(-12 * sigma - 2, 12 * sigma + 2, 400_001)
    dx = x[1] - x[0]
    lp = np.logaddexp(np.log1p(-q) + norm.logpdf(x, 0, sigma), np.log(q) + norm.logpdf(x, 1, sigma))
    lm = np.logaddexp(np.log1p(-q) + norm.logpdf(x, 0, sigma), np.log(q) + norm.logpdf(x, -1, sigma))
    w = np.exp(lp) * dx
    w /= w.sum()
    k = np.round((lp - lm) / h).astype(np.int64)
    return int(k.min()), np.bincount(k - k.min(), weights=w)


def replace_one_epsilon(schedule: list[tuple[float, float, int]], delta: float, h: float = 2e-3) -> float:
    """Epsilon at `delta` of the composed (sigma, q, steps) parts under replace-one adjacency."""
    parts = [_loss_pmf(s, q, h) for s, q, _ in schedule]
    size = 1
    while size < sum(t * len(p) for (_, _, t), (_, p) in zip(schedule, parts)):
        size *= 2
    spectrum, offset = np.ones(size // 2 + 1, complex), 0
    for (_, _, t), (k0, p) in zip(schedule, parts):
        spectrum *= np.fft.rfft(p, size) ** t
        offset += t * k0
    pmf = np.maximum(np.fft.irfft(spectrum, size), 0)
    losses = (offset + np.arange(size)) * h

    def delta_at(e: float) -> float:
        m = losses > e
        return float(np.sum(pmf[m] * (1 - np.exp(e - losses[m]))))

    lo, hi = 0.0, 200.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


def main() -> None:
    rows = []
    if len(sys.argv) > 1:
        for path in sys.argv[1:]:
            state = json.loads(Path(path).read_text())
            parts = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in state["entries"]
                     if e.get("status") in ("committed", "pending") and not e.get("mechanism")]
            merged: dict = {}
            for s, q, t in parts:
                merged[(s, q)] = merged.get((s, q), 0) + t
            rows.append((path, [(s, q, t) for (s, q), t in merged.items()], float(state.get("delta", 1e-5))))
    else:
        rows = [(f"sigma {s}, q {q:.4f}, {t} steps", [(s, q, t)], 1e-5)
                for s, q, t in ((0.812, 1 / 32, 640), (1.0, 1 / 4, 40), (2.0, 0.5, 10))]
    print(f"{'schedule':<60} {'add/remove (ledger)':>20} {'replace-one':>12}")
    for name, schedule, delta in rows:
        print(f"{name[-60:]:<60} {epsilon(schedule, delta):>20.2f} {replace_one_epsilon(schedule, delta):>12.2f}")


if __name__ == "__main__":
    main()
