"""The book-keeping clipper (privacy/clipping.py) computes DP-SGD's clipped sum exactly.

Reference: a brute-force per-sample loop in float64. From one batched forward (so dropout masks are
the same), each sample's gradient g_i = d l_i / d theta by its own autograd call; clip to C with
Opacus' factor min(1, C / (||g_i|| + 1e-6)); sum. Samples never interact in these models, so g_i
from the batched graph is the gradient of sample i alone (checked separately in eval mode).
The clipping bound is the median norm, so some samples are clipped and some are not.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privacy.clipping as pc
from privacy.clipping import BookKeepingClipper, BookKeepingDPOptimizer, clipped_sum, make_private
from shared_models import ModelConfig, MultiModalTransformer
from shared_models.layers import AddLearned, FeatureFill, NumericTokens
from shared_models.model import Block
from shared_models.training import TrainConfig, build_optimizer
from tests.factories import drop_modalities, random_inputs, tiny_schema

TOL = 1e-9


def per_sample_loop(model: nn.Module, forward, n: int, seed: int = 1):
    """Per-sample gradients by one autograd call per sample: (norms, [per-sample grads per parameter])."""
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    losses = forward()  # (n,) per-sample losses
    grads = []
    for i in range(n):
        g = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        grads.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
    norms = torch.tensor([math.sqrt(sum(float(gi.pow(2).sum()) for gi in g)) for g in grads], dtype=torch.float64)
    return norms, grads


def loop_clipped_sum(norms, grads, c: float):
    factors = (c / (norms + 1e-6)).clamp(max=1.0)
    return [sum(float(factors[i]) * grads[i][k] for i in range(len(grads))) for k in range(len(grads[0]))]


def assert_clipper_matches_loop(model: nn.Module, forward, n: int, **clipper_kwargs) -> torch.Tensor:
    """forward() returns per-sample losses; the clipper sees their mean, as in training."""
    model = model.double()
    ref_norms, ref_grads = per_sample_loop(model, forward, n)
    c = float(ref_norms.median())
    expected = loop_clipped_sum(ref_norms, ref_grads, c)
    with BookKeepingClipper(model, c, **clipper_kwargs) as clipper:
        torch.manual_seed(1)
        forward().mean().backward()
        norms = clipper.clip_()
    assert torch.allclose(norms, ref_norms, rtol=TOL, atol=0)
    params = [p for p in model.parameters() if p.requires_grad]
    for (name, p), want in zip([(n_, p) for n_, p in model.named_parameters() if p.requires_grad], expected):
        scale = float(want.abs().max()) or 1.0
        err = float((p.grad - want).abs().max()) / scale
        assert err <= TOL, f"{name}: relative error {err:.2e}"
    assert len(params) == len(expected)
    return norms


class RowsLinear(nn.Module):  # one row per sample: the wide path
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(30, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class TokensLinear(nn.Module):  # several tokens per sample: chunk projection, attention projections
    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x.view(len(x), 5, 6))).mean(1))


class LinearTwice(nn.Module):  # one Linear called twice per forward: norm of the sum, with cross terms
    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(15, 15), nn.Linear(15, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(x[:, :15]))
        return self.head(self.shared(h + x[:, 15:]))


class TokensLinearTwice(nn.Module):  # one Linear over tokens called twice: per-sample gradients formed after both
    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        t = x.view(len(x), 5, 6)
        return self.head(self.shared(torch.tanh(self.shared(t)) + t).mean(1))


class LearnedArrays(nn.Module):  # shared_models.layers: fill values, numeric tokens, added arrays
    def __init__(self):
        super().__init__()
        self.fill, self.num, self.pos = FeatureFill(30), NumericTokens(30, 4), AddLearned(30, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.pos(self.num(self.fill(x))).mean(1))


class NormAndEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(7, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        codes = (x[:, :5].abs() * 3).long().clamp(max=6)  # (B, 5) indices
        return self.head(self.norm(self.emb(codes) + x[:, 5:10, None]).mean(1))


class AttentionBlocks(nn.Module):  # self-attention (fused qkv, key mask) and cross-attention blocks
    def __init__(self):
        super().__init__()
        cfg = ModelConfig(d_model=8, n_heads=2, dropout=0.2)
        self.inp, self.self_blk, self.cross_blk = nn.Linear(6, 8), Block(cfg), Block(cfg, cross=True)
        self.lat, self.head = AddLearned(3, 8), nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.inp(x.view(len(x), 5, 6))
        mask = torch.ones(len(x), 5, dtype=torch.bool)
        mask[::3, 3:] = False  # some samples' last tokens masked out
        tokens, _ = self.self_blk(tokens, key_mask=mask)
        lat, _ = self.cross_blk(self.lat(x.new_zeros(len(x), 3, 8)), context=tokens)
        return self.head(lat.mean(1))


class BiasOrWeightOnly(nn.Module):  # no bias; a frozen weight with a trained bias, on rows and on tokens
    def __init__(self):
        super().__init__()
        self.rows, self.tokens = nn.Linear(30, 6), nn.Linear(6, 5, bias=False)
        self.frozen_rows, self.frozen_tokens, self.head = nn.Linear(6, 6), nn.Linear(5, 4), nn.Linear(4, 3)
        self.frozen_rows.weight.requires_grad_(False)
        self.frozen_tokens.weight.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.frozen_rows(torch.tanh(self.rows(x))))
        t = torch.tanh(self.tokens(x.view(len(x), 5, 6) + h[:, None, :]))
        return self.head(torch.tanh(self.frozen_tokens(t)).mean(1))


class SameShapesSomeUnused(nn.Module):  # same-shape layers: one unused in the forward, one with a frozen bias
    def __init__(self):
        super().__init__()
        self.num = NumericTokens(30, 4)
        self.num.missing.requires_grad_(False)  # numeric tokens with one trained array
        self.a, self.b, self.unused = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.rows, self.rows_unused = nn.Linear(30, 4), nn.Linear(30, 4)
        self.b.bias.requires_grad_(False)
        self.pos_unused, self.head = AddLearned(30, 4), nn.Linear(4, 3)

    def forward(self, x):
        t = self.b(torch.tanh(self.a(self.num(x))))
        return self.head(t.mean(1) + self.rows(torch.nan_to_num(x)))


class LayerNorms(nn.Module):  # LayerNorms stacked by width: called twice, bias only, no bias, on rows and tokens
    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
        self.twice, self.rows, self.bias_only = nn.LayerNorm(6), nn.LayerNorm(6), nn.LayerNorm(6)
        self.bias_only.weight.requires_grad_(False)  # elementwise_affine, only the bias trained
        self.no_bias, self.wide = nn.LayerNorm(6, bias=False), nn.LayerNorm((5, 6), eps=1e-3)  # another width and eps
        self.unused = nn.LayerNorm(6)

    def forward(self, x):
        t = self.twice(torch.tanh(self.inp(x.view(len(x), 5, 6))))  # (B, 5, 6)
        t = self.wide(self.twice(t * 2 + 1))  # the second call on the first's output
        r = self.rows(torch.tanh(self.inp(x[:, :6])))  # one row per sample
        return self.head(self.no_bias(self.bias_only(t.mean(1) + r)))


LAYERS = {"layer norms": LayerNorms, "linear on rows": RowsLinear, "same shapes, some unused": SameShapesSomeUnused, "bias or weight only": BiasOrWeightOnly, "linear on tokens": TokensLinear, "linear called twice": LinearTwice,
          "linear on tokens called twice": TokensLinearTwice,
          "learned arrays": LearnedArrays, "layer norm and embedding": NormAndEmbedding,
          "attention blocks": AttentionBlocks}


@pytest.mark.parametrize("token_norm", ["ghost", "materialise"])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_types_clipped_sum_equals_the_per_sample_loop(layer, token_norm):
    torch.manual_seed(0)
    model = LAYERS[layer]()
    x = torch.randn(8, 30, dtype=torch.float64)
    x[1, 3] = x[4, 20] = x[4, 21] = float("nan") if layer in ("learned arrays", "same shapes, some unused") else x[1, 3]
    y = torch.randint(0, 3, (8,))
    model.train()
    assert_clipper_matches_loop(model, lambda: F.cross_entropy(model(x), y, reduction="none"), 8,
                                token_norm=token_norm)


def _full_model(**overrides):
    cfg = dict(d_model=16, n_heads=2, n_latents=4, chunk_size=16, latent_blocks=1, tabular_blocks=1, dropout=0.2)
    return MultiModalTransformer(tiny_schema(), ModelConfig(**{**cfg, **overrides}))


def _batch_with_missing(n: int = 12):
    schema = tiny_schema()
    x = random_inputs(schema, n, seed=3).double()
    drop_modalities(schema, x, 1, ["expr"])
    drop_modalities(schema, x, 2, ["clinical", "prot"])
    drop_modalities(schema, x, 5, ["mutation"])
    x[3, 5] = x[4, 140] = x[6, 131] = float("nan")  # missing values inside present modalities
    return x, torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("wide_rank, modality_dropout, tabular_blocks",
                         [(16, 0.0, 1), ("full", 0.0, 1), ("full", 0.5, 1), ("full", 0.0, 0), ("full", 0.5, 0)])
def test_the_full_models_clipped_sum_equals_the_per_sample_loop_with_missing_modalities(wide_rank, modality_dropout,
                                                                                        tabular_blocks):
    # tabular_blocks 0 (the default): the tabular encoders' pooled NumericTokens and column identities
    model = _full_model(wide_rank=wide_rank, modality_dropout=modality_dropout, tabular_blocks=tabular_blocks).train()
    x, y = _batch_with_missing()
    assert_clipper_matches_loop(model, lambda: F.cross_entropy(model(x.double()), y, reduction="none"), len(y))


@pytest.mark.parametrize("bias", [True, False])
def test_in_float32_a_sample_whose_tokens_cancel_adds_at_most_c(bias):
    """The sites train in float32. A Linear over 16 tokens whose terms e_t a_t^T nearly cancel (near-identical inputs,
    alternating output gradients: attention's key gradients sum to zero over the tokens): the Gram-matrix norm lost
    its digits and came out far too small, or 0, while the clipped sum wrote the sample's gradient at its true size,
    up to 86 C (a review's construction, 2026-12-06). The sample's written gradient now stays within C, as in float64;
    and on ordinary inputs the norm counted is at least the true one and within 1e-3 of it (the bound's price)."""
    tokens, d, c = 16, 64, 1.0
    gen = torch.Generator().manual_seed(7)
    worst, zeros = 0.0, 0
    for _ in range(2000):  # the review's search: the clipper before wrote up to 86 C here (docs/privacy.md)
        scale = 10.0 ** torch.empty(1).uniform_(2, 4, generator=gen).item()
        a = (torch.randn(d, generator=gen) * scale + 1e-3 * scale * torch.randn(tokens, d, generator=gen)).unsqueeze(0)
        w = torch.tensor([1.0, -1.0] * (tokens // 2)).view(tokens, 1) * torch.randn(d, generator=gen) \
            + 1e-4 * torch.randn(tokens, d, generator=gen)
        layer = nn.Linear(d, d, bias=bias)
        with BookKeepingClipper(layer, c, loss_reduction="sum") as clipper:
            (layer(a) * w.unsqueeze(0)).sum().backward()
            norms = clipper.clip_()
        zeros += int(norms.item() == 0)
        written = torch.cat([p.grad.double().ravel() for p in layer.parameters()]).norm().item()
        worst = max(worst, written / c)
    assert zeros == 0 and worst <= 1.0 + 1e-6, (zeros, worst)
    # ordinary tokens: the counted norm is the float64 per-sample gradient's
    layer = nn.Linear(d, d, bias=bias)
    x, g = torch.randn(4, tokens, d, generator=gen), torch.randn(4, tokens, d, generator=gen)
    with BookKeepingClipper(layer, 1e9, loss_reduction="sum") as clipper:
        (layer(x) * g).sum().backward()
        norms = clipper.clip_()
    exact = torch.stack([(g[i].double().T @ x[i].double()).square().sum() + (g[i].double().sum(0).square().sum()
                                                                               if bias else 0) for i in range(4)]).sqrt()
    assert (norms.double() >= exact).all() and torch.allclose(norms.double(), exact, rtol=1e-3), (norms, exact)


def test_in_float32_the_routes_that_norm_what_they_write_add_at_most_c_times_1_plus_1e_6():
    """The row route (one token per sample: ||a|| ||e||) and a frozen weight's bias over cancelling tokens compute a
    sample's norm and its written gradient from the same tensors in another order: they agree to float32 rounding,
    which docs/privacy.md bounds by C (1 + 1e-6) (the sensitivity it states) for inputs spanning seven decades."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for trial in range(600):
        layer = nn.Linear(7, 5, bias=bool(trial % 2))
        x = torch.randn(1, 7, generator=gen) * 10 ** (4 * torch.rand(1, generator=gen).item() - 1)
        g = torch.randn(1, 5, generator=gen) * 10 ** (4 * torch.rand(1, generator=gen).item() - 1)
        with BookKeepingClipper(layer, 1.0, loss_reduction="sum") as clipper:
            (layer(x) * g).sum().backward()
            clipper.clip_()
        worst = max(worst, torch.cat([p.grad.double().ravel() for p in layer.parameters()]).norm().item())
    for _ in range(600):
        layer = nn.Linear(4, 4)
        layer.weight.requires_grad_(False)
        base = torch.randn(4, generator=gen) * 10 ** (4 * torch.rand(1, generator=gen).item())
        tiny = 10 ** (8 * torch.rand(1, generator=gen).item() - 8) * base.abs().max()
        g = torch.tensor([1.0, -1.0] * 8).view(16, 1) * base + torch.randn(16, 4, generator=gen) * tiny
        g = g[torch.randperm(16, generator=gen)].unsqueeze(0)
        with BookKeepingClipper(layer, 1.0, loss_reduction="sum") as clipper:
            (layer(torch.randn(1, 16, 4, generator=gen)) * g).sum().backward()
            clipper.clip_()
        worst = max(worst, layer.bias.grad.double().norm().item())
    assert worst <= 1.0 + 1e-6, worst


def test_samples_do_not_interact_each_samples_norm_is_its_own_forwards():
    model = _full_model(dropout=0.0).double().eval()  # eval: no dropout, so separate forwards are comparable
    x, y = _batch_with_missing(8)
    params = list(model.parameters())
    alone = []
    for i in range(len(y)):
        g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params, allow_unused=True)
        alone.append(math.sqrt(sum(float(t.pow(2).sum()) for t in g if t is not None)))
    with BookKeepingClipper(model, 1.0) as clipper:
        F.cross_entropy(model(x), y).backward()
        norms = clipper.clip_()
    assert torch.allclose(norms, torch.tensor(alone, dtype=torch.float64), rtol=TOL, atol=0)


def _dp_step(model, x, y, sigma, clipping: str, seed: int):
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="prv")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if clipping == "opacus":
            hooks, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
                                                max_grad_norm=0.5, poisson_sampling=True, wrap_model=False)
        else:
            hooks, opt, _ = make_private(engine, model, opt, loader, noise_multiplier=sigma, max_grad_norm=0.5)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()  # the batch itself, not a Poisson draw: the same rows for both
        torch.manual_seed(seed)  # the noise's draws
        opt.step()
    hooks.cleanup()
    return [b - p.detach() for b, p in zip(before, model.parameters())], engine


@pytest.mark.parametrize("tabular_blocks", [1, 0])
def test_without_noise_a_dp_step_is_opacus_hooks_step(tabular_blocks):
    """Same weights and rows: the update (clipped sum / expected batch, then the optimizer) equals Opacus'."""
    torch.manual_seed(0)
    base = _full_model(dropout=0.0, tabular_blocks=tabular_blocks).double()
    x, y = _batch_with_missing()
    ours, _ = _dp_step(copy.deepcopy(base), x, y, 0.0, "ghost", seed=7)
    theirs, _ = _dp_step(copy.deepcopy(base), x, y, 0.0, "opacus", seed=7)
    for a, b in zip(ours, theirs):
        assert float((a - b).abs().max()) <= TOL * max(float(b.abs().max()), 1e-12)


def test_the_distributed_rounds_clipped_sum_is_the_same_by_either_dp_clipping():
    """distributed_round's sum (privacy.clipping.clipped_sum): dp-clipping "ghost" and "opacus" (Opacus'
    hooks and DPOptimizer.clip_and_accumulate) give the same p.grad, float64, missing modalities."""
    torch.manual_seed(0)
    base = _full_model(dropout=0.0).double()
    x, y = _batch_with_missing()
    grads = {}
    for how in ("ghost", "opacus"):
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clipped_sum(model, lambda: F.cross_entropy(model(x), y), 0.5, how)
        grads[how] = [p.grad for p in model.parameters()]
        assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    assert max(float(a.abs().max()) for a in grads["opacus"]) > 0.01
    for a, b in zip(grads["ghost"], grads["opacus"]):
        assert float((a - b).abs().max()) <= TOL * max(float(b.abs().max()), 1e-12)


@pytest.mark.parametrize("how", ["ghost", "opacus"])
def test_a_padded_batchs_clipped_sum_is_its_samples_alone(how):
    """distributed_round pads its Poisson sample with zero-weight patients (a fixed cost whatever the sample):
    the clipped sum is the sampled rows' alone, float64, missing modalities, by either dp-clipping."""
    from shared_models.training import WeightedCrossEntropy

    torch.manual_seed(0)
    base = _full_model(dropout=0.0).double()
    x, y = _batch_with_missing()
    loss = WeightedCrossEntropy(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    mask = torch.zeros(len(y), dtype=torch.float64)
    mask[[0, 3, 4, 7]] = 1.0
    grads = []
    for rows, weights in ((mask.bool(), None), (slice(None), mask)):
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clipped_sum(model, lambda: loss(model(x[rows]), y[rows], weights), 0.5, how)
        grads.append([p.grad for p in model.parameters()])
    assert max(float(a.abs().max()) for a in grads[0]) > 0.01
    for a, b in zip(*grads):
        assert float((a - b).abs().max()) <= TOL * max(float(a.abs().max()), 1e-12)


def test_a_padded_poisson_sample_has_a_fixed_size_and_samples_each_patient_independently_at_the_rate():
    from scipy import stats

    from privacy import DISTRIBUTED_PADDING_TAIL, PADDING_TAIL
    from privacy.sampling import padded_batch, padded_sample

    n, q = 620, 0.3
    b = padded_batch(n, q, tail=PADDING_TAIL)
    # the smallest b whose exact tail is within PADDING_TAIL (2^-80; scipy's isf, used before, saturates to n there)
    assert (b, PADDING_TAIL) == (308, 2.0 ** -80)
    assert stats.binom.logsf(b, n, q) <= math.log(PADDING_TAIL) < stats.binom.logsf(b - 1, n, q)
    far = padded_batch(n, q, tail=DISTRIBUTED_PADDING_TAIL)
    assert far < n and stats.binom.logsf(far, n, q) <= math.log(DISTRIBUTED_PADDING_TAIL) < stats.binom.logsf(far - 1, n, q)
    # a small site computes every patient, always
    assert padded_batch(5, 0.3, tail=PADDING_TAIL) == 5 and padded_batch(0, 0.3, tail=PADDING_TAIL) == 0
    gen = torch.Generator().manual_seed(0)
    counts, sizes = torch.zeros(n), []
    for _ in range(2000):
        rows, mask = padded_sample(n, q, gen, b)
        assert len(rows) == b and len(set(rows.tolist())) == b  # every step computes b distinct patients
        counts[rows[mask.bool()]] += 1
        sizes.append(int(mask.sum()))
    sd = math.sqrt(n * q * (1 - q))  # the sample's size is Binomial(n, q), as Poisson sampling draws it
    assert abs(sum(sizes) / len(sizes) - n * q) < 4 * sd / math.sqrt(len(sizes))
    assert 0.85 < float(torch.tensor(sizes, dtype=torch.float64).var()) / sd ** 2 < 1.15
    # each patient sampled at rate q, whatever its index
    expected = torch.full((n,), float(counts.sum()) / n)
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-4
    rows, mask = padded_sample(8, 1.0, gen, 5)  # a sample larger than the padding is computed whole
    assert sorted(rows.tolist()) == list(range(8)) and bool(mask.all())


def test_with_a_public_bound_every_site_computes_the_same_rows_and_samples_as_before():
    """dp-pad-to: a site of 40 patients and one of 300 both compute the bound's rows each step (the seconds no
    longer tell their sizes apart); the filler repeats patients where the site has fewer, weighted 0, and each
    patient is still sampled independently at the rate."""
    from scipy import stats

    from privacy import PADDING_TAIL as tail
    from privacy.sampling import PaddedPoissonLoader, padded_batch, padded_sample, step_rows

    q, bound = 0.3, 1000
    assert (step_rows(40, q, bound, tail=tail) == step_rows(300, q, bound, tail=tail) == padded_batch(bound, q, tail=tail)
            > 300)
    # a site above the bound pads to its own
    assert step_rows(1200, q, bound, tail=tail) == padded_batch(1200, q, tail=tail)
    assert step_rows(300, q, tail=tail) == padded_batch(300, q, tail=tail) and step_rows(0, q, bound, tail=tail) == 0
    gen = torch.Generator().manual_seed(1)
    n, rows = 40, step_rows(40, q, bound, tail=tail)
    counts, sizes = torch.zeros(n), []
    for _ in range(3000):
        index, mask = padded_sample(n, q, gen, rows)
        assert len(index) == rows and int(index.max()) < n
        assert len(set(index[mask.bool()].tolist())) == int(mask.sum())  # a sampled patient appears once
        counts[index[mask.bool()]] += 1
        sizes.append(int(mask.sum()))
    sd = math.sqrt(n * q * (1 - q))
    assert abs(sum(sizes) / len(sizes) - n * q) < 4 * sd / math.sqrt(len(sizes))
    assert stats.chisquare(counts.numpy(), torch.full((n,), float(counts.sum()) / n).numpy()).pvalue > 1e-4
    dataset = torch.utils.data.TensorDataset(torch.zeros(40, 3), torch.zeros(40, dtype=torch.long))
    loader = PaddedPoissonLoader(dataset, steps=3, generator=gen, sample_rate=q, pad_to=bound, tail=tail)
    assert loader.rows == rows and all(len(y) == rows for _, y, _ in loader)


def test_the_noise_has_opacus_distribution_independent_gaussians_of_std_sigma_c_over_the_expected_batch():
    from scipy import stats

    torch.manual_seed(0)
    model = _full_model(dropout=0.0).double()
    x, y = _batch_with_missing()
    sigma, c, ebs = 2.0, 0.5, len(y)
    zero, _ = _dp_step(copy.deepcopy(model), x, y, 0.0, "ghost", seed=7)
    noise = {}
    for clipping in ("ghost", "opacus"):
        noisy, _ = _dp_step(copy.deepcopy(model), x, y, sigma, clipping, seed=7)
        noise[clipping] = torch.cat([(a - b).flatten() for a, b in zip(noisy, zero)]).numpy()
    assert noise["ghost"].size > 10_000
    std = sigma * c / ebs
    assert stats.kstest(noise["ghost"] / std, "norm").pvalue > 1e-3  # N(0, (sigma C / B)^2) per coordinate
    assert stats.ks_2samp(noise["ghost"], noise["opacus"]).pvalue > 1e-3  # the same law as Opacus' noise
    first, second = noise["ghost"][: len(noise["ghost"]) // 2], noise["ghost"][len(noise["ghost"]) // 2:]
    assert abs(stats.pearsonr(first[: len(second)], second[: len(first)])[0]) < 0.03  # no reuse across coordinates


def test_the_noise_is_drawn_into_the_gradients_and_the_clipped_sum_added_exactly_once():
    """The DP optimizer draws the step's noise into one flat buffer whose views become the gradients, and the
    clipper adds the clipped sum into them in place (privacy/clipping.py, _GradSink): each gradient must be
    exactly the clipped sum / expected batch + that parameter's slice of N(0, (sigma C / B)^2) drawn from the
    optimizer's generator, for every parameter (Linear weights on the row and Gram routes by addmm_, the rest
    by add_), on every step."""
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = _full_model(dropout=0.0).double()
    x, y = _batch_with_missing()
    sigma, c = 2.0, 0.5
    params = [p for p in model.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(y))
    engine = PrivacyEngine(accountant="prv")
    engine.secure_rng = torch.Generator().manual_seed(5)
    template = copy.deepcopy(model)
    clipper, opt, _ = make_private(engine, model, torch.optim.SGD(model.parameters(), lr=0.0), loader,
                                   noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=4)
    replay = torch.Generator().manual_seed(5)
    for _ in range(2):  # the second step reuses the buffer: the first step's sums must not carry over
        reference = _copy_of(template, model)
        clipped_sum(reference, lambda: F.cross_entropy(reference(x), y), c, "ghost")
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        noise = torch.empty(sum(p.numel() for p in params), dtype=torch.float64).normal_(0.0, sigma * c / 4,
                                                                                        generator=replay)
        want = [r.grad / 4 + n.view_as(r) for r, n in
                zip([q for q in reference.parameters() if q.requires_grad], noise.split([p.numel() for p in params]))]
        for p, w in zip(params, want):
            assert torch.allclose(p.grad, w, rtol=1e-12, atol=1e-15)
    clipper.cleanup()


def test_the_noise_comes_from_the_optimizers_generator():
    from opacus import PrivacyEngine

    def update(seed: int):
        torch.manual_seed(0)
        model = _full_model(dropout=0.0).double()
        x, y = _batch_with_missing()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(y))
        engine = PrivacyEngine(accountant="prv")
        engine.secure_rng = torch.Generator().manual_seed(seed)  # as privacy.dp_randomness.private_engine
        clipper, opt, _ = make_private(engine, model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
                                       noise_multiplier=1.0, max_grad_norm=1.0)
        assert opt.generator is engine.secure_rng
        F.cross_entropy(model(x), y).backward()
        torch.manual_seed(123)  # the global generator is not where the noise comes from
        opt.step()
        clipper.cleanup()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(update(1), update(1)) and not torch.equal(update(1), update(2))


def test_make_private_keeps_opacus_poisson_sampling_and_accountant():
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    torch.manual_seed(0)
    model = _full_model()
    x = random_inputs(tiny_schema(), 64)
    y = torch.randint(0, 3, (64,))
    engine = PrivacyEngine(accountant="prv")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    clipper, opt, dp_loader = make_private(engine, model, torch.optim.AdamW(model.parameters()), loader,
                                           noise_multiplier=1.1, max_grad_norm=1.0)
    assert isinstance(dp_loader, DPDataLoader) and isinstance(opt, BookKeepingDPOptimizer)
    assert opt.expected_batch_size == 16
    steps = 0
    for xb, yb in dp_loader:  # Poisson batches, possibly empty
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        steps += 1
    clipper.cleanup()
    assert engine.accountant.history == [(1.1, 0.25, steps)]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("how", ["ghost", "opacus"])
def test_site_mode_padded_batches_keep_opacus_sampling_rate_expected_batch_and_accountant(how):
    """dp-pad-batches: every step computes the same number of rows whatever the sample; the optimizer's
    gradient is the sampled rows' clipped sum over the expected batch, as without padding; the accountant
    records the same (sigma, q, steps)."""
    from opacus import PrivacyEngine

    from privacy import PADDING_TAIL
    from privacy.sampling import PaddedPoissonLoader, padded_batch
    from shared_models.training import WeightedCrossEntropy, train_epochs

    torch.manual_seed(0)
    model = _full_model(dropout=0.0).double()
    reference = copy.deepcopy(model)
    x, y = _batch_with_missing(64)
    loss = WeightedCrossEntropy()
    loader = PaddedPoissonLoader.from_data_loader(
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16),
        generator=torch.Generator().manual_seed(1), tail=PADDING_TAIL)
    assert len(loader) == 4 and loader.sample_rate == 0.25 and loader.rows == padded_batch(64, 0.25, tail=PADDING_TAIL)
    sizes = [(len(yb), int(mask.sum())) for _ in range(5) for _, yb, mask in loader]
    assert {rows for rows, _ in sizes} == {loader.rows} and len({n for _, n in sizes}) > 1  # fixed rows, varying sample
    engine = PrivacyEngine(accountant="prv")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "ghost":
            hooks, opt, dp_loader = make_private(engine, model, opt, loader, noise_multiplier=0.0, max_grad_norm=0.5,
                                                 poisson_sampling=False)
        else:
            hooks, opt, dp_loader = engine.make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.5,
                poisson_sampling=False, grad_sample_mode="hooks", wrap_model=False)
        assert dp_loader is loader and opt.expected_batch_size == 16
        batches = [next(iter(loader))]
        totals = train_epochs(model, batches, opt, loss)
        hooks.cleanup()
        xb, yb, mask = batches[0]
        sampled = mask.bool()
        clipped_sum(reference, lambda: loss(reference(xb[sampled]), yb[sampled]), 0.5, how)
    assert totals.samples == int(mask.sum())
    assert engine.accountant.history == [(0.0, 0.25, 1)]
    for p, r in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, r.grad / 16, rtol=1e-9, atol=1e-12)


def test_an_empty_poisson_batch_gives_a_zero_clipped_sum():
    model = _full_model()
    x = random_inputs(tiny_schema(), 0)
    with BookKeepingClipper(model, 1.0) as clipper:
        F.cross_entropy(model(x), torch.zeros(0, dtype=torch.long), reduction="sum").backward()
        assert clipper.clip_().shape == (0,)
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters())


@pytest.mark.parametrize("how", ["ghost", "opacus"])
def test_an_empty_poisson_batch_gives_a_zero_clipped_sum_by_either_dp_clipping(how):
    # a review: Opacus' reference path raised here (its non-finite check reshaped (0, ...) gradients)
    model = _full_model()
    x = random_inputs(tiny_schema(), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' full backward hook notice
        clipped_sum(model, lambda: F.cross_entropy(model(x), torch.zeros(0, dtype=torch.long), reduction="sum"), 1.0,
                    how)
    assert all(p.grad is not None and float(p.grad.abs().max()) == 0 for p in model.parameters())


def test_a_pooled_column_identity_takes_the_sum_of_tokens_only():
    layer = AddLearned(5, 4)
    layer.pooled = True
    assert layer(torch.zeros(3, 4)).shape == (3, 4)
    with pytest.raises(ValueError, match="sum of its tokens"):
        layer(torch.zeros(3, 5, 4))


def test_a_model_with_the_clipper_attached_refuses_to_be_copied_and_copies_again_once_detached():
    """A deep copy of an attached model kept the original's taped forwards and hooks: the copy computed with the
    original's weights and recorded into its tapes, training wrong without a sign. It is refused, naming the fix."""
    import pickle

    model = _full_model(dropout=0.0)
    clipper = BookKeepingClipper(model, 1.0).attach()
    for copier in (copy.deepcopy, pickle.dumps):
        with pytest.raises(RuntimeError, match="BookKeepingClipper attached"):
            copier(model)
    clipper.detach()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    x, _ = _batch_with_missing()
    assert not torch.allclose(twin(x.float()), model(x.float()))  # the copy computes with its own weights


def test_after_detach_the_model_trains_as_before():
    torch.manual_seed(0)
    model = _full_model(dropout=0.0).eval()
    x, y = random_inputs(tiny_schema(), 8), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    BookKeepingClipper(model, 1.0).attach().detach()
    F.cross_entropy(model(x), y).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(want, model.parameters()))


def test_a_layer_without_a_per_sample_rule_is_refused_with_the_fix():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    with pytest.raises(ValueError, match="no per-sample gradient rule.*register_grad_sampler.*clipping='opacus'"):
        BookKeepingClipper(nn.Sequential(nn.Linear(3, 3), Scale()), 1.0)


def test_a_parameter_shared_by_two_modules_is_refused():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(ValueError, match="shared by two modules"):
        BookKeepingClipper(nn.Sequential(a, b), 1.0)


def test_step_without_a_recorded_backward_is_an_error():
    clipper = BookKeepingClipper(nn.Linear(3, 3), 1.0)
    with pytest.raises(RuntimeError, match="call loss.backward"):
        clipper.clip_()


@pytest.mark.parametrize("token_norm", ["ghost", "materialise"])
def test_a_sample_whose_gradient_is_not_finite_counts_as_a_zero_gradient(token_norm):
    # one patient whose values overflow: the clipped sum is the other patients' alone, finite, so the site
    # need not withdraw from the round (a withdrawal the server would see); with "materialise" the token
    # layers' per-sample gradients are formed during the backward, and the bad rows are zeroed there
    model = _full_model(dropout=0.0).double().eval()
    x, y = _batch_with_missing(8)
    bad = x.clone()
    bad[0] = torch.where(torch.isnan(bad[0]), bad[0], torch.full_like(bad[0], 1e308))
    params = [p for p in model.parameters() if p.requires_grad]
    with BookKeepingClipper(model, 0.5, loss_reduction="sum", token_norm=token_norm) as clipper:
        F.cross_entropy(model(bad), y, reduction="sum").backward()
        norms = clipper.clip_()
    got = [p.grad.clone() for p in params]
    assert norms[0] == 0 and all(torch.isfinite(g).all() for g in got)
    model.zero_grad()
    with BookKeepingClipper(model, 0.5, loss_reduction="sum", token_norm=token_norm) as clipper:
        F.cross_entropy(model(x[1:]), y[1:], reduction="sum").backward()
        want_norms = clipper.clip_()
    assert torch.allclose(norms[1:], want_norms, rtol=TOL, atol=0)
    for g, p in zip(got, params):
        assert torch.allclose(g, p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("filler", [False, True])
def test_with_opacus_hooks_a_sample_whose_gradient_is_not_finite_counts_as_a_zero_gradient(filler):
    # dp-clipping = "opacus": the same rule as the book-keeping clipper, so an overflowing patient (sampled, or
    # an unsampled filler row of a padded batch, weighted 0) does not make the clipped sum NaN
    from shared_models.training import WeightedCrossEntropy

    base = _full_model(dropout=0.0).double().train()  # Opacus' hooks record in training mode only
    x, y = _batch_with_missing(8)
    bad = x.clone()
    bad[0] = torch.where(torch.isnan(bad[0]), bad[0], torch.full_like(bad[0], 1e308))
    mask = torch.ones(8, dtype=torch.float64)
    if filler:
        mask[0] = 0.0
    loss = WeightedCrossEntropy()
    got, want = copy.deepcopy(base), copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clipped_sum(got, lambda: loss(got(bad), y, mask), 0.5, "opacus")
        clipped_sum(want, lambda: loss(want(x[1:]), y[1:]), 0.5, "opacus")
    for g, w in zip(got.parameters(), want.parameters()):
        assert torch.isfinite(g.grad).all()
        assert torch.allclose(g.grad, w.grad, rtol=1e-9, atol=1e-12)


def test_materialised_layers_drop_their_activations_and_output_gradients_during_the_backward():
    # the step's peak memory: a token layer whose norms come from its per-sample gradients holds those
    # (B x out x in) from its backward on, not the (B x T x in, B x T x out) pairs; a layer called twice
    # only once both calls' gradients are in; a layer whose forward and backward calls do not match keeps
    # its pairs for the step
    model = TokensLinearTwice().double()
    x, y = torch.randn(8, 30, dtype=torch.float64), torch.randint(0, 3, (8,))
    clipper = BookKeepingClipper(model, 1.0, token_norm="materialise").attach()
    shared = dict(clipper._linears)[model.shared]
    F.cross_entropy(model(x), y).backward()
    assert len(shared) == 0 and shared.prepared is not None and shared.prepared.rows["ws"].shape == (8, 6, 6)
    clipper.clip_()
    got = model.shared.weight.grad.clone()
    model.zero_grad()
    model(x)  # a forward whose graph is never differentiated: calls and backward entries no longer match
    F.cross_entropy(model(x), y).backward()
    assert len(shared) == 2 and shared.prepared is None
    clipper.clip_()
    assert torch.allclose(model.shared.weight.grad, got, rtol=1e-12)
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    loss.backward()  # twice over one forward: the step refuses rather than clip a mix
    with pytest.raises(RuntimeError, match="zero_grad"):
        clipper.clip_()
    clipper.detach()


class ColumnsOverNumericTokens(nn.Module):  # the tabular encoder: column identities added to the value tokens
    def __init__(self, categorical: bool):
        super().__init__()
        self.num, self.head = NumericTokens(12, 4), nn.Linear(4, 3)
        self.emb = nn.Embedding(5, 4) if categorical else None
        self.column = AddLearned(12 + (3 if categorical else 0), 4)

    def forward(self, x):
        tokens = self.num(x[:, :12])
        if self.emb is not None:
            tokens = torch.cat([tokens, self.emb((x[:, 12:15].abs() * 2).long().clamp(max=4))], 1)
        return self.head(self.column(tokens).mean(1))


@pytest.mark.parametrize("categorical", [False, True])
def test_column_identities_over_numeric_tokens_alone_share_their_passes_and_equal_the_loop(monkeypatch, categorical):
    """An AddLearned whose output gradient is NumericTokens' own (the tabular encoder without categorical
    columns) is normed and summed with it, from the same (B, C) norms and one batched matmul; over a
    concatenation with other tokens it keeps its own rule. Both equal the per-sample loop."""
    import privacy.clipping as pc

    fused = []
    prepare = pc._prepare_numeric_tokens
    monkeypatch.setattr(pc, "_prepare_numeric_tokens",
                        lambda layer, tape, batch, added=None: fused.append(added is not None) or
                        prepare(layer, tape, batch, added))
    torch.manual_seed(0)
    model = ColumnsOverNumericTokens(categorical)
    for n in (5, 10):  # NumericTokens' two forward routes
        x = torch.randn(n, 15, dtype=torch.float64)
        x[1, 3] = x[3, 0] = float("nan")
        y = torch.randint(0, 3, (n,))
        assert_clipper_matches_loop(model, lambda: F.cross_entropy(model(x), y, reduction="none"), n)
    assert fused == [not categorical] * 2
    with BookKeepingClipper(model, 1.0):  # the backward leaves NumericTokens' sums to the clipper while attached
        assert model.num.param_grads is False
    assert model.num.param_grads is True
    arrays = LearnedArrays()
    with BookKeepingClipper(arrays, 1.0):  # FeatureFill hands its per-sample gradients over while attached
        assert arrays.fill.param_grads is False and arrays.fill.sample_grads == []
    assert arrays.fill.param_grads is True and arrays.fill.sample_grads is None


# --- the noise drawn into the gradients, the clipped sums added in place (review of 2026-12-05) ---------------
def _private(model, opt, x, y, sigma=2.0, c=0.5, ebs=4, seed=5):
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="prv")
    engine.secure_rng = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(y))
    return make_private(engine, model, opt, loader, noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=ebs)


def _copy_of(template, model):
    """A model with `model`'s weights and no clipper (an attached model refuses to be deep-copied): `template` is
    a copy of it made before the clipper was attached."""
    ref = copy.deepcopy(template)
    ref.load_state_dict(model.state_dict())
    return ref


def _want(template, model, x, y, c, ebs, noise_flat, params):
    ref = _copy_of(template, model)
    clipped_sum(ref, lambda: F.cross_entropy(ref(x), y), c, "ghost")
    rp = [q for q in ref.parameters() if q.requires_grad]
    return [r.grad / ebs + n.view_as(r) for r, n in zip(rp, noise_flat.split([p.numel() for p in params]))]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_each_step_is_the_clipped_sum_plus_fresh_noise_whatever_autograd_left_in_the_gradients(set_to_none):
    """zero_grad(set_to_none=False): LayerNorm / AddLearned / embedding gradients that autograd accumulates
    during the backward land in the previous step's noise views; the step must still be sum/B + fresh noise."""
    torch.manual_seed(0)
    model = _full_model(dropout=0.0).double()
    x, y = _batch_with_missing()
    sigma, c, ebs = 2.0, 0.5, 4
    params = [p for p in model.parameters() if p.requires_grad]
    template = copy.deepcopy(model)
    clipper, opt, _ = _private(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, sigma, c, ebs)
    replay = torch.Generator().manual_seed(5)
    for _ in range(3):
        opt.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        noise = torch.empty(sum(p.numel() for p in params), dtype=torch.float64).normal_(0, sigma * c / ebs, generator=replay)
        for p, w in zip(params, _want(template, model, x, y, c, ebs, noise, params)):
            assert torch.allclose(p.grad, w, rtol=1e-12, atol=1e-15)
    clipper.cleanup()


def test_parameters_of_several_dtypes_get_the_clipped_sum_then_their_own_noise():
    """The (params of several dtypes) fallback, add_noise_and_scale, had no test: an unused float32 layer
    beside float64 ones. Per-parameter draws, in the optimizer's parameter order."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 5).double(), nn.Linear(5, 3).double()
            self.unused = nn.Linear(2, 2)  # float32

        def forward(self, x):
            return self.b(torch.tanh(self.a(x.view(len(x), 2, 6)))).mean(1)
    torch.manual_seed(0)
    model = M()
    x, y = torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 3, (8,))
    sigma, c, ebs = 1.5, 0.3, 4
    params = [p for p in model.parameters() if p.requires_grad]
    template = copy.deepcopy(model)
    clipper, opt, _ = _private(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, sigma, c, ebs)
    assert not opt._one_buffer(opt.params)  # the fallback path
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    ref = _copy_of(template, model)
    opt.step()
    clipped_sum(ref, lambda: F.cross_entropy(ref(x), y), c, "ghost")
    g = torch.Generator().manual_seed(5)
    for p, r in zip(params, [q for q in ref.parameters() if q.requires_grad]):
        n = torch.empty_like(p).normal_(0, sigma * c / ebs, generator=g)
        assert torch.allclose(p.grad, r.grad.to(p.dtype) / ebs + n, rtol=1e-6, atol=1e-7)
    clipper.cleanup()


def test_the_sites_optimizer_steps_on_the_clipped_sum_plus_noise_on_every_parameter():
    """The sites' optimizer (build_optimizer: fused AdamW, decay and no-decay groups, float32): the
    gradients it steps with are sum/B + noise on every parameter, on consecutive steps."""
    torch.manual_seed(0)
    model = _full_model(dropout=0.0)
    x, y = _batch_with_missing()
    x = x.float()
    sigma, c, ebs = 1.0, 0.5, 4
    opt = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.01))
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]  # the optimizer's order
    template = copy.deepcopy(model)
    clipper, opt, _ = _private(model, opt, x, y, sigma, c, ebs)
    replay = torch.Generator().manual_seed(5)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        want_model = _copy_of(template, model)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        noise = torch.empty(sum(p.numel() for p in params)).normal_(0, sigma * c / ebs, generator=replay)
        ref = want_model
        clipped_sum(ref, lambda: F.cross_entropy(ref(x), y), c, "ghost")
        by_id = {id(p): q for p, q in zip(model.parameters(), ref.parameters())}
        for p, n in zip(params, noise.split([p.numel() for p in params])):
            assert torch.allclose(p.grad, by_id[id(p)].grad / ebs + n.view_as(p), rtol=1e-4, atol=1e-6)
    clipper.cleanup()


class _TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)))


def test_an_optimizer_parameter_the_clipper_does_not_record_is_refused():
    """A layer frozen when make_private planned the clipper, unfrozen later: Opacus' params() (requires_grad
    filtered at each step) then includes it, and the clipper never tapes it. Stepping would use its unclipped
    autograd gradient (with mixed dtypes) or noise alone: the step is refused instead."""
    model = _TwoLinears().double()
    model.head.requires_grad_(False)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    clipper, opt, _ = _private(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y)
    model.head.requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises((RuntimeError, ValueError)):
        opt.step()
    clipper.cleanup()


def test_a_layer_called_twice_whose_calls_together_materialise_does_so_in_the_backward():
    """Each call's tokens route to ghost, both calls' to materialise: the per-sample gradients are formed in the
    backward (the pairs dropped, the step's peak lowered), whichever call's hook fires last."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            t = x.view(len(x), 2, 8)  # 2 tokens: 2 x 16 < 64 (ghost alone); 4 tokens: 64 >= 64 (materialise)
            return self.head(self.l(torch.tanh(self.l(t))).mean(1))
    model = Twice().double()
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    with BookKeepingClipper(model, 1.0) as clipper:
        F.cross_entropy(model(x), torch.randint(0, 3, (6,))).backward()
        tape = dict(clipper._linears)[model.l]
        assert tape.prepared is not None and len(tape) == 0


def test_each_parameter_is_written_exactly_once_by_the_clipper():
    """The in-place addition needs every parameter written once (a second write would add the sum twice): count
    the sink's writes per parameter over the full model; with the DP optimizer's noise (into=...) the sink checks it
    itself at every step."""
    counts: dict[int, int] = {}
    orig = (pc._GradSink.set, pc._GradSink.mm, pc._GradSink.mv, pc._GradSink.zero)

    depth = [0]

    def counted(f):
        def g(self, p, *a):
            if depth[0] == 0:  # (count the outer call only, should a write method call another)
                counts[id(p)] = counts.get(id(p), 0) + 1
            depth[0] += 1
            try:
                return f(self, p, *a)
            finally:
                depth[0] -= 1
        return g
    pc._GradSink.set, pc._GradSink.mm, pc._GradSink.mv, pc._GradSink.zero = map(counted, orig)
    try:
        torch.manual_seed(0)
        model = _full_model(dropout=0.0).double()
        x, y = _batch_with_missing()
        with BookKeepingClipper(model, 1.0) as clipper:
            F.cross_entropy(model(x), y).backward()
            clipper.clip_()
    finally:
        pc._GradSink.set, pc._GradSink.mm, pc._GradSink.mv, pc._GradSink.zero = orig
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(counts.get(id(p)) == 1 for p in trainable)
    sink = pc._GradSink({p: torch.zeros_like(p) for p in trainable[:1]})
    sink.set(trainable[0], torch.ones_like(trainable[0]))
    with pytest.raises(RuntimeError, match="twice"):
        sink.set(trainable[0], torch.ones_like(trainable[0]))
    unwritten = pc._GradSink({p: torch.zeros_like(p) for p in trainable[:2]})
    unwritten.set(trainable[0], torch.ones_like(trainable[0]))
    with pytest.raises(RuntimeError, match="no clipped sum"):  # the second would step on noise alone
        unwritten.check_complete()


def test_a_failed_clip_draws_no_noise_into_the_gradients():
    """clip_ raising (here: two backward passes over one forward) must leave the gradients as they were: the noise
    is drawn only once the tapes have passed their checks."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    clipper, opt, _ = _private(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y)
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    with pytest.raises(RuntimeError):
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    clipper.cleanup()


def test_a_model_parameter_the_optimizer_does_not_step_gets_its_clipped_sum_without_a_false_double_write():
    """A trainable Linear outside the optimizer (its weight written through the sink's matmul path, with no noise
    view): its one write must not count as two, and it gets its clipped sum / B as before the noise-first step."""
    torch.manual_seed(0)
    model = _TwoLinears().double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    reference = copy.deepcopy(model)
    clipped_sum(reference, lambda: F.cross_entropy(reference(x), y), 0.5, "ghost")
    clipper, opt, _ = _private(model, torch.optim.SGD(model.head.parameters(), lr=0.0), x, y)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.allclose(model.a.weight.grad, reference.a.weight.grad / 4, rtol=1e-12, atol=1e-15)
    clipper.cleanup()


def test_the_clipper_refuses_tf32_matmuls_which_its_rounding_bound_does_not_cover():
    torch.set_float32_matmul_precision("high")
    try:
        with pytest.raises(RuntimeError, match="set it back to 'highest'"):
            BookKeepingClipper(nn.Linear(4, 4), 1.0)
    finally:
        torch.set_float32_matmul_precision("highest")
    BookKeepingClipper(nn.Linear(4, 4), 1.0)
