"""One federated round at a site: local training (DP-SGD by default) from the global weights.

Privacy protocol of a round (the site's ledger is the authority, see privacy/ledger.py):
1. the run's noise multiplier is chosen once, at the run's first round at this site, for the whole
   planned schedule (rounds x local epochs x steps) composed with what the site already spent;
2. `begin_round` refuses the round if its planned steps would exceed the site's budget (nothing is
   trained or sent), else writes it ahead as pending;
3. Opacus' PRV accountant is restored from the ledger's history before training, DP-SGD runs
   (per-sample clipping by privacy/clipping.py, or Opacus' hooks with dp-clipping = "opacus");
4. the executed steps are committed before the update leaves the site; the accountant's own
   epsilon must agree with the ledger's.
The update sent is the weight delta (local - global), which keeps SecAgg+'s quantisation precise.
Under DP the metrics sent are the privacy state (epsilon, noise multiplier, sample rate), the step
count (fixed by the schedule) and metrics of the held-out part (suppressed below min-count); the
training loss, a noiseless function of the DP-protected rows, is not sent.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from client.site import PreparedSite
from client.training import (TrainConfig, build_loader, build_loss, build_optimizer, class_counts, evaluate,
                             lr_multiplier)
from privacy.accounting import BudgetError, compact, noise_multiplier_for, planned_steps
from privacy.clipping import make_private
from privacy.ledger import RunPlan
from shared_models.model import MultiModalTransformer
from shared_models.run_config import RunConfig
from shared_models.weights import load_arrays, state_arrays  # noqa: F401 (state_arrays: re-export)

log = logging.getLogger("oncofed.site")


@dataclass
class RoundResult:
    delta: list[np.ndarray]  # local - global, in state_dict order
    num_examples: int
    metrics: dict  # aggregates only: safe to send


def train_config(cfg: RunConfig) -> TrainConfig:
    """Under DP the loss is not class-weighted: weights computed from the site's label counts would make
    every sample's gradient depend on the other patients' labels, a release DP-SGD's analysis does not
    cover (and per-sample clipping largely undoes a weighting anyway). For the same reason the run config
    refuses a softmax over the site's own classes (`local-softmax = "site"`) together with DP."""
    return TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                       warmup_fraction=cfg.warmup_fraction, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
                       class_weighting=not cfg.dp, softmax_over="present" if cfg.local_softmax == "site" else "all",
                       optimizer=cfg.local_optimizer, momentum=cfg.momentum)


def plan_terms(cfg: RunConfig) -> dict:
    """The run-config values that fix a run's privacy mechanism at a site: none may change during the run."""
    return {"epsilon": cfg.epsilon, "delta": cfg.delta, "num-rounds": cfg.num_rounds, "batch-size": cfg.batch_size,
            "local-epochs": cfg.local_epochs, "max-grad-norm": cfg.max_grad_norm}


def run_noise(site: PreparedSite, run_id: str, cfg: RunConfig) -> tuple[float, float, int]:
    """(noise multiplier, sample rate, steps per round) of this run at this site, fixed at its first round.

    The run's plan is recorded in the site's ledger then; a later request of the same run (a resumed or
    misconfigured server) that changes any term of it is refused, and the ledger enforces its rounds, steps
    and epsilon on every round."""
    saved = site.ledger.run_plan(site.dataset_fingerprint, run_id)
    if saved is not None:
        if changed := saved.changes(plan_terms(cfg)):
            raise BudgetError(f"run {run_id} was started at this site with another privacy plan; this request "
                              f"changes {'; '.join(changed)}. A run's plan is fixed when it starts: nothing was "
                              "trained or sent (resume the run with its frozen configuration, or start a new run)")
        return saved.noise_multiplier, saved.sample_rate, saved.steps_per_round
    n = len(site.train.y)
    q, total = planned_steps(n, cfg.batch_size, cfg.local_epochs, cfg.num_rounds)
    # This run may bring the site's total to (spent + the run's epsilon), never beyond the site's budget:
    # a site with budget 30 can join several runs of epsilon 8 instead of spending it all on the first.
    target = min(site.ledger.budget_epsilon, site.ledger.spent(site.dataset_fingerprint) + cfg.epsilon)
    sigma = noise_multiplier_for(target, site.ledger.delta, q, total,
                                 spent=site.ledger.history(site.dataset_fingerprint))
    plan = site.ledger.start_run(site.dataset_fingerprint, run_id, RunPlan(
        epsilon=cfg.epsilon, epsilon_cap=target, num_rounds=cfg.num_rounds, steps_per_round=total // cfg.num_rounds,
        noise_multiplier=sigma, sample_rate=q, terms=plan_terms(cfg)))
    return plan.noise_multiplier, plan.sample_rate, plan.steps_per_round


def train_round(site: PreparedSite, global_arrays: list[np.ndarray], cfg: RunConfig, run_id: str, rnd: int,
                site_seed: int = 0) -> RoundResult:
    """Train from the global weights and return the update; raises BudgetError to refuse the round."""
    t_round = time.perf_counter()
    torch.manual_seed(cfg.seed * 1_000_003 + site_seed * 1009 + rnd)
    model = MultiModalTransformer(site.schema, cfg.model_config_())
    load_arrays(model, global_arrays)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tc = train_config(cfg)
    x, y = (torch.from_numpy(a) for a in (site.train.x, site.train.y))
    loss_fn = build_loss(tc, class_counts(site.train.y, site.schema.n_classes))
    optimizer = build_optimizer(model, tc)
    loader = build_loader(x, y, tc, seed=cfg.seed * 7919 + site_seed * 31 + rnd)
    steps_per_round = cfg.local_epochs * len(loader)
    total_steps = steps_per_round * cfg.num_rounds
    first_step = (rnd - 1) * steps_per_round  # one warm-up + cosine schedule over the whole run

    ticket, hooks, engine = None, None, None
    if cfg.dp:
        sigma, q, planned = run_noise(site, run_id, cfg)
        ticket = site.ledger.begin_round(site.dataset_fingerprint, run_id, rnd, sigma, q, planned)
        from privacy.dp_randomness import private_engine

        engine = private_engine("prv")  # sampling and noise from a secret seed, not the run's (see there)
        # compacted: one entry per (sigma, q) instead of one per past round (PRV's cost grows with entries)
        engine.accountant.history = compact(site.ledger.history(site.dataset_fingerprint, excluding=ticket))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' notes on secure_mode and optimizer types
            if cfg.dp_clipping == "ghost":  # per-sample clipping without per-sample gradients; Opacus' noise
                hooks, optimizer, loader = make_private(  # sampling and accountant (privacy/clipping.py)
                    engine, model, optimizer, loader, noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm)
            else:
                hooks, optimizer, loader = engine.make_private(
                    module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                    max_grad_norm=cfg.max_grad_norm, poisson_sampling=True, grad_sample_mode="hooks",
                    wrap_model=False, noise_generator=engine.secure_rng)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    prox = cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0

    model.train()
    t_train = time.perf_counter()
    step, loss_sum, seen = 0, 0.0, 0
    # Opacus' hooks sit on leaves whose inputs need no gradient (learned arrays, first layers): PyTorch
    # warns on every step that the hook fires for module outputs, which is exactly what Opacus uses.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        for _ in range(cfg.local_epochs):
            for xb, yb in loader:
                mult = lr_multiplier(first_step + step, total_steps, math.ceil(cfg.warmup_fraction * total_steps))
                for g, lr in zip(optimizer.param_groups, base_lrs):
                    g["lr"] = lr * mult
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                if not cfg.dp:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                if prox:
                    # FedProx's proximal term, applied as its own (data-independent) step after the
                    # DP-SGD step: Opacus rebuilds the gradient from per-sample terms only.
                    with torch.no_grad():
                        for name, p in model.named_parameters():
                            p.sub_(p - global_state[name], alpha=optimizer.param_groups[0]["lr"] * prox)
                step += 1
                loss_sum += float(loss.detach()) * len(yb)
                seen += len(yb)
    finally:
        if hooks is not None:
            hooks.cleanup()

    metrics = {"local_steps": step, "train_seconds": round(time.perf_counter() - t_train, 3)}
    train_loss = loss_sum / max(seen, 1)
    if not cfg.dp:
        metrics["train_loss"] = train_loss
    else:
        # The loss on the DP-SGD batches is computed from the training rows without noise: sending it
        # would release what DP-SGD protects. It stays in the site's log.
        log.info("round %s: train loss %.4f over %s sampled rows (not sent under DP)", rnd, train_loss, seen)
        spent = site.ledger.commit_round(ticket, step)
        accountant_eps = float(engine.get_epsilon(site.ledger.delta))
        if not math.isclose(spent, accountant_eps, rel_tol=0.01):
            raise BudgetError(f"ledger epsilon {spent:.4f} and Opacus' accountant {accountant_eps:.4f} disagree; "
                              "the round's update is withheld")
        metrics.update(epsilon=spent, noise_multiplier=ticket.noise_multiplier, sample_rate=ticket.sample_rate)
    val = evaluate(model, torch.from_numpy(site.val.x), torch.from_numpy(site.val.y)) if len(site.val.y) else None
    if val is not None and len(site.val.y) >= cfg.min_count:
        metrics.update(local_val_accuracy=val.accuracy, local_val_macro_f1=val.macro_f1)
    local = model.state_dict()
    delta = [(local[k] - global_state[k]).detach().cpu().numpy() for k in global_state]
    metrics["round_seconds"] = round(time.perf_counter() - t_round, 3)  # training + privacy bookkeeping + eval
    return RoundResult(delta=delta, num_examples=len(site.train.y), metrics=metrics)


def evaluate_global(site: PreparedSite, arrays: list[np.ndarray], cfg: RunConfig) -> tuple[int, dict]:
    """Metrics of the global weights on the site's held-out part; counts below min_count are not sent."""
    model = MultiModalTransformer(site.schema, cfg.model_config_())
    load_arrays(model, arrays)
    n = len(site.val.y)
    if n < cfg.min_count:
        return 0, {}
    m = evaluate(model, torch.from_numpy(site.val.x), torch.from_numpy(site.val.y))
    return n, {"loss": m.loss, "accuracy": m.accuracy, "balanced_accuracy": m.balanced_accuracy,
               "macro_f1": m.macro_f1}
