"""The subsampled Skellam bound (privacy/accounting.py, subsampled_rdp) against exact Renyi divergences.

For a 1-D Skellam of variance V and an integer shift s (sensitivities l2 = l1 = s) the outputs without and with
the record are P = Sk and Q = Sk + s; with Poisson sampling at rate q the record's presence gives M = (1-q) P + q Q.
Both directions of add/remove, D_a(M||P) (removal) and D_a(P||M) (addition), are computed exactly on the
integers in log space, and the accountant's bound must lie above both."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import gammaln, logsumexp

from privacy.accounting import skellam_rdp, subsampled_rdp

SPAN = 1500  # |z| <= SPAN: the tails beyond carry no weight even at order 32, shift 4, variance 2 (checked by the mass)
ORDERS = (2, 3, 5, 8, 16, 32)


def skellam_logpmf(variance: float) -> np.ndarray:
    """log P(Sk(mu, mu) = z) for z in [-SPAN, SPAN], mu = V / 2: log of sum_j Pois(j + |z|; mu) Pois(j; mu)."""
    mu = variance / 2
    z = np.abs(np.arange(-SPAN, SPAN + 1))[:, None]
    j = np.arange(0, 400)[None, :]
    terms = (2 * j + z) * math.log(mu) - gammaln(j + 1) - gammaln(j + z + 1)
    return -2 * mu + logsumexp(terms, axis=1)


def renyi(log_p: np.ndarray, log_q: np.ndarray, a: int) -> float:
    """D_a(p || q) of two distributions on the same points, in log space."""
    return float(logsumexp(a * log_p + (1 - a) * log_q)) / (a - 1)


def zhu_wang_general(a: int, q: float, rdp) -> float:
    """Zhu & Wang's general bound (ICML 2019, Theorem 5), the accountant's previous one, for comparison."""
    terms = [(a - 1) * math.log1p(-q) + math.log1p((a - 1) * q)]
    for k in range(2, a + 1):
        c = gammaln(a + 1) - gammaln(k + 1) - gammaln(a - k + 1) + (a - k) * math.log1p(-q) + k * math.log(q)
        terms.append(c + (k - 1) * rdp(k) + (math.log(3) if k >= 3 else 0.0))
    return float(logsumexp(terms)) / (a - 1)


@pytest.mark.parametrize("variance", [2.0, 8.0, 50.0])
def test_the_bound_is_above_both_exact_directions_of_the_subsampled_skellam(variance):
    log_p = skellam_logpmf(variance)
    assert abs(math.expm1(float(logsumexp(log_p)))) < 1e-12  # the truncation keeps all the mass
    for shift in (1, 2, 3, 4):
        log_q = np.concatenate([np.full(shift, -np.inf), log_p[:-shift]])  # Sk + shift

        def rdp(k: int) -> float:
            return skellam_rdp(k, shift, shift, variance)

        for q in (0.01, 0.1, 0.3, 0.9):
            log_m = np.logaddexp(math.log1p(-q) + log_p, math.log(q) + log_q)
            for a in ORDERS:
                removal, addition = renyi(log_m, log_p, a), renyi(log_p, log_m, a)
                bound = subsampled_rdp(a, q, rdp)
                assert addition <= removal + 1e-9, (variance, shift, q, a)  # the symmetric noise's lemma
                assert removal <= bound + 1e-9, (variance, shift, q, a)
                assert bound <= zhu_wang_general(a, q, rdp) + 1e-12

                # with the exact unsampled divergence in place of the Skellam's RDP bound, the expansion is exact
                def exact(k: int) -> float:
                    return renyi(log_q, log_p, k)
                assert subsampled_rdp(a, q, exact) == pytest.approx(min(removal, exact(a)), rel=1e-7, abs=1e-12)


def test_a_worst_case_above_the_largest_budget_pays_its_bad_events_at_its_own_epsilon():
    # (1 + e^eps) P in delta at the epsilon claimed: a site's own share alone at sample rate 0.1 (250 rounds,
    # 8 trusted) would be epsilon ~194 by RDP, where e^194 P is far above delta: no finite epsilon is proven
    import math

    from privacy.accounting import bad_event_delta, epsilon
    from privacy.distributed import run_plan

    low, high = (run_plan(1.0, 258_431, 8, q, 8.0, 1e-5, 250) for q in (0.1, 0.3))
    assert math.isinf(epsilon([low.steps(250, worst_case=True)], 1e-5))
    wc = high.steps(250, worst_case=True)
    e = epsilon([wc], 1e-5)
    assert 30 < e < 100 and bad_event_delta([wc], e) < 1e-5  # below MAX_BUDGET nothing changes
    assert epsilon([low.steps(250)], 1e-5) <= 8.0  # nor under the trust assumption


def test_a_worst_case_above_the_largest_budget_is_a_claim_whose_own_bad_event_price_holds():
    # a history whose RDP epsilon is above MAX_BUDGET with a bad-event probability small enough for it
    from opacus.accountants.analysis.rdp import get_privacy_spent

    from privacy.accounting import MAX_BUDGET, RDP_ORDERS, SkellamSteps, bad_event_delta, epsilon, skellam_steps_rdp

    m = SkellamSteps(l2=1.0, l1=1.0, variance=0.5, sample_rate=1.0, steps=20, bad_event=math.exp(-170) / 20)
    e = epsilon([m], 1e-5)
    assert MAX_BUDGET < e < math.inf
    rdp_at_claim, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=skellam_steps_rdp(m, RDP_ORDERS),
                                        delta=1e-5 - bad_event_delta([m], e))
    assert rdp_at_claim <= e
