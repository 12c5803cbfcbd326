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
    # subsampling: never worse than unsampled, never better than the exact sampled Gaussian, and as the
    # Skellam's extra term vanishes, the exact sampled Gaussian's (tests/test_skellam_accounting.py: exactness)
    rdp = lambda a: skellam_rdp(a, 1e3, 1e5, 1.2e6)  # noqa: E731
    for a in (2, 5, 20):
        sub = subsampled_rdp(a, 0.3, rdp)
        gauss = compute_rdp(q=0.3, noise_multiplier=math.sqrt(1.2), steps=1, orders=[a])[0]
        assert gauss <= sub <= rdp(a) and sub == pytest.approx(gauss, rel=1e-3)
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
    # a sum beyond max-weight patients' (a site larger than the public bound) is clamped to it, not refused: a
    # refusal would turn on the site's size
    z = encode(np.full(DIM, 1e9), p, _grid(8), np.random.default_rng(0))
    bound = 2000.0 * p.max_grad_norm * (1 + 1e-4) * p.scale
    assert np.abs(z).max() <= _grid(8).half_range and np.median(z) == pytest.approx(bound, abs=10 * math.sqrt(p.variance))
    with pytest.raises(GridError, match="withdraws"):  # a value that still leaves the range never goes out
        encode(np.full(DIM, 1e9), p, SecAggGrid(1.0, 2 ** 10, 2 ** 32, 2000.0), np.random.default_rng(0))


def test_the_skellam_share_is_a_difference_of_poissons():
    rng = np.random.default_rng(5)
    s = skellam(3.0, 400_000, rng)
    assert s.dtype == np.int64 and abs(s.mean()) < 0.02 and s.var() == pytest.approx(6.0, rel=0.02)
    assert np.mean(s == 0) == pytest.approx(math.exp(-6) * np.i0(6), rel=0.03)  # P(Sk = 0) = e^-2mu I0(2mu)


# --- the ledger, the trust contract, the round -------------------------------------------------------
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from tests.factories import in_stage, kill_local_superlink_when  # noqa: E402

from privacy.ledger import PrivacyLedger  # noqa: E402
from privacy.run_config import load_run_config  # noqa: E402
from shared_models.run_config import RunConfig, RunConfigError  # noqa: E402


def test_the_ledger_records_the_mechanism_relied_on_and_reports_two_epsilons(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", budget_epsilon=8.0, delta=DELTA)
    ds = ledger.register_dataset([f"P{i}" for i in range(100)], "schema")
    p = plan_for_budget(plan(1.0, DIM, trusted_sites=3, sample_rate=0.3), 8.0, DELTA, steps=10)
    for rnd in (1, 2):
        ticket = ledger.begin_round(ds, "run", rnd, p.noise_multiplier, p.sample_rate, 1, mechanism=p, padding_tail=0.0)
        spent = ledger.commit_round(ticket, 1)
    entry = ledger._read()["entries"][-1]
    assert entry["mechanism"]["kind"] == "skellam" and entry["mechanism"]["trusted_sites"] == 3
    assert spent == entry["epsilon_after"] == pytest.approx(epsilon([p.steps(2)], DELTA))
    worst = ledger.spent(ds, worst_case=True)
    assert worst == entry["epsilon_worst_case_after"] == pytest.approx(epsilon([p.steps(2, worst_case=True)], DELTA))
    assert worst > spent
    # site-mode rounds of another run on the same patients compose with them (one ledger, both modes)
    ticket = ledger.begin_round(ds, "site-run", 1, 1.2, 0.1, 20, padding_tail=0.0)
    assert ledger.commit_round(ticket, 20) > spent


def test_the_run_config_refuses_distributed_dp_without_secagg_or_a_server_optimizer():
    base = {"schema": "s.json", "dp-mode": "distributed", "strategy": "fedavgm"}
    assert RunConfig.from_flower(base, max_epsilon=None).privacy.trusted_sites == 2
    with pytest.raises(RunConfigError, match="needs secagg = true"):
        RunConfig.from_flower({**base, "secagg": False}, max_epsilon=None)
    with pytest.raises(RunConfigError, match="server optimizer"):
        RunConfig.from_flower({**base, "strategy": "fedavg"}, max_epsilon=None)
    with pytest.raises(RunConfigError, match="power of two"):
        RunConfig.from_flower({**base, "secagg-clipping-range": 3.0}, max_epsilon=None)
    with pytest.raises(RunConfigError, match="exceeds the run's 3 sites"):
        RunConfig.from_flower({**base, "sites": 3, "trusted-sites": 4}, max_epsilon=None)


def test_a_site_refuses_a_run_that_assumes_more_honest_sites_than_it_relies_on(tmp_path):
    from client.app import SiteSettings, site_settings, trust_refusal
    from flwr.app import Context, RecordDict

    cfg = load_run_config({"schema": "s.json", "dp-mode": "distributed", "strategy": "fedavgm", "trusted-sites": 4,
                           "sites": 4})

    def settings(node: dict) -> SiteSettings:
        ctx = Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path / "site"), **node},
                      state=RecordDict(), run_config={})
        return site_settings(ctx, cfg)

    assert "relies on at most 1" in trust_refusal(settings({}), cfg)  # a deployment's default: nobody else
    assert "relies on at most 3 (node config max-trusted-sites)" in trust_refusal(
        settings({"max-trusted-sites": 3}), cfg)
    assert trust_refusal(settings({"max-trusted-sites": 4}), cfg) == ""


def test_a_site_refuses_a_site_mode_run_with_unpadded_batches_unless_its_policy_allows_them(tmp_path):
    from client.app import site_settings, padding_refusal
    from flwr.app import Context, RecordDict

    def refusal(node: dict, **run) -> str:
        cfg = load_run_config({"schema": "s.json", **run})
        ctx = Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path / "site"), **node},
                      state=RecordDict(), run_config={})
        return padding_refusal(site_settings(ctx, cfg), cfg)

    assert "require-padded-batches allows only padded batches" in refusal({}, **{"dp-pad-batches": False})
    assert refusal({"require-padded-batches": False}, **{"dp-pad-batches": False}) == ""
    assert refusal({}) == "" and refusal({}, **{"dp-pad-batches": False, "dp": False}) == ""  # padded; no DP at all


def _site(tmp_path: Path, budget: float = 8.0, **cfg):
    from client.site import SitePaths, prepare_site
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema()
    schema_path = schema.save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    run = load_run_config({"schema": str(schema_path), "num-rounds": 3, "d-model": 32, "dp-mode": "distributed",
                           "strategy": "fedavgm", "trusted-sites": 2, "sample-rate": 0.5, **cfg})
    site = prepare_site(schema, SitePaths(tmp_path / "site", tmp_path / "state", tmp_path / "models"),
                        budget_epsilon=budget, delta=DELTA, val_fraction=0.2, min_count=5, seed=0, dp=True)
    return schema, run, site


def test_a_distributed_round_sends_the_sites_clipped_gradient_sum_on_the_grid_and_spends_one_step(tmp_path):
    from client.local_round import distributed_round, state_arrays, trainable_layout
    from shared_models.model import MultiModalTransformer

    schema, run, site = _site(tmp_path)
    torch.manual_seed(0)
    model = MultiModalTransformer(schema, run.model)
    weights = state_arrays(model)
    grid = _grid(3)
    result = distributed_round(site, weights, run, "run-d", 1, grid)
    assert result.num_examples == int(grid.max_weight)  # Flower's weight factor is exactly 1
    assert [a.shape for a in result.delta] == [w.shape for w in weights]
    assert all(a.dtype == np.float64 for a in result.delta)
    z = np.concatenate([a.ravel() for a in result.delta]) / grid.step
    assert np.array_equal(z, np.rint(z)) and np.abs(z).max() <= grid.half_range  # on the grid, in range
    m = result.metrics
    assert m["local_steps"] == 1 and "patients" not in m and m["trusted_sites"] == 2
    assert 0 < m["epsilon"] < m["epsilon_worst_case"]
    plan_ = site.ledger.run_plan(site.dataset_fingerprint, "run-d")
    assert plan_.mechanism["kind"] == "skellam" and plan_.steps_per_round == 1
    # its padded sample's overflow is priced at the distributed tail, as far out as the Skellam steps' bad events
    from privacy.ledger import read_ledger
    from privacy import DISTRIBUTED_PADDING_TAIL
    assert [e["padding_tail"] for e in read_ledger(site.ledger.path)["entries"]] == [DISTRIBUTED_PADDING_TAIL]
    _, noised = trainable_layout(model)
    assert plan_.mechanism["dim"] == int(noised.sum())
    # the whole run (3 rounds) was planned on the run's epsilon: its last round lands on it
    for rnd in (2, 3):
        last = distributed_round(site, weights, run, "run-d", rnd, grid).metrics["epsilon"]
    assert 7.8 <= last <= 8.0
    with pytest.raises(BudgetError, match="round 4 refused"):
        distributed_round(site, weights, run, "run-d", 4, grid)


def test_a_distributed_runs_own_epsilon_counts_its_rounds_alone_and_lands_on_the_runs_epsilon(tmp_path):
    """RUN_EPSILON (what the run's model alone costs the patients, under the trust assumption) in distributed mode:
    the site's total for a first run; for a second run on the same patients, that run's rounds alone, which the
    plan lands on the run's epsilon, while the total counts both runs."""
    from client.local_round import distributed_round, state_arrays
    from shared_models.model import MultiModalTransformer

    schema, run, site = _site(tmp_path, budget=20.0)
    torch.manual_seed(0)
    weights = state_arrays(MultiModalTransformer(schema, run.model))
    grid = _grid(3)
    first = [distributed_round(site, weights, run, "run-d", rnd, grid).metrics for rnd in (1, 2, 3)]
    assert all(m["run_epsilon"] == m["epsilon"] for m in first)  # nothing spent before: the run is the total
    second = [distributed_round(site, weights, run, "run-e", rnd, grid).metrics for rnd in (1, 2, 3)]
    assert second[0]["run_epsilon"] == pytest.approx(first[0]["epsilon"])  # one round of the same plan
    assert 7.8 <= second[-1]["run_epsilon"] <= 8.0  # the run alone lands on its epsilon
    assert second[-1]["epsilon"] > first[-1]["epsilon"] + 1  # the site's total counts both runs
    assert second[-1]["run_epsilon"] < second[-1]["epsilon"] < second[-1]["epsilon_worst_case"]
    assert site.ledger.run_spent("run-d") == pytest.approx(first[-1]["epsilon"])  # an earlier run's own: unchanged


def test_a_site_whose_sum_could_leave_secaggs_range_refuses_before_spending(tmp_path):
    from client.local_round import distributed_round, state_arrays
    from shared_models.model import MultiModalTransformer

    schema, run, site = _site(tmp_path)
    weights = state_arrays(MultiModalTransformer(schema, run.model))
    with pytest.raises(GridError, match="could leave SecAgg"):
        distributed_round(site, weights, run, "run-r", 1, SecAggGrid(1.0, 2 ** 10, 2 ** 32, 2000.0))
    assert site.ledger.spent(site.dataset_fingerprint) == 0.0


def test_a_site_refuses_a_server_that_planned_other_noise_before_spending(tmp_path):
    """A server on another accountant (another release) plans another aggregate variance: the shares would not
    add up to what the site accounts for, so the site refuses; the server's own plan is accepted."""
    import json

    from client.local_round import distributed_round, state_arrays
    from privacy.distributed import plan_message, run_plan
    from server.app import log_distributed_plan
    from shared_models.model import MultiModalTransformer
    from shared_models.weights import trainable_layout

    schema, run, site = _site(tmp_path)
    weights = state_arrays(MultiModalTransformer(schema, run.model))
    grid = _grid(3)
    theirs = json.loads(log_distributed_plan(run, schema))  # exactly what the server sends
    _, noised = trainable_layout(MultiModalTransformer(schema, run.model))
    mine = run_plan(run.privacy.max_grad_norm, int(noised.sum()), run.privacy.trusted_sites,
                    run.privacy.sample_rate, run.privacy.epsilon, DELTA, run.federation.num_rounds)
    assert theirs == json.loads(plan_message(mine))
    older = {**theirs, "variance": theirs["variance"] * 1.3}
    with pytest.raises(GridError, match="different OncoFed accountants"):
        distributed_round(site, weights, run, "run-p", 1, grid, server_plan=older)
    assert site.ledger.spent(site.dataset_fingerprint) == 0.0
    assert site.ledger.run_plan(site.dataset_fingerprint, "run-p") is None, "a refused first round records no run"
    result = distributed_round(site, weights, run, "run-p", 1, grid, server_plan=theirs)
    assert result.metrics["epsilon"] > 0




def test_a_run_planned_at_a_larger_delta_than_the_sites_is_refused_before_any_spend(tmp_path):
    """Every site adds the same noise share, planned at the run's delta; a site accounting at a smaller privacy-delta
    would pass the run's epsilon before its last round and withdraw partway, its earlier rounds spent for nothing: it
    refuses at the first round instead. At the site's own delta the run goes ahead."""
    from client.local_round import distributed_round, state_arrays
    from shared_models.model import MultiModalTransformer

    schema, run, site = _site(tmp_path, delta=1e-4)  # the site accounts at DELTA = 1e-5
    weights = state_arrays(MultiModalTransformer(schema, run.model))
    with pytest.raises(BudgetError, match="refused before any spend"):
        distributed_round(site, weights, run, "run-big-delta", 1, _grid(3))
    assert site.ledger.spent(site.dataset_fingerprint) == 0.0
    assert site.ledger.run_plan(site.dataset_fingerprint, "run-big-delta") is None
    same = run.model_copy(update={"privacy": run.privacy.model_copy(update={"delta": DELTA})})
    assert distributed_round(site, weights, same, "run-same-delta", 1, _grid(3)).metrics["epsilon"] > 0


def test_a_run_that_would_pass_the_sites_remaining_budget_is_refused_before_any_spend(tmp_path):
    """The run's noise is the same at every site and cannot shrink to fit one site's remaining budget: a site with less
    left than the run's rounds cost refuses at the first round, not partway after spending some of them."""
    from client.local_round import distributed_round, state_arrays
    from shared_models.model import MultiModalTransformer

    schema, run, site = _site(tmp_path, **{"num-rounds": 6, "epsilon": 4.0})  # the site's budget: 8
    earlier = site.ledger.begin_round(site.dataset_fingerprint, "earlier-run", 1, 1.2, 0.3, 20, padding_tail=0.0)
    site.ledger.commit_round(earlier, 20)
    before = site.ledger.spent(site.dataset_fingerprint)
    assert 4.0 < before < 8.0  # less than the run's 4 left
    weights = state_arrays(MultiModalTransformer(schema, run.model))
    with pytest.raises(BudgetError, match="refused before any spend.*beyond its budget 8"):
        distributed_round(site, weights, run, "run-over", 1, _grid(3))
    assert site.ledger.spent(site.dataset_fingerprint) == before
    assert site.ledger.run_plan(site.dataset_fingerprint, "run-over") is None


def test_a_run_whose_model_changes_size_is_refused_before_spending_and_encode_refuses_another_dimension(tmp_path):
    """A run's Skellam plan (its rounding sensitivity l2) holds for the number of coordinates it was planned for: a later
    round of the run with a model of another size (a resumed or misconfigured server; its NOISE_PLAN is optional) is
    refused before any spend, and the encoder itself refuses a vector whose noised coordinates are not the plan's."""
    from client.local_round import distributed_round, state_arrays
    from shared_models.model import MultiModalTransformer

    schema, run, site = _site(tmp_path)
    grid = _grid(3)
    distributed_round(site, state_arrays(MultiModalTransformer(schema, run.model)), run, "run-m", 1, grid)
    spent = site.ledger.spent(site.dataset_fingerprint)
    wider = run.model_copy(update={"model": run.model.model_copy(update={"d_model": 64})})
    with pytest.raises(BudgetError, match="planned at this site for a model of"):
        distributed_round(site, state_arrays(MultiModalTransformer(schema, wider.model)), wider, "run-m", 2, grid)
    assert site.ledger.spent(site.dataset_fingerprint) == spent
    p = plan_for_budget(plan(1.0, DIM, trusted_sites=2, sample_rate=0.3), 8.0, DELTA, steps=50)
    with pytest.raises(GridError, match=f"plan is for {DIM} noised coordinates"):
        encode(np.zeros(DIM + 1), p, _grid(8), np.random.default_rng(0))
    noised = np.ones(DIM, bool)
    noised[0] = False
    with pytest.raises(GridError, match=f"this vector has {DIM - 1}"):
        encode(np.zeros(DIM), p, _grid(8), np.random.default_rng(0), noised=noised)


def test_the_server_steps_its_optimizer_on_the_decoded_sum_divided_by_the_runs_batch_size():
    """The divisor is the run's batch-size, a public number: no site sends its patient count."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from server.strategy import build_strategy

    cfg = load_run_config({"schema": "s.json", "dp-mode": "distributed", "strategy": "fedavgm",
                           "server-lr": 0.5, "momentum": 0.9, "sample-rate": 0.25, "batch-size": 50})
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    grid = _grid(3)
    strategy = build_strategy(cfg, weights, 3, {})
    strategy.grid = grid
    p = plan(1.0, DIM, trusted_sites=2, sample_rate=0.25, variance=1e6)
    z = [_site_vector(rng, p, grid) for _ in range(3)]
    summed = _flower_secagg([to_flower(zi, grid, SHAPES) for zi in z], grid)

    class Proxy:
        def __init__(self, node_id):
            self.node_id = node_id

    results = [(Proxy(i), FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(summed), 2000,
                                 {"grid_scale": p.scale, "sample_rate": 0.25}))
               for i in range(3)]
    strategy.sampled = {0, 1, 2}
    params, _ = strategy.aggregate_fit(1, results, [])
    gradient = np.sum(z, axis=0) / (p.scale * 50)
    expected = np.concatenate([w.ravel() for w in weights]).astype(np.float64) - 0.5 * gradient  # momentum starts at g
    got = np.concatenate([a.ravel() for a in parameters_to_ndarrays(params)])
    assert np.allclose(got, expected, atol=1e-6) and strategy.round_info["expected_batch"] == 50.0


def test_a_site_gives_no_key_shares_for_a_sum_of_fewer_than_trusted_sites(tmp_path):
    import json

    from flwr.app import Context, RecordDict

    from client.app import site_policy_mod
    from tests.factories import unmask_message

    def never(msg, context):
        raise AssertionError("the site must refuse before Flower's SecAgg+ mod runs")

    ctx = Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path / "site"),
                                                    "state-dir": str(tmp_path / "state"), "max-trusted-sites": 4},
                  state=RecordDict(), run_config={"schema": "s.json", "min-sites": 2, "dp-mode": "distributed",
                                                  "strategy": "fedavgm", "trusted-sites": 4, "sites": 4})
    reply = site_policy_mod(unmask_message([1, 2, 3], [4]), ctx, never)
    assert reply.has_error() and "3 sites sent masked vectors, fewer than 4" in reply.error.reason
    assert "the run's trusted-sites 4" in reply.error.reason
    events = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "unmask_refused" and events[-1]["needed"] == 4


def test_a_distributed_site_never_trains_for_a_request_outside_secagg_even_with_an_earlier_rounds_state(tmp_path):
    """A site's distributed update carries only its share of the noise. Flower's SecAgg+ mod leaves its setup in the
    context's state after a round; a plain TRAIN message for the next round (a site with require-secagg = false)
    must still be refused, by the site's mod and by the training handler itself, before any spend."""
    import json

    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict

    from client.app import SiteRefusal, site_policy_mod, train
    from shared_models.model import MultiModalTransformer
    from shared_models.protocol import RUN_KEY, SERVER_ROUND
    from shared_models.weights import state_arrays
    from tests.factories import site_message

    schema, run, _ = _site(tmp_path)
    state = RecordDict()
    state.config_records[RECORD_KEY_STATE] = ConfigRecord({"clipping_range": 1.0, "target_range": 2 ** 30,
                                                            "mod_range": 2 ** 32, "max_weight": 2000.0})
    ctx = Context(run_id=1, node_id=1, state=state, node_config={
        "data-path": str(tmp_path / "site"), "state-dir": str(tmp_path / "state2"), "privacy-budget": 8.0,
        "max-trusted-sites": 3, "require-secagg": False}, run_config={
        "schema": str(tmp_path / "schema.json"), "num-rounds": 3, "d-model": 32, "dp-mode": "distributed",
        "strategy": "fedavgm", "trusted-sites": 2, "sites": 2, "sample-rate": 0.5})
    weights = state_arrays(MultiModalTransformer(schema, run.model))
    plain = site_message(fitins_to_recorddict(FitIns(ndarrays_to_parameters(weights),
                                                     {SERVER_ROUND: 2, RUN_KEY: "run-p"}), True))
    with pytest.raises(PermissionError, match="not a SecAgg\\+ round"):
        site_policy_mod(plain, ctx, train)
    with pytest.raises(SiteRefusal, match="not a SecAgg\\+ round"):  # the handler's own check, had the mod been left out
        train(plain, ctx)
    ledger = tmp_path / "state2" / "privacy-ledger.json"
    assert not ledger.exists() or json.loads(ledger.read_text())["entries"] == []


@pytest.mark.slow
def test_a_round_with_fewer_contributors_than_trusted_sites_is_abandoned_before_any_site_spends(tmp_path):
    """One of 3 sites has no budget left and refuses; with trusted-sites 3 the two others' sum is never unmasked, and
    since the refusal comes at SecAgg+'s setup, before anyone trains, neither spends on it."""
    import json

    from client.site import SitePaths, prepare_site
    from shared_models.schema import FeatureSchema
    from simulations.federation import ROOT, run_federation
    from simulations.synthetic import SyntheticConfig, generate_federation

    sites = tmp_path / "sites"
    generate_federation(sites, SyntheticConfig(sites=3, classes=3, patients_per_site=60, omics_widths=[200],
                                               tabular_columns=4, alpha=5.0, seed=1))
    spent = prepare_site(FeatureSchema.load(sites / "schema.json"),  # the split the federation will use (seed 7)
                         SitePaths(sites / "site_02", tmp_path / "state" / "site_02" / "state", tmp_path / "m"),
                         budget_epsilon=8.0, delta=DELTA, val_fraction=0.2, min_count=5, seed=7, dp=True)
    from privacy.accounting import noise_multiplier_for

    sigma = noise_multiplier_for(7.95, DELTA, 0.5, 40)  # an earlier run left this site almost no budget
    ticket = spent.ledger.begin_round(spent.dataset_fingerprint, "earlier-run", 1, sigma, 0.5, 40, padding_tail=0.0)
    assert spent.ledger.commit_round(ticket, 40) > 7.8
    cfg = {"base-dir": str(ROOT), "schema": str(sites / "schema.json"), "data-root": str(sites),
           "site-state-root": str(tmp_path / "state"), "output-dir": str(tmp_path / "server"), "num-rounds": 2,
           "sites": 3, "min-sites": 2, "round-timeout": 300.0, "d-model": 32, "seed": 7, "dp-mode": "distributed",
           "strategy": "fedadam", "trusted-sites": 3, "sample-rate": 0.5}
    result = run_federation(tmp_path, cfg, n_sites=3, stream=None)
    rounds = [json.loads(x) for x in (tmp_path / "server" / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rounds] == ["abandoned", "abandoned"]
    assert not any("received" in r for r in rounds)  # abandoned before any update reached the server: not said so
    # the site says so at SecAgg+'s setup (it knows the round from the setup's terms), so the round is abandoned
    # before any site trains: no site spends on a sum that could never be unmasked
    assert "fewer than 3" in rounds[0]["reason"] and "before any site trains" in rounds[0]["reason"]
    assert "refused before any spend" in rounds[0]["refused"][0]["reason"]
    # the global model never moved: the untrained initial model is neither scored, signed nor delivered, and the
    # result says why, round by round
    assert "no round updated the global model" in result["not_delivered"] and result["deliveries"] == []
    assert "rounds 1-2: " in result["not_delivered"] and "refused before any spend" in result["not_delivered"]
    assert not any(r.get("site_eval") for r in rounds)
    assert not (tmp_path / "server" / "final_weights.npz").exists()
    assert not list((tmp_path / "state").glob("*/models/v0001"))
    for name in ("site_00", "site_01", "site_02"):  # no site spent anything on the run
        ledger = json.loads((tmp_path / "state" / name / "state" / "privacy-ledger.json").read_text())
        assert not [e for e in ledger["entries"] if e["run_id"] == result["run"]], name
        # yet each was told why each round was abandoned: round 1 at round 2's setup, round 2 after the last round
        audit = [json.loads(x) for x in (tmp_path / "state" / name / "state" / "audit.jsonl").read_text().splitlines()]
        told = [(e["round"], e["spent"]) for e in audit if e["event"] == "round_abandoned" and e["run"] == result["run"]]
        assert told == [(1, False), (2, False)], name


@pytest.mark.slow
def test_a_distributed_run_through_real_secagg_survives_a_kill_at_unmask_and_every_round_spends_once(tmp_path):
    """3 simulated sites in Flower's simulation engine (real SuperLink, real SecAgg+), 2 distributed rounds, and a
    SIGKILL of the whole server stack while round 2's sum is being unmasked, then a resume: the sites send round 2's
    released contributions into no second exchange among other (new) node ids, so the round is abandoned, spent
    once (no new noise, no new spend); the run finishes, and the sum the server stepped on in round 1 is the sum of
    what the three sites released, bit for bit."""
    import hashlib
    import json

    from client.releases import ReleaseStore

    from simulations.federation import ROOT, SimulationError, run_federation
    from simulations.synthetic import SyntheticConfig, generate_federation

    sites = tmp_path / "sites"
    generate_federation(sites, SyntheticConfig(sites=3, classes=3, patients_per_site=60, omics_widths=[200],
                                               tabular_columns=4, alpha=5.0, seed=1))
    cfg = {"base-dir": str(ROOT), "schema": str(sites / "schema.json"), "data-root": str(sites),
           "site-state-root": str(tmp_path / "state"), "output-dir": str(tmp_path / "server"), "num-rounds": 2,
           "sites": 3, "min-sites": 2, "round-timeout": 300.0, "d-model": 32, "seed": 7, "dp-mode": "distributed",
           "strategy": "fedavgm", "server-lr": 0.5, "trusted-sites": 3, "sample-rate": 0.5}
    watcher = kill_local_superlink_when(tmp_path, in_stage(tmp_path / "server" / "progress.json", 2, "unmask"))
    with pytest.raises(SimulationError):
        run_federation(tmp_path, cfg, n_sites=3, stream=None)
    watcher.join()
    latest = tmp_path / "server" / "checkpoints" / "latest.json"
    checkpointed = latest.exists() and json.loads(latest.read_text())["round"] == 2
    (tmp_path / "again").mkdir()
    resumed = run_federation(tmp_path / "again", {**cfg, "resume": True}, n_sites=3, stream=None)
    assert resumed["first_round"] == (3 if checkpointed else 2) and resumed["dp_mode"] == "distributed"
    rounds = [json.loads(x) for x in (tmp_path / "server" / "metrics.jsonl").read_text().splitlines()]
    # The sites sent their round-2 masked updates before the kill and kept the SecAgg+ neighbours they sent them
    # among (client/releases.py). The resumed simulation's SuperNodes have new ids (a deployment's SuperLink keeps a
    # site's id: it is bound to its key in state/superlink.db), so each site refuses to send round 2 into the new
    # exchange, where the other sites' key shares could unmask a second sum holding it, and the round is abandoned:
    # spent once, in one sum only.
    assert rounds[-1]["round"] == 2
    unmasked_before = rounds[-1]["status"] == "abandoned"
    assert unmasked_before != checkpointed
    if unmasked_before:
        assert len(rounds[-1]["refused"]) == 3 and all("was sent before in a SecAgg+ exchange among other sites"
                                                       in r["reason"] for r in rounds[-1]["refused"])
    for name in ("site_00", "site_01", "site_02"):
        state = tmp_path / "state" / name / "state"
        entries = json.loads((state / "privacy-ledger.json").read_text())["entries"]
        assert sorted((e["round"], e["status"], e["steps"]) for e in entries) == [(1, "committed", 1),
                                                                                  (2, "committed", 1)]
        events = [json.loads(x)["event"] for x in (state / "audit.jsonl").read_text().splitlines()]
        assert events.count("round_trained") == 2, "no round was trained (and noised) twice"
        assert events.count("round_resent") == 0 and events.count("round_refused") == (not checkpointed)
    names = ("site_00", "site_01", "site_02")
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0]["status"] == "updated"
    for r in rounds[:1 if unmasked_before else 2]:  # the sum the server stepped on is the sum of what the three
        # sites released, bit for bit
        released = [ReleaseStore(tmp_path / "state" / s / "state").load(resumed["run"], r["round"]) for s in names]
        step = 2 * 1.0 / 2 ** 30  # secagg-clipping-range 1, quantisation range 2^30 for 3 sites (server/app.py)
        z = sum(np.rint(np.concatenate([a.ravel() for a in rel.delta]) / step).astype(np.int64) for rel in released)
        assert r["grid_sum_sha256"] == hashlib.sha256(z.astype("<i8").tobytes()).hexdigest()
        assert all(rel.num_examples == 2000 for rel in released)
    eps, worst = rounds[-1]["site_epsilon"], rounds[-1]["site_epsilon_worst_case"]
    assert set(eps) == set(worst) == set(names) and all(0 < eps[s] <= 8.0 < worst[s] for s in names)
    assert resumed["trusted_sites"] == 3 and resumed["mechanism"] == "skellam"
    assert resumed["site_epsilon_worst_case"] == worst and "at least 3 of the sites in each round's sum" in resumed["privacy"]
    status = json.loads((tmp_path / "server" / "status.json").read_text())  # what Prometheus is served
    assert status["site_epsilon_worst_case"] == worst
    assert all(d["installed"] for d in resumed["deliveries"])


def test_prometheus_serves_both_epsilons_of_a_distributed_run(tmp_path):
    import json

    from server.metrics import ConsortiumCollector

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "status.json").write_text(json.dumps({
        "run": "run", "round": 2, "site_epsilon": {"h1": 7.9}, "site_epsilon_worst_case": {"h1": 16.3}}))
    metrics = {m.name: [s.value for s in m.samples] for m in ConsortiumCollector(tmp_path, lambda superlink: None).collect()}
    assert metrics["oncofed_site_epsilon"] == [7.9] and metrics["oncofed_site_epsilon_worst_case"] == [16.3]


def test_a_distributed_rounds_dropout_masks_come_from_a_secret_seed(tmp_path, monkeypatch):
    from client.local_round import distributed_round, state_arrays
    from shared_models.model import MultiModalTransformer
    from tests.factories import dropout_seeds

    schema, run, site = _site(tmp_path)
    torch.manual_seed(0)
    weights = state_arrays(MultiModalTransformer(schema, run.model))
    seen = dropout_seeds(monkeypatch)
    distributed_round(site, weights, run, "run-d", 1, _grid(3))
    assert seen and run.training.seed * 1_000_003 + 1 not in seen


def test_fedadam_steps_the_same_whatever_the_clipping_bound_scales_the_gradient_by():
    """In dp-mode distributed FedAdam steps on a mean of gradients clipped to C: its tau is in units of C, so a
    gradient k times larger under a bound k times larger moves the weights the same (the bound then changes the
    training only through which patients it clips)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from server.strategy import build_strategy

    rng = np.random.default_rng(0)
    weights = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    g = rng.normal(scale=2e-3, size=DIM)  # the size of the noise in the 250-round run's mean gradient at C 1
    moved = []
    for c in (1.0, 0.1, 0.01):
        cfg = load_run_config({"schema": "s.json", "dp-mode": "distributed", "strategy": "fedadam",
                               "server-lr": 0.003, "max-grad-norm": c})
        strategy = build_strategy(cfg, weights, 3, {})
        strategy.grid = _grid(3)  # what server/app.py sets in dp-mode distributed
        strategy._distributed_step = lambda rnd, ok, c=c: [-(g * c)[a:a + w.size].reshape(w.shape) for a, w in
                                                           zip(np.cumsum([0] + [w.size for w in weights]), weights)]

        class Proxy:
            node_id = 0

        strategy.sampled = {0}
        strategy.min_fit = 1  # one stand-in reply for the round's sum (its step is replaced above)
        res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(weights), 1, {})
        params, _ = strategy.aggregate_fit(1, [(Proxy(), res)], [])
        moved.append(np.concatenate([(a - w).ravel() for a, w in zip(parameters_to_ndarrays(params), weights)]))
    assert np.allclose(moved[0], moved[1], rtol=1e-4, atol=1e-9) and np.allclose(moved[0], moved[2], rtol=1e-4,
                                                                                   atol=1e-9)
    assert np.abs(moved[0]).max() > 1e-6


def test_batch_size_auto_is_the_public_divisor_of_each_mode_and_follows_the_sample_rate():
    from shared_models.run_config import DISTRIBUTED_PATIENTS, RECIPES

    def batch(**kw) -> int:
        return load_run_config({"schema": "s.json", **kw}).training.batch_size

    distributed = {"dp-mode": "distributed", "strategy": "fedadam"}
    assert batch(**distributed) == 1500 == round(0.3 * DISTRIBUTED_PATIENTS)
    assert batch() == 192 == round(0.3 * RECIPES["dp"].patients) and batch(dp=False) == RECIPES["no-dp"].batch_size
    # another sample rate moves the expected batch, so the divisor follows it (it stayed 192: a doubled step size)
    assert batch(**{"sample-rate": 0.5}) == 320 and batch(**{"sample-rate": "0.1", **distributed}) == 500
    assert batch(**{"sample-rate": 0.5, "dp": False}) == 64  # without DP the batch is the batch
    assert batch(**{"sample-rate": 0.5, "batch-size": 100}) == 100  # a number wins
    with pytest.raises(ValueError, match="sample-rate"):
        batch(**{"sample-rate": 1.5})


def test_a_sum_that_decodes_off_the_grid_abandons_the_round_not_the_run():
    """A site whose masked weight disagrees with the weight it declares: the unmasked sum is off the grid. The round is
    abandoned with the reason (it crashed the ServerApp, and again at every resume, as the sites resent the same)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from server.strategy import build_strategy

    rng = np.random.default_rng(1)
    grid = _grid(3)
    p = plan(1.0, DIM, trusted_sites=3, sample_rate=0.25, variance=1e6)
    summed = _flower_secagg([to_flower(_site_vector(rng, p, grid), grid, SHAPES) for _ in range(3)], grid,
                            weights=[2000, 2000, 1000])  # the third site masked with another weight
    cfg = load_run_config({"schema": "s.json", "dp-mode": "distributed", "strategy": "fedavgm", "sample-rate": 0.25,
                           "batch-size": 50, "trusted-sites": 3, "sites": 3, "min-sites": 3})
    strategy = build_strategy(cfg, [rng.normal(size=s).astype(np.float32) for s in SHAPES], 3, {})
    strategy.grid, strategy.sampled = grid, {0, 1, 2}

    class Proxy:
        def __init__(self, node_id):
            self.node_id = node_id

    replies = [(Proxy(i), FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(summed), 2000,
                                 {"grid_scale": p.scale, "sample_rate": 0.25})) for i in range(3)]
    params, _ = strategy.aggregate_fit(1, replies, [])
    assert params is None and strategy.round_info["status"] == "abandoned"
    assert "off the grid" in strategy.outcomes[1]["reason"]
    # abandoned after the sum was unmasked: said so in metrics.jsonl and the audit log (round_info) and to the sites,
    # whose spend for it stands; a round abandoned before any update reached the server is not
    import json

    from shared_models.protocol import PREVIOUS_ROUND

    assert strategy.round_info["received"] is True and json.loads(strategy.told(1)[PREVIOUS_ROUND])["received"]
