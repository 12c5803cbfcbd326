"""Record-level DP accounting for a site: epsilon of a DP-SGD history, and the noise for a schedule.

A history is a list of mechanisms: (noise_multiplier, sample_rate, steps) for the Gaussian steps of
DP-SGD at a site (`dp-mode = "site"`, the format of Opacus' PRV accountant), and `SkellamSteps` for the
Skellam steps of `dp-mode = "distributed"` (privacy/distributed.py). Everything a site ever ran on its
data is composed into one history, across rounds, runs and modes; the noise is chosen once per run so
that the whole planned schedule, composed with what was already spent, lands on the site's budget (see
shared/notes/opacus.md for the common per-round mistakes this avoids).

A Gaussian-only history is accounted by Opacus' PRV accountant (tightest). A history with Skellam steps
is accounted in Renyi DP, all of it: Opacus' RDP of the sampled Gaussian for the Gaussian steps, the
Skellam RDP of Agarwal, Kairouz & Liu (NeurIPS 2021, Theorem 3.5) amplified by Poisson subsampling with
the binomial expansion that is exact for the Gaussian (`subsampled_rdp`: the Skellam's noise is symmetric,
which makes it valid in both directions of add/remove) for the Skellam steps, summed order by order and
converted by Opacus' `get_privacy_spent`.

Bad events, the Skellam steps' and the padded batches' (`Overflow`: a Poisson sample outgrowing its padding, when the
step's time shows the sample's size), are paid in delta: the mechanism run and the one analysed differ with
probability at most P, the history's summed bad-event probabilities, which costs (1 + e^eps) P of delta for a claim
of epsilon eps (a total-variation argument). `epsilon` reports the smallest claim it can prove that pays its own
price: priced at the epsilon it reports, not at the largest budget (`priced`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln, logsumexp

from privacy import MAX_BUDGET, MIN_RUN_SHARE  # MAX_BUDGET re-exported: the largest budget a site may set

Gaussian = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


@dataclass(frozen=True)
class SkellamSteps:
    """`steps` steps of the Poisson-subsampled Skellam mechanism, in grid units (privacy/distributed.py).

    l2, l1: the sensitivity of the grid vector to one record (after randomized rounding, see there);
    variance: the variance of the aggregate noise per coordinate (a Skellam's, 2 x its Poisson mean);
    bad_event: a bound on the probability per step that the analysed mechanism and the one run differ
    (the rounding's norm exceeding l2, a value outside SecAgg+'s range), paid in delta."""

    l2: float
    l1: float
    variance: float
    sample_rate: float
    steps: int
    bad_event: float = 0.0

    def key(self) -> tuple:
        return (self.l2, self.l1, self.variance, self.sample_rate, self.bad_event)


@dataclass(frozen=True)
class Overflow:
    """`steps` padded DP steps (privacy/sampling.py), each of whose Poisson samples outgrows its padded batch with
    probability at most `tail`: then that step is computed whole and its time shows the sample's size, which the
    analysis assumes secret. A bad event, paid in delta (`priced`); no Renyi divergence of its own."""

    steps: int
    tail: float


Mechanism = Gaussian | SkellamSteps | Overflow
RDP_ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256)  # integer: the subsampling bound needs them
EPS_ERROR = 0.01  # PRV accountant's epsilon discretisation error; the upper bound is reported
PRV_LIMIT = MAX_BUDGET  # above this RDP bound PRV's grid grows to many GB; such spends are reported by RDP
MAX_NOISE_MULTIPLIER = 1024.0  # the noise search's ceiling: a schedule over the budget even at it is refused


def _opacus_accountants():
    """Opacus' accountant module, imported on first use: importing Opacus costs ~5 s of CPU (torch and all of
    Opacus' training side come with it), and a deployed site starts a fresh process for every message, most
    of which (SecAgg+'s key stages, evaluation, delivery) read the ledger without accounting anything.

    Opacus recomputes the sampled Gaussian's RDP at each order, a pure function of (q, sigma, order) summed
    as a slow Python series for fractional orders, for every history entry on every call, and again inside its
    PRV accountant's domain: in a site's DP round (noise search, the ledger's check and commit, the cross-check
    with Opacus' accountant) that was ~3/4 of the round's time, all of it repeats. Memoising the function
    changes no value. Both names Opacus calls it by are replaced."""
    from opacus import accountants
    from opacus.accountants.analysis import rdp as rdp_analysis
    from opacus.accountants.analysis.prv import prvs

    if not hasattr(rdp_analysis._compute_rdp, "cache_info"):
        log_a_fractional.opacus = rdp_analysis._compute_log_a_for_frac_alpha  # kept for the test against it
        rdp_analysis._compute_log_a_for_frac_alpha = log_a_fractional
        cached = functools.lru_cache(maxsize=1 << 16)(rdp_analysis._compute_rdp)
        rdp_analysis._compute_rdp = prvs._compute_rdp = cached
    return accountants


def log_a_fractional(q: float, sigma: float, alpha: float, chunk: int = 256) -> float:
    """Opacus' `_compute_log_a_for_frac_alpha` (log A_alpha of the sampled Gaussian at a fractional order,
    Mironov, Talwar & Zhang 2019, Section 3.3), the same series summed with numpy instead of term by term
    in Python: it is called for each of Opacus' 99 fractional orders and each noise multiplier a site's
    noise search tries, ~0.01 s each, most of a first DP round's time. Same terms, same stopping rule (the
    first term of both parts below e^-30 is the last one summed); installed in Opacus' place by
    `_opacus_accountants`, and tests/test_privacy_ledger.py checks it against Opacus' own (relative 1e-9)."""
    from scipy import special

    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1q, two_s2 = math.log(q), math.log(1 - q), 2 * sigma**2
    s0, s1, signs = [], [], []
    start = 0
    while True:
        i = np.arange(start, start + chunk, dtype=np.float64)
        coef = special.binom(alpha, i)
        with np.errstate(divide="ignore"):
            log_coef = np.log(np.abs(coef))
        j = alpha - i
        # Opacus' log(0.5) + _log_erfc(x / (sqrt(2) sigma)) is log_ndtr(-x / sigma): the halves cancel
        log_s0 = log_coef + i * log_q + j * log_1q + (i * i - i) / two_s2 + special.log_ndtr((z0 - i) / sigma)
        log_s1 = log_coef + j * log_q + i * log_1q + (j * j - j) / two_s2 + special.log_ndtr((j - z0) / sigma)
        done = np.flatnonzero(np.maximum(log_s0, log_s1) < -30)
        stop = int(done[0]) + 1 if len(done) else chunk
        s0.append(log_s0[:stop]), s1.append(log_s1[:stop]), signs.append(np.sign(coef[:stop]))
        if len(done):
            break
        start += chunk
    sign = np.concatenate(signs)
    return float(np.logaddexp(_signed_logsumexp(np.concatenate(s0), sign),
                              _signed_logsumexp(np.concatenate(s1), sign)))


def _signed_logsumexp(log_terms: np.ndarray, sign: np.ndarray) -> float:
    """log(sum(sign * exp(log_terms))) of a positive sum."""
    top = float(log_terms.max())
    return math.log(float(np.sum(sign * np.exp(log_terms - top)))) + top


UNPROVABLE = (" (the history's bad events, a padded batch outgrown or a Skellam rounding that failed, each of a tiny "
              "probability P, cost (1 + e^eps) P of delta at a claim of eps: all of it above an epsilon the history "
              "sets, whatever the budget; privacy/accounting.py `priced`, docs/privacy.md)")


class BudgetError(ValueError):
    """A privacy budget that cannot be met or would be exceeded; the message says by how much."""


def compact(history: list[Mechanism]) -> list[Mechanism]:
    """Merge entries of the same mechanism: T1 then T2 steps of one mechanism = T1 + T2 steps."""
    merged: OrderedDict[tuple, int] = OrderedDict()
    skellam: OrderedDict[tuple, SkellamSteps] = OrderedDict()
    overflow: OrderedDict[float, int] = OrderedDict()
    for m in history:
        if isinstance(m, Overflow):
            if m.steps > 0 and m.tail > 0:
                overflow[float(m.tail)] = overflow.get(float(m.tail), 0) + int(m.steps)
            continue
        if isinstance(m, SkellamSteps):
            if m.steps > 0:
                kept = skellam.get(m.key())
                skellam[m.key()] = m if kept is None else SkellamSteps(*m.key()[:4], kept.steps + m.steps, m.bad_event)
            continue
        sigma, q, steps = m
        if steps > 0:
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    return ([(s, q, t) for (s, q), t in merged.items()] + list(skellam.values())
            + [Overflow(t, tail) for tail, t in overflow.items()])


def skellam_rdp(order: int, l2: float, l1: float, variance: float) -> float:
    """RDP at `order` of the multi-dimensional Skellam mechanism (Agarwal, Kairouz, Liu 2021, Theorem 3.5)
    with noise of `variance` per coordinate (Sk(mu, mu), variance = 2 mu) and sensitivities l2, l1:
        alpha l2^2 / (2 V) + min(((2 alpha - 1) l2^2 + 6 l1) / (4 V^2), 3 l1 / (2 V)).
    The first term is the Gaussian mechanism's of the same variance; the second vanishes as V grows."""
    a = float(order)
    return a * l2 ** 2 / (2 * variance) + min(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * variance ** 2),
                                             3 * l1 / (2 * variance))


def subsampled_rdp(order: int, q: float, rdp) -> float:
    """RDP at integer `order` a >= 2, under add/remove adjacency, of an additive mechanism with symmetric noise
    (the Skellam, the Gaussian) and RDP `rdp(k)` at integer k, run on a Poisson sample of rate q:
        (1/(a-1)) log((1-q)^(a-1) (1 + (a-1) q) + sum_{k=2..a} C(a,k) (1-q)^(a-k) q^k e^((k-1) rdp(k))),
    capped by the unsampled rdp(a). This is the bound Zhu & Wang (ICML 2019) prove tight for the Gaussian and
    Laplace mechanisms, and Opacus' integer-order formula for the sampled Gaussian; their general bound
    (Theorem 5: a factor 3 on the terms k >= 3) is not needed here. Why it holds in both directions (in full:
    every budget rests on it), with P the output without the record, Q with it, L = dQ/dP, M = (1-q) P + q Q:
    - removal: e^((a-1) D_a(M||P)) = E_P[(1-q+qL)^a] = sum_k C(a,k) (1-q)^(a-k) q^k E_P[L^k] exactly, with
      E_P[L] = 1 and E_P[L^k] = e^((k-1) D_k(Q||P)) <= e^((k-1) rdp(k)).
    - addition: D_a(P||M) <= D_a(M||P). P and Q have the same support and the noise's symmetry z -> c - z
      swaps them, so L under P is distributed as 1/L under Q: E_P[h(L)] = E_P[L h(1/L)] for any h. Hence
      E_P[(1-q+qL)^a - (1-q+qL)^(1-a)] is the P-average of (Psi(a) - Psi(1-a))/2 at x = L, where
      Psi(b) = u^b + x^(1-b) v^b, u = 1-q+qx, v = (1-q) x + q. Psi(0) = Psi(1) = 1 + x and, with b = 1/2 + t,
      Psi(1/2+t) - Psi(1/2-t) = 2 (sqrt(u) sinh(t log u) + x sqrt(v/x) sinh(t log(v/x))). log u and log(v/x)
      have opposite signs (x != 1) and a non-negative sum, log(u v / x) = log(1 + q (1-q) (x + 1/x - 2)): the
      difference is A sinh(c1 t) - B sinh(c2 t), A, B > 0, c1 >= c2 > 0, which vanishes at t = 1/2 and at
      no other t > 0 (sinh(c1 t) / sinh(c2 t) increases; c1 = c2 makes it 0 for all t), so it is >= 0 for
      every t >= 1/2, i.e. every a >= 1.
    tests/test_skellam_accounting.py checks both directions against the exact divergences of 1-D Skellams."""
    alpha = int(order)
    if alpha < 2 or alpha != order:
        raise ValueError(f"subsampled RDP needs an integer order >= 2, got {order}")
    if q >= 1:
        return rdp(alpha)
    log_terms = [(alpha - 1) * math.log1p(-q) + math.log1p((alpha - 1) * q)]
    for k in range(2, alpha + 1):
        log_comb = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
        log_terms.append(log_comb + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k - 1) * rdp(k))
    return min(float(logsumexp(log_terms)) / (alpha - 1), rdp(alpha))


def skellam_steps_rdp(m: SkellamSteps, orders=RDP_ORDERS) -> np.ndarray:
    """RDP of `m.steps` subsampled Skellam steps at every order (composition adds RDP)."""
    return m.steps * _one_skellam_step_rdp(m.l2, m.l1, m.variance, m.sample_rate, tuple(orders))


@functools.lru_cache(maxsize=256)
def _one_skellam_step_rdp(l2: float, l1: float, variance: float, sample_rate: float, orders: tuple) -> np.ndarray:
    """One subsampled Skellam step's RDP at every order: a pure function of the mechanism, the same every
    round of a run, and the sum of ~10^4 terms per order (the binomial expansion up to order 256), so memoised:
    it was a quarter of a distributed round's time at a site, recomputed by every ledger check."""
    def rdp(a: int) -> float:
        return skellam_rdp(a, l2, l1, variance)
    out = np.array([subsampled_rdp(a, sample_rate, rdp) for a in orders])
    out.flags.writeable = False  # shared by every caller
    return out


def bad_event_probability(history: list[Mechanism]) -> float:
    """P: the probability, over the whole history, that the mechanism run and the one analysed differ (the Skellam
    steps' rounding and range events, the padded batches' overflows), bounded by the sum over steps."""
    return (sum(m.steps * m.bad_event for m in history if isinstance(m, SkellamSteps))
            + sum(m.steps * m.tail for m in history if isinstance(m, Overflow)))


def bad_event_delta(history: list[Mechanism], at_epsilon: float) -> float:
    """The delta the history's bad events cost a claim of epsilon `at_epsilon`: (1 + e^eps) P (a total-variation
    argument: on the bad event the run's output may be anything; elsewhere it is the analysed mechanism's)."""
    p = bad_event_probability(history)
    if p == 0:
        return 0.0
    return math.inf if at_epsilon > 700 else (1 + math.exp(at_epsilon)) * p


BAD_EVENT_RESERVE = 2.0 ** -20  # the share of delta set aside for the bad events when their price fits in it


def priced(epsilon_at, delta: float, history: list[Mechanism]) -> tuple[float, float]:
    """(eps, the delta charged to the mechanisms): an epsilon that pays its own bad-event price, eps >=
    epsilon_at(delta - (1 + e^eps) P), for `epsilon_at(d)` the mechanisms' epsilon at delta d (decreasing in d), and
    the d it was taken at; (inf, 0) when none is found. Usually one call: the epsilon at delta x (1 -
    BAD_EVENT_RESERVE), valid when its price fits in the reserve. Else a claim c with g(c) = epsilon_at(delta -
    price(c)) <= c is searched for: g iterated from below climbs to its least fixed point without passing it, and
    where that climb is slow (near a tangency) the least excess g(c) - c below the epsilon where the price takes all
    of delta is searched (golden section), and from a c it finds, the crossing below it (bisection); g(c) then pays
    its price (its price is at most c's)."""
    p = bad_event_probability(history)
    if p == 0:
        return epsilon_at(delta), delta
    reserve = delta * BAD_EVENT_RESERVE
    eps = epsilon_at(delta - reserve)
    if bad_event_delta(history, eps) <= reserve:
        return eps, delta - reserve
    ceiling = math.log(delta / p - 1) if delta > 2 * p else -math.inf  # the price takes all of delta there

    def g(c: float) -> tuple[float, float]:  # (epsilon_at the delta left at claim c, that delta)
        rest = delta - bad_event_delta(history, c)
        return (epsilon_at(rest), rest) if rest > 0 and c < ceiling else (math.inf, 0.0)

    def least(below: float, c: float, at_c: tuple[float, float]) -> tuple[float, float]:
        # g(below) > below, g(c) <= c: bisect to the crossing, the least claim found (rises with the curve)
        for _ in range(30):
            if c - below <= 1e-6 * c:
                break
            mid = (below + c) / 2
            at_mid = g(mid)
            if at_mid[0] <= mid:
                c, at_c = mid, at_mid
            else:
                below = mid
        return at_c

    for _ in range(6):
        claim = eps * (1 + 1e-6) + 1e-9
        found, rest = g(claim)
        if found <= claim:
            return found, rest
        if math.isinf(found):
            break
        eps = found
    golden = (math.sqrt(5) - 1) / 2
    lo, hi = eps, ceiling
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    (fa, ra), (fb, rb) = g(a), g(b)
    for _ in range(30):
        for c, f, r in ((a, fa, ra), (b, fb, rb)):
            if f <= c:
                return least(eps, c, (f, r))
        if fa - a < fb - b:
            hi, b, fb, rb = b, a, fa, ra
            a = hi - golden * (hi - lo)
            fa, ra = g(a)
        else:
            lo, a, fa, ra = a, b, fb, rb
            b = lo + golden * (hi - lo)
            fb, rb = g(b)
    return math.inf, 0.0


def rdp_epsilon(history: list[Mechanism], delta: float, orders=RDP_ORDERS) -> float:
    """Epsilon of the whole history in Renyi DP (Gaussian steps by Opacus' RDP, Skellam steps above), its bad events
    paid in delta at the epsilon claimed (`priced`)."""
    return _rdp_priced(compact(history), delta, orders)[0]


def _rdp_priced(hist: list[Mechanism], delta: float, orders=RDP_ORDERS) -> tuple[float, float]:
    _opacus_accountants()
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if all(isinstance(m, Overflow) for m in hist):
        return 0.0, delta
    rdp = np.zeros(len(orders))
    for m in hist:
        if isinstance(m, SkellamSteps):
            rdp = rdp + skellam_steps_rdp(m, orders)
        elif not isinstance(m, Overflow):
            sigma, q, steps = m
            rdp = rdp + np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders)))

    def at(d: float) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha": then epsilon is tiny anyway
            return float(get_privacy_spent(orders=list(orders), rdp=rdp, delta=d)[0])
    return priced(at, delta, hist)


def epsilon(history: list[Mechanism], delta: float) -> float:
    """Epsilon of composing every mechanism in `history` at `delta`, bad events paid at the claim (`priced`): the PRV
    upper bound for a Gaussian-only history, the RDP bound (rdp_epsilon) once it holds Skellam steps."""
    return epsilon_and_delta(history, delta)[0]


def epsilon_and_delta(history: list[Mechanism], delta: float) -> tuple[float, float]:
    """(epsilon, the delta its mechanisms were charged at): `delta` less the bad events' price (`priced`). What another
    accountant of the same mechanisms, which knows no bad events (Opacus'), must be compared at."""
    hist = compact(history)
    gaussian = [m for m in hist if not isinstance(m, Overflow)]
    if not gaussian:
        return 0.0, delta
    if any(isinstance(m, SkellamSteps) for m in gaussian):
        return _rdp_priced(hist, delta)
    # RDP is a looser upper bound than PRV (so reporting it is conservative) and cheap. PRV's
    # discretisation needs memory that grows with epsilon: past PRV_LIMIT (no real budget is that
    # large) the RDP bound is the answer.
    accountants = _opacus_accountants()
    composed = []  # the history's discretised PRV, built once: each further delta is a lookup in it

    def at(d: float) -> float:
        rdp = accountants.RDPAccountant()
        rdp.history = gaussian
        with np.errstate(divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha" at a tiny epsilon
            rdp_eps = float(rdp.get_epsilon(delta=d))
        if rdp_eps > PRV_LIMIT:
            return rdp_eps
        # Opacus' PRVAccountant.get_epsilon(d) at the history's delta: its discretisation (PRVAccountant._get_dprv, of
        # the pinned opacus 1.6.0) for a delta error of delta / 1000, whose bounds hold at any d above that error
        # (at d = delta it is get_epsilon's own figure; below, the error is a larger share of d: a looser bound)
        error = delta / 1000
        if d <= 2 * error:  # most of d would be the discretisation's own error: RDP's bound
            return rdp_eps
        if not composed:
            acc = accountants.PRVAccountant()
            acc.history = gaussian
            composed.append(acc._get_dprv(eps_error=EPS_ERROR, delta_error=error))
        try:
            with np.errstate(divide="ignore", over="ignore"):
                return min(rdp_eps, float(composed[0].compute_epsilon(d, error, EPS_ERROR)[2]))
        except (ValueError, RuntimeError):  # d too close to the error (a bad-event price near all of delta)
            return rdp_eps
    return priced(at, delta, hist)


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
    while (reached := eps_at(hi)) > budget_epsilon:
        hi *= 2
        if hi > MAX_NOISE_MULTIPLIER:
            if math.isinf(reached):  # at the largest noise tried: the bad events, not the noise, bound the claim
                raise BudgetError(f"no noise for {steps} more steps keeps the site's epsilon provable{UNPROVABLE}: "
                                  "stop training on this data")
            raise BudgetError(
                f"the site has spent epsilon {already:.3f} of its budget {budget_epsilon:g}; even noise "
                f"multiplier {MAX_NOISE_MULTIPLIER:g} for {steps} more steps would exceed it. Raise the site's "
                "budget (a decision for its data governance) or stop training on this data"
            )
    lo = 0.0 if hi == 1.0 else hi / 2
    while hi - lo > tolerance * max(lo, 1e-3) and hi - lo > 1e-4:
        mid = (lo + hi) / 2
        if mid > 0 and eps_at(mid) <= budget_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def public_schedule(sample_rate: float, local_epochs: int, rounds: int) -> tuple[float, int]:
    """(sample_rate, total steps) of a site-mode DP run: `round(1 / q)` Poisson-sampled steps per local epoch at
    the run config's sample rate q, as privacy.sampling.PaddedPoissonLoader (the sites' default) runs them.

    A function of the run config alone: under add/remove adjacency (what the accountant analyses) a schedule
    derived from the site's patient count would differ between neighbouring datasets, and the count would be
    published through it (the epsilon, the noise multiplier and the steps are sent). Opacus' DPDataLoader
    (dp-pad-batches = false) runs int(1 / q) steps per epoch, one fewer for some q; the ledger commits the steps
    actually run."""
    per_epoch = max(1, round(1.0 / sample_rate))
    return sample_rate, per_epoch * local_epochs * rounds


def default_run_epsilon() -> float:
    """What one run at the run config's defaults may add to a site's spend (its `epsilon`)."""
    from shared_models.run_config import PrivacySection

    return PrivacySection.model_fields["epsilon"].default


def low_budget_warning(budget: float, delta: float | None = None) -> str:
    """Why a site with this privacy budget (at `delta`, default the run config's) refuses every run at the run config's
    defaults, and what the budget could still pay for; "" when it joins such a run. A new run is joined only with
    MIN_RUN_SHARE of its epsilon left, and a schedule cannot train at all within less than its epsilon at
    MAX_NOISE_MULTIPLIER. `oncofed site init` and the site's preflight say it (a warning: a site may mean to be strict);
    without it every round is refused later, the reason only in the site's audit log and the server's log."""
    from shared_models.run_config import FederationSection, PrivacySection, TrainingSection

    def default(section, name):
        return section.model_fields[name].default

    run_epsilon = default_run_epsilon()
    needed = MIN_RUN_SHARE * run_epsilon
    if budget >= needed:
        return ""
    delta = default(PrivacySection, "delta") if delta is None else delta
    rounds, epochs = default(FederationSection, "num_rounds"), default(TrainingSection, "local_epochs")
    rate = default(PrivacySection, "sample_rate")
    q, steps = public_schedule(rate, epochs, rounds)
    schedule = f"{steps} DP-SGD steps: {rounds} rounds of {epochs} local epochs at sample rate {rate:g}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' "optimal order is the largest alpha" at this much noise
        floor = epsilon([(MAX_NOISE_MULTIPLIER, q, steps)], delta)
        sigmas = None if budget < floor else [noise_multiplier_for(b, delta, q, steps) for b in (budget, run_epsilon)]
    if sigmas is None:
        can = (f"no run of the default schedule ({schedule}) can train within it at all: even at noise multiplier "
               f"{MAX_NOISE_MULTIPLIER:g}, the largest the site uses, that schedule costs epsilon {floor:.3g} "
               f"(at delta {delta:g})")
    else:
        sigma, sigma_default = sigmas
        can = (f"it joins only runs asking for epsilon at most {budget / MIN_RUN_SHARE:.3g}, and its whole budget "
               f"spent on one run of the default schedule ({schedule}) takes noise multiplier {sigma:.3g}, "
               f"{sigma / sigma_default:.1f} times a default run's {sigma_default:.3g}")
    return (f"privacy budget {budget:g} is below {needed:g}, half the epsilon ({run_epsilon:g}) of a run at the "
            f"consortium's default settings: this site will refuse every such run (a site joins a new run only while "
            f"at least half its epsilon is left of the budget), the reason only in its audit log and the server's log; "
            f"{can}. Keep it if the site means to be this strict; a budget of {needed:g} or more joins a default run")
