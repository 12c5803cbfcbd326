"""Whole DP runs, not single steps: the main job and a distributed-DP run, each with the book-keeping
clipper (dp-clipping = "ghost", the default) and with Opacus' hooks (dp-clipping = "opacus", the path
before issue 21), interleaved in one invocation so the machine's drift hits both alike.

    main          `oncofed simulate` (8 sites, 10 rounds, DP-SGD at the sites, SecAgg+)
    distributed   `oncofed simulate --rounds R --strategy fedadam --set dp-mode=distributed
                  --set trusted-sites=8 --set server-lr=0.003 --set evaluate-every=10`

Per run: the wall time of the whole command (Flower, SecAgg+, evaluation included) and the sites' own
training time (the `train_seconds` each site reports every round, summed over sites and rounds) per
DP step. Ratios are Opacus' hooks over the book-keeping clipper within one repeat.

    python benchmarks/dp_runs.py [--repeats 2] [--distributed-rounds 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {
    "main": [],
    "distributed": ["--strategy", "fedadam", "--set", "dp-mode=distributed", "--set", "trusted-sites=8",
                    "--set", "server-lr=0.003", "--set", "evaluate-every=10"],
}
CLIPPINGS = ("ghost", "opacus")


def site_training(out: Path) -> tuple[float, int]:
    """(seconds, steps) of the sites' training over the run, from the server's metrics.jsonl."""
    from server.run_files import METRICS, metrics_lines

    seconds, steps = 0.0, 0
    for line in metrics_lines(out / "server" / METRICS):
        for site in line.get("sites", {}).values():
            seconds += site.get("train_seconds", 0.0)
            steps += int(site.get("local_steps", 0))
    return seconds, steps


def one_run(kind: str, clipping: str, out: Path, rounds: int | None) -> dict:
    cmd = [sys.executable, "-m", "oncofed", "simulate", *RUNS[kind], "--set", f"dp-clipping={clipping}",
           "--out", str(out)]
    if rounds is not None:
        cmd += ["--rounds", str(rounds)]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    seconds, steps = site_training(out)
    return {"run": kind, "clipping": clipping, "wall_s": round(wall, 1), "site_train_s": round(seconds, 1),
            "steps": steps, "ms_per_step": round(1000 * seconds / max(steps, 1), 1),
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--distributed-rounds", type=int, default=40)
    ap.add_argument("--main-rounds", type=int, default=None, help="default: the main job's")
    args = ap.parse_args()
    rounds = {"main": args.main_rounds, "distributed": args.distributed_rounds}
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for kind in RUNS:
                for clipping in CLIPPINGS:
                    row = one_run(kind, clipping, Path(tmp) / f"{kind}-{clipping}-{r}", rounds[kind])
                    rows.append({**row, "repeat": r})
                    print(f"  {kind:<12} {clipping:<7} repeat {r}: {row['wall_s']} s", flush=True)
    print(f"load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}; after "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n{'run':<13}{'repeat':>7}{'clipping':>10}{'wall s':>9}{'site train s':>14}{'steps':>7}{'ms/step':>9}"
          f"{'loadavg':>9}")
    for row in rows:
        print(f"{row['run']:<13}{row['repeat']:>7}{row['clipping']:>10}{row['wall_s']:>9}{row['site_train_s']:>14}"
              f"{row['steps']:>7}{row['ms_per_step']:>9}{row['loadavg_1min']:>9}")
    ratios = []
    for r in range(args.repeats):
        for kind in RUNS:
            ghost, hooks = (next(x for x in rows if (x["run"], x["clipping"], x["repeat"]) == (kind, c, r))
                            for c in CLIPPINGS)
            ratios.append({"run": kind, "repeat": r, "site_training": round(hooks["site_train_s"] / ghost["site_train_s"], 2),
                           "wall": round(hooks["wall_s"] / ghost["wall_s"], 2)})
    print("\nOpacus' hooks / book-keeping (how much faster the default is):")
    for x in ratios:
        print(f"  {x['run']:<12} repeat {x['repeat']}: sites' training {x['site_training']:.2f}x, whole run "
              f"{x['wall']:.2f}x")
    print(json.dumps({"benchmark": "dp_runs", "rows": rows, "ratios": ratios, "loadavg_before": load_before}))


if __name__ == "__main__":
    main()
