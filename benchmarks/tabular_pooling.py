"""What pooling the tabular encoders' tokens buys: the pan-cancer training step with the column tokens formed
and averaged (the code before 2026-12-05) against their mean computed directly (the default since), plain and
DP (book-keeping clipper), in one process, interleaved, best of repeats, CPU time, one thread.

    python benchmarks/tabular_pooling.py [--batches 64,512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import shared_models.model as sm
    from benchmarks.train_step import build_steps, synthetic_batch
    from shared_models.run_config import CENTRALIZED_MODEL
    from shared_models.schema import FeatureSchema

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="64,512")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    schema = FeatureSchema.load(ROOT / "simulations" / "schemas" / "tcga_pancan33.json")
    pooled_init = sm.TabularEncoder.__init__

    def tokens_init(self, *a, **k):  # the tokens formed, as before
        pooled_init(self, *a, **k)
        self.column.pooled = False
        if self.numeric is not None:
            self.numeric.pooled = False

    print(f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'batch':>5} {'step':13} {'tokens ms':>9} {'pooled ms':>9} {'pooled/tokens':>13}")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        batches = [synthetic_batch(schema, batch, seed=i) for i in range(max(3, 640 // batch))]
        steps = {}
        for name, init in (("tokens", tokens_init), ("pooled", pooled_init)):
            sm.TabularEncoder.__init__ = init
            try:
                steps[name], *_ = build_steps(schema, CENTRALIZED_MODEL, 20 * batch, batch, ["plain", "book-keeping"])
            finally:
                sm.TabularEncoder.__init__ = pooled_init
        best: dict = {}
        for _ in range(args.repeats):
            for name, variants in steps.items():
                for v, train in variants.items():
                    t0 = time.process_time()
                    train(batches)
                    ms = (time.process_time() - t0) / len(batches) * 1000
                    best[name, v] = min(best.get((name, v), float("inf")), ms)
        for v in ("plain", "book-keeping"):
            a, b = best["tokens", v], best["pooled", v]
            rows.append({"batch": batch, "step": v, "tokens_ms": round(a, 1), "pooled_ms": round(b, 1)})
            print(f"{batch:>5} {v:13} {a:9.1f} {b:9.1f} {b / a:12.2f}x")
        for name in ("tokens", "pooled"):
            print(f"{batch:>5} DP/plain, {name}: {best[name, 'book-keeping'] / best[name, 'plain']:.2f}x")
    print(json.dumps({"benchmark": "tabular_pooling", "rows": rows}))


if __name__ == "__main__":
    main()
