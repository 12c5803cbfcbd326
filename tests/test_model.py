"""The shared model as a specification: missing modalities, sample isolation, exact DP per-sample gradients."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from shared_models import ModelConfig, MultiModalTransformer
from tests.factories import drop_modalities, random_inputs

NO_DROPOUT = ModelConfig(dropout=0.0)


def _every_subset_batch(schema, n=16, seed=0):
    """Row i lacks the i-th subset of modalities (cycling through all 2^M, including 'none present')."""
    x = random_inputs(schema, n, seed)
    names = schema.modality_names
    subsets = [s for k in range(len(names) + 1) for s in itertools.combinations(names, k)]
    for i in range(n):
        drop_modalities(schema, x, i, list(subsets[i % len(subsets)]))
    return x


def test_defaults_are_cpu_sized_and_within_the_design_card():
    cfg = ModelConfig()
    assert cfg.d_model >= 64 and cfg.n_latents >= 16 and cfg.fusion_block_count >= 2


def test_every_missing_pattern_gives_finite_logits(tiny_schema):
    model = MultiModalTransformer(tiny_schema, NO_DROPOUT).eval()
    x = _every_subset_batch(tiny_schema)
    logits = model(x)
    assert logits.shape == (16, 3)
    assert torch.isfinite(logits).all()


def test_missing_values_inside_a_present_modality_never_propagate_nan(tiny_schema):
    model = MultiModalTransformer(tiny_schema, NO_DROPOUT).eval()
    x = random_inputs(tiny_schema, 4)
    x[:, ::3] = float("nan")  # a third of all values missing, in every modality
    assert torch.isfinite(model(x)).all()


def test_each_sample_is_the_same_alone_and_inside_a_batch(tiny_schema):
    model = MultiModalTransformer(tiny_schema, NO_DROPOUT).eval()
    x = _every_subset_batch(tiny_schema)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)


def test_modality_weights_sum_to_one_over_present_modalities(tiny_schema):
    model = MultiModalTransformer(tiny_schema, NO_DROPOUT).eval()
    x = _every_subset_batch(tiny_schema)
    out = model.explain(x)
    w, present = out["modality_weights"], out["present"]
    assert torch.all(w[~present] == 0)
    some = present.any(dim=1)
    torch.testing.assert_close(w[some].sum(dim=1), torch.ones(int(some.sum())))
    torch.testing.assert_close(out["logits"], model(x))
    # the wide paths' share of the logits, per modality: nothing from a missing modality
    torch.testing.assert_close(out["deep_logits"] + out["wide_logits"].sum(dim=1), out["logits"])
    assert torch.all(out["wide_logits"][~present] == 0)
    assert out["wide_logits"][present].abs().sum() > 0


def test_a_full_wide_path_is_one_linear_map_per_numeric_modality(tiny_schema):
    model = MultiModalTransformer(tiny_schema, ModelConfig(wide_rank="full"))
    assert model.wide_modalities  # the tiny schema has numeric modalities
    for path, i in zip(model.wide, model.wide_modalities):
        assert len(path) == 1 and path[0].weight.shape == (tiny_schema.n_classes,
                                                            tiny_schema.modalities[i].n_features)
    assert torch.isfinite(model(_every_subset_batch(tiny_schema))).all()
    with pytest.raises(ValueError, match="wide_rank"):
        ModelConfig(wide_rank="half")


def test_empty_batch_is_allowed(tiny_schema):
    # Poisson sampling (DP-SGD) can draw an empty batch.
    model = MultiModalTransformer(tiny_schema)
    assert model(random_inputs(tiny_schema, 0)).shape == (0, 3)


def test_wrong_input_width_is_refused_with_the_expected_shape(tiny_schema):
    model = MultiModalTransformer(tiny_schema)
    with pytest.raises(ValueError, match=r"\(patients, 161\)"):
        model(torch.zeros(2, 10))


def test_omics_features_become_chunk_tokens_not_one_token_per_feature():
    from shared_models.model import OmicsEncoder

    enc = OmicsEncoder(6000, ModelConfig())
    assert enc.n_chunks == 94  # ceil(6000 / 64)


def test_no_layer_that_breaks_per_sample_gradients(tiny_schema):
    from opacus.validators import ModuleValidator

    model = MultiModalTransformer(tiny_schema)
    assert ModuleValidator.validate(model, strict=False) == []
    banned = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer, torch.nn.modules.batchnorm._BatchNorm)
    assert not [m for m in model.modules() if isinstance(m, banned)]
    assert not list(model.buffers())


def _brute_force_grads(model, x, y):
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return grads


def _opacus_grad_samples(model, x, y):
    from opacus import PrivacyEngine

    from shared_models.layers import register_grad_samplers

    register_grad_samplers()

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hooks, opt, _ = PrivacyEngine(accountant="prv").make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=True, grad_sample_mode="hooks", wrap_model=False)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # mean reduction, as Opacus expects by default
    samples = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()}
    hooks.cleanup()
    return samples


@pytest.mark.parametrize("wide_rank", [16, "full"], ids=["wide-rank-16", "wide-full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("missing", [False, True], ids=["all-present", "missing-modalities"])
def test_opacus_per_sample_gradients_equal_a_brute_force_loop(tiny_schema, missing, dtype, wide_rank):
    # float64 shows the two computations are the same function, parameter by parameter (~1e-11).
    # In float32 some true gradients are exactly zero (attention over a single chunk token) and come
    # out as ~1e-9 round-off, so there each sample's whole gradient vector is compared: it is what
    # DP-SGD clips and noises.
    torch.manual_seed(0)
    model = MultiModalTransformer(tiny_schema, ModelConfig(dropout=0.0, wide_rank=wide_rank)).to(dtype)
    x = _every_subset_batch(tiny_schema, n=10) if missing else random_inputs(tiny_schema, 10)
    if missing:
        x[3, 7] = float("nan")  # plus a missing value inside a present modality
    x = x.to(dtype)
    y = torch.arange(10) % 3
    expected = _brute_force_grads(model, x, y)
    samples = _opacus_grad_samples(model, x, y)
    assert set(samples) == {n for n, _ in model.named_parameters()}  # every parameter got one
    for i in range(len(x)):
        if dtype == torch.float64:
            for name, gs in samples.items():
                ref = expected[i][name]
                err = (gs[i] - ref).abs().max() / ref.abs().max().clamp_min(1e-10)
                assert err < 1e-4, f"{name}, sample {i}: relative error {err:.2e}"
        else:
            got = torch.cat([samples[n][i].flatten() for n in samples])
            ref = torch.cat([expected[i][n].flatten() for n in samples])
            err = (got - ref).norm() / ref.norm()
            assert err < 1e-4, f"sample {i}: relative error of the per-sample gradient {err:.2e}"


def test_every_parameter_gets_a_gradient_when_a_modality_is_missing_for_the_whole_batch(tiny_schema):
    model = MultiModalTransformer(tiny_schema, NO_DROPOUT)
    x = random_inputs(tiny_schema, 6)
    for i in range(6):
        drop_modalities(tiny_schema, x, i, ["prot", "clinical"])
    samples = _opacus_grad_samples(model, x, torch.arange(6) % 3)
    assert set(samples) == {n for n, _ in model.named_parameters()}


def test_dropout_drops_each_element_independently_at_rate_p_and_keeps_the_expectation():
    """shared_models.layers.Dropout (nn.Dropout's function, cheaper on CPU): rate, expectation, independence
    between elements and samples, identity in evaluation and at p = 0, and the backward uses the same mask."""
    from scipy import stats

    from shared_models.layers import Dropout

    torch.manual_seed(0)
    d = Dropout(0.1)
    x = torch.ones(400_000, requires_grad=True)
    y = d(x)
    dropped = (y == 0).double()
    assert stats.binomtest(int(dropped.sum()), len(dropped), 0.1).pvalue > 1e-3
    assert float(y.mean()) == pytest.approx(1.0, abs=0.005)
    assert y.unique().tolist() == pytest.approx([0.0, d.scale])
    pairs = dropped.view(-1, 2)  # neighbouring elements (and so the four 16-bit parts of one word) independent
    assert float(torch.corrcoef(pairs.T)[0, 1]) == pytest.approx(0.0, abs=0.01)
    quads = dropped.view(-1, 4)
    assert float(torch.corrcoef(quads.T)[0, 3]) == pytest.approx(0.0, abs=0.01)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d y / d x is the mask
    assert not torch.equal(d(torch.ones(64, 16)), d(torch.ones(64, 16)))  # a new mask each call
    d.eval()
    assert torch.equal(d(x), x)
    assert Dropout(0.0)(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)


@pytest.mark.parametrize("patients", [6, 12])  # below and above _NUMERIC_BMM_FROM: both forward routes
def test_numeric_tokens_are_value_times_scale_or_the_missing_token_with_exact_gradients(patients):
    """shared_models.layers.NumericTokens (one batched product or a fused multiply, its own backward) against
    the definition written with torch.where, in float64: output, and gradients for the input (zero where
    missing), scale and missing; with param_grads off (the DP clipper writes those) the input's gradient is
    unchanged."""
    from shared_models.layers import NumericTokens

    torch.manual_seed(0)
    layer = NumericTokens(7, 5).double()
    x = torch.randn(patients, 7, dtype=torch.float64)
    x[torch.rand(patients, 7) < 0.3] = float("nan")
    x.requires_grad_(True)
    e = torch.randn(patients, 7, 5, dtype=torch.float64)

    miss = torch.isnan(x).unsqueeze(-1)
    want = torch.where(miss, layer.missing, torch.where(miss, 0.0, x.unsqueeze(-1)) * layer.scale)
    want_grads = torch.autograd.grad(want, [x, layer.scale, layer.missing], e)
    got = layer(x)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    with torch.no_grad():  # inference takes no autograd Function
        assert torch.allclose(layer(x), want, rtol=1e-12, atol=0)
    got_grads = torch.autograd.grad(got, [x, layer.scale, layer.missing], e)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-15)
    assert float(got_grads[0][torch.isnan(x)].abs().sum()) == 0.0

    layer.param_grads = False
    layer(x).backward(e)
    assert layer.scale.grad is None and layer.missing.grad is None
    assert torch.allclose(x.grad, want_grads[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("pad", [0, 3])
def test_feature_fill_is_x_or_the_fill_value_with_exact_gradients_and_hands_over_per_sample_ones(pad):
    """shared_models.layers.FeatureFill (its own backward, reusing the forward's mask) against torch.where's
    definition in float64: output (then `pad` columns of zeros, the omics encoder's chunk padding), the input's
    gradient (zero where missing) and the fill values'; in inference; with the DP clipper's settings (no
    parameter gradient, per-sample gradients handed over); and Opacus' per-sample rule for the layer."""
    from shared_models.layers import GRAD_SAMPLERS, FeatureFill

    torch.manual_seed(0)
    layer = FeatureFill(9, pad=pad).double()
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(5, 9, dtype=torch.float64)
    x[torch.rand(5, 9) < 0.3] = float("nan")
    x.requires_grad_(True)
    e = torch.randn(5, 9 + pad, dtype=torch.float64)

    want = torch.nn.functional.pad(torch.where(torch.isnan(x), layer.weight, torch.where(torch.isnan(x), 0.0, x)),
                                   (0, pad))
    want_grads = torch.autograd.grad(want, [x, layer.weight], e)
    got = layer(x)
    assert got.shape == (5, 9 + pad) and torch.equal(got, want)
    for g, w in zip(torch.autograd.grad(got, [x, layer.weight], e), want_grads):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-15)
    with torch.no_grad():
        assert torch.equal(layer(x), want)

    layer.param_grads, layer.sample_grads = False, []
    layer(x).backward(e)
    assert layer.weight.grad is None and len(layer.sample_grads) == 1
    per_sample = layer.sample_grads[0][1]
    by_rule = GRAD_SAMPLERS[FeatureFill](layer, [x.detach()], e)[layer.weight]
    for b in range(5):  # sample b's gradient alone
        one = torch.autograd.grad(torch.where(torch.isnan(x[b]), layer.weight, 0.0), layer.weight, e[b, :9])[0]
        assert torch.allclose(per_sample[b], one, rtol=1e-12, atol=0)
        assert torch.allclose(by_rule[b], one, rtol=1e-12, atol=0)
    assert torch.allclose(x.grad, want_grads[0], rtol=1e-12, atol=1e-15)


def test_a_patient_counts_as_present_in_a_modality_with_any_value_that_is_not_nan():
    """shared_models.model.any_present against torch.isnan's definition, infinite values and empty rows included."""
    from shared_models.model import any_present

    x = torch.randn(6, 7)
    x[0] = float("nan")
    x[1, 1:] = float("nan")
    x[2] = float("nan")
    x[2, 3] = float("-inf")
    x[3] = float("inf")
    x[4, :] = -3.4e38
    assert torch.equal(any_present(x), ~torch.isnan(x).all(dim=1))
    assert any_present(x).tolist() == [False, True, True, True, True, True]
    assert any_present(torch.empty(2, 0)).tolist() == [False, False]


def test_modality_dropout_masks_present_modalities_per_patient_keeps_one_and_only_in_training():
    from tests.factories import drop_modalities, random_inputs, tiny_schema

    schema = tiny_schema(omics_width=30)
    model = MultiModalTransformer(schema, ModelConfig(d_model=16, n_heads=2, modality_dropout=0.5))
    x = random_inputs(schema, 4000, seed=0)
    drop_modalities(schema, x, 0, ["expr", "prot", "clinical"])  # one modality left: it is never masked
    parts = [x[:, s] for s in model.slices]
    present = torch.stack([~torch.isnan(p).all(dim=1) for p in parts], dim=1)
    torch.manual_seed(0)
    dropped_parts, kept = model._drop_modalities(parts, present)
    assert kept.any(dim=1).all() and bool(kept[0, 3]) and not (kept & ~present).any()
    rate = float((present & ~kept).sum() / present.sum())
    assert 0.41 < rate < 0.47  # 0.5 - 1/16: a patient who would lose all four (1 in 16) keeps them all
    for i, p in enumerate(dropped_parts):  # a masked modality is wholly missing; a kept one is unchanged
        assert torch.isnan(p[~kept[:, i]]).all() and torch.equal(p[kept[:, i]], parts[i][kept[:, i]])
    model.eval()
    with torch.no_grad():
        a, b = model(x[:50]), model(x[:50])
    assert torch.equal(a, b)  # serving masks nothing


def test_modality_dropout_keeps_each_patients_gradient_its_own():
    """Under DP-SGD a patient's gradient must depend on that patient alone: with the same draws, patient 0's
    gradient is the same whatever the other patients' values or missing modalities."""
    from tests.factories import drop_modalities, random_inputs, tiny_schema

    schema = tiny_schema(omics_width=30)
    torch.manual_seed(0)
    model = MultiModalTransformer(schema, ModelConfig(d_model=16, n_heads=2, dropout=0.0, modality_dropout=0.5))
    model = model.double().train()
    x = random_inputs(schema, 6, seed=1).double()
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def grad_of_patient0(batch):
        torch.manual_seed(7)  # the same draws for every batch
        loss = torch.nn.functional.cross_entropy(model(batch), y, reduction="none")[0]
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
                          if g is not None])

    base = grad_of_patient0(x)
    other = x.clone()
    other[1:] = random_inputs(schema, 5, seed=2).double()
    drop_modalities(schema, other, 2, ["expr", "prot"])
    assert torch.equal(grad_of_patient0(other), base)
