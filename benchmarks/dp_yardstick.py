"""What DP-SGD costs before federation does anything: the DP yardstick of the main job.

The training patients of the 8 center8 hospitals of `oncofed simulate` (same partition, same
site-local split and per-site normalisation) are pooled in one place and trained centrally with
Opacus DP-SGD at the per-site budget of the federation (epsilon, delta), with its schedule
(rounds x local epochs passes, expected batch, local optimizer, learning rate, warm-up + cosine, clipping
bound, no class weighting under DP), then scored on the held-out tss patients exactly as the
federation's global model is. A pooled mechanism protects every patient at the same epsilon with
8x fewer noise draws per update than 8 hospitals each adding their own, so it is the natural
ceiling to hold the federated DP result against, as the centralized baseline is for the non-private
one. Two models: multinomial logistic regression (one nn.Linear on the standardised inputs,
missing values at 0) and the shared transformer with the run-config defaults; each also without DP
(class-weighted, lr 0.002, batch 64: the federation's non-private settings). `transformer-es` is the
non-private centralized recipe instead (`oncofed baseline`'s: lr 0.001, up to 60 epochs, early
stopping on a stratified 15% of the pooled rows, the best epoch's weights): what model selection on
pooled data adds, which the federation's fixed schedule does not do. `--seeds` repeats every row
with other run-config seeds (initialisation, sampling, DP noise; the partition stays that of seed 0,
and the sites' evaluation parts those of the run config's seed). `--all-rows` also pools the parts
the sites keep for their own evaluation (every patient of every site, as the real-data study's
"pooled" cell).

    python benchmarks/dp_yardstick.py                       # epsilon 8; both models, DP and not
    python benchmarks/dp_yardstick.py --epsilons 1,3,8 --models linear
    python benchmarks/dp_yardstick.py --models transformer,transformer-es --epsilons none --seeds 0,1,2
    python benchmarks/dp_yardstick.py --models transformer-es --epsilons none --seeds 0,1,2 --all-rows
    # tune the pooled DP recipe (18 combinations): the ceiling the federation is held against, measured with AdamW
    # (docs/results.md); with SGD, the default, lr and max-grad-norm go together (a step scales with lr x C): grid both
    python benchmarks/dp_yardstick.py --models linear --set local-optimizer=adamw --grid batch-size=256,1024,2048 --grid lr=0.005,0.01,0.02 --grid local-epochs=2,5

`--grid KEY=V1,V2,...` (repeatable) trains every combination of the values (run-config keys of the
training recipe, on top of `--set`) and ends with the best combination per model and budget. The
best is picked on the held-out patients themselves, so it is an optimistic ceiling for the pooled
mechanism, not a recipe validated for deployment: the point is to see whether any recipe reaches a
target, and a ceiling picked this way is the generous side of that question.

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from client.site import SitePaths, prepare_site  # noqa: E402
from privacy.accounting import MAX_BUDGET, noise_multiplier_for  # noqa: E402
from privacy.run_config import load_run_config, parse_run_overrides  # noqa: E402
from shared_models.evaluation import evaluate  # noqa: E402
from shared_models.model import MultiModalTransformer  # noqa: E402
from shared_models.run_config import RunConfig  # noqa: E402
from shared_models.schema import FeatureSchema  # noqa: E402
from shared_models.site_data import load_labelled_site  # noqa: E402
from shared_models.training import (TrainConfig, WarmupCosine, build_loader, build_loss,  # noqa: E402
                                    build_optimizer, class_counts, train_epochs)
from simulations.experiment import fit_early_stopped  # noqa: E402
from simulations.federation import ensure_partition  # noqa: E402

MODELS = ("linear", "transformer", "transformer-es")
# what --grid may vary: the training recipe only (the partition, the sites' splits and normalisation stay fixed)
GRID_KEYS = ("batch-size", "lr", "local-epochs", "num-rounds", "max-grad-norm", "weight-decay", "warmup-fraction",
             "local-optimizer", "momentum")


def grid_overrides(items: list[str]) -> list[dict]:
    """Every combination of `--grid KEY=V1,V2,...` values, each combination one dict of run-config overrides."""
    import itertools

    from shared_models.run_config import RunConfigError

    if not items:
        return []
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise RunConfigError(f"--grid {item}: write KEY=V1,V2,..., e.g. --grid local-epochs=1,2,5")
        if key not in GRID_KEYS:
            raise RunConfigError(f"--grid {key}: not a training-recipe key; use one of {', '.join(GRID_KEYS)} "
                             "(seeds: --seeds; the data split stays the main job's)")
        if key in (k for k, _ in axes):
            raise RunConfigError(f"--grid {key}: given twice; list all its values in one --grid {key}=V1,V2,...")
        axes.append((key, [parse_run_overrides([f"{key}={v}"], source="--grid")[key]
                           for v in values.split(",")]))
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*(v for _, v in axes))]


class Linear(nn.Module):
    """Multinomial logistic regression on the model's input vector (missing values at the mean, 0)."""

    def __init__(self, n_inputs: int, n_classes: int):
        super().__init__()
        self.linear = nn.Linear(n_inputs, n_classes)

    def forward(self, x):
        return self.linear(torch.nan_to_num(x, nan=0.0))


def recipe(cfg: RunConfig, *, dp: bool, epochs: int) -> TrainConfig:
    """The training recipe of one row: a site's (`RunConfig.train_config`: optimizer, lr, batch, clipping,
    schedule, ...) over `epochs` pooled passes. Without DP: the run config's no-DP recipe with AdamW (lr 0.002,
    batch 64, class-weighted), the recipe the no-DP rows were measured with."""
    if not dp:
        cfg = no_dp(cfg)
    return cfg.train_config().model_copy(update={"epochs": epochs})


def no_dp(cfg: RunConfig) -> RunConfig:
    """The no-DP rows' run config: every setting the DP one resolved for DP ("auto": the clipping bound, the
    modality dropout, lr, batch) resolved again without DP, with AdamW (the recipe those rows were measured with)."""
    return load_run_config({**cfg.flat(), "dp": False, "local-optimizer": "adamw", "lr": "auto", "batch-size": "auto",
                            "max-grad-norm": "auto", "modality-dropout": "auto", "local-softmax": "all"},
                           source="the no-DP rows' recipe")


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig, n_classes: int, *, dp: bool,
          epsilon: float, epochs: int) -> float:
    """Central training on the pooled rows; returns the epsilon Opacus' accountant reports (0 without DP)."""
    tc = recipe(cfg, dp=dp, epochs=epochs)
    loss_fn = build_loss(tc, class_counts(y, n_classes))
    optimizer = build_optimizer(model, tc)
    loader = build_loader(x, y, tc)
    engine = None
    if dp:
        from opacus import PrivacyEngine

        # pooled DP-SGD as Opacus runs it: len(loader) Poisson steps per epoch at rate 1 / len(loader)
        q, total = 1.0 / len(loader), len(loader) * epochs
        sigma = noise_multiplier_for(epsilon, cfg.privacy.delta, q, total, spent=[])
        engine = PrivacyEngine(accountant="prv")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=cfg.privacy.max_grad_norm, poisson_sampling=True, grad_sample_mode="hooks")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    # the sites' loop (client.local_round.train_round): one schedule over all passes, as over a run's rounds
    schedule = WarmupCosine.of(optimizer, tc, total_steps=epochs * len(loader))
    train_epochs(model, loader, optimizer, loss_fn, epochs=epochs, schedule=schedule,
                 max_grad_norm=None if dp else tc.max_grad_norm)
    return float(engine.get_epsilon(cfg.privacy.delta)) if engine else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", default="8", help="comma-separated per-site budgets (default 8; 'none': no DP only)")
    ap.add_argument("--models", default="linear,transformer", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--seeds", default="", help="comma-separated run-config seeds (default: the run config's)")
    ap.add_argument("--all-rows", action="store_true",
                    help="pool every patient of each site, including the part a federated site keeps for its own "
                         "evaluation (val-fraction), as the real-data study's 'pooled' cell does")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help=f"train every combination of these values of the recipe's run-config keys "
                         f"({', '.join(GRID_KEYS)}); ends with the best per model and budget")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    if bad := [m for m in models if m not in MODELS]:
        ap.error(f"--models: unknown {', '.join(bad)}; choose from {', '.join(MODELS)}")
    try:
        epsilons = [] if args.epsilons == "none" else [float(e) for e in args.epsilons.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError as e:
        ap.error(f"--epsilons/--seeds: {e}; give comma-separated numbers, e.g. --epsilons 1,3,8 --seeds 0,1,2")
    torch.set_num_threads(1)
    from shared_models.run_config import RunConfigError

    try:  # a bad --grid stops here, before the partition is cut
        grids = grid_overrides(args.grid)
    except RunConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if grids and not epsilons:
        ap.error("--grid varies the DP recipe: give --epsilons (e.g. 8), not 'none'")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sites_root = ensure_partition(tmp / "sites")
        schema = FeatureSchema.load(sites_root / "schema.json")
        base = {"schema": str(sites_root / "schema.json"), **parse_run_overrides(args.set)}
        cfg = load_run_config(base)
        try:  # every grid point is a whole run config, checked before anything trains
            recipes = [(g, load_run_config({**base, **g}, source=f"--grid {g}"))
                       for g in grids]
        except RunConfigError as e:
            print(e, file=sys.stderr)
            return 2
        xs, ys = [], []
        for site_dir in sorted(p for p in sites_root.iterdir() if p.is_dir() and p.name != "holdout"):
            if args.all_rows:  # every patient of the site, normalised over the whole site (the study's pooled cell)
                rows_ = load_labelled_site(schema, site_dir)
            else:  # the rows a federated site trains on: its training split, normalised as its runs normalise it
                rows_ = prepare_site(schema, SitePaths(site_dir, tmp / "state" / site_dir.name, tmp / "models"),
                                     budget_epsilon=MAX_BUDGET, delta=cfg.privacy.delta, val_fraction=cfg.site.val_fraction,
                                     min_count=cfg.site.min_count, seed=cfg.training.seed, dp=bool(epsilons)).train
            xs.append(rows_.x)
            ys.append(rows_.y)
        x, y = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
        held = load_labelled_site(schema, sites_root / "holdout")
    epochs = cfg.federation.num_rounds * cfg.training.local_epochs
    print(f"pooled {'' if args.all_rows else 'training '}patients of {len(xs)} hospitals: {len(y):,}; held-out tss patients: {len(held.y):,}; "
          f"{epochs} passes, expected batch {cfg.training.batch_size}, lr {cfg.training.lr}, C {cfg.privacy.max_grad_norm}, delta {cfg.privacy.delta}"
          + (f"; {len(recipes)} DP recipes (--grid)" if recipes else ""), flush=True)
    rows = []
    for seed in seeds or [cfg.training.seed]:
        for name in models:
            for i, (grid, rcfg) in enumerate(recipes or [({}, cfg)]):
                # no DP once, not once per DP recipe, and from the base config: a --grid point is a DP recipe
                for eps in ([None] if i == 0 else []) + ([] if name == "transformer-es" else epsilons):
                    row_cfg = no_dp(cfg) if eps is None else rcfg
                    scfg = row_cfg.model_copy(update={"training": row_cfg.training.model_copy(update={"seed": seed})})
                    torch.manual_seed(seed)
                    model = (Linear(x.shape[1], schema.n_classes) if name == "linear"
                             else MultiModalTransformer(schema, scfg.model))
                    t0 = time.perf_counter()
                    extra, spent = {}, 0.0
                    if name == "transformer-es":
                        f = fit_early_stopped(model, x, y, seed)
                        extra = {"best_epoch": f.best_epoch, "epochs_run": f.epochs_run}
                    else:
                        spent = train(model, x, y, scfg, schema.n_classes, dp=eps is not None, epsilon=eps or 0.0,
                                      epochs=scfg.federation.num_rounds * scfg.training.local_epochs)
                    m = evaluate(model, torch.from_numpy(held.x), torch.from_numpy(held.y))
                    rows.append({"model": name, "seed": seed, "epsilon": eps, "epsilon_spent": round(spent, 3),
                                 "recipe": grid if eps is not None else {},
                                 "accuracy": m.accuracy, "balanced_accuracy": m.balanced_accuracy,
                                 "macro_f1": m.macro_f1, "seconds": round(time.perf_counter() - t0, 1), **extra})
                    r = rows[-1]
                    note = (f"best epoch {extra['best_epoch']} of {extra['epochs_run']}" if extra
                            else f"spent {spent:.2f}")
                    recipe = " ".join(f"{k}={v}" for k, v in r["recipe"].items())
                    print(f"{name:<15} seed {seed}  {'no DP' if eps is None else f'eps {eps:g}':<8} accuracy "
                          f"{r['accuracy']:.3f}  balanced {r['balanced_accuracy']:.3f}  macro-F1 {r['macro_f1']:.3f}  "
                          f"({note}, {r['seconds']:.0f} s){'  ' + recipe if recipe else ''}", flush=True)
    if recipes:
        print(f"best DP recipe of {len(recipes)}, by macro-F1 on the held-out patients (an optimistic ceiling):")
        for name in models:
            for eps in epsilons:
                for seed in seeds or [cfg.training.seed]:
                    cell = [r for r in rows if (r["model"], r["epsilon"], r["seed"]) == (name, eps, seed)]
                    if cell:
                        b = max(cell, key=lambda r: r["macro_f1"])
                        print(f"  {name:<15} seed {seed}  eps {eps:g}  macro-F1 {b['macro_f1']:.3f}  accuracy "
                              f"{b['accuracy']:.3f}  " + " ".join(f"{k}={v}" for k, v in b["recipe"].items()))
    print(json.dumps({"benchmark": "dp_yardstick", "patients": int(len(y)), "held_out": int(len(held.y)),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
