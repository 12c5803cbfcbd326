"""Training of the shared model: one loop, `train_epochs`, for plain training and for DP-SGD (a site's
local rounds, the centralized baseline, the membership audit's reference models, the DP yardstick and
the step benchmark).

The pieces are built separately so that a DP-SGD caller can hand the optimizer and the loader to
Opacus between building and training:

    torch.manual_seed(cfg.seed)
    model = MultiModalTransformer(schema, model_cfg)
    optimizer = build_optimizer(model, cfg)
    loss_fn = build_loss(cfg, class_counts(y_train, n_classes))
    loader = build_loader(x_train, y_train, cfg)
    schedule = WarmupCosine.of(optimizer, cfg, total_steps=cfg.epochs * len(loader))
    # DP: hooks, optimizer, loader = PrivacyEngine(...).make_private(module=model, optimizer=optimizer,
    #     data_loader=loader, max_grad_norm=C, ..., wrap_model=False)
    train_epochs(model, loader, optimizer, loss_fn, epochs=cfg.epochs, schedule=schedule,
                 max_grad_norm=None if dp else cfg.max_grad_norm)   # Opacus clips per sample

A site's round is one stretch of its run's schedule (`WarmupCosine.of(..., first_step=...)`) and adds
FedProx's proximal step through `after_step`. `fit` runs the loop one epoch at a time with early
stopping on a validation split and restores the best epoch's weights. `evaluate`
(shared_models.evaluation) computes the reported metrics from eval-mode predictions.

The loss is per-sample: sum_i w[y_i] * CE_i / batch_size, with class weights normalised so that
their mean over the training rows is 1. Unlike `F.cross_entropy(weight=...)` (which divides by the
batch's total weight) each sample's term depends on that sample alone, which DP-SGD's per-sample
clipping needs, and the loss keeps the scale of the unweighted loss, so one learning rate serves both.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from shared_models.evaluation import Metrics, evaluate


def training_process(keep_freed_memory: bool = True) -> None:
    """Set up this process the way a site trains (a site's round, the simulation's clients, and the step benchmarks
    train_step.py and dp_overhead.py): torch on one thread, and glibc's allocator keeping the memory a step frees
    (keep_freed_memory=False leaves glibc's default: the benchmarks' comparison).

    A training step frees and re-allocates the same temporaries every step. By default glibc gives memory
    freed at the top of its heap back to the kernel (above 128 kB, a threshold it raises as the process frees
    larger blocks, up to 32 MB) and takes it back as fresh zeroed pages, one page fault per 4 kB, every step
    (`python benchmarks/train_step.py --glibc-default` counts them: docs/results.md). With the thresholds fixed
    high, freed memory stays in the heap for the next step (what that does to a step's peak is not resolved by
    the benchmark's runs: docs/results.md). `release_freed_memory()`
    gives it back when a round ends (the simulation's worker processes serve many rounds). Only glibc is tuned:
    elsewhere (macOS, musl) the allocator is left as it is."""
    torch.set_num_threads(1)
    libc = _glibc()
    if keep_freed_memory and libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's own ceiling for the threshold it adjusts
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def release_freed_memory() -> None:
    """Give the heap's free memory back to the kernel (glibc's malloc_trim; nothing elsewhere): at the end of a
    site's round, after `training_process()` kept it for the round's steps."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.lru_cache(maxsize=1)
def _glibc():
    """The process's C library if it is glibc (found once), else None."""
    import ctypes
    import os

    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both must exist)
    except (AttributeError, OSError, ValueError):
        return None
    return libc


class TrainConfig(BaseModel):
    """Local training hyper-parameters.

    Defaults checked with `oncofed baseline` on both TCGA cohorts (5 BRCA / 3 pan-cancer site splits):
    the best epoch is typically 6-12, so 60 epochs with patience 15 stop after ~25. Lower lr (3e-4),
    monitoring macro-F1, more dropout or weight decay changed test macro-F1 by less than the
    split-to-split spread; class weighting adds ~0.09 balanced accuracy on BRCA with the current model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(1e-3, gt=0, description="peak learning rate (after warm-up)")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="'sgd': SGD with `momentum`")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD's momentum")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled decay, Linear weights only")
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(64, ge=1)
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="share of all steps spent warming up linearly")
    min_lr_fraction: float = Field(0.0, ge=0, le=1, description="cosine decays to lr * this")
    max_grad_norm: float | None = Field(1.0, gt=0, description="global gradient-norm clip (non-private only)")
    patience: int | None = Field(15, ge=1, description="epochs without validation improvement before stopping")
    monitor: Literal["loss", "macro_f1", "balanced_accuracy", "accuracy"] = Field(
        "loss", description="validation metric that picks the best epoch")
    class_weighting: bool = Field(True, description="weight the loss by inverse training class frequency")
    softmax_over: Literal["all", "present"] = Field(
        "all", description="'present': the loss's softmax runs over the classes with training rows only (FedRS "
                           "with alpha 0, for label-skewed federations; needs the training class counts)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    eval_batch_size: int = Field(512, ge=1)
    seed: int = 0


# --- building blocks --------------------------------------------------------------------------------
def class_counts(y: np.ndarray | Tensor, n_classes: int) -> np.ndarray:
    y = y.numpy() if isinstance(y, Tensor) else np.asarray(y)
    return np.bincount(y.astype(np.int64), minlength=n_classes)[:n_classes]


def class_weights(counts: np.ndarray) -> Tensor:
    """Inverse-frequency weights, normalised so that their mean over the training rows is 1.

    w_c = N / (K_present * n_c) for the K_present classes with rows (sklearn's "balanced"); a class
    with no training rows gets weight 0 (it has no loss term to weight, and an inf would poison a
    validation loss that meets it).
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    if present.any():
        w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


class WeightedCrossEntropy(nn.Module):
    """sum_i w[y_i] * CE(logits_i, y_i) / batch_size: each sample's term depends on that sample only.

    With `classes` (indices), the softmax runs over those classes only: the other logits get no gradient,
    so a site that never sees a class does not teach the model that its patients are not of that class
    (Li & Zhan, FedRS, KDD 2021, with alpha 0). A label outside `classes` is an error.
    """

    def __init__(self, weight: Tensor | None = None, label_smoothing: float = 0.0, classes: Tensor | None = None):
        super().__init__()
        # Plain attributes, not buffers: the loss is not part of any model state.
        self.weight, self.label_smoothing = weight, label_smoothing
        self.classes, self._position = None, None
        if classes is not None:
            self.classes = torch.as_tensor(classes, dtype=torch.int64)
            if self.classes.numel() == 0:
                raise ValueError("softmax over no classes: the site has no training rows")
            self._position = torch.full((int(self.classes.max()) + 1,), -1, dtype=torch.int64)
            self._position[self.classes] = torch.arange(len(self.classes))

    def forward(self, logits: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """`mask` (0/1 per row): rows with 0 add nothing (a padded batch's filler rows); the divisor stays
        the batch's length, so every row's term is the same as without the mask."""
        target = y
        if self.classes is not None:
            pos = self._position.to(y.device)
            target = pos[y.clamp(max=len(pos) - 1)].masked_fill(y >= len(pos), -1)
            if bool((target < 0).any()):
                raise ValueError(f"labels {sorted(set(y[target < 0].tolist()))} are outside the classes this loss "
                                 "was built for (softmax_over='present' takes them from the training class counts)")
            logits = logits.index_select(1, self.classes.to(logits.device))
        ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
        if self.weight is not None:
            ce = ce * self.weight.to(ce.device)[y]
        if mask is not None:
            ce = ce * mask
        return ce.sum() / max(len(y), 1)  # an empty (Poisson-sampled) batch gives 0, not NaN


def build_loss(cfg: TrainConfig, counts: np.ndarray | None = None) -> WeightedCrossEntropy:
    """The training loss; `counts` (training rows per class) are needed for class weighting and for a
    softmax over the present classes."""
    if counts is None and (cfg.class_weighting or cfg.softmax_over == "present"):
        raise ValueError("class_weighting and softmax_over='present' need the training class counts; pass "
                         "class_counts(y_train, K)")
    weight = class_weights(counts) if cfg.class_weighting else None
    classes = torch.from_numpy(np.flatnonzero(np.asarray(counts) > 0)) if cfg.softmax_over == "present" else None
    return WeightedCrossEntropy(weight, cfg.label_smoothing, classes)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum); weight decay on Linear weights only (not on biases, norms,
    embeddings, learned arrays)."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if id(p) in decay_ids]
    no_decay = [p for p in params if id(p) not in decay_ids]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # fused: one kernel per parameter for the whole update; the default for-loop implementation launches
    # ~10 small kernels per parameter, which cost more than the plain step's matmuls on this model (measured)
    fused = all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in params) or None
    if cfg.optimizer == "sgd":  # weight decay here is an L2 term on the same Linear weights
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_fraction: float = 0.0) -> float:
    """Linear warm-up from lr/warmup_steps to lr, then cosine decay to lr * min_fraction at total_steps.

    `step` counts optimizer steps already taken (0 = the first step); past total_steps it stays at the floor.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_fraction + (1.0 - min_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class WarmupCosine:
    """The learning rate of every optimizer step of a training run: `lr_multiplier` times each param group's
    base lr. `next_step` is the run's step the next optimizer step takes, so a site's round continues its
    run's one schedule where the previous round stopped."""

    base_lrs: list[float]
    total_steps: int
    warmup_steps: int
    min_fraction: float = 0.0
    next_step: int = 0

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int,
           first_step: int = 0) -> "WarmupCosine":
        """Warm-up over cfg.warmup_fraction of the run's `total_steps`, from the optimizer's lr (its peak)."""
        total = max(1, total_steps)
        return cls([g["lr"] for g in optimizer.param_groups], total, math.ceil(cfg.warmup_fraction * total),
                   cfg.min_lr_fraction, first_step)

    def multiplier(self) -> float:
        return lr_multiplier(self.next_step, self.total_steps, self.warmup_steps, self.min_fraction)

    def lr(self) -> float:
        """The first param group's learning rate at the next step."""
        return self.base_lrs[0] * self.multiplier()

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        mult = self.multiplier()
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * mult


def build_loader(x: Tensor, y: Tensor, cfg: TrainConfig, seed: int | None = None) -> DataLoader:
    """Shuffled mini-batches in an order fixed by the seed."""
    g = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
    return DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, shuffle=True, generator=g)


def clip_global_grad_norm_(parameters, max_norm: float) -> Tensor:
    """nn.utils.clip_grad_norm_'s result (scale all gradients so that their global norm is at most
    max_norm) in two multi-tensor kernels, and no multiply when the norm is already within the bound."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if float(norm) > max_norm:
        torch._foreach_mul_(grads, max_norm / (float(norm) + 1e-6))
    return norm


# --- the training loop ---------------------------------------------------------------------------
@dataclass
class LoopTotals:
    """What a call of `train_epochs` ran: optimizer steps, samples and the sum of their loss terms."""

    steps: int = 0
    samples: int = 0
    loss_sum: float = 0.0

    @property
    def mean_loss(self) -> float:
        """The mean training loss per sample (0 when no sample was seen)."""
        return self.loss_sum / max(self.samples, 1)


def train_epochs(model: nn.Module, loader, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], *, epochs: int = 1,
                 schedule: WarmupCosine | None = None, max_grad_norm: float | None = None,
                 clip_with: Callable[..., Tensor] = clip_global_grad_norm_,
                 after_step: Callable[[], None] | None = None) -> LoopTotals:
    """`epochs` passes over `loader` (any iterable of (x, y) or (x, y, mask) batches: a padded Poisson batch's
    mask, 1 sampled and 0 filler, goes to `loss_fn` as its third argument), one optimizer step per batch.

    Before each step the `schedule` (if any) sets the learning rate and advances. Pass max_grad_norm=None
    under DP-SGD: the DP optimizer clips each sample's gradient itself, and clipping the (noised) sum
    again would change the privacy calibration. `clip_with(parameters, max_norm)` clips the global norm
    otherwise. `after_step` runs after every optimizer step (FedProx's proximal step).
    """
    model.train()
    totals = LoopTotals()
    for _ in range(epochs):
        for xb, yb, *mask in loader:
            if schedule is not None:
                schedule.apply(optimizer)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb, *mask)
            loss.backward()
            if max_grad_norm is not None:
                clip_with(model.parameters(), max_grad_norm)
            optimizer.step()
            if schedule is not None:
                schedule.next_step += 1
            if after_step is not None:
                after_step()
            totals.steps += 1
            totals.loss_sum += float(loss.detach()) * len(yb)  # the batch's summed loss terms (filler rows add 0)
            totals.samples += int(mask[0].sum()) if mask else len(yb)
    return totals


# --- the whole local fit --------------------------------------------------------------------------
@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    lr: float
    seconds: float
    val: dict | None = None


@dataclass
class FitResult:
    best_epoch: int  # 1-based; the weights of this epoch are in the model after fit
    epochs_run: int
    seconds: float
    samples_per_s: float  # training steps only (validation excluded)
    best_val: Metrics | None
    history: list[EpochRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["best_val"] = self.best_val.to_dict() if self.best_val else None
        return d


def _better(monitor: str, new: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(new)
    return new < best if monitor == "loss" else new > best


def fit(model: nn.Module, x_train: Tensor, y_train: Tensor, cfg: TrainConfig,
        x_val: Tensor | None = None, y_val: Tensor | None = None,
        log: Callable[[EpochRecord], None] | None = None) -> FitResult:
    """Train with AdamW, warm-up + cosine, gradient clipping and (with a validation split) early stopping.

    With a validation split the weights of the best epoch by `cfg.monitor` are restored at the end;
    without one, the last epoch's weights are kept. Deterministic for a given seed (one thread).
    """
    torch.manual_seed(cfg.seed)  # dropout
    n_classes = _n_classes(model, y_train)
    loss_fn = build_loss(cfg, class_counts(y_train, n_classes))
    loader = build_loader(x_train, y_train, cfg)
    optimizer = build_optimizer(model, cfg)
    schedule = WarmupCosine.of(optimizer, cfg, total_steps=cfg.epochs * len(loader))
    has_val = x_val is not None and y_val is not None and len(y_val) > 0

    best_score, best_epoch, best_state, best_val, stale = None, 0, None, None, 0
    history: list[EpochRecord] = []
    t_start, seen = time.perf_counter(), 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        lr = schedule.lr()
        train_loss = train_epochs(model, loader, optimizer, loss_fn, schedule=schedule,
                                  max_grad_norm=cfg.max_grad_norm).mean_loss
        seen += len(y_train)
        record = EpochRecord(epoch=epoch, train_loss=train_loss, lr=lr, seconds=time.perf_counter() - t0)
        if has_val:
            val = evaluate(model, x_val, y_val, cfg.eval_batch_size)
            record.val = val.to_dict()
            score = val.get(cfg.monitor)
            if _better(cfg.monitor, score, best_score):
                best_score, best_epoch, best_val, stale = score, epoch, val, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        history.append(record)
        if log is not None:
            log(record)
        if has_val and cfg.patience is not None and stale >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    train_seconds = sum(r.seconds for r in history)
    return FitResult(best_epoch=best_epoch if has_val else len(history), epochs_run=len(history),
                     seconds=time.perf_counter() - t_start,
                     samples_per_s=seen / train_seconds if train_seconds > 0 else float("nan"),
                     best_val=best_val, history=history)


def _n_classes(model: nn.Module, y: Tensor) -> int:
    schema = getattr(model, "schema", None)
    return schema.n_classes if schema is not None else int(y.max()) + 1
