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

In `dp-mode = "distributed"` a round is instead one DP-SGD step of the whole consortium
(`distributed_round`): the site Poisson-samples its patients, sums their clipped gradients at the
global weights (privacy/clipping.py) and sends that sum on SecAgg+'s grid with its Skellam noise share
(privacy/distributed.py); the ledger's protocol is the same, one step per round.
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

from client.site import PreparedSite, min_count
from privacy.accounting import (UNPROVABLE, BudgetError, Overflow, SkellamSteps, compact, epsilon, epsilon_and_delta,
                                noise_multiplier_for, public_schedule)
from privacy.clipping import clipped_sum, finite_samples_only, make_private
from privacy import (DISTRIBUTED_PADDING_TAIL, MIN_RUN_SHARE, PADDING_TAIL,  # noqa: F401 (MIN_RUN_SHARE: re-exported)
                     distributed)
from privacy.ledger import EPSILON_SLACK, RunPlan
from privacy.sampling import PaddedPoissonLoader, opacus_poisson_loader, padded_sample, step_rows
from shared_models.evaluation import evaluate, predict_logits
from shared_models.model import MultiModalTransformer
from shared_models.protocol import (EPSILON, EPSILON_WORST_CASE, GRID_SCALE, LOCAL_STEPS, LOCAL_VAL_ACCURACY,
                                    LOCAL_VAL_MACRO_F1, NOISE_MULTIPLIER, ROUND_SECONDS, SAMPLE_RATE,
                                    RUN_EPSILON, TRAIN_LOSS, TRAIN_SECONDS, TRUSTED_SITES)
from shared_models.run_config import RunConfig
from shared_models.training import (WarmupCosine, build_loader, build_loss, build_optimizer, class_counts,
                                    train_epochs)
from shared_models.weights import load_arrays, state_arrays, trainable_layout  # noqa: F401 (state_arrays: re-export)

log = logging.getLogger("oncofed.site")


@dataclass
class RoundResult:
    delta: list[np.ndarray]  # local - global, in state_dict order
    num_examples: int
    metrics: dict  # aggregates only: safe to send


def plan_terms(cfg: RunConfig) -> dict:
    """The run-config values that fix a run's privacy mechanism at a site: none may change during the run."""
    if cfg.privacy.mode == "distributed":
        return {"dp-mode": cfg.privacy.mode, "epsilon": cfg.privacy.epsilon, "delta": cfg.privacy.delta, "num-rounds": cfg.federation.num_rounds,
                "sample-rate": cfg.privacy.sample_rate, "trusted-sites": cfg.privacy.trusted_sites, "max-grad-norm": cfg.privacy.max_grad_norm}
    return {"epsilon": cfg.privacy.epsilon, "delta": cfg.privacy.delta, "num-rounds": cfg.federation.num_rounds,
            "sample-rate": cfg.privacy.sample_rate, "batch-size": cfg.training.batch_size,
            "local-epochs": cfg.training.local_epochs, "max-grad-norm": cfg.privacy.max_grad_norm}


def saved_plan(site: PreparedSite, run_id: str, cfg: RunConfig) -> RunPlan | None:
    """The plan this run recorded at its first round here, or None (its first round); raises BudgetError when
    this request changes any of its terms (a resumed or misconfigured server)."""
    saved = site.ledger.run_plan(site.dataset_fingerprint, run_id)
    if saved is not None and (changed := saved.changes(plan_terms(cfg))):
        raise BudgetError(f"run {run_id} was started at this site with another privacy plan; this request "
                          f"changes {'; '.join(changed)}. A run's plan is fixed when it starts: nothing was "
                          "trained or sent (resume the run with its frozen configuration, or start a new run)")
    return saved


def starved_refusal(site: PreparedSite, run_id: str, cfg: RunConfig, spent: float) -> str:
    """Why the site does not join a new run ("" if it does): its budget's rest, after `spent`, is below MIN_RUN_SHARE
    of the epsilon."""
    left = site.ledger.budget_epsilon - spent
    if left >= MIN_RUN_SHARE * cfg.privacy.epsilon:
        return ""
    if math.isinf(spent):
        return (f"run {run_id} refused: no finite epsilon bounds this site's spend{UNPROVABLE}. Nothing was trained or "
                "sent; the site's data-protection officer decides whether its patients train again (a new privacy "
                "ledger starts from zero only by their decision)")
    return (f"run {run_id} asks for epsilon {cfg.privacy.epsilon:g} and this site has {max(left, 0):.3g} left of its "
            f"budget {site.ledger.budget_epsilon:g} ({spent:.3f} spent): its update would carry noise for "
            f"{max(left, 0):.3g}, many times the run's, which the consortium's sum would carry too. Nothing was trained "
            "or sent; the site's data-protection officer may raise its privacy-budget, or the consortium run with a "
            "smaller epsilon")


def padding_tail(cfg: RunConfig) -> float:
    """The probability per DP step that a Poisson sample outgrows its padded batch (privacy/sampling.py), which the
    ledger prices with the steps; 0 for unpadded site-mode steps (`dp-pad-batches = false`: their timing shows every
    sample's size, outside the claim)."""
    if cfg.privacy.distributed:
        return DISTRIBUTED_PADDING_TAIL
    return PADDING_TAIL if cfg.privacy.pad_batches else 0.0


def run_noise(site: PreparedSite, run_id: str, cfg: RunConfig) -> tuple[float, float, int]:
    """(noise multiplier, sample rate, steps per round) of this run at this site, fixed at its first round.

    The run's plan is recorded in the site's ledger then; a later request of the same run (a resumed or
    misconfigured server) that changes any term of it is refused, and the ledger enforces its rounds, steps
    and epsilon on every round."""
    if (saved := saved_plan(site, run_id, cfg)) is not None:
        return saved.noise_multiplier, saved.sample_rate, saved.steps_per_round
    sigma, q, total, target = new_run_noise(site, run_id, cfg)
    plan = site.ledger.start_run(site.dataset_fingerprint, run_id, RunPlan(
        epsilon=cfg.privacy.epsilon, epsilon_cap=target, num_rounds=cfg.federation.num_rounds, steps_per_round=total // cfg.federation.num_rounds,
        noise_multiplier=sigma, sample_rate=q, terms=plan_terms(cfg)))
    return plan.noise_multiplier, plan.sample_rate, plan.steps_per_round


# The last new-run noise computed for each site's ledger, with everything it was computed from: a new run's first
# round asks for it at SecAgg+'s setup stage (round_precheck) and again as it trains (run_noise), ~0.5 s each; the
# second takes the first's answer when this process handled both and neither the ledger nor the run changed.
_NEW_RUN_NOISE: dict[str, tuple[tuple, tuple[float, float, int, float]]] = {}


def new_run_noise(site: PreparedSite, run_id: str, cfg: RunConfig) -> tuple[float, float, int, float]:
    """(noise multiplier, sample rate, total steps, the epsilon the run may bring the site to) for a new run at this
    site, or BudgetError: the site does not join it (what is left is below MIN_RUN_SHARE of the run's epsilon).
    Records nothing: the round's precheck asks it too, before any site trains."""
    history = tuple(site.ledger.history(site.dataset_fingerprint))  # read first: reading may pin a smaller delta
    key = (run_id, history, site.ledger.budget_epsilon, site.ledger.delta, cfg.model_dump_json())
    held = _NEW_RUN_NOISE.get(str(site.ledger.path))
    if held is not None and held[0] == key:
        return held[1]
    noise = _new_run_noise(site, run_id, cfg, list(history))  # from the snapshot keyed, whatever is written meanwhile
    _NEW_RUN_NOISE[str(site.ledger.path)] = key, noise
    return noise


def _new_run_noise(site: PreparedSite, run_id: str, cfg: RunConfig, history: list) -> tuple[float, float, int, float]:
    """new_run_noise from the ledger's `history` (its every mechanism), budget and delta: nothing else of it."""
    spent = epsilon(history, site.ledger.delta)  # the ledger's `spent`
    if reason := starved_refusal(site, run_id, cfg, spent):
        raise BudgetError(reason)
    q, total = public_schedule(cfg.privacy.sample_rate, cfg.training.local_epochs, cfg.federation.num_rounds)
    # This run may bring the site's total to (spent + the run's epsilon), never beyond the site's budget:
    # a site with budget 30 can join several runs of epsilon 8 instead of spending it all on the first.
    target = min(site.ledger.budget_epsilon, spent + cfg.privacy.epsilon)
    overflow = Overflow(total, padding_tail(cfg))  # the run's padding, priced with its steps
    sigma = noise_multiplier_for(target, site.ledger.delta, q, total, spent=history + [overflow])
    # And the run's model alone costs at most the run's epsilon. Composition is subadditive, so noise set by the total
    # alone falls with every run: a second run of epsilon 8 after one of 7.97 got noise multiplier 1.17 instead of
    # 1.625, a model of epsilon 13.0 on its own (and a total of 15.9 where 11.8 now)
    own = noise_multiplier_for(cfg.privacy.epsilon, site.ledger.delta, q, total, spent=[overflow])
    # The budget's rest is not all a run can have: the history's bad events, priced at the epsilon claimed, can make
    # the total unprovable far below the budget (privacy/accounting.py `priced`), and the noise then grows many-fold
    alone = epsilon([(sigma, q, total), overflow], site.ledger.delta) if sigma > own else cfg.privacy.epsilon
    if alone < MIN_RUN_SHARE * cfg.privacy.epsilon:
        raise BudgetError(
            f"run {run_id} refused: this site's spend can grow by epsilon {alone:.3g} only, though its budget "
            f"{site.ledger.budget_epsilon:g} has more left{UNPROVABLE}; its update would carry {sigma / own:.1f} times "
            f"the run's noise, which the consortium's sum would carry too. Nothing was trained or sent")
    return max(sigma, own), q, total, target


def train_round(site: PreparedSite, global_arrays: list[np.ndarray], cfg: RunConfig, run_id: str, rnd: int,
                site_seed: int = 0) -> RoundResult:
    """Train from the global weights and return the update; raises BudgetError to refuse the round."""
    t_round = time.perf_counter()
    torch.manual_seed(cfg.training.seed * 1_000_003 + site_seed * 1009 + rnd)
    model = MultiModalTransformer(site.schema, cfg.model)
    load_arrays(model, global_arrays)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tc = cfg.train_config()
    x, y = (torch.from_numpy(a) for a in (site.train.x, site.train.y))
    loss_fn = build_loss(tc, class_counts(site.train.y, site.schema.n_classes))
    optimizer = build_optimizer(model, tc)
    loader = build_loader(x, y, tc, seed=cfg.training.seed * 7919 + site_seed * 31 + rnd)
    steps_per_round = cfg.training.local_epochs * len(loader)

    ticket, hooks, engine = None, None, None
    if cfg.privacy.enabled:
        # Under DP nothing the site sends may depend on its number of patients (the accountant's add/remove
        # adjacency; docs/privacy.md): the sample rate and steps come from the run config (public_schedule), and
        # the noisy sum of clipped gradients is divided by the run's batch-size, a public number, not by the
        # expected batch (sample rate x patients). A site with more patients per batch takes larger steps.
        sigma, q, steps_per_round = run_noise(site, run_id, cfg)
        ticket = site.ledger.begin_round(site.dataset_fingerprint, run_id, rnd, sigma, q, steps_per_round,
                                         padding_tail=padding_tail(cfg))
        from privacy.dp_randomness import private_engine, secret_dropout

        secret_dropout()  # the masks depend on which records a step sampled: secret, as the sampling

        engine = private_engine("prv")  # sampling and noise from a secret seed, not the run's (see there)
        # compacted: one entry per (sigma, q) instead of one per past round (PRV's cost grows with entries)
        past = compact(site.ledger.history(site.dataset_fingerprint, excluding=ticket))
        # Opacus' accountant knows Gaussian steps only: after distributed rounds the ledger's RDP is the check
        engine.accountant.history = [m for m in past if isinstance(m, tuple)]
        opacus_checks = not any(isinstance(m, SkellamSteps) for m in past)
        per_epoch = steps_per_round // cfg.training.local_epochs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' notes on secure_mode and optimizer types
            if cfg.privacy.pad_batches:  # Poisson batches at a fixed cost (privacy/sampling.py), from the secret rng
                loader = PaddedPoissonLoader.from_data_loader(loader, generator=engine.secure_rng, sample_rate=q,
                                                              steps=per_epoch, pad_to=cfg.privacy.pad_to,
                                                              tail=padding_tail(cfg))  # the tail its entry records
            else:  # Opacus' own Poisson loader, at (at most) the run's sample rate
                loader = opacus_poisson_loader(loader.dataset, q, engine.secure_rng)
            if cfg.privacy.clipping == "ghost":  # per-sample clipping without per-sample gradients; Opacus' noise
                hooks, optimizer, loader = make_private(  # sampling and accountant (privacy/clipping.py)
                    engine, model, optimizer, loader, noise_multiplier=sigma, max_grad_norm=cfg.privacy.max_grad_norm,
                    poisson_sampling=False, expected_batch_size=cfg.training.batch_size)
            else:
                hooks, optimizer, loader = engine.make_private(
                    module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                    max_grad_norm=cfg.privacy.max_grad_norm, poisson_sampling=False,
                    grad_sample_mode="hooks", wrap_model=False, noise_generator=engine.secure_rng)
                # Opacus takes the sample rate as 1 / len(loader) and divides by the dataset's size x it: the
                # run's sample rate and batch-size instead
                optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=q))
                optimizer.expected_batch_size = cfg.training.batch_size
                hooks.forbid_grad_accumulation()  # Opacus sets it only for its own Poisson loader
                finite_samples_only(optimizer)  # an overflowing patient (sampled or filler) counts as zero

    # one warm-up + cosine schedule over the whole run: this round is its stretch from (rnd - 1) * steps_per_round
    schedule = WarmupCosine.of(optimizer, tc, total_steps=steps_per_round * cfg.federation.num_rounds,
                               first_step=(rnd - 1) * steps_per_round)
    proximal_step = None
    if cfg.federation.strategy == "fedprox":
        def proximal_step() -> None:
            # FedProx's proximal term, applied as its own (data-independent) step after the DP-SGD step:
            # Opacus rebuilds the gradient from per-sample terms only. The step is the term's proximal operator,
            # p <- (p + a g) / (1 + a) with a = lr x mu, not the gradient step p - a (p - g): that one set every
            # parameter back to the global weights at a = 1 (the DP recipe's lr 100 with the default mu 0.01: a
            # round sent a zero update) and diverged beyond. The two agree to first order in a (a = 0.002 at the
            # no-DP recipe's lr 0.2).
            a = optimizer.param_groups[0]["lr"] * cfg.federation.proximal_mu
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.add_(global_state[name], alpha=a).div_(1.0 + a)

    t_train = time.perf_counter()
    # Opacus' hooks sit on leaves whose inputs need no gradient (learned arrays, first layers): PyTorch
    # warns on every step that the hook fires for module outputs, which is exactly what Opacus uses.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        # Without DP the global norm is clipped with torch's clip_grad_norm_, not clip_global_grad_norm_: the
        # two round the scale factor differently in the last bit, and a site's rounds stay bit for bit those
        # of earlier runs (changing it is a change of results, to be measured on its own).
        totals = train_epochs(model, loader, optimizer, loss_fn, epochs=cfg.training.local_epochs, schedule=schedule,
                              max_grad_norm=None if cfg.privacy.enabled else cfg.privacy.max_grad_norm,
                              clip_with=torch.nn.utils.clip_grad_norm_, after_step=proximal_step)
    finally:
        if hooks is not None:
            hooks.cleanup()

    metrics = {LOCAL_STEPS: totals.steps, TRAIN_SECONDS: round(time.perf_counter() - t_train, 3)}
    if not cfg.privacy.enabled:
        metrics[TRAIN_LOSS] = totals.mean_loss
    else:
        # The loss on the DP-SGD batches is computed from the training rows without noise: sending it
        # would release what DP-SGD protects. It stays in the site's log.
        log.info("round %s: train loss %.4f over %s sampled rows (not sent under DP)", rnd, totals.mean_loss,
                 totals.samples)
        spent = site.ledger.commit_round(ticket, totals.steps)
        if opacus_checks:  # the two accountants over the same history: the ledger's as it stood when the round began
            # (`spent` may hold another run's round committed meanwhile at this site, which Opacus' copy lacks)
            # at the delta the ledger charged the steps: its figure pays the bad events' price (the padding's overflow,
            # privacy/accounting.py `priced`) out of delta, which Opacus' accountant does not know of
            ours, charged = epsilon_and_delta(past + [(ticket.noise_multiplier, ticket.sample_rate, totals.steps),
                                                      Overflow(totals.steps, padding_tail(cfg))], site.ledger.delta)
            accountant_eps = float(engine.get_epsilon(charged)) if charged > 0 else math.inf
            if not math.isclose(ours, accountant_eps, rel_tol=0.01):
                raise BudgetError(f"ledger epsilon {ours:.4f} and Opacus' accountant {accountant_eps:.4f} disagree; "
                                  "the round's update is withheld")
        metrics.update({EPSILON: spent, RUN_EPSILON: site.ledger.run_spent(run_id),
                        NOISE_MULTIPLIER: ticket.noise_multiplier, SAMPLE_RATE: ticket.sample_rate})
    val = evaluate(model, torch.from_numpy(site.val.x), torch.from_numpy(site.val.y)) if len(site.val.y) else None
    if cfg.privacy.enabled and cfg.privacy.pad_to and len(site.val.y):
        # dp-pad-to: the held-out part's forward pass costs what the bound's would (its rows again, discarded), so
        # round_seconds do not tell the held-out part's size either
        bound = round(cfg.privacy.pad_to * cfg.site.val_fraction / (1 - cfg.site.val_fraction))
        if (extra := bound - len(site.val.y)) > 0:
            predict_logits(model, torch.from_numpy(site.val.x[np.arange(extra) % len(site.val.y)]))
    if val is not None and len(site.val.y) >= min_count(site, cfg):
        metrics.update({LOCAL_VAL_ACCURACY: val.accuracy, LOCAL_VAL_MACRO_F1: val.macro_f1})
    local = model.state_dict()
    delta = [(local[k] - global_state[k]).detach().cpu().numpy() for k in global_state]
    metrics[ROUND_SECONDS] = round(time.perf_counter() - t_round, 3)  # training + privacy bookkeeping + eval
    return RoundResult(delta=delta, num_examples=len(site.train.y), metrics=metrics)


def distributed_plan(site: PreparedSite, run_id: str, cfg: RunConfig, dim: int,
                     check=lambda p: None) -> distributed.SkellamPlan:
    """The Skellam mechanism of this distributed run at this site, fixed at its first round.

    The aggregate noise is a function of the run config alone (epsilon, delta, rounds, sample rate, C,
    trusted sites) and the model's size, so every site computes the same and adds the same share: any
    `trusted-sites` honest shares then sum to the noise each site's accounting assumes. (A site's own
    earlier spend cannot raise the noise, as it does in dp-mode "site": the other sites would not add it.)
    The ledger refuses the run's rounds at a site whose budget the run would exceed. `check(plan)` raises to
    refuse the round; on a run's first round it runs before the ledger records the run, so a refused first
    round leaves no trace of the run in the ledger."""
    if (saved := saved_plan(site, run_id, cfg)) is not None:
        p = distributed.SkellamPlan.from_dict(saved.mechanism)
        if p.dim != dim:  # the plan's rounding sensitivity holds for its own number of coordinates only
            raise BudgetError(f"run {run_id} was planned at this site for a model of {p.dim} trained coordinates and "
                              f"this round's model has {dim}: its noise and accounting would not hold; a run's model "
                              "cannot change during the run, start a new run")
        check(p)
        return p
    # the plan at the run's delta, as the server and every other site compute it; the ledger accounts it at its own
    # (never larger) delta, and refuses the rounds that would pass the budget there
    p = distributed.run_config_plan(cfg, dim)
    check(p)
    cap = _whole_run_fits(site, run_id, cfg, p)
    site.ledger.start_run(site.dataset_fingerprint, run_id, RunPlan(
        epsilon=cfg.privacy.epsilon, epsilon_cap=cap, num_rounds=cfg.federation.num_rounds, steps_per_round=1,
        noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate, terms=plan_terms(cfg), mechanism=p.to_dict()))
    return p


def _whole_run_fits(site: PreparedSite, run_id: str, cfg: RunConfig, p: distributed.SkellamPlan) -> float:
    """The epsilon a new distributed run may bring the site to, or BudgetError: its rounds would not fit."""
    history = site.ledger.history(site.dataset_fingerprint)  # read once: the spend and the whole run's projection
    spent = epsilon(history, site.ledger.delta)  # (PrivacyLedger.spent)
    cap = min(site.ledger.budget_epsilon, spent + cfg.privacy.epsilon)
    # the run's noise cannot adapt to this site (every site adds the same share): a run whose rounds cost more at the
    # site's own (smaller) delta than its epsilon would be refused partway, its earlier rounds spent for nothing
    whole = epsilon(history + [p.steps(cfg.federation.num_rounds), Overflow(cfg.federation.num_rounds, padding_tail(cfg))],
                    site.ledger.delta)
    if math.isinf(whole):
        raise BudgetError(f"run {run_id} refused before any spend: its {cfg.federation.num_rounds} rounds would leave "
                          f"this site's spend ({spent:.3f} now) without a finite epsilon{UNPROVABLE}")
    if whole > spent + cfg.privacy.epsilon + EPSILON_SLACK:
        raise BudgetError(
            f"run {run_id} refused before any spend: its noise is planned for epsilon {cfg.privacy.epsilon:g} at the "
            f"run's delta {cfg.privacy.delta:g}, and this site accounts at its privacy-delta {site.ledger.delta:g}, "
            f"where the run's {cfg.federation.num_rounds} rounds would spend {whole - spent:.3f}: the site would "
            "withdraw partway. Set the run's delta to at most the smallest privacy-delta of its sites")
    if whole > site.ledger.budget_epsilon + EPSILON_SLACK:
        raise BudgetError(
            f"run {run_id} refused before any spend: its {cfg.federation.num_rounds} rounds would take this site's "
            f"epsilon from {spent:.3f} to {whole:.3f}, beyond its budget {site.ledger.budget_epsilon:g} "
            f"({max(site.ledger.budget_epsilon - spent, 0):.3f} left); the run's noise is the same at every site and "
            "cannot shrink for this one, so it would withdraw partway. Join a run with a smaller epsilon or fewer "
            "rounds, or raise the site's privacy-budget if its data-protection officer agrees")
    return cap


def round_precheck(site: PreparedSite, cfg: RunConfig, run_id: str, rnd: int) -> None:
    """Raise BudgetError if the site's ledger would refuse round `rnd` of the run (its plan's terms, its epsilon cap,
    the site's budget), writing nothing: asked at SecAgg+'s setup stage, before any site trains, so that a round this
    site would refuse costs the other sites no spend (a round already released is resent, not refused)."""
    from privacy.ledger import AlreadyReleased

    saved = saved_plan(site, run_id, cfg)
    fingerprint = site.dataset_fingerprint
    try:
        if cfg.privacy.distributed:
            if saved is None:  # a new run: its noise is the consortium's, so the whole run must fit now
                _, noised = trainable_layout(MultiModalTransformer(site.schema, cfg.model))
                _whole_run_fits(site, run_id, cfg, distributed.run_config_plan(cfg, int(noised.sum())))
                return
            p = distributed.SkellamPlan.from_dict(saved.mechanism)
            site.ledger.check_round(fingerprint, run_id, rnd, p.noise_multiplier, p.sample_rate, 1, mechanism=p,
                                    padding_tail=padding_tail(cfg))
        elif saved is None:  # a new run's noise adapts to what is left (run_noise), down to MIN_RUN_SHARE of it
            new_run_noise(site, run_id, cfg)
        else:
            site.ledger.check_round(fingerprint, run_id, rnd, saved.noise_multiplier, saved.sample_rate,
                                    saved.steps_per_round, padding_tail=padding_tail(cfg))
    except AlreadyReleased:
        return


def distributed_round(site: PreparedSite, global_arrays: list[np.ndarray], cfg: RunConfig, run_id: str, rnd: int,
                      grid: distributed.SecAggGrid, site_seed: int = 0, server_plan: dict | None = None) -> RoundResult:
    """One DP-SGD step at the global weights, as the site's share of the consortium's step: the sum of the
    clipped per-sample gradients of a Poisson sample of its patients, on SecAgg+'s grid with its Skellam
    noise share. Returns the float arrays for Flower (num_examples = max_weight: Flower's weight factor 1);
    raises BudgetError or distributed.GridError to refuse (nothing is sent), also when `server_plan` (the
    server's NOISE_PLAN) is not this site's plan."""
    from privacy.dp_randomness import dp_generator, dp_numpy_generator, secret_dropout

    t_round = time.perf_counter()
    torch.manual_seed(cfg.training.seed * 1_000_003 + site_seed * 1009 + rnd)  # the model's initialisation only
    model = MultiModalTransformer(site.schema, cfg.model)
    load_arrays(model, global_arrays)
    shapes, noised = trainable_layout(model)
    n = len(site.train.y)

    def check(p: distributed.SkellamPlan) -> None:  # before any spend, and before a new run is recorded
        distributed.check_same_plan(p, server_plan)
        # a configuration that could be clipped is refused; checked for secagg-max-weight patients, a public
        # bound, since a refusal that turned on the site's own count would publish it
        distributed.check_range(p, grid, int(grid.max_weight))

    p = distributed_plan(site, run_id, cfg, int(noised.sum()), check)
    ticket = site.ledger.begin_round(site.dataset_fingerprint, run_id, rnd, p.noise_multiplier, p.sample_rate, 1,
                                     mechanism=p, padding_tail=padding_tail(cfg))
    t_train = time.perf_counter()
    secret_dropout()  # the masks depend on which records were sampled: secret, as the sampling (dp_randomness)
    rows, mask = padded_sample(n, p.sample_rate, dp_generator(),  # Poisson sampling, secret; fixed cost
                               step_rows(n, p.sample_rate, cfg.privacy.pad_to, tail=padding_tail(cfg)))
    grads = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    if len(rows):
        tc = cfg.train_config()
        loss_fn = build_loss(tc, class_counts(site.train.y, site.schema.n_classes))
        model.train()
        xs, ys = (torch.from_numpy(a[rows.numpy()]) for a in (site.train.x, site.train.y))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus' hooks (see train_round)
            # p.grad = the sum of the clipped per-sample gradients of the sampled rows (the filler rows' are 0),
            # by the run config's dp-clipping
            clipped_sum(model, lambda: loss_fn(model(xs), ys, mask), cfg.privacy.max_grad_norm, cfg.privacy.clipping)
        for k, param in model.named_parameters():
            if param.requires_grad and param.grad is not None:
                grads[k] = param.grad.detach()
    x = np.concatenate([g.numpy().astype(np.float64).ravel() for g in grads.values()])
    z = distributed.encode(x, p, grid, dp_numpy_generator(), noised=noised)
    arrays = distributed.to_flower(z, grid, shapes)
    train_seconds = time.perf_counter() - t_train
    log.info("round %s: one distributed DP step over %s sampled patients in %s rows (not sent)", rnd, int(mask.sum()),
             len(rows))
    spent, worst = site.ledger.commit_distributed_round(ticket, 1)
    metrics = {LOCAL_STEPS: 1, TRAIN_SECONDS: round(train_seconds, 3), EPSILON: spent, EPSILON_WORST_CASE: worst,
               RUN_EPSILON: site.ledger.run_spent(ticket.run_id),
               NOISE_MULTIPLIER: p.noise_multiplier, SAMPLE_RATE: p.sample_rate, TRUSTED_SITES: p.trusted_sites,
               GRID_SCALE: p.scale, ROUND_SECONDS: round(time.perf_counter() - t_round, 3)}
    return RoundResult(delta=arrays, num_examples=int(grid.max_weight), metrics=metrics)
