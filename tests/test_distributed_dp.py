"""Distributed DP (dp-mode "distributed"): the Skellam mechanism, exact on Flower's SecAgg+ grid.

The SecAgg+ arithmetic below is Flower's own (flwr.common.secure_aggregation), called in the order
flwr 1.41's secaggplus_mod._collect_masked_vectors (site) and SecAggPlusWorkflow.unmask_stage (server)
call it, with random masks that cancel in the sum as the pairwise masks do.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from privacy.accounting import BudgetError, SkellamSteps, epsilon, rdp_epsilon, skellam_rdp, subsampled_rdp
from privacy.distributed import (
    GridError,
    SecAggGrid,
    check_range,
    decode_sum,
    encode,
    plan,
    plan_for_budget,
    randomized_round,
    skellam,
    to_flower,
)

DELTA = 1e-5
SHAPES = [(40, 25), (300,), (7, 3, 5)]
DIM = sum(math.prod(s) for s in SHAPES)


def _grid(n_sites: int) -> SecAggGrid:  # as server/app.py sizes it
    return SecAggGrid(1.0, 2 ** (32 - math.ceil(math.log2(n_sites + 1))), 2 ** 32, 2000.0)


def _flower_site(values: list[np.ndarray], num_examples: int, grid: SecAggGrid) -> list[np.ndarray]:
    """secaggplus_mod._collect_masked_vectors up to the masks: weight factor, quantize, factor_combine."""
    ratio = num_examples / grid.max_weight
    q_ratio = round(ratio * grid.quantization_range)
    dq_ratio = q_ratio / grid.quantization_range
    quantized = quantize(parameters_multiply(values, dq_ratio), grid.clipping_range, grid.quantization_range)
    return factor_combine(q_ratio, quantized)


def _flower_secagg(site_values: list[list[np.ndarray]], grid: SecAggGrid, weights: list[int] | None = None,
                   seed: int = 0) -> list[np.ndarray]:
    """Every site's vector quantised, masked (masks that cancel in the sum) and summed mod 2^32, then the
    server's unmask stage: factor_extract, dequantize, offset, division by the total weight."""
    rng = np.random.default_rng(seed)
    n = len(site_values)
    weights = weights or [int(grid.max_weight)] * n  # a distributed-DP site's num_examples
    quantized = [_flower_site(v, w, grid) for v, w in zip(site_values, weights)]
    shapes = [a.shape for a in quantized[0]]
    masks = [[rng.integers(0, grid.modulus_range, s, dtype=np.int64) for s in shapes] for _ in range(n - 1)]
    masked = []
    for i, q in enumerate(quantized):
        if i < n - 1:
            q = parameters_addition(q, masks[i])
        else:
            for m in masks:
                q = parameters_subtraction(q, m)
        masked.append(parameters_mod(q, grid.modulus_range))
    total = masked[0]
    for m in masked[1:]:
        total = parameters_addition(total, m)
    q_total_ratio, recon = factor_extract(parameters_mod(total, grid.modulus_range))
    inv_dq_total_ratio = grid.quantization_range / q_total_ratio
    aggregated = dequantize(recon, grid.clipping_range, grid.quantization_range)
    offset = -(n - 1) * grid.clipping_range
    for vec in aggregated:
        vec += offset
        vec *= inv_dq_total_ratio
    return aggregated


def _site_vector(rng, p, grid, scale=0.05) -> np.ndarray:
    x = rng.normal(0, scale, DIM)  # a gradient sum, any values
    return encode(x, p, grid, rng)


@pytest.mark.parametrize("n_sites", [2, 3, 8])
def test_the_servers_secagg_sum_is_the_sum_of_the_sites_grid_values_bit_for_bit(n_sites):
    grid = _grid(n_sites)
    p = plan(1.0, DIM, trusted_sites=n_sites, sample_rate=0.3, variance=4e6)
    rng = np.random.default_rng(n_sites)
    z = [_site_vector(rng, p, grid) for _ in range(n_sites)]
    z[0][:3] = [grid.half_range, -grid.half_range, 0]  # the range's edges go through unchanged too
    sent = [to_flower(zi, grid, SHAPES) for zi in z]
    np.random.seed(n_sites)  # Flower's stochastic rounding draws from numpy's global generator
    for zi, arrays in zip(z, sent):  # Flower's own rounding is the identity on the grid
        q = np.concatenate([a.ravel() for a in _flower_site(arrays, int(grid.max_weight), grid)[1:]])
        assert np.array_equal(q.astype(np.int64) - grid.half_range, zi)
    server = _flower_secagg(sent, grid)
    assert np.array_equal(decode_sum(server, n_sites, grid), np.sum(z, axis=0))


def test_a_site_whose_weight_is_not_max_weight_is_caught_when_the_sum_is_decoded():
    grid = _grid(3)
    p = plan(1.0, DIM, trusted_sites=3, sample_rate=0.3, variance=4e6)
    rng = np.random.default_rng(1)
    sent = [to_flower(_site_vector(rng, p, grid), grid, SHAPES) for _ in range(3)]
    server = _flower_secagg(sent, grid, weights=[2000, 1000, 2000])  # Flower scales site 2's values by 1/2
    with pytest.raises(GridError, match="off the grid"):
        decode_sum(server, 3, grid)


@pytest.mark.parametrize("trusted,sites", [(1, 1), (2, 2), (3, 3), (3, 8)])
def test_any_trusted_sites_shares_add_up_to_the_noise_the_accountant_assumed(trusted, sites):
    p = plan(1.0, DIM, trusted_sites=trusted, sample_rate=0.3, variance=2.5e5)
    grid = _grid(8)
    rng = np.random.default_rng(trusted * 10 + sites)
    draws = 200
    zero = np.zeros(DIM)
    noise = np.concatenate([sum(encode(zero, p, grid, rng) for _ in range(sites)) for _ in range(draws)])
    expected = p.variance * sites / trusted  # every site adds V / t; `trusted` of them make V
    se = expected * math.sqrt(2 / noise.size)  # standard error of a sample variance (Skellam: ~Gaussian here)
    assert abs(noise.mean()) < 5 * math.sqrt(expected / noise.size)
    assert abs(noise.var() - expected) < 5 * se
    if sites == trusted:
        assert abs(noise.var() - p.variance) < 5 * se


def test_the_rounding_is_unbiased_and_a_records_change_stays_within_the_accounted_sensitivity():
    rng = np.random.default_rng(3)
    p = plan(1.0, DIM, trusted_sites=2, sample_rate=0.3)
    v = rng.normal(0, 3, DIM)
    mean = np.mean([randomized_round(v, rng) for _ in range(2000)], axis=0)
    assert np.abs(mean - v).max() < 5 * 0.5 / math.sqrt(2000)
    base = rng.normal(0, 50, DIM) * p.scale
    for _ in range(200):  # a record's clipped gradient (norm C), rounded with the same draws as the rest
        g = rng.normal(0, 1, DIM)
        g *= p.scale * p.max_grad_norm / np.linalg.norm(g)
        u = rng.random(DIM)
        diff = np.floor(base + g + u) - np.floor(base + u)
        assert np.linalg.norm(diff) <= p.l2 and np.abs(diff).sum() <= p.l1


def test_the_skellam_accountant_is_the_gaussians_plus_a_vanishing_term_and_lands_on_the_budget():
    from opacus.accountants.analysis.rdp import compute_rdp

    # unsampled, large variance: Skellam RDP -> Gaussian RDP of the same variance
    for a in (2, 8, 32):
        gauss = compute_rdp(q=1.0, noise_multiplier=1.0, steps=1, orders=[a])[0]
        assert skellam_rdp(a, 1e3, 1e5, 1e6) == pytest.approx(gauss, rel=1e-3)
    # subsampling: never worse than unsampled, never better than the exact sampled Gaussian
    rdp = lambda a: skellam_rdp(a, 1e3, 1e5, 1.2e6)  # noqa: E731
    for a in (2, 5, 20):
        sub = subsampled_rdp(a, 0.3, rdp)
        assert compute_rdp(q=0.3, noise_multiplier=math.sqrt(1.2), steps=1, orders=[a])[0] <= sub <= rdp(a)
    base = plan(1.0, DIM, trusted_sites=4, sample_rate=0.3)
    p = plan_for_budget(base, 8.0, DELTA, steps=50)
    trusted = epsilon([p.steps(50)], DELTA)
    assert 7.8 <= trusted <= 8.0
    worst = epsilon([p.steps(50, worst_case=True)], DELTA)  # the site's own share alone: V / 4
    assert worst > 1.5 * trusted
    one = plan_for_budget(plan(1.0, DIM, trusted_sites=1, sample_rate=0.3), 8.0, DELTA, steps=50)
    assert epsilon([one.steps(50, worst_case=True)], DELTA) == epsilon([one.steps(50)], DELTA)
    # one ledger, two modes: a site-mode history and a distributed run compose (RDP), and cost more together
    mixed = [(1.1, 0.1, 100), p.steps(50)]
    assert rdp_epsilon(mixed, DELTA) == epsilon(mixed, DELTA) > max(epsilon(mixed[:1], DELTA), trusted)
    with pytest.raises(BudgetError, match="even noise multiplier 1024"):
        plan_for_budget(base, 8.0, DELTA, steps=50, spent=[SkellamSteps(1.0, 1.0, 1e-3, 1.0, 100)])


def test_configurations_that_could_wrap_or_be_clipped_are_refused():
    with pytest.raises(GridError, match="could wrap"):
        SecAggGrid(1.0, 2 ** 30, 2 ** 32, 2000.0).check(4)
    _grid(4).check(4)
    with pytest.raises(GridError, match="power of two"):
        SecAggGrid(1.5, 2 ** 28, 2 ** 32, 2000.0).check(4)
    with pytest.raises(GridError, match="whole number"):
        SecAggGrid(1.0, 2 ** 28, 2 ** 32, 1000.5).check(4)
    p = plan_for_budget(plan(1.0, DIM, trusted_sites=2, sample_rate=0.3), 8.0, DELTA, steps=50)
    check_range(p, _grid(8), 500)
    with pytest.raises(GridError, match="could leave SecAgg"):  # +-2^27 grid units hold ~260k patients at gamma 512
        check_range(p, _grid(8), 1_000_000)
    with pytest.raises(GridError, match="withdraws"):  # a sum beyond what check_range allows never goes out
        encode(np.full(DIM, 1e9), p, _grid(8), np.random.default_rng(0))


def test_the_skellam_share_is_a_difference_of_poissons():
    rng = np.random.default_rng(5)
    s = skellam(3.0, 400_000, rng)
    assert s.dtype == np.int64 and abs(s.mean()) < 0.02 and s.var() == pytest.approx(6.0, rel=0.02)
    assert np.mean(s == 0) == pytest.approx(math.exp(-6) * np.i0(6), rel=0.03)  # P(Sk = 0) = e^-2mu I0(2mu)
