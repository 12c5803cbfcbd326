"""An EMA of a finished run's global weights, computed offline from its per-round checkpoints.

An exponential moving average of the global model is post-processing of what the server already holds,
so it costs no privacy; this measures whether it would help before building it into the server. Each
decay's average is scored on the sites' validation parts (what chooses) and on the held-out patients
(what reports), exactly as `oncofed simulate` scores the final model.

    python benchmarks/ema_offline.py RUN_DIR [--decays 0,0.9,0.95] [--rounds 150,250]

RUN_DIR is an `oncofed simulate --out` directory (server/checkpoints/round-NNNN, sites/) of a run made with
`--set keep-checkpoints=0` (by default the server keeps only the newest three rounds). Decay 0 is the
run's own model, a check that the scoring matches the run's log.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from shared_models.evaluation import classification_metrics, evaluate, predict_logits
from shared_models.model import MultiModalTransformer
from shared_models.site_data import load_labelled_site
from shared_models.weights import load_arrays
from simulations.federation import finished_run_sites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--decays", default="0,0.9,0.95")
    ap.add_argument("--rounds", default="250", help="rounds at which to score the averages")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run_dir = args.run_dir
    decays = [float(d) for d in args.decays.split(",")]
    at = sorted(int(r) for r in args.rounds.split(","))
    cfg, schema, parts = finished_run_sites(run_dir)
    sites = list(parts.values())
    held = load_labelled_site(schema, run_dir / "sites/holdout")
    model = MultiModalTransformer(schema, cfg.model)

    def score(arrays: list[np.ndarray]) -> tuple[float, float]:
        load_arrays(model, [a.astype(np.float32) for a in arrays])
        model.eval()
        n = sum(len(s.val.y) for s in sites)
        val = sum(evaluate(model, torch.from_numpy(s.val.x), torch.from_numpy(s.val.y)).macro_f1 * len(s.val.y)
                  for s in sites) / n
        pred = predict_logits(model, torch.from_numpy(held.x)).argmax(1).numpy()
        return val, classification_metrics(held.y, pred, len(schema.classes))["macro_f1"]

    print(f"{'round':>5} {'decay':>6} {'sites validation macro-F1':>26} {'held-out macro-F1':>18}")
    ema: dict[float, list[np.ndarray] | None] = {d: None for d in decays}
    for r in range(1, at[-1] + 1):
        with np.load(run_dir / f"server/checkpoints/round-{r:04d}/weights.npz") as z:
            w = [np.asarray(z[k], np.float64) for k in z.files]
        for d in decays:
            ema[d] = w if ema[d] is None else [d * e + (1 - d) * x for e, x in zip(ema[d], w)]
        if r in at:
            for d in decays:
                val, heldout = score(ema[d])
                print(f"{r:>5} {d:>6g} {val:>26.3f} {heldout:>18.3f}", flush=True)


if __name__ == "__main__":
    main()
