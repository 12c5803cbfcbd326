"""Training-step throughput of the shared model, non-private vs Opacus DP-SGD (hooks), on one thread.

Two reference shapes, the committed cohort schemas: BRCA PAM50 (6,000 + 6,000 + 503 omics features
+ 4 clinical columns, 5 classes) and pan-cancer (513 + 41 + 301 + 120 + 1 features, 33 classes).
Each shape runs in its own process so that its peak RSS is its own. Inputs are synthetic values of
the right shape (throughput does not depend on the values), with one modality missing for a
quarter of the patients.

    python benchmarks/train_step.py            # table + one JSON line
    python benchmarks/train_step.py --quick    # fewer steps (used by the test suite)

The achieved FLOP/s is reported as a fraction of a plain float32 matmul measured on the same core
in the same process, so the numbers compare across machines.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"brca": "tcga_brca_pam50.json", "pancan": "tcga_pancan33.json"}
BATCH = 64
FLUSH_DENORMAL = True


def matmul_flops_per_s(n: int = 512, seconds: float = 1.0) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _inputs(schema, n: int, seed: int = 0):
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.factories import drop_modalities, random_inputs

    x = random_inputs(schema, n, seed)
    names = schema.modality_names
    for i in range(0, n, 4):  # a quarter of the patients lack one modality
        drop_modalities(schema, x, i, [names[(i // 4) % len(names)]])
    y = torch.randint(0, schema.n_classes, (n,), generator=torch.Generator().manual_seed(seed))
    return x, y


def train_flops_per_sample(model, x, y) -> float:
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def measure_shape(shape: str, steps: int, repeats: int, model_overrides: dict | None = None) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.set_flush_denormal(FLUSH_DENORMAL)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    from opacus import PrivacyEngine

    from shared_models import FeatureSchema, MultiModalTransformer

    schema = FeatureSchema.load(ROOT / "simulations" / "schemas" / SHAPES[shape])
    n_data = BATCH * steps
    x, y = _inputs(schema, n_data)
    from shared_models import ModelConfig

    cfg = ModelConfig(**(model_overrides or {}))
    plain = MultiModalTransformer(schema, cfg)
    private = MultiModalTransformer(schema, cfg)
    private.load_state_dict(plain.state_dict())
    flops = train_flops_per_sample(plain, x[:BATCH], y[:BATCH])

    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    loader_plain = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    opt_dp = torch.optim.AdamW(private.parameters(), lr=1e-3)
    loader_dp = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    hooks, opt_dp, loader_dp = PrivacyEngine(accountant="prv").make_private(
        module=private, optimizer=opt_dp, data_loader=loader_dp, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=True, grad_sample_mode="hooks", wrap_model=False)

    def run_plain() -> float:
        n, t0 = 0, time.perf_counter()
        for xb, yb in loader_plain:
            opt_plain.zero_grad(set_to_none=True)
            F.cross_entropy(plain(xb), yb).backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
            opt_plain.step()
            n += len(xb)
        return n / (time.perf_counter() - t0)

    def run_dp() -> float:
        n, t0 = 0, time.perf_counter()
        for xb, yb in loader_dp:
            opt_dp.zero_grad(set_to_none=True)
            F.cross_entropy(private(xb), yb).backward()
            opt_dp.step()
            n += len(xb)
        return n / (time.perf_counter() - t0)

    run_plain(), run_dp()  # warm-up
    peak = matmul_flops_per_s()
    plain_rates, dp_rates = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        plain_rates.append(run_plain())
        dp_rates.append(run_dp())
    best_plain, best_dp = max(plain_rates), max(dp_rates)
    hooks.cleanup()
    return {
        "shape": shape,
        "model": cfg.model_dump(),
        "inputs": schema.layout().n_inputs,
        "classes": schema.n_classes,
        "parameters": plain.num_parameters(),
        "train_flops_per_sample": flops,
        "samples_per_s": round(best_plain, 1),
        "dp_samples_per_s": round(best_dp, 1),
        "dp_overhead": round(best_plain / best_dp, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "matmul_gflops": round(peak / 1e9, 2),
        "flops_fraction_of_matmul": round(flops * best_plain / peak, 4),
        "dp_flops_fraction_of_matmul": round(flops * best_dp / peak, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps: a smoke run, not a measurement")
    ap.add_argument("--child", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    ap.add_argument("--shapes", default="brca,pancan")
    ap.add_argument("--model", default="{}", help='ModelConfig overrides as JSON, e.g. \'{"n_latents": 32}\'')
    args = ap.parse_args()
    steps, repeats = (3, 1) if args.quick else (12, 3)
    if args.child:
        print(json.dumps(measure_shape(args.child, steps, repeats, json.loads(args.model))))
        return
    results = []
    for shape in args.shapes.split(","):
        cmd = [sys.executable, __file__, "--child", shape, "--model", args.model] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    head = ["shape", "inputs", "params", "MFLOP/sample", "plain/s", "DP/s", "DP overhead", "peak RSS MB",
            "matmul GFLOP/s", "plain % of matmul"]
    rows = [[r["shape"], r["inputs"], r["parameters"], f"{r['train_flops_per_sample'] / 1e6:.1f}",
             r["samples_per_s"], r["dp_samples_per_s"], f"{r['dp_overhead']:.2f}x", r["peak_rss_mb"],
             r["matmul_gflops"], f"{100 * r['flops_fraction_of_matmul']:.1f}%"] for r in results]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    for row in [head] + rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    print(f"batch {BATCH}, one thread, Opacus hooks mode, AdamW; best of interleaved repeats")
    print(json.dumps({"benchmark": "train_step", "batch": BATCH, "threads": 1, "quick": args.quick,
                      "model_overrides": json.loads(args.model),
                      "shapes": {r["shape"]: r for r in results}}))


if __name__ == "__main__":
    main()
