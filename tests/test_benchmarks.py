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
    assert set(result["shapes"]) == {"brca", "pancan"}
    for r in result["shapes"].values():
        assert r["parameters"] > 0 and r["train_flops_per_sample"] > 0
        assert r["samples_per_s"] > 0 and r["dp_samples_per_s"] > 0 and r["peak_rss_mb"] > 0
