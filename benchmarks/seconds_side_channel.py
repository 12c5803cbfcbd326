"""What a DP site's round seconds say about its patient count, and what `dp-pad-to` costs to make them say
nothing: the main job (`oncofed simulate`, site-mode DP, 8 sites x 10 rounds) with each site padding its DP
steps to its own count (the default), then with every site padding to a public bound (`--set dp-pad-to=B`),
one run after the other in one invocation.

Per site: its training patients (its split, as the site makes it), the rows each step computes
(`privacy.sampling.step_rows`), and the median over the 10 rounds of the `train_seconds` and `round_seconds`
it sent. Per run: the correlation of the sites' median train_seconds with their counts, the largest median
over the smallest, and the sites' summed training time (the cost, as a ratio to the default run).

    python benchmarks/seconds_side_channel.py [--bound 1100] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from server.run_files import METRICS, metrics_lines  # noqa: E402


def run(out: Path, seed: int, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "oncofed", "simulate", "--out", str(out), "--set", f"seed={seed}", *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[2:])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def training_counts(out: Path, seed: int) -> dict[str, int]:
    """Each site's training patients: its split (client.site.held_out_split), as the site makes it."""
    import pandas as pd

    from client.site import held_out_split
    from privacy.run_config import load_run_config
    from shared_models.site_data import LABELS_STEM, find_table

    val_fraction = load_run_config({"schema": "s.json"}).site.val_fraction
    counts = {}
    for d in sorted((out / "sites").glob("C*")):
        ids = [str(i) for i in pd.read_csv(find_table(d, LABELS_STEM)[0], usecols=[0], dtype=str).iloc[:, 0]]
        counts[d.name] = len(held_out_split(ids, val_fraction, seed)[0])
    return counts


def per_site(out: Path, seed: int, pad_to: int, sample_rate: float) -> list[dict]:
    from privacy import PADDING_TAIL
    from privacy.sampling import step_rows

    counts = training_counts(out, seed)
    seconds: dict[str, dict[str, list[float]]] = {}
    for line in metrics_lines(out / "server" / METRICS):
        for site in line.get("sites", {}).values():
            s = seconds.setdefault(site["site"], {"train": [], "round": []})
            s["train"].append(site["train_seconds"])
            s["round"].append(site.get("round_seconds", float("nan")))
    # the main job's site-mode DP steps pad at PADDING_TAIL (client.local_round.padding_tail)
    return [{"site": name, "patients": counts[name],
             "rows": step_rows(counts[name], sample_rate, pad_to, tail=PADDING_TAIL),
             "train": statistics.median(s["train"]), "round": statistics.median(s["round"]),
             "spread": max(s["train"]) - min(s["train"]), "total": sum(s["train"])}
            for name, s in sorted(seconds.items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bound", type=int, default=1100, help="dp-pad-to: a public bound on the sites' training patients")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from privacy.run_config import load_run_config

    q = load_run_config({"schema": "s.json"}).privacy.sample_rate
    with open("/proc/loadavg") as fh:
        print(f"load average at the start: {fh.read().split()[0]}")
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for label, pad_to in (("own count (default)", 0), (f"dp-pad-to={args.bound}", args.bound)):
            out = Path(tmp) / f"pad{pad_to}"
            wall = run(out, args.seed, ["--set", f"dp-pad-to={pad_to}"])
            sites = per_site(out, args.seed, pad_to, q)
            total = sum(s["total"] for s in sites)
            base = base or total
            n = np.array([s["patients"] for s in sites], dtype=float)
            med = np.array([s["train"] for s in sites])
            rnd = np.array([s["round"] for s in sites])
            print(f"\n{label}: wall {wall:.0f} s, sites' training {total:.1f} s ({total / base:.2f}x the default)")
            print("site  patients  rows/step  median train_seconds  median round_seconds  train range over rounds")
            for s in sites:
                print(f"{s['site']:<5} {s['patients']:>8}  {s['rows']:>9}  {s['train']:>20.3f}  {s['round']:>20.3f}  "
                      f"{s['spread']:>23.3f}")
            print(f"correlation with patients of the median train_seconds: {np.corrcoef(n, med)[0, 1]:.2f} (largest "
                  f"/ smallest {med.max() / med.min():.2f}), of the median round_seconds: {np.corrcoef(n, rnd)[0, 1]:.2f} "
                  f"(largest / smallest {rnd.max() / rnd.min():.2f})")
            rows.append((label, total))
    print("\n| padding | sites' training (s) | ratio |\n|---|---|---|")
    for label, total in rows:
        print(f"| {label} | {total:.1f} | {total / base:.2f}x |")


if __name__ == "__main__":
    main()
