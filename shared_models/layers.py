"""Small parameter-holding leaves with exact per-sample gradient rules for Opacus.

Learned arrays added to every sample (latents, CLS, identities) and per-feature fill values could
live in nn.Embedding tables indexed by arange, but then each step pays Opacus' generic embedding
rule (a scatter into a batch x table tensor) and autograd's slow embedding_dense_backward over
batch x features indices. Each leaf below takes one tensor input (what Opacus' hooks capture) and
has the closed form of its per-sample gradient, which `register_grad_samplers` hands to Opacus;
tests/test_model.py checks every rule against a brute-force per-sample loop in float64.

Opacus is imported only by `register_grad_samplers` (privacy/clipping.py calls it): importing the model
must not load Opacus, whose import costs seconds of CPU in every process that serves, predicts or
evaluates (a deployed site starts one per message).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AddLearned(nn.Module):
    """x + W: a learned (n, d) array added to every sample (positions, identities, latents, CLS).

    `pooled` (set by its owner): x is already the sum of the n tokens, (B, d), and the result is x + sum_n W_n,
    the sum of the n tokens x_n + W_n without forming them. Each sample's gradient is then its output gradient
    in every one of the n rows."""

    def __init__(self, n: int, d: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, d) * std)
        self.pooled = False

    def forward(self, x: Tensor) -> Tensor:  # (B, n, d) -> (B, n, d); pooled: (B, d) -> (B, d)
        if self.pooled:
            if x.dim() != 2:  # tokens, not their sum: the per-sample rules would not be this layer's gradient
                raise ValueError(f"a pooled AddLearned takes the sum of its tokens, (B, d); got {tuple(x.shape)}")
            return x + self.weight.sum(0)
        return x + self.weight


class Dropout(nn.Module):
    """nn.Dropout's function at half its CPU cost on this model's small activations (B x 16 x 64).

    torch's CPU dropout draws one 32-bit random number per element through `bernoulli_` and compares in
    bool tensors, both slow on CPU (a visible share of a training step in the profile). Here each
    64-bit random word gives four 16-bit uniforms, compared with a threshold in float arithmetic: element
    kept with probability 1 - k / 65536, k = round(p x 65536) (|error| <= 2^-17: p = 0.1 drops with
    probability 0.100006), scaled by the exact inverse of that, so the expectation is x. Masks are drawn
    per element from torch's global generator, as nn.Dropout's. A sample's mask depends on its position in the
    batch, so under DP that generator must be secret (privacy/dp_randomness.py `secret_dropout`)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.drop_below = int(round(p * 65536)) - 32768  # a 16-bit word below this drops its element
        self.scale = 65536 / (65536 - (self.drop_below + 32768))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_below == -32768:
            return x
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        bits = words.view(torch.int16)[:n].view(x.shape)
        # 1 where bits >= drop_below, else 0 (integers: clamp(bits - drop_below + 1, 0, 1)), times the scale
        mask = bits.to(x.dtype).sub_(self.drop_below - 1).clamp_(0, 1).mul_(self.scale)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeatureFill(nn.Module):
    """Replaces each missing (NaN) value by its feature's learned fill value.

    x where present, the fill value where NaN, in float arithmetic (torch.where over torch.isnan's bool mask
    cost 0.40 ms forward and 0.71 ms forward and backward at (64, 6000) on the earlier machine's CPU, this
    0.17 / 0.50 ms; the same values for finite inputs, and the input contract refuses infinite ones). The
    backward reuses the forward's mask. `pad`: the output has `pad` more columns of zeros (the omics encoder's
    chunk padding), written in the same buffer (a fill then F.pad was 0.20 ms at (64, 6000), this 0.10 ms).
    For the DP clipper (while attached): `param_grads = False` leaves the fill values' gradient to it, and a
    list in `sample_grads` receives each call's per-sample gradient (output gradient x missing mask, (B, F)),
    which it would otherwise recompute from the input."""

    def __init__(self, n_features: int, pad: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_features))  # inputs are standardised: start at the mean
        self.pad = pad
        self.param_grads = True
        self.sample_grads: list | None = None

    def forward(self, x: Tensor) -> Tensor:  # (B, F) with NaN -> (B, F + pad) finite
        if not torch.is_grad_enabled():
            return _filled(x, missing_mask(x), self.weight, self.pad)
        return _FeatureFillFn.apply(x, self.weight, self.param_grads, self.sample_grads, self.pad)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, pad={self.pad}"


def _filled(x: Tensor, mask: Tensor, weight: Tensor, pad: int = 0, into_buffer: bool = False) -> Tensor:
    """x with NaN as 0, plus mask x weight, then `pad` columns of zeros: (B, F) -> (B, F + pad). `into_buffer` (the
    autograd Function's forward, where nothing is differentiated): written straight into the padded buffer with
    out= arguments, which autograd refuses, so not where the result may be differentiated (the service's
    explanations differentiate its TorchScript trace, recorded through the other form)."""
    if into_buffer and x.dtype == weight.dtype:
        out = x.new_empty(x.shape[0], x.shape[1] + pad)
        filled = out[:, : x.shape[1]] if pad else out
        torch.nan_to_num(x, nan=0.0, out=filled).addcmul_(mask, weight)
        if pad:
            out[:, x.shape[1]:] = 0.0
        return out
    out = torch.nan_to_num(x, nan=0.0) + mask * weight  # promoted, for mixed precision (tests)
    return F.pad(out, (0, pad)) if pad else out


class _FeatureFillFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, param_grads: bool, sample_grads: list | None, pad: int) -> Tensor:
        mask = missing_mask(x)
        ctx.save_for_backward(mask)
        ctx.param_grads, ctx.sample_grads = param_grads, sample_grads
        return _filled(x, mask, weight, pad, into_buffer=True)

    @staticmethod
    def backward(ctx, grad: Tensor):
        mask, = ctx.saved_tensors
        grad = grad[:, : mask.shape[1]]  # the padding's columns are constants
        grad_x = grad * (1 - mask) if ctx.needs_input_grad[0] else None  # a missing value's output is a constant
        grad_w = None
        if ctx.needs_input_grad[1] and (ctx.param_grads or ctx.sample_grads is not None):
            per_sample = grad * mask.to(grad.dtype)
            if ctx.sample_grads is not None:
                ctx.sample_grads.append((None, per_sample))
            if ctx.param_grads:
                grad_w = per_sample.sum(0)
        return grad_x, grad_w, None, None, None


class NumericTokens(nn.Module):
    """One token per numeric or binary column: v * scale_j, or column j's learned missing token.

    From 8 patients, one batched product over the columns, (C, B, 2) @ (C, 2, d), whose (C, B, d) result
    is returned as a (B, C, d) view, differentiated by the transposed product: at 64 patients x 301 columns
    x 64 the forward and backward took 1.2 ms here against 7.0 ms for the same function written with
    torch.where (one-off timing, 50 calls). Fewer patients (the site service scores a few at a time) take a
    multiply and an addcmul. Set `param_grads = False` (the DP clipper does, while attached) and the
    backward leaves the parameters' gradients to whoever writes them."""

    def __init__(self, n_cols: int, d: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(n_cols, d) / d**0.5)
        self.missing = nn.Parameter(torch.randn(n_cols, d) * 0.02)
        self.param_grads = True
        self.pooled = False  # set by its owner: the tokens' sum over the columns, (B, d), without forming them

    def forward(self, x: Tensor) -> Tensor:  # (B, C) with NaN -> (B, C, d); pooled: (B, d)
        if self.pooled:  # value @ scale + missing flags @ missing tokens: two (B, C) x (C, d) products
            value, miss = numeric_parts(x)
            return value.to(self.scale.dtype) @ self.scale + miss.to(self.missing.dtype) @ self.missing
        if not torch.is_grad_enabled():  # inference: nothing to keep for a backward
            return _numeric_tokens(*numeric_parts(x), self.scale, self.missing)
        return _NumericTokensFn.apply(x, self.scale, self.missing, self.param_grads)


def numeric_parts(x: Tensor) -> tuple[Tensor, Tensor]:
    """A tabular block's (value, missing) factors: x with NaN as 0, and 1.0 where x is NaN (else 0.0)."""
    return torch.nan_to_num(x, nan=0.0), missing_mask(x)


# From this many patients NumericTokens' forward is one batched product; below it, a multiply and an addcmul
# (at 301 columns x 64: 12 against 74 us for 1 patient, 26 against 43 for 4, 126 against 85 for 16; no grad)
_NUMERIC_BMM_FROM = 8


def _numeric_tokens(value: Tensor, miss: Tensor, scale: Tensor, missing: Tensor,
                    factors: Tensor | None = None) -> Tensor:
    """numeric_parts (B, C) -> (B, C, d): value x scale + missing flag x missing token; `factors`: the two
    stacked as (C, 2, B), if already built."""
    if value.shape[0] < _NUMERIC_BMM_FROM:
        return torch.addcmul(value.unsqueeze(-1).to(scale.dtype) * scale, miss.unsqueeze(-1).to(scale.dtype), missing)
    if factors is None:
        factors = torch.stack([value.t(), miss.t()], 1).to(scale.dtype)
    return torch.bmm(factors.transpose(1, 2), torch.stack([scale, missing], 1)).transpose(0, 1)  # a (B, C, d) view


class _NumericTokensFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, missing: Tensor, param_grads: bool) -> Tensor:
        value, miss = numeric_parts(x)
        factors = torch.stack([value.t(), miss.t()], 1).to(scale.dtype)  # (C, 2, B), for the backward
        ctx.param_grads = param_grads
        ctx.save_for_backward(factors, scale if ctx.needs_input_grad[0] else None)
        return _numeric_tokens(value, miss, scale, missing, factors)

    @staticmethod
    def backward(ctx, grad: Tensor):
        factors, scale = ctx.saved_tensors
        grad_x = grad_scale = grad_missing = None
        if ctx.needs_input_grad[0]:  # d(v scale_c)/dv where v is present; a missing value's token is a constant
            grad_x = (grad * scale).sum(-1) * (1 - factors[:, 1].t()).to(grad.dtype)
        if ctx.param_grads and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            sums = torch.bmm(factors, grad.transpose(0, 1))  # (C, 2, d): sums over the patients
            grad_scale = sums[:, 0] if ctx.needs_input_grad[1] else None
            grad_missing = sums[:, 1] if ctx.needs_input_grad[2] else None
        return grad_x, grad_scale, grad_missing, None


def missing_mask(x: Tensor) -> Tensor:
    """1.0 where x is NaN, 0.0 where it is finite, in x's dtype (x - x is NaN exactly there): two float passes,
    cheaper on CPU than torch.isnan's bool tensor (at 64 x 6000: 0.20 ms, these 0.07 ms)."""
    return torch.nan_to_num(x - x, nan=1.0)


def _tokens(layer, backprops: Tensor) -> Tensor:
    """The per-token output gradient (B, n, d): a pooled layer's (B, d) is every token's (a stride-0 view)."""
    return backprops.unsqueeze(1).expand(-1, layer.weight.shape[0] if isinstance(layer, AddLearned) else
                                         layer.scale.shape[0], -1) if layer.pooled else backprops


def _add_learned_grad_sample(layer: AddLearned, activations: list[Tensor], backprops: Tensor) -> dict:
    return {layer.weight: _tokens(layer, backprops)} if layer.weight.requires_grad else {}


def _feature_fill_grad_sample(layer: FeatureFill, activations: list[Tensor], backprops: Tensor) -> dict:
    if not layer.weight.requires_grad:
        return {}
    x = activations[0]
    return {layer.weight: backprops[:, : x.shape[1]] * missing_mask(x)}  # the padding's columns have no parameter


def _numeric_tokens_grad_sample(layer: NumericTokens, activations: list[Tensor], backprops: Tensor) -> dict:
    value, miss = numeric_parts(activations[0])
    backprops = _tokens(layer, backprops)
    out = {}
    if layer.scale.requires_grad:
        out[layer.scale] = backprops * value.unsqueeze(-1).to(backprops.dtype)
    if layer.missing.requires_grad:
        out[layer.missing] = backprops * miss.unsqueeze(-1).to(backprops.dtype)
    return out


GRAD_SAMPLERS = {AddLearned: _add_learned_grad_sample, FeatureFill: _feature_fill_grad_sample,
                 NumericTokens: _numeric_tokens_grad_sample}


def register_grad_samplers() -> None:
    """Give Opacus the per-sample gradient rules of the leaves above (idempotent). Whoever runs Opacus on the
    model calls it first: privacy/clipping.py does at import, so DP training always has them."""
    from opacus.grad_sample import register_grad_sampler

    for layer, rule in GRAD_SAMPLERS.items():
        register_grad_sampler(layer)(rule)
