"""Where a DP step's time goes beyond the plain step's: forward, backward, clipping, noise, optimizer, one thread.

The sites' plain step (AdamW with global gradient-norm clipping) and the sites' DP step (Gaussian noise on every
coordinate drawn into the gradients, privacy/clipping.py's book-keeping clipper adding the clipped sums into
them, then AdamW), on the same synthetic batches of a
committed cohort schema, each phase timed in the process's CPU time, best of interleaved repeats. At a batch of
2 patients the arithmetic is negligible, so what is left is each phase's fixed (per-layer) cost.

    python benchmarks/dp_overhead.py                       # pan-cancer, batches 2 and 64
    python benchmarks/dp_overhead.py --shape brca --batches 64
    python benchmarks/dp_overhead.py --quick               # batch 2, few steps: a smoke run, not a measurement
    python benchmarks/dp_overhead.py --against HEAD~1      # also the DP step with that commit's privacy/clipping.py

With --against, a third model takes its DP step with the clipper of another commit (its privacy/clipping.py, with
this tree's model), in the same process, interleaved: a change to the clipper measured against its baseline in one
run (separate runs on a shared machine differ by more than a change of 0.5 ms).

The last line is the results as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHASES = ("forward", "backward", "clip", "noise", "optimizer")


def clipping_at(rev: str):
    """privacy/clipping.py as it is at git revision `rev`, imported as a module of its own."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(["git", "show", f"{rev}:privacy/clipping.py"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    path = Path(tempfile.mkdtemp()) / "clipping_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("clipping_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(shape: str, batch: int, steps: int = 8, repeats: int = 5, against=None) -> dict[str, dict[str, float]]:
    """`against`: (label, clipping module): a third model's DP step with that module's clipper."""
    import torch
    import torch.nn.functional as F

    import privacy.clipping
    from benchmarks.train_step import SHAPES, synthetic_batch
    from shared_models import FeatureSchema, ModelConfig, MultiModalTransformer
    from shared_models.run_config import CENTRALIZED_MODEL
    from shared_models.training import TrainConfig, build_optimizer, clip_global_grad_norm_, training_process

    training_process()  # as a site's training process
    schema = FeatureSchema.load(ROOT / "simulations" / "schemas" / SHAPES[shape])
    cfg = ModelConfig(**CENTRALIZED_MODEL.model_dump())
    batches = [synthetic_batch(schema, batch, s) for s in range(steps)]

    def build():
        torch.manual_seed(0)
        m = MultiModalTransformer(schema, cfg).train()
        return m, build_optimizer(m, TrainConfig(lr=1e-3, weight_decay=0.0))

    clippings = {"dp": privacy.clipping} | ({} if against is None else {against[0]: against[1]})
    models = {"plain": build()} | {kind: build() for kind in clippings}
    dp = {}
    for kind, module in clippings.items():
        clipper = module.BookKeepingClipper(models[kind][0], max_grad_norm=1.0).attach()
        # the sites' DP optimizer, whose phases are called one at a time below (its pre_step runs them in one call,
        # with its per-step checks and the accountant's hook, which are not timed here)
        dp_opt = module.BookKeepingDPOptimizer(models[kind][1], clipper=clipper, noise_multiplier=1.0,
                                               max_grad_norm=1.0, expected_batch_size=batch, loss_reduction="mean")
        dp[kind] = clipper, dp_opt, dp_opt.params, tuple(map(id, dp_opt.params))

    def step(kind: str) -> dict[str, float]:
        model, opt = models[kind]
        spent = dict.fromkeys(PHASES, 0.0)
        for x, y in batches:
            t0 = time.process_time()
            opt.zero_grad(set_to_none=True)
            if kind in dp:
                dp[kind][0].clear()
            loss = F.cross_entropy(model(x), y)
            t1 = time.process_time()
            loss.backward()
            t2 = time.process_time()
            t3 = t2  # the plain step has no noise
            if kind in dp:  # the DP optimizer's noise, drawn into one flat buffer whose views are the gradients
                clipper, dp_opt, params, ids = dp[kind]
                views = dp_opt._draw_noise(params, ids)
                t3 = time.process_time()
                clipper.clip_(scale=1.0 / dp_opt._divisor(), into=lambda: views)  # the clipped sums added into them
            else:
                clip_global_grad_norm_(list(model.parameters()), 1.0)
            t4 = time.process_time()
            opt.step()
            t5 = time.process_time()
            for k, v in zip(PHASES, (t1 - t0, t2 - t1, t4 - t3, t3 - t2, t5 - t4)):
                spent[k] += 1000 * v / len(batches)
        return spent

    best: dict[str, dict[str, float]] = {k: dict.fromkeys(PHASES, float("inf")) for k in models}
    kinds = list(models)
    for r in range(repeats + 1):  # the first pass warms up
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # rotated: none always runs after the same one
            spent = step(kind)
            if r:
                best[kind] = {k: min(best[kind][k], spent[k]) for k in PHASES}
    for clipper, *_ in dp.values():
        clipper.detach()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="pancan", choices=("brca", "pancan"))
    ap.add_argument("--batches", default="2,64")
    ap.add_argument("--quick", action="store_true", help="batch 2, 2 steps, 1 repeat: a smoke run")
    ap.add_argument("--against", metavar="REV", help="also the DP step with privacy/clipping.py of git revision REV")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    batches, steps, repeats = ([2], 2, 1) if args.quick else ([int(b) for b in args.batches.split(",")], 8, 5)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.2f}; {args.shape}, one thread, "
          f"CPU ms per step, best of {repeats} interleaved repeats of {steps} steps")
    if args.against:
        print(f"  dp@rev: the DP step with privacy/clipping.py at {args.against}")
    print(f"  {'batch':>5} {'step':>6} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'total':>8}")
    against = None if args.against is None else ("dp@rev", clipping_at(args.against))
    results = {}
    for batch in batches:
        best = results[batch] = measure(args.shape, batch, steps, repeats, against)
        for kind, ms in best.items():
            ratio = "" if kind == "plain" else f"  (DP / plain {sum(ms.values()) / sum(best['plain'].values()):.2f}x)"
            print(f"  {batch:>5} {kind:>6} " + " ".join(f"{ms[p]:>9.2f}" for p in PHASES)
                  + f" {sum(ms.values()):>8.2f}{ratio}")
        for label, base in (("extra", "plain"),) + ((("-@rev", "dp@rev"),) if against else ()):
            diff = {p: best["dp"][p] - best[base][p] for p in PHASES}
            print(f"  {batch:>5} {label:>6} " + " ".join(f"{diff[p]:>+9.2f}" for p in PHASES)
                  + f" {sum(diff.values()):>+8.2f}  (dp - {base})")
    print(json.dumps({"benchmark": "dp_overhead", "shape": args.shape, "quick": args.quick, "against": args.against,
                      "ms": {str(b): {k: {p: round(v, 3) for p, v in ms.items()} for k, ms in r.items()}
                             for b, r in results.items()}}))


if __name__ == "__main__":
    main()
