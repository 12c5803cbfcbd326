"""benchmarks/scale.py stays runnable: its quick mode (3 synthetic sites x 2 rounds, DP and
SecAgg+ on, through Flower's simulation engine) ends with one JSON line of times and peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_scale_benchmark_quick_run_reports_round_time_and_peak_memory_per_site_count():
    out = subprocess.run([sys.executable, "benchmarks/scale.py", "--quick"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=900).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["benchmark"] == "scale" and result["quick"] and result["rounds"] == 2
    assert set(result["results"]) == {"3"}
    for n, r in result["results"].items():
        assert "error" not in r, r.get("error")
        assert r["seconds_per_round"] > 0 and r["first_round_seconds"] > 0
        assert r["peak_rss_mb"] > 0 and r["peak_single_rss_mb"] > 0
        assert r["peak_rss_mb_by_process"]["flwr-simulation"] > 0 and r["leftover_processes"] == 0
        assert r["participants"] == [int(n)] * 2  # every site took part in both rounds
        assert r["delivered"] == int(n)
