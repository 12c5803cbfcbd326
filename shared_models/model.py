"""The shared multi-modal transformer (the Cancer Alpha design, made DP-trainable).

    flat input x: (B, n_inputs) float, NaN = missing value, modalities laid out by the schema
      |-- omics modality   -> OmicsEncoder    (Perceiver-IO style: latents cross-attend to chunk tokens,
      |                                        plus a low-rank linear path over all features)
      |-- tabular modality -> TabularEncoder  (TabTransformer style: one token per column)
      v  one token per modality (+ modality embedding), plus a CLS token
    FusionEncoder: transformer whose key mask drops each patient's missing modalities
      v  CLS
    head: LayerNorm + Linear -> logits over schema.classes
      +  wide paths: per present numeric modality, Linear(F, r) -> Linear(r, classes) on its inputs

DP-SGD (Opacus, hooks mode) needs per-sample gradients that are exact, so the rules of
`shared/notes/opacus.md` are followed by construction:
- attention is nn.Linear + F.scaled_dot_product_attention (never nn.MultiheadAttention);
- no BatchNorm or other batch statistics: nothing mixes samples;
- every free parameter (latent array, CLS token, learned fill values, column and chunk identities)
  lives in a one-input leaf of shared_models/layers.py with an exact per-sample gradient rule;
- no module owns a buffer (index tensors are made on the fly);
- every encoder runs at every step, whatever is missing: a missing modality is filled and then
  removed by the fusion key mask, so every parameter receives a (possibly zero) gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_models.layers import AddLearned, Dropout, FeatureFill, NumericTokens
from shared_models.run_config import ModelConfig
from shared_models.schema import ColumnType, FeatureSchema, Modality, ModalityKind


class Attention(nn.Module):
    """Multi-head attention; self-attention (fused qkv) or cross-attention (q from x, kv from context)."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.cross, self.dropout = cfg.n_heads, cross, cfg.attention_dropout
        if cross:
            self.q = nn.Linear(d, d)
            self.kv = nn.Linear(d, 2 * d)
        else:
            self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def _heads(self, t: Tensor) -> Tensor:  # (B, T, d) -> (B, h, T, d/h)
        b, n, d = t.shape
        return t.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(
        self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        if self.cross:
            q = self.q(x)
            k, v = self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Tk), True = attend
        weights = None
        if need_weights:  # same function as SDPA, written out to expose the attention weights
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)  # (B, h, Tq, Tk)
            y = weights @ v
        else:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        b, h, n, dh = y.shape
        y = y.transpose(1, 2).reshape(b, n, h * dh)
        return self.out(y), weights


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.ff_mult * cfg.d_model)
        self.down = nn.Linear(cfg.ff_mult * cfg.d_model, cfg.d_model)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


def _norm(cfg: ModelConfig) -> nn.LayerNorm:
    # Every block norm feeds a Linear with a bias, which absorbs the norm's gain (into its weight) and
    # shift (into its bias): an affine norm there adds no expressive power, only per-sample-gradient
    # work under DP-SGD (a hooked module and two gradient tensors each). So block norms carry no
    # parameters; the head's norm (the model's output path) keeps them.
    return nn.LayerNorm(cfg.d_model, elementwise_affine=False)


class Block(nn.Module):
    """Pre-norm transformer block; with cross=True the attention reads keys/values from a context."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.norm_x = _norm(cfg)
        self.norm_ctx = _norm(cfg) if cross else None
        self.attn = Attention(cfg, cross=cross)
        self.norm_ff = _norm(cfg)
        self.ff = FeedForward(cfg)
        self.drop = Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        ctx = self.norm_ctx(context) if self.norm_ctx is not None else None
        a, w = self.attn(self.norm_x(x), ctx, key_mask, need_weights)
        x = x + self.drop(a)
        x = x + self.ff(self.norm_ff(x))
        return x, w


class OmicsEncoder(nn.Module):
    """Perceiver-IO-style encoder for one high-dimensional omics modality.

    Features are cut into chunks of `chunk_size` consecutive features; each chunk becomes one token
    (a Linear shared by all chunks + a learned chunk identity). A small learned latent array
    cross-attends to the chunk tokens, then self-attends. Cost is linear in the number of features
    and the attention sees ceil(F / chunk_size) tokens, not F: 6,000 genes -> 94 tokens at chunk 64.

    The shared chunk Linear gives feature i of every chunk the same weights, so the attention path
    cannot weight single features the way a linear model does (on TCGA BRCA PAM50 it stays ~0.09
    macro-F1 below logistic regression). A low-rank linear path, Linear(F, r) -> Linear(r, d), adds
    that per-feature signal to the modality token (the "wide" part of wide-and-deep models).
    """

    def __init__(self, n_features: int, cfg: ModelConfig):
        super().__init__()
        self.n_features, self.chunk = n_features, cfg.chunk_size
        self.n_chunks = math.ceil(n_features / cfg.chunk_size)
        self.fill = FeatureFill(n_features, pad=self.n_chunks * cfg.chunk_size - n_features)  # the last chunk's
        self.linear_down = nn.Linear(n_features, cfg.linear_rank) if cfg.linear_rank else None
        self.linear_up = nn.Linear(cfg.linear_rank, cfg.d_model) if cfg.linear_rank else None
        self.chunk_proj = nn.Linear(cfg.chunk_size, cfg.d_model)
        self.chunk_id = AddLearned(self.n_chunks, cfg.d_model)
        self.latents = AddLearned(cfg.n_latents, cfg.d_model)
        self.cross = Block(cfg, cross=True)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.latent_blocks))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, F), NaN = missing -> (B, d)
        b = x.shape[0]
        x = self.fill(x)  # (B, n_chunks x chunk): the features, then zeros
        linear = self.linear_up(self.linear_down(x[:, : self.n_features])) if self.linear_down is not None else None
        tokens = self.chunk_id(self.chunk_proj(x.view(b, self.n_chunks, self.chunk)))  # (B, n_chunks, d)
        lat = self.latents(x.new_zeros(b, self.latents.weight.shape[0], tokens.shape[-1]))  # (B, L, d)
        lat, _ = self.cross(lat, context=tokens)
        for blk in self.blocks:
            lat, _ = blk(lat)
        pooled = lat.mean(dim=1)
        return self.norm(pooled if linear is None else pooled + linear)


class TabularEncoder(nn.Module):
    """TabTransformer-style encoder: one token per column = column identity + value (or category).

    A numeric or binary value v of column j becomes v * w_j; a categorical value becomes its level's
    embedding; a missing cell becomes the column's learned missing-value token (for a categorical
    column, an extra "missing" level).
    """

    def __init__(self, modality: Modality, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        types = [modality.column_type(f) for f in modality.features]
        self.numeric_cols = [i for i, t in enumerate(types) if t is not ColumnType.categorical]
        self.categorical_cols = [i for i, t in enumerate(types) if t is ColumnType.categorical]
        # Only modules used at every step exist (Opacus needs a gradient for each).
        self.numeric = NumericTokens(len(self.numeric_cols), d) if self.numeric_cols else None
        self.level_offsets, self.level_counts, total = [], [], 0
        for i in self.categorical_cols:
            n = len(modality.levels[modality.features[i]])
            self.level_offsets.append(total)
            self.level_counts.append(n)
            total += n + 1  # + the column's "missing" level
        self.category = nn.Embedding(total, d) if self.categorical_cols else None
        if self.category is not None:
            nn.init.normal_(self.category.weight, std=0.02)
        self.column = AddLearned(len(types), d)  # tokens: numeric columns first, then categorical
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.tabular_blocks))
        self.norm = nn.LayerNorm(cfg.d_model)
        # Without blocks the tokens are linear in the cells and only averaged: their mean is computed without
        # forming them (the same parameters and function; the mutation table's 64 x 301 x 64 tokens were ~5 ms of
        # a 23 ms pan-cancer training step at 64 patients, their pooled sum 0.3 ms)
        if not cfg.tabular_blocks:
            self.column.pooled = True
            if self.numeric is not None:
                self.numeric.pooled = True

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C), NaN = missing -> (B, d)
        parts = []
        if self.numeric is not None:
            parts.append(self.numeric(x[:, self.numeric_cols]))  # (B, Cn, d); pooled: their sum (B, d)
        if self.category is not None:
            dev = x.device
            codes = x[:, self.categorical_cols]
            count = torch.tensor(self.level_counts, device=dev)
            level = torch.nan_to_num(codes, nan=-1.0).long()
            level = torch.where((level < 0) | (level >= count), count, level)  # unknown/missing -> missing level
            levels = self.category(level + torch.tensor(self.level_offsets, device=dev))
            parts.append(levels.sum(1) if self.column.pooled else levels)
        if self.column.pooled:  # the mean of the tokens: (sum of the cells' tokens + sum of the identities) / C
            total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
            return self.norm(self.column(total) / self.column.weight.shape[0])  # over every column
        tokens = self.column(torch.cat(parts, dim=1))  # (B, C, d)
        for blk in self.blocks:
            tokens, _ = blk(tokens)
        return self.norm(tokens.mean(dim=1))


class FusionEncoder(nn.Module):
    """CLS + one token per modality; the key mask removes each patient's missing modalities."""

    def __init__(self, n_modalities: int, cfg: ModelConfig):
        super().__init__()
        self.cls = AddLearned(1, cfg.d_model)
        self.modality = AddLearned(n_modalities, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.fusion_block_count))

    def forward(self, tokens: Tensor, present: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        # tokens: (B, M, d); present: (B, M) bool -> CLS output (B, d), CLS->modality weights (B, M)
        b, m, d = tokens.shape
        dev = tokens.device
        seq = torch.cat([self.cls(tokens.new_zeros(b, 1, d)), self.modality(tokens)], dim=1)
        key_mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), present], dim=1)
        weights = None
        for i, blk in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            seq, w = blk(seq, key_mask=key_mask, need_weights=need_weights and last)
            if w is not None:
                cls_w = w[:, :, 0, 1:].mean(dim=1)  # CLS query over modality keys, mean over heads
                weights = cls_w / cls_w.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return seq[:, 0], weights


def any_present(x: Tensor) -> Tensor:
    """(B, F) -> (B,) bool: the rows with at least one value that is not NaN. NaN as -inf, then the row's maximum:
    two float passes (at 64 x 6000: 0.065 ms, against 0.48 ms for torch.isnan's bool tensor and its all(); the
    commands in docs/results.md)."""
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.nan_to_num(x, nan=float("-inf")).amax(dim=1) > float("-inf")


class MultiModalTransformer(nn.Module):
    """Classifies patients from any subset of the schema's modalities.

    logits = head(fused CLS) + sum over the patient's present modalities of wide_m(x_m): a "wide and
    deep" classifier. Each wide path is Linear(F_m, wide_rank) -> Linear(wide_rank, classes) over the
    modality's standardised values (missing values at the mean, 0); modalities with categorical
    columns have none. Why: under DP-SGD every parameter receives the same noise, while the
    gradient signal of the deep path concentrates in the fusion and head (measured at
    initialisation on a pan-cancer site: encoders' input layers ~1% of the clipped gradient's
    squared norm). The wide path gives the inputs a short, strongly-signalled route to the logits.
    """

    def __init__(self, schema: FeatureSchema, config: ModelConfig | None = None):
        super().__init__()
        self.schema, self.config = schema, config or ModelConfig()
        self.schema_hash = schema.content_hash()
        layout = schema.layout()
        self.slices = [layout.slices[m.name] for m in schema.modalities]
        self.n_inputs = layout.n_inputs
        self.encoders = nn.ModuleList(
            OmicsEncoder(m.n_features, self.config) if m.kind is ModalityKind.omics else TabularEncoder(m, self.config)
            for m in schema.modalities
        )
        self.fusion = FusionEncoder(len(schema.modalities), self.config)
        self.head_norm = nn.LayerNorm(self.config.d_model)
        self.head = nn.Linear(self.config.d_model, schema.n_classes)
        r = self.config.wide_rank
        self.wide_modalities = [i for i, m in enumerate(schema.modalities) if r and all(
            m.column_type(f) is not ColumnType.categorical for f in m.features)]
        k = schema.n_classes
        self.wide = nn.ModuleList(
            nn.Sequential(nn.Linear(schema.modalities[i].n_features, k)) if r == "full" else
            nn.Sequential(nn.Linear(schema.modalities[i].n_features, r), nn.Linear(r, k))
            for i in self.wide_modalities)
        with torch.no_grad():  # the same function at initialisation; the first layers' gradients x gain
            for path in self.wide:
                path[0].weight.div_(self.config.wide_gain)

    def _wide(self, parts: list[Tensor], present: Tensor) -> Tensor | None:  # -> (B, M, classes) or None
        if not self.wide_modalities:
            return None
        out = parts[0].new_zeros(parts[0].shape[0], len(parts), self.head.out_features)
        for path, i in zip(self.wide, self.wide_modalities):
            x = torch.nan_to_num(parts[i], nan=0.0)
            if self.config.wide_gain != 1:
                x = x * self.config.wide_gain
            out[:, i] = path(x) * present[:, i : i + 1]
        return out

    def _drop_modalities(self, parts: list[Tensor], present: Tensor) -> tuple[list[Tensor], Tensor]:
        """Modality dropout: each present modality of each patient masked as missing with probability
        `modality_dropout`; a patient all of whose modalities would go keeps what it has. Per patient, from its own
        draws: under DP-SGD a patient's gradient still depends on that patient alone."""
        keep = present & (torch.rand(present.shape, device=present.device) >= self.config.modality_dropout_rate)
        keep = torch.where(keep.any(dim=1, keepdim=True), keep, present)
        dropped = present & ~keep
        parts = [torch.where(dropped[:, i:i + 1], torch.full_like(p, float("nan")), p) for i, p in enumerate(parts)]
        return parts, keep

    def _encode(self, x: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        if x.dim() != 2 or x.shape[1] != self.n_inputs:
            raise ValueError(
                f"model input must be (patients, {self.n_inputs}) for schema {self.schema.name!r}; got {tuple(x.shape)}"
            )
        parts = [x[:, s] for s in self.slices]
        present = torch.stack([any_present(p) for p in parts], dim=1)  # (B, M)
        if self.training and self.config.modality_dropout_rate > 0:
            parts, present = self._drop_modalities(parts, present)
        tokens = torch.stack([enc(p) for enc, p in zip(self.encoders, parts)], dim=1)  # (B, M, d)
        tokens = torch.where(present.unsqueeze(-1), tokens, torch.zeros_like(tokens))
        fused, weights = self.fusion(tokens, present, need_weights)
        return fused, weights, present, self._wide(parts, present)

    def forward(self, x: Tensor) -> Tensor:
        fused, _, _, wide = self._encode(x, need_weights=False)
        logits = self.head(self.head_norm(fused))
        return logits if wide is None else logits + wide.sum(dim=1)

    @torch.no_grad()
    def explain(self, x: Tensor) -> dict[str, Tensor]:
        """Logits, fused representation, presence, per-sample modality weights (the CLS token's attention,
        summing to 1 over present modalities) and each modality's wide-path logits (B, M, classes)."""
        fused, weights, present, wide = self._encode(x, need_weights=True)
        deep = self.head(self.head_norm(fused))
        if wide is None:
            wide = deep.new_zeros(deep.shape[0], len(self.slices), deep.shape[1])
        return {"logits": deep + wide.sum(dim=1), "deep_logits": deep, "wide_logits": wide, "fused": fused,
                "modality_weights": weights, "present": present}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
