"""Training-step cost of the shared model: plain vs DP-SGD (Opacus hooks, Opacus ghost, book-keeping), one thread.

Two reference shapes, the committed cohort schemas: BRCA PAM50 (6,000 + 6,000 + 503 omics features
+ 4 clinical columns, 5 classes) and pan-cancer (513 + 41 + 301 + 120 + 1 features, 33 classes),
each at batch 64 and 512. Each shape runs in its own process. Inputs are synthetic values of the
right shape (the step's cost does not depend on the values), with one modality missing for a
quarter of the patients.

Steps compared, on the same batches, interleaved so that all see the same machine load:
- plain:        AdamW step with global gradient-norm clipping (the non-private recipe; the baseline);
- plain-before: the same with torch's default (for-loop) AdamW and clip_grad_norm_, as before issue 21;
- opacus-hooks: Opacus DP-SGD, grad_sample_mode="hooks" (per-sample gradients materialised; the
                site's DP path before issue 21);
- opacus-ghost: Opacus DP-SGD, grad_sample_mode="ghost" with its DP loss wrapper (two backward passes);
- book-keeping: privacy/clipping.py (norms without per-sample gradients, clipped sum in the same pass;
                the site's DP path now);
- plain-compiled (only when named in --variants): the plain step with the model under torch.compile
                (inductor, default mode), compiled before the timing (its compile time is printed).
Every DP step includes Opacus' noise and scaling; every step but plain-before uses the sites' optimizer
(shared_models.training.build_optimizer: fused AdamW), and every variant runs its batches through the one
training loop of sites and baselines (shared_models.training.train_epochs). Ratios are step times over the plain step's in the
same run, in the process's CPU time (on a busy machine, time spent waiting for a core is not the
step's; the matmul rate is measured the same way). Step memory is the peak RSS during a step above the RSS before it (glibc's free memory
returned first, the kernel's peak counter reset), so it counts what the step allocates; each variant's is measured in a
process of its own, as a site trains one kind of step in its process (with every variant in one process, the
variants measured before shaped the heap the next one was measured in).

    python benchmarks/train_step.py            # table + one JSON line
    python benchmarks/train_step.py --quick    # batch 64, fewer steps (used by the test suite)

The achieved FLOP/s is reported as a fraction of a plain float32 matmul measured on the same core
in the same process, so the numbers compare across machines.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"brca": "tcga_brca_pam50.json", "pancan": "tcga_pancan33.json"}
VARIANTS = ("plain", "plain-before", "opacus-hooks", "opacus-ghost", "book-keeping")
OPT_IN = ("plain-compiled",)  # measured only when asked for: compiling takes a minute or more per process


def matmul_flops_per_s(n: int = 512, seconds: float = 1.0) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.process_time()
    while time.process_time() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.process_time() - t0)


def synthetic_batch(schema, n: int, seed: int = 0):
    """Standard normals, level indices for categoricals, 0/1 for binaries; a quarter of the patients
    lack one modality (all NaN), in turn."""
    import torch

    from simulations.synthetic import random_model_inputs

    g = torch.Generator().manual_seed(seed + 1)  # the labels' stream, apart from the inputs'
    layout = schema.layout()
    x = random_model_inputs(schema, n, seed)
    names = schema.modality_names
    for i in range(0, n, 4):
        x[i, layout.slices[names[(i // 4) % len(names)]]] = float("nan")
    y = torch.randint(0, schema.n_classes, (n,), generator=g)
    return x, y


def _count_cpu_attention_flops() -> None:
    """torch's flop counter has formulas for the CUDA attention kernels and none for the CPU one that
    F.scaled_dot_product_attention runs here, whose products it would count as 0 (2.85 of BRCA's 28.4 MFLOP a
    sample): register torch's own formulas for it (forward: QK^T and PV; backward: QK^T recomputed and the
    gradients' four products)."""
    import torch
    from torch.utils import flop_counter as fc

    forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward not in fc.flop_registry:
        fc.register_flop_formula(forward)(
            lambda q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_flop_count(q, k, v))
    if backward not in fc.flop_registry:
        fc.register_flop_formula(backward)(
            lambda g, q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_backward_flop_count(g, q, k, v))


def train_flops_per_sample(model, x, y) -> float:
    """The model's arithmetic in a forward and backward, per sample (torch's flop counter: the matmuls and the
    attention's products)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    _count_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def step_memory_mb(step) -> float:
    """Peak RSS during step() above the RSS before it."""
    from shared_models.training import release_freed_memory

    gc.collect()
    try:
        release_freed_memory()  # glibc's free memory returned first: the step's own allocations count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the kernel's peak-RSS counter (VmHWM)
    except OSError:
        return float("nan")
    before = _rss_mb("VmRSS")
    step()
    return _rss_mb("VmHWM") - before


def build_steps(schema, cfg, n_data: int, batch: int, variants=VARIANTS) -> tuple[dict, object, list]:
    """One training function per variant (it trains on a list of (x, y) batches, one step each), each with its
    own copy of the same initial model."""
    import torch
    import torch.nn.functional as F
    from opacus import PrivacyEngine

    from shared_models.training import TrainConfig, build_optimizer, clip_global_grad_norm_, train_epochs
    from privacy.clipping import make_private
    from shared_models import MultiModalTransformer

    torch.manual_seed(0)
    base = MultiModalTransformer(schema, cfg)
    dataset = torch.utils.data.TensorDataset(torch.zeros(n_data, 1), torch.zeros(n_data))  # sets the sample rate
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    keep = []  # Opacus' hooks and the clipper stay attached while the steps run

    def copy_model():
        m = MultiModalTransformer(schema, cfg)
        m.load_state_dict(base.state_dict())
        return m

    def adamw(m):  # the sites' optimizer (no weight decay here: the benchmark times the step)
        return build_optimizer(m, TrainConfig(lr=1e-3, weight_decay=0.0))

    def trainer(m, opt, loss=F.cross_entropy, clip=None):
        clipping = {} if clip is None else {"max_grad_norm": 1.0, "clip_with": clip}
        return lambda batches: train_epochs(m, batches, opt, loss, **clipping)

    def plain():
        m = copy_model()
        return trainer(m, adamw(m), clip=clip_global_grad_norm_)

    def plain_before():
        m = copy_model()
        return trainer(m, torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0),
                       clip=torch.nn.utils.clip_grad_norm_)

    def opacus(mode: str):
        m = copy_model()
        kwargs = dict(criterion=torch.nn.CrossEntropyLoss()) if mode == "ghost" else dict(wrap_model=False)
        out = PrivacyEngine(accountant="prv").make_private(
            module=m, optimizer=adamw(m), data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=True, grad_sample_mode=mode, **kwargs)
        if mode == "ghost":  # the wrapped model and Opacus' DP loss (its two backward passes)
            gm, opt, crit, _ = out
            keep.append(gm)
            return trainer(gm, opt, loss=crit)
        hooks, opt, _ = out
        keep.append(hooks)
        return trainer(m, opt)

    def plain_compiled():
        m = copy_model()
        compiled = torch.compile(m)
        opt = adamw(m)
        return lambda batches: train_epochs(compiled, batches, opt, F.cross_entropy, max_grad_norm=1.0,
                                            clip_with=clip_global_grad_norm_)

    def book_keeping():
        m = copy_model()
        clipper, opt, _ = make_private(PrivacyEngine(accountant="prv"), m, adamw(m), loader, noise_multiplier=1.0,
                                       max_grad_norm=1.0)
        keep.append(clipper)
        return trainer(m, opt)

    builders = {"plain": plain, "plain-before": plain_before, "opacus-hooks": lambda: opacus("hooks"),
                "opacus-ghost": lambda: opacus("ghost"), "book-keeping": book_keeping,
                "plain-compiled": plain_compiled}
    return {v: builders[v]() for v in variants}, base, keep


def book_keeping_phases(train, batches) -> dict:
    """CPU ms per step of the book-keeping DP step's own parts (one extra, untimed pass with the clipper's
    functions wrapped): per-sample norms of the Linear layers and of the other layers, the clip factors and
    the weighted sums (added into the noise), the noise's draw. The rest of the step is the forward and backward passes and
    the optimizer, as in the plain step."""
    import privacy.clipping as pc

    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.process_time() - t0
        return wrapper

    originals = {"_prepare_linear": pc._prepare_linear, "_prepare_other": pc._prepare_other}
    clip, noise = pc.BookKeepingClipper.clip_, pc.BookKeepingDPOptimizer._draw_noise
    pc._prepare_linear, pc._prepare_other = timed("norms_linear", pc._prepare_linear), timed("norms_other", pc._prepare_other)
    pc.BookKeepingClipper.clip_ = timed("clip", clip)
    pc.BookKeepingDPOptimizer._draw_noise = timed("noise", noise)
    try:
        t0 = time.process_time()
        train(batches)
        total = time.process_time() - t0
    finally:
        for k, v in originals.items():
            setattr(pc, k, v)
        pc.BookKeepingClipper.clip_, pc.BookKeepingDPOptimizer._draw_noise = clip, noise
    ms = {k: 1000 * v / len(batches) for k, v in spent.items()}
    return {"step": round(1000 * total / len(batches), 2), "norms_linear": round(ms.get("norms_linear", 0), 2),
            "norms_other": round(ms.get("norms_other", 0), 2),
            "weighted_sums": round(ms.get("clip", 0) - ms.get("norms_linear", 0) - ms.get("norms_other", 0)
                                   - ms.get("noise", 0), 2),  # the noise is drawn inside the clipping call
            "noise": round(ms.get("noise", 0), 2)}


def _setup(shape: str, batch: int, steps_per_repeat: int, variants: list[str], model_overrides: dict | None,
           keep_freed_memory: bool):
    """As a site's training process (one thread, the allocator), the batches and one step function per variant."""
    warnings.filterwarnings("ignore")
    from shared_models import FeatureSchema, ModelConfig
    from shared_models.run_config import CENTRALIZED_MODEL
    from shared_models.training import training_process

    training_process(keep_freed_memory)
    schema = FeatureSchema.load(ROOT / "simulations" / "schemas" / SHAPES[shape])
    cfg = ModelConfig(**{**CENTRALIZED_MODEL.model_dump(), **(model_overrides or {})})  # the shapes measured since 2026-11
    batches = [synthetic_batch(schema, batch, seed) for seed in range(steps_per_repeat)]
    steps, base, keep = build_steps(schema, cfg, n_data=batch * 20, batch=batch, variants=variants)
    return schema, cfg, batches, steps, base, keep


def measure_memory(shape: str, batch: int, steps_per_repeat: int, variant: str, model_overrides: dict | None = None,
                   keep_freed_memory: bool = True) -> dict:
    """One variant's step memory, in a process that builds and runs that variant alone: after a warm-up pass
    over the batches, the larger of two one-step measurements."""
    _, _, batches, steps, _, _keep = _setup(shape, batch, steps_per_repeat, [variant], model_overrides,
                                            keep_freed_memory)
    steps[variant](batches)
    return {"variant": variant, "step_memory_mb": max(step_memory_mb(lambda: steps[variant](batches[:1]))
                                                     for _ in range(2))}


def measure(shape: str, batch: int, steps_per_repeat: int, repeats: int, variants: list[str],
            model_overrides: dict | None = None, keep_freed_memory: bool = True) -> dict:
    """Step times, interleaved, of every variant in one process (the memory: measure_memory, a process each)."""
    schema, cfg, batches, steps, base, _keep = _setup(shape, batch, steps_per_repeat, variants, model_overrides,
                                                      keep_freed_memory)
    flops = train_flops_per_sample(base, *batches[0])

    faults: dict[str, list[float]] = {v: [] for v in variants}

    def run(train, variant: str | None = None) -> float:  # CPU seconds per step: waiting for a core is not the step's
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        train(batches)
        t = (time.process_time() - t0) / len(batches)
        if variant:  # page faults per step: fresh memory the kernel zero-fills (counted in the CPU time)
            faults[variant].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / len(batches))
        return t

    compile_s = {}
    for v in variants:
        t0 = time.perf_counter()
        run(steps[v])  # warm-up (and the compiling, for plain-compiled)
        compile_s[v] = round(time.perf_counter() - t0, 1)
    peak = matmul_flops_per_s()
    times = {v: [] for v in variants}
    for _ in range(repeats):  # interleaved: every variant sees the same machine load
        for v in variants:
            times[v].append(run(steps[v], v))
    best = {v: min(t) for v, t in times.items()}
    phases = book_keeping_phases(steps["book-keeping"], batches) if "book-keeping" in steps else None
    return {
        "shape": shape, "batch": batch, "model": cfg.model_dump(), "inputs": schema.layout().n_inputs,
        "classes": schema.n_classes, "parameters": base.num_parameters(), "train_flops_per_sample": flops,
        "samples_per_s": {v: round(batch / best[v], 1) for v in variants},
        "step_ratio": {v: round(best[v] / best["plain"], 3) for v in variants},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "matmul_gflops": round(peak / 1e9, 2),
        "plain_fraction_of_matmul": round(flops * batch / best["plain"] / peak, 4),
        "plain_step_ms": round(1000 * best["plain"], 2), "book_keeping_phases_ms": phases,
        "page_faults_per_step": {v: round(sorted(f)[len(f) // 2], 1) for v, f in faults.items()},
        "keep_freed_memory": keep_freed_memory,
        "first_pass_s": compile_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 64, few steps: a smoke run, not a measurement")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)  # with --child: that variant's step memory, alone
    ap.add_argument("--shapes", default="brca,pancan")
    ap.add_argument("--batches", default="64,512")
    ap.add_argument("--variants", help=f"plain is always measured (the baseline) [default: {','.join(VARIANTS)}; "
                    "with --quick: opacus-hooks,book-keeping]")
    ap.add_argument("--model", default="{}", help='ModelConfig overrides as JSON, e.g. \'{"wide_rank": "full"}\'')
    ap.add_argument("--glibc-default", action="store_true",
                    help="leave glibc's allocator at its default (the sites keep freed memory: "
                         "shared_models.training.training_process)")
    args = ap.parse_args()
    chosen = args.variants or ("opacus-hooks,book-keeping" if args.quick else ",".join(VARIANTS))
    variants = ["plain"] + [v for v in chosen.split(",") if v != "plain"]
    if bad := [v for v in variants if v not in VARIANTS + OPT_IN]:
        ap.error(f"--variants: unknown {', '.join(bad)}; choose from {', '.join(VARIANTS + OPT_IN)}")
    if args.child:
        shape, batch = args.child.split(":")
        steps, repeats = (2, 1) if args.quick else (8, 5) if int(batch) <= 64 else (3, 3)
        if args.memory_of:
            print(json.dumps(measure_memory(shape, int(batch), steps, args.memory_of, json.loads(args.model),
                                            keep_freed_memory=not args.glibc_default)))
        else:
            print(json.dumps(measure(shape, int(batch), steps, repeats, variants, json.loads(args.model),
                                     keep_freed_memory=not args.glibc_default)))
        return
    batches = ["64"] if args.quick else args.batches.split(",")
    load_before = os.getloadavg()
    results = []

    def child(shape: str, batch: str, *more: str) -> dict:
        cmd = [sys.executable, __file__, "--child", f"{shape}:{batch}", "--model", args.model,
               "--variants", ",".join(variants), *more] + (["--quick"] if args.quick else []) + \
            (["--glibc-default"] if args.glibc_default else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        return json.loads(out.strip().splitlines()[-1])

    for shape in args.shapes.split(","):
        for batch in batches:
            r = child(shape, batch)
            memory = {v: child(shape, batch, "--memory-of", v)["step_memory_mb"] for v in variants}
            r["step_memory_mb"] = {v: round(m, 1) for v, m in memory.items()}
            r["memory_ratio"] = {v: round(m / memory["plain"], 3) for v, m in memory.items()}
            results.append(r)
    load = os.getloadavg()
    dp = [v for v in variants if v != "plain"]
    head = (["shape", "batch", "params", "MFLOP/sample", "plain/s"] + [f"{v} x" for v in dp] + ["plain step MB"]
            + [f"{v} mem x" for v in dp] + ["plain % of matmul"])
    rows = [[r["shape"], r["batch"], r["parameters"], f"{r['train_flops_per_sample'] / 1e6:.1f}",
             r["samples_per_s"]["plain"]] + [f"{r['step_ratio'][v]:.2f}x" for v in dp]
            + [r["step_memory_mb"]["plain"]] + [f"{r['memory_ratio'][v]:.2f}x" for v in dp]
            + [f"{100 * r['plain_fraction_of_matmul']:.1f}%"] for r in results]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    for row in [head] + rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    if any(r["book_keeping_phases_ms"] for r in results):
        print("\nbook-keeping DP step, CPU ms per step (one extra pass, wrapped): plain step | DP step = forward, backward "
              "and optimizer + norms (Linear) + norms (other layers) + clip factors and weighted sums + noise")
        for r in results:
            if ph := r["book_keeping_phases_ms"]:
                print(f"  {r['shape']:>6} {r['batch']:>4}: plain {r['plain_step_ms']:6.1f} | DP {ph['step']:6.1f} = "
                      f"{ph['step'] - ph['norms_linear'] - ph['norms_other'] - ph['weighted_sums'] - ph['noise']:6.1f} "
                      f"+ {ph['norms_linear']:5.1f} + {ph['norms_other']:5.1f} + {ph['weighted_sums']:5.1f} + {ph['noise']:5.1f}")
    print("\npage faults per step (median of the timed passes): " + "; ".join(
        f"{r['shape']} {r['batch']}: " + ", ".join(f"{v} {n:g}" for v, n in r["page_faults_per_step"].items())
        for r in results) + (" (glibc's default allocator)" if args.glibc_default else
                             " (freed memory kept, as the sites: shared_models.training.training_process)"))
    for r in results:
        if "plain-compiled" in r["first_pass_s"]:
            print(f"  {r['shape']} {r['batch']}: plain-compiled's first pass (compiling included) "
                  f"{r['first_pass_s']['plain-compiled']} s, the plain step's {r['first_pass_s']['plain']} s")
    print(f"one thread; step CPU time as a ratio to the plain step in the same process, best of interleaved repeats; "
          f"step memory as a ratio to the plain step's, each variant in a process of its own; matmul: float32 512x512 on the same core ({results[0]['matmul_gflops']} GFLOP/s); "
          f"load average {load_before[0]:.2f} before, {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} after")
    print(json.dumps({"benchmark": "train_step", "threads": 1, "quick": args.quick, "variants": variants,
                      "model_overrides": json.loads(args.model), "load_average": [round(v, 2) for v in load],
                      "shapes": {f"{r['shape']}:{r['batch']}": r for r in results}}))


if __name__ == "__main__":
    main()
