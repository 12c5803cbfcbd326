"""Distributed DP under SecAgg+: the Skellam mechanism, exact on Flower's quantisation grid.

In `dp-mode = "distributed"` a round is one DP-SGD step taken by the whole consortium. Each site
sends, through SecAgg+, its sum of clipped per-sample gradients x (||each|| <= C), scaled by the grid
scale gamma, randomly rounded to integers, plus an integer noise share:

    z = round_random(gamma * x) + Sk(lambda, lambda),   lambda = V / (2 t)

Sk is the Skellam distribution (the difference of two Poissons of mean lambda, variance 2 lambda).
Skellams add up to a Skellam: any t = `trusted-sites` honest sites' shares sum to noise of variance
exactly V, the variance the accountant assumed (Agarwal, Kairouz, Liu, "The Skellam Mechanism for
Differentially Private Federated Learning", NeurIPS 2021). The server unmasks only the sum of the z.

Exactness on Flower's grid (flwr 1.41, secaggplus_mod._collect_masked_vectors and quantization.py):
the site hands Flower the float z * step, step = 2 c / Q (c = clipping_range, Q = quantization_range,
both powers of two), with num_examples == max_weight so that Flower's weight factor dq_ratio is 1.0.
Flower computes (z * step + c) * Q / (2 c) = z + Q / 2: exact in float64 (powers of two times
integers below 2^53), so its stochastic rounding (ceil, then a draw from numpy's global generator
against ceil - value = 0) never changes a value. Every site's z lies in [-Q/2, Q/2] (checked: Flower
would clip silently), so each quantised value lies in [0, Q] and the sum of n sites' values stays below
the modulus 2^32 when (n + 1) Q <= 2^32 (the server's choice of Q, server/app.py): no wrap-around.
The server's dequantised mean is (sum of z) * step / n in float64; `decode_sum` recovers the integer
sum exactly (its float error is below 2^-19 of one grid step). tests/test_distributed_dp.py runs
Flower's own functions to show it bit for bit.

Privacy of the rounding (record level): neighbouring datasets change x by one clipped gradient g. With
one uniform draw per coordinate shared by both (round_random(v) = floor(v + U)), the two rounded
vectors differ by a vector distributed exactly as round_random(gamma g), whose L2 norm exceeds
    l2 = sqrt((gamma C)^2 + d / 4 + sqrt(2 ln(1 / beta)) (gamma C + sqrt(d) / 2))
with probability at most beta (Kairouz, Liu, Steinke, ICML 2021, Theorem 1 / Google's
`rounded_l2_norm_bound`); its L1 norm is at most l2 min(sqrt(d), l2) (integers). The mechanism is a
mixture over the draws of Skellam mechanisms with that sensitivity (Renyi divergence is jointly
quasi-convex); the draws that break the bound, and noise so large that a value would leave Flower's
range (then the site withdraws from the round), are bad events of probability <= BAD_EVENT per step,
paid in delta (privacy/accounting.py, bad_event_delta). The grid scale gamma is the smallest power of
two with gamma C >= ROUNDING_HEADROOM sqrt(d): the rounding then inflates the sensitivity by < 1%.

Randomness: rounding and noise come from numpy generators seeded from the operating system's CSPRNG
(privacy/dp_randomness.py, dp_numpy_generator), never from the run's seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from privacy.accounting import BudgetError, Mechanism, SkellamSteps, epsilon

LOG2_BAD_EVENT = -200  # per step: the rounding's norm bound fails, or a value would leave Flower's range
BAD_EVENT = 2.0 ** LOG2_BAD_EVENT
ROUNDING_HEADROOM = 8.0  # gamma C >= 8 sqrt(d): the rounding inflates the L2 sensitivity by < 1%
CLIP_MARGIN = 1e-4  # per-sample norms are computed in float32: the sensitivity counts C (1 + margin)


class GridError(ValueError):
    """A distributed-DP configuration whose values could be clipped by SecAgg+ or wrap its modulus;
    the message names the setting and the fix."""


def _power_of_two(x: float) -> bool:
    m, _ = math.frexp(float(x))
    return x > 0 and m == 0.5


@dataclass(frozen=True)
class SecAggGrid:
    """The SecAgg+ parameters a site's values go through (Flower's setup stage sends them to every site)."""

    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float

    @property
    def step(self) -> float:  # one grid unit, as a float on Flower's side
        return 2 * self.clipping_range / self.quantization_range

    @property
    def half_range(self) -> int:  # the largest |z| Flower takes without clipping
        return self.quantization_range // 2

    def off_grid(self, arrays: list[np.ndarray], weight: float, n_sites: int) -> str:
        """Why Flower's arithmetic on this grid would not be the identity on `arrays` sent with `weight` ("" when it
        is): the values must be whole grid steps within +-half_range (what `to_flower` gives), with weight
        max-weight, and the grid itself must pass `check`. For a released update resent into another session."""
        try:
            self.check(n_sites)
        except GridError as e:
            return str(e)
        if weight != self.max_weight:
            return f"weight {weight}, this grid's max-weight {self.max_weight:g}"
        z = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays]) / self.step
        if not np.array_equal(z, np.rint(z)) or np.abs(z).max(initial=0) > self.half_range:
            return f"its values are not on this grid's step {self.step:g} within +-{self.half_range}"
        return ""

    def check(self, n_sites: int) -> None:
        """Refuse parameters under which Flower's arithmetic is not the identity on the grid, or a sum of
        `n_sites` in-range values could wrap the modulus."""
        problems = []
        if not _power_of_two(self.clipping_range):
            problems.append(f"secagg-clipping-range {self.clipping_range:g} is not a power of two (Flower's "
                            "scaling would round the grid values); use e.g. 1.0")
        if not _power_of_two(self.quantization_range) or self.quantization_range < 4:
            problems.append(f"the quantization range {self.quantization_range} is not a power of two >= 4")
        if self.quantization_range > 2 ** 30:
            problems.append(f"the quantization range {self.quantization_range} exceeds 2^30 (Flower rounds to int32)")
        if self.max_weight != int(self.max_weight) or self.max_weight < 1:
            problems.append(f"secagg-max-weight {self.max_weight:g} must be a whole number (a site's weight must "
                            "equal it exactly, so that Flower's weight factor is exactly 1)")
        if (n_sites + 1) * self.quantization_range > self.modulus_range:
            problems.append(f"{n_sites} sites' values of range {self.quantization_range} could wrap the modulus "
                            f"{self.modulus_range}")
        if problems:
            raise GridError("distributed DP: " + "; ".join(problems))


@dataclass(frozen=True)
class SkellamPlan:
    """The mechanism of one distributed-DP run at a site, fixed at its first round."""

    scale: float  # gamma: grid units per gradient unit (a power of two)
    max_grad_norm: float  # C
    dim: int  # d: the coordinates that carry gradients
    l2: float  # sensitivity in grid units (rounding included)
    l1: float
    variance: float  # the aggregate noise's variance per coordinate when trusted_sites shares are in it
    trusted_sites: int
    sample_rate: float

    @property
    def share_mean(self) -> float:
        """lambda: each Poisson of a site's Skellam share has this mean (share variance 2 lambda = V / t)."""
        return self.variance / (2 * self.trusted_sites)

    @property
    def noise_multiplier(self) -> float:
        """The aggregate noise's standard deviation in units of the clipping bound (DP-SGD's sigma)."""
        return math.sqrt(self.variance) / (self.scale * self.max_grad_norm)

    def steps(self, n: int, worst_case: bool = False) -> SkellamSteps:
        """n steps of this mechanism as the accountant takes them: with the trusted aggregate noise, or
        (worst_case) with this site's own share alone."""
        variance = self.variance / self.trusted_sites if worst_case else self.variance
        return SkellamSteps(self.l2, self.l1, variance, self.sample_rate, int(n), 2 * BAD_EVENT)  # rounding, range

    def to_dict(self) -> dict:
        return {"kind": "skellam", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "SkellamPlan":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def check_same_plan(p: SkellamPlan, server: dict | None) -> None:
    """Refuse a round whose server planned other aggregate noise than this site: every share must be
    1/t of the variance every party accounts for, or a site's guarantee no longer holds (a party on an
    older accountant, or a run started on one release and resumed on another)."""
    if not server:
        return
    theirs = (float(server["scale"]), float(server["variance"]))
    if theirs[0] != p.scale or not math.isclose(theirs[1], p.variance, rel_tol=1e-9):
        raise GridError(
            f"distributed DP: the server plans aggregate noise of variance {theirs[1]:.6g} on grid scale {theirs[0]:g}, "
            f"this site {p.variance:.6g} on {p.scale:g}: the server and the sites run different OncoFed accountants "
            "(privacy/accounting.py) or the run started on another release. Run the same release everywhere and "
            "finish a run on the release it started with")


def plan_message(p: SkellamPlan) -> str:
    """What the server sends every site as the protocol's NOISE_PLAN."""
    return json.dumps({"scale": p.scale, "variance": p.variance})


def grid_scale(max_grad_norm: float, dim: int) -> float:
    """gamma: the smallest power of two with gamma C >= ROUNDING_HEADROOM sqrt(d)."""
    return 2.0 ** math.ceil(math.log2(ROUNDING_HEADROOM * math.sqrt(dim) / max_grad_norm))


def rounded_sensitivity(scaled_norm: float, dim: int, beta: float = BAD_EVENT) -> tuple[float, float]:
    """(L2, L1) bounds, with probability >= 1 - beta, of the randomized rounding of a vector of L2 norm
    `scaled_norm` in d coordinates (Kairouz, Liu, Steinke 2021, Theorem 1)."""
    sq = scaled_norm ** 2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (scaled_norm + math.sqrt(dim) / 2)
    l2 = min(math.sqrt(sq), scaled_norm + math.sqrt(dim))
    return l2, l2 * min(math.sqrt(dim), l2)


def plan(max_grad_norm: float, dim: int, trusted_sites: int, sample_rate: float, variance: float = 1.0) -> SkellamPlan:
    """The mechanism for a model of `dim` coordinates (the noise `variance` is then chosen by `plan_for_budget`)."""
    if trusted_sites < 1:
        raise GridError(f"trusted-sites must be at least 1 (the site itself), got {trusted_sites}")
    if not 0 < sample_rate <= 1:
        raise GridError(f"sample-rate {sample_rate} must be in (0, 1]")
    gamma = grid_scale(max_grad_norm, dim)
    l2, l1 = rounded_sensitivity(gamma * max_grad_norm * (1 + CLIP_MARGIN), dim)
    return SkellamPlan(gamma, float(max_grad_norm), int(dim), l2, l1, float(variance), int(trusted_sites),
                       float(sample_rate))


def plan_for_budget(base: SkellamPlan, budget_epsilon: float, delta: float, steps: int,
                    spent: list[Mechanism] | None = None, tolerance: float = 0.01) -> SkellamPlan:
    """`base` with the smallest aggregate noise variance whose `steps` steps, composed with `spent`, stay
    within `budget_epsilon` at `delta` (binary search on the noise's standard deviation)."""
    if steps < 1:
        raise BudgetError(f"planned steps {steps} must be at least 1")
    spent = list(spent or [])

    def eps_at(std: float) -> float:
        return epsilon(spent + [_with(base, std ** 2).steps(steps)], delta)

    already = epsilon(spent, delta)
    unit = base.l2  # the noise std in units of the sensitivity: the noise multiplier
    hi = 1.0
    while eps_at(hi * unit) > budget_epsilon:
        hi *= 2
        if hi > 1024:
            raise BudgetError(
                f"the site has spent epsilon {already:.3f} of its budget {budget_epsilon:g}; even noise multiplier "
                f"1024 for {steps} more steps would exceed it. Raise the site's budget (a decision for its data "
                "governance) or stop training on this data")
    lo = 0.0 if hi == 1.0 else hi / 2
    while hi - lo > tolerance * max(lo, 1e-3) and hi - lo > 1e-4:
        mid = (lo + hi) / 2
        if mid > 0 and eps_at(mid * unit) <= budget_epsilon:
            hi = mid
        else:
            lo = mid
    return _with(base, (hi * unit) ** 2)


def run_plan(max_grad_norm: float, dim: int, trusted_sites: int, sample_rate: float, run_epsilon: float,
             delta: float, rounds: int) -> SkellamPlan:
    """The plan of a distributed run: a function of the run config and the model's size alone, so that every
    site (and the server, which prints it) computes the same aggregate noise and the shares agree."""
    return plan_for_budget(plan(max_grad_norm, dim, trusted_sites, sample_rate), run_epsilon, delta, rounds)


def run_config_plan(cfg, dim: int) -> SkellamPlan:
    """run_plan with a run config's terms (a shared_models.run_config.RunConfig): what the server prints and every site
    adds its share of."""
    return run_plan(cfg.privacy.max_grad_norm, dim, cfg.privacy.trusted_sites, cfg.privacy.sample_rate,
                    cfg.privacy.epsilon, cfg.privacy.delta, cfg.federation.num_rounds)


def _with(p: SkellamPlan, variance: float) -> SkellamPlan:
    return SkellamPlan(p.scale, p.max_grad_norm, p.dim, p.l2, p.l1, float(variance), p.trusted_sites, p.sample_rate)


def skellam_log_tail(k: float, mean: float) -> float:
    """log of a Chernoff bound on P(|Sk(mean, mean)| >= k): 2 exp(2 mean (cosh t - 1) - t k), t = asinh(k / 2 mean)."""
    if mean <= 0:
        return -math.inf if k > 0 else 0.0
    t = math.asinh(k / (2 * mean))
    return math.log(2) + 2 * mean * (math.cosh(t) - 1) - t * k


def sum_bound(p: SkellamPlan, n_patients: float) -> float:
    """The largest |value| of one coordinate of a sum of n clipped per-sample gradients (before the grid scale)."""
    return n_patients * p.max_grad_norm * (1 + CLIP_MARGIN)


def check_range(p: SkellamPlan, grid: SecAggGrid, n_patients: int) -> None:
    """Refuse a plan whose values could leave Flower's range [-Q/2, Q/2] at this site other than through the
    noise's tail of probability <= BAD_EVENT per step: the rounded sum of at most n clipped gradients is
    at most gamma n C + 1 per coordinate, whatever the data; the noise share needs the rest. The sites pass
    secagg-max-weight for n, a public bound: a refusal that turned on a site's own count would publish it."""
    data = p.scale * sum_bound(p, n_patients) + 1
    room = grid.half_range - data
    if room <= 0 or skellam_log_tail(room, p.share_mean) + math.log(max(p.dim, 1)) > LOG2_BAD_EVENT * math.log(2):
        need = math.ceil(math.log2(max(data, 1) + 12 * math.sqrt(p.variance / p.trusted_sites))) + 1
        raise GridError(
            f"distributed DP: a gradient sum of {n_patients} patients (secagg-max-weight) (up to {data:.3g} grid units per "
            f"coordinate) plus its noise share (std {math.sqrt(p.variance / p.trusted_sites):.3g}) could leave SecAgg+'s "
            f"range of +-{grid.half_range} (quantization range {grid.quantization_range}); Flower would clip it "
            f"silently. The range needs about 2^{need}: run with fewer sites (the server derives the range from "
            "them), a smaller secagg-max-weight or a smaller max-grad-norm scale; nothing was trained or sent")


def randomized_round(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """floor(v + U), U uniform in [0, 1): each value to one of its two neighbouring integers, unbiased."""
    return np.floor(v + rng.random(v.shape)).astype(np.int64)


def skellam(mean: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sk(mean, mean): the difference of two independent Poisson(mean) vectors."""
    return rng.poisson(mean, size).astype(np.int64) - rng.poisson(mean, size).astype(np.int64)


def encode(x: np.ndarray, p: SkellamPlan, grid: SecAggGrid, rng: np.random.Generator,
           noised: np.ndarray | None = None) -> np.ndarray:
    """The site's grid vector z = round_random(gamma x) + its Skellam share, as int64. `noised` (boolean,
    like x) marks the coordinates that carry gradients; the others (buffers, frozen weights: zero, no
    data) get no noise. Raises GridError if a value would leave Flower's range (a bad event of the
    accounting: the site then withdraws from the round)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(x).all():  # a training failure, not a privacy event: nothing is sent
        raise GridError("the round's gradient sum is not finite (NaN or infinity): nothing is sent; lower the "
                        "server's learning rate or check the site's data")
    # at most max-weight patients' clipped gradients per coordinate: a no-op for a site of at most max-weight patients,
    # and for a larger one what keeps its values in the range check_range verified (clamping each coordinate moves two
    # neighbouring sums no further apart, so the sensitivity the accounting assumes holds), instead of a refusal
    # that would turn on its size
    bound = sum_bound(p, grid.max_weight)  # the sum check_range verifies the range for (client/local_round.py)
    z = randomized_round(np.clip(x, -bound, bound) * p.scale, rng)
    mask = np.ones(x.size, bool) if noised is None else np.asarray(noised, bool).ravel()
    if int(mask.sum()) != p.dim:  # l2, the sensitivity accounted, includes the rounding of exactly p.dim coordinates
        raise GridError(f"distributed DP: the plan is for {p.dim} noised coordinates and this vector has "
                        f"{int(mask.sum())}: its accounting would not hold, so the site sends nothing")
    z[mask] += skellam(p.share_mean, int(mask.sum()), rng)
    if np.abs(z).max(initial=0) > grid.half_range:
        raise GridError("distributed DP: a value of this round's noisy gradient sum would leave SecAgg+'s range "
                        f"(+-{grid.half_range}); the site withdraws from the round (a bad event the accounting "
                        "paid for in delta)")
    return z


def to_flower(z: np.ndarray, grid: SecAggGrid, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The float64 arrays the site hands Flower (num_examples = max_weight): exactly z * step."""
    values = z.astype(np.float64) * grid.step
    out, at = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(values[at:at + size].reshape(shape))
        at += size
    return out


def decode_sum(mean_arrays: list[np.ndarray], n_contributors: int, grid: SecAggGrid) -> np.ndarray:
    """The exact integer sum of the sites' grid vectors from what Flower's SecAgg+ workflow hands the
    strategy (the dequantised sum divided by the number of contributors, each of weight max_weight)."""
    v = np.concatenate([np.asarray(a, np.float64).ravel() for a in mean_arrays]) * n_contributors / grid.step
    s = np.rint(v)
    off = float(np.abs(v - s).max(initial=0))
    if off > 1e-3:
        raise GridError(f"the unmasked sum is {off:.3g} grid units off the grid: a site did not send grid values "
                        "with weight max-weight, or SecAgg+'s parameters differ from the ones the sites used")
    return s.astype(np.int64)
