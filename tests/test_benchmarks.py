"""Benchmarks stay runnable: a quick run of each ends with its one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_quick_run_ends_with_its_json_line():
    out = subprocess.run([sys.executable, "benchmarks/train_step.py", "--quick"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["shapes"]) == {"brca:64", "pancan:64"}
    for r in result["shapes"].values():
        assert r["parameters"] > 0 and r["train_flops_per_sample"] > 0 and r["peak_rss_mb"] > 0
        assert set(r["step_ratio"]) == set(result["variants"]) and r["step_ratio"]["plain"] == 1.0
        assert all(v > 0 for v in r["samples_per_s"].values())
        assert all(v > 0 for v in r["step_memory_mb"].values())


def test_dp_overhead_benchmark_quick_run_times_every_phase_of_both_steps():
    out = subprocess.run([sys.executable, "benchmarks/dp_overhead.py", "--quick"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    ms = result["ms"]["2"]
    assert set(ms) == {"plain", "dp"} and ms["plain"]["noise"] == 0 and ms["dp"]["noise"] > 0
    assert all(ms[k][p] > 0 for k in ms for p in ("forward", "backward", "clip", "optimizer"))


def test_dp_overhead_against_a_revision_times_that_revisions_clipper_in_the_same_run():
    """--against REV: a third model takes its DP step with privacy/clipping.py as committed at REV (here HEAD)."""
    out = subprocess.run([sys.executable, "benchmarks/dp_overhead.py", "--quick", "--against", "HEAD"], cwd=ROOT,
                         check=True, capture_output=True, text=True, timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    ms = result["ms"]["2"]
    assert result["against"] == "HEAD" and set(ms) == {"plain", "dp", "dp@rev"}
    assert ms["dp@rev"]["noise"] > 0 and ms["dp@rev"]["clip"] > 0
    assert "dp@rev: the DP step with privacy/clipping.py at HEAD" in out


def test_round_benchmark_quick_run_breaks_a_real_round_down(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/round.py", "--quick"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["results"]) == {"dp+secagg"} and result["sites"] == 3
    on = result["results"]["dp+secagg"]
    assert set(on["secagg_stages"]) == {"setup", "share_keys", "collect_masked_vectors", "unmask"}
    assert on["train_sum"] > 0 and on["round"] > 0
    assert "dp+secagg" in out and "SecAgg+" in out.splitlines()[0]  # the table's first row and column heads


def test_dp_yardstick_pools_the_hospitals_and_spends_exactly_the_budget():
    """The linear model only (seconds), two DP recipes from --grid: each spends what it was given and costs
    accuracy; the non-private row runs once; the best recipe is named."""
    out = subprocess.run([sys.executable, "benchmarks/dp_yardstick.py", "--models", "linear", "--epsilons", "8",
                          # the DP recipe's SGD at max-grad-norm 0.01 (lr alone is refused: it goes with C): lr x C 0.5, 1
                          "--grid", "lr=50,100", "--grid", "max-grad-norm=0.01"],
                         cwd=ROOT, check=True, capture_output=True, text=True, timeout=600).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["patients"] > 4000 and result["held_out"] > 1000
    plain, *dp = result["rows"]
    assert plain["epsilon"] is None and plain["epsilon_spent"] == 0
    assert [r["recipe"] for r in dp] == [{"lr": 50, "max-grad-norm": 0.01}, {"lr": 100, "max-grad-norm": 0.01}]
    for r in dp:
        assert r["epsilon"] == 8 and 7.5 <= r["epsilon_spent"] <= 8.0
        assert 0.3 < r["macro_f1"] < plain["macro_f1"]
    best = max(dp, key=lambda r: r["macro_f1"])
    assert f"eps 8  macro-F1 {best['macro_f1']:.3f}" in out and f"lr={best['recipe']['lr']}" in out.split("best DP")[1]


def _yardstick():
    """benchmarks/dp_yardstick.py as a module (benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dp_yardstick", ROOT / "benchmarks" / "dp_yardstick.py")
    yardstick = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(yardstick)
    return yardstick


def test_dp_yardstick_names_a_bad_model_epsilon_or_grid_before_any_work(capsys):
    import torch

    main, threads = _yardstick().main, torch.get_num_threads()  # main() sets one thread, as a benchmark should
    try:
        for args, named in ((["--models", "linear,forest"], "--models: unknown forest"),
                            (["--epsilons", "8,x"], "--epsilons/--seeds"),
                            (["--grid", "val-fraction=0.1,0.2"], "--grid val-fraction: not a training-recipe key"),
                            (["--grid", "lr=0.01,-1"], "lr: use a number > 0"),
                            (["--grid", "lr=0.01", "--epsilons", "none"], "give --epsilons")):
            try:
                code = main(args)
            except SystemExit as e:  # argparse's error()
                code = e.code
            assert code == 2 and named in capsys.readouterr().err, args
    finally:
        torch.set_num_threads(threads)


def test_dp_yardstick_rows_train_with_the_recipe_the_grid_names():
    """Every recipe key --grid accepts reaches the DP rows' training (a site's RunConfig.train_config); the no-DP row
    keeps the federation's fixed non-private settings whatever the recipe."""
    from privacy.run_config import load_run_config

    yardstick = _yardstick()
    grid = {"batch-size": 1024, "lr": 0.01, "local-epochs": 5, "num-rounds": 3, "max-grad-norm": 0.5,
            "weight-decay": 0.001, "warmup-fraction": 0.2, "local-optimizer": "sgd", "momentum": 0.5}
    assert set(grid) == set(yardstick.GRID_KEYS)
    cfg = load_run_config({"schema": "s.json", **grid})
    dp = yardstick.recipe(cfg, dp=True, epochs=15)
    assert (dp.batch_size, dp.lr, dp.epochs, dp.max_grad_norm, dp.weight_decay, dp.warmup_fraction, dp.optimizer,
            dp.momentum, dp.class_weighting) == (1024, 0.01, 15, 0.5, 0.001, 0.2, "sgd", 0.5, False)
    plain = yardstick.recipe(cfg, dp=False, epochs=15)
    assert (plain.lr, plain.batch_size, plain.optimizer, plain.class_weighting) == (0.002, 64, "adamw", True)
    # every "auto" resolved without DP: the global clipping bound, not DP-SGD's per-sample one; the model's dropout
    dp_default = load_run_config({"schema": "s.json"})
    assert yardstick.recipe(dp_default, dp=False, epochs=15).max_grad_norm == 1.0
    assert yardstick.no_dp(dp_default).model.modality_dropout == 0.25 != dp_default.model.modality_dropout
